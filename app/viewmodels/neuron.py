"""The neuron page: one view model for the HTML page, its JSON twin and its htmx partials, built panel by panel.

Every panel has one builder that takes the neuron's `NeuronViewContext` (app.viewmodels.context): the header
and universality here, the statistics panels in `app.viewmodels.stats`, family and roles in
`app.viewmodels.labels`, the examples in `app.viewmodels.examples`. `build_neuron_page` puts them together.

The JSON twin is the API's neuron endpoint, so the contract's keys (``model``, ``layer``, ``neuron``,
``excess_corr``, ``mean_corr``, ``max_corr``, ``min_corr``, ``mean_baseline``, ``universal``, ``matches``, and
the analyses' ``activation``, ``weights``, ``vocab``, ``family``, ``explanation``, ``roles``, ``examples``) are
top-level fields: `NeuronPage` extends the header and universality sections rather than nesting them. An
analysis whose table holds no rows for the model is ``null`` and its panel is hidden.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from pydantic import Field

from app.queries import neurons as nq
from app.urls import MAX_TEXT_IN_URL, neuron_label
from app.viewmodels.common import NeuronRef, ViewModel, number
from app.viewmodels.context import NeuronViewContext
from app.viewmodels.examples import Context, ExamplesPanel, build_examples
from app.viewmodels.intervene import InterveneForm, build_intervene_form
from app.viewmodels.labels import FamilyPanel, RolesPanel, build_family_panel, build_roles_panel, explanation_text
from app.viewmodels.published import PaperLabel, PublishedNote, paper_labels, published_note
from app.viewmodels.stats import (
    ActivationPanel,
    TokenTablesPanel,
    VocabPanel,
    WeightsPanel,
    build_activation_panel,
    build_token_tables_panel,
    build_vocab_panel,
    build_weights_panel,
)

#: Reverse matches ("matched by") listed per neuron.
MATCHED_BY_ROWS = 12


class PartnerScore(ViewModel):
    """Universality against one partner model (paper-spec §2.4)."""

    model: str = Field(description="Partner model")
    best: NeuronRef = Field(description="The partner neuron with the highest correlation (the twin)")
    corr: float | None = Field(description="maxcorr: correlation with the twin")
    baseline_corr: float | None = Field(description="Best correlation with the partner's rotated units")
    baseline_layer: int = Field(description="Layer of the best rotated unit")
    baseline_unit: int = Field(description="Index of the best rotated unit")
    excess: float | None = Field(description="corr − baseline_corr for this partner")


class Match(ViewModel):
    """One of the best-matching neurons in a partner model."""

    model: str = Field(description="Partner model")
    layer: int = Field(description="Partner neuron's layer")
    neuron: int = Field(description="Partner neuron's index")
    corr: float | None = Field(description="Pearson correlation of the activations")
    rank: int = Field(description="0 = the best match in that partner")
    id: str = Field(description="Display id L{layer}N{neuron}")
    url: str = Field(description="The partner neuron's page")


class NeuronHeader(ViewModel):
    """Which neuron this is, and where it lives."""

    model: str = Field(description="Model name")
    run: int = Field(description="Run id")
    layer: int
    neuron: int
    id: str = Field(description="L{layer}N{neuron}")
    url: str = Field(description="This page")
    permalink: str = Field(description="This page pinned to its run")
    api_url: str = Field(description="This JSON")
    family_models: list[str] = Field(description="Models of the family")


class UniversalityPanel(ViewModel):
    """How universal the neuron is: its correlations with the partner models against the rotated baselines."""

    dead: bool = Field(description="Zero variance over the counted tokens")
    universal: bool | None = Field(description="excess_corr > threshold (None when aggregates are missing)")
    threshold: float = Field(description="The universality threshold in effect (?threshold=, default: the run's)")
    excess_corr: float | None = Field(description="mean_corr − mean_baseline (paper eq. 3)")
    mean_corr: float | None
    max_corr: float | None
    min_corr: float | None
    mean_baseline: float | None
    max_baseline: float | None
    min_baseline: float | None
    partners: list[PartnerScore] = Field(description="Per partner model: twin, ρ, baseline, excess")
    matches: list[Match] = Field(description="Top partner neurons, grouped by partner model, best first")
    matched_by: list[Match] = Field(description="Neurons of other models that list this one among their matches")


class Navigation(ViewModel):
    prev: NeuronRef | None
    next: NeuronRef | None
    prev_universal: NeuronRef | None
    next_universal: NeuronRef | None
    random_url: str
    random_universal_url: str
    model_url: str
    layer_url: str = Field(description="The explorer filtered to this layer")


class LiveForm(ViewModel):
    enabled: bool
    text: str | None = Field(description="The text in the URL (?text=)")
    max_chars: int = Field(description="Longest text the form sends: the server's limit, within a URL's")
    max_tokens: int
    partial_url: str | None = Field(description="htmx fragment with the result for `text`")
    api_url: str = Field(description="POST endpoint of live runs")
    intervene: InterveneForm = Field(description="Clamp or ablate this neuron (and its twins) on a text")


class PublishedPanel(PublishedNote):
    """A neuron of a run imported from the paper's table: the run's note, and the paper's labels of the neuron."""

    listed: bool = Field(
        description="The neuron is a row of the table; False: the table does not list it (not universal there)"
    )
    labels: list[PaperLabel] = Field(
        description="The paper's prediction/suppression labels (prediction_neurons.csv; GPT-2-medium-a only)"
    )


class Badge(NamedTuple):
    """A label next to the neuron's name; `kind` picks its colour (a CSS class, empty for a plain badge)."""

    label: str
    kind: str


class NeuronPage(UniversalityPanel, NeuronHeader):
    """Everything known about one neuron (the header's fields first, then the universality's, then the panels)."""

    activation: ActivationPanel | None
    weights: WeightsPanel | None
    vocab: VocabPanel | None
    tokens: TokenTablesPanel | None
    family: FamilyPanel | None
    explanation: str | None = Field(description="One-line summary of the family and roles")
    roles: RolesPanel | None
    examples: ExamplesPanel | None = Field(description="Top examples")
    nav: Navigation
    live: LiveForm
    vocab_histogram_url: str | None = Field(description="htmx fragment: histogram of W_U·w_out from the weights")
    twins_url: str | None = Field(description="htmx fragment: top examples coloured by each twin")
    twins_api_url: str | None
    published: PublishedPanel | None = Field(
        description="For a run imported from the paper's tables: what it holds and lacks, and the paper's labels "
        "(None for a run computed here)"
    )

    @property
    def badges(self) -> list[Badge]:
        """What the heading says about the neuron: universality, dead, family and roles."""
        badges = []
        if self.universal:
            badges.append(Badge("universal", "universal"))
        elif self.universal is None and not self.published:
            badges.append(Badge("no aggregates", ""))
        if self.dead:
            badges.append(Badge("dead", "dead"))
        if self.published:
            badges.append(Badge("published" if self.published.listed else "not in the paper's table", "published"))
            badges.extend(Badge(f"paper: {label.role} ({label.feature})", "role") for label in self.published.labels)
        if self.family and self.family.labelled:
            badges.append(Badge(self.family.family, "family"))
        if self.roles:
            if self.roles.vocab_role:
                badges.append(Badge(self.roles.vocab_role, "role"))
            if self.roles.attention_role:
                badges.append(Badge(f"attention {self.roles.attention_role}", "role"))
            if self.roles.entropy_candidate:
                badges.append(Badge(f"entropy candidate #{self.roles.entropy_position}", "role"))
        return badges

    @property
    def has_analyses(self) -> bool:
        """Any analysis beyond universality was computed for this neuron's model."""
        return any((self.examples, self.activation, self.vocab, self.weights, self.family, self.roles))

    @property
    def share_title(self) -> str:
        """The title a link preview shows (``og:title``)."""
        return f"{self.model} {self.id}" + (" (universal)" if self.universal else "")

    @property
    def share_description(self) -> str:
        """One line for link previews (``<meta name="description">``, ``og:description``): the excess correlation
        against the threshold, the family and the roles."""
        if self.dead:
            universality = "dead neuron (never varied, no correlations)"
        elif self.excess_corr is None:
            universality = "no universality scores"
        else:
            verdict = "universal" if self.universal else "not universal"
            universality = f"excess correlation {self.excess_corr:.3f} ({verdict} at > {self.threshold:g})"
        family = "family: " + (self.family.family if self.family and self.family.labelled else "none")
        if self.family and self.family.best_feature:  # what it responds to best, labelled or not
            family += f" (best feature {self.family.best_feature})"
        roles = [b.label for b in self.badges if b.kind == "role"]
        return f"{self.model} {self.id}: {universality}; {family}; role: {', '.join(roles) or 'none'}"


def build_header(view: NeuronViewContext) -> NeuronHeader:
    scope, name = view.scope, view.model.name
    return NeuronHeader(
        model=name,
        run=scope.run.id,
        layer=view.layer,
        neuron=view.neuron,
        id=view.label,
        url=scope.neuron_url(name, view.layer, view.neuron),
        permalink=scope.neuron_url(name, view.layer, view.neuron, pin=True),
        api_url=scope.api_neuron_url(name, view.layer, view.neuron),
        family_models=[m.name for m in scope.models],
    )


def _match(view: NeuronViewContext, row: nq.MatchRow) -> Match:
    return Match(
        model=row.model,
        layer=row.layer,
        neuron=row.neuron,
        corr=number(row.corr),
        rank=row.rank,
        id=neuron_label(row.layer, row.neuron),
        url=view.scope.neuron_url(row.model, row.layer, row.neuron),
    )


def build_universality(view: NeuronViewContext) -> UniversalityPanel:
    conn, (model_id, layer, neuron) = view.conn, view.key
    scores = nq.get_neuron(conn, model_id, layer, neuron, view.scope.custom_threshold)
    return UniversalityPanel(
        dead=scores.dead if scores else False,
        universal=scores.universal if scores else None,
        threshold=view.threshold,
        excess_corr=number(scores.excess_corr) if scores else None,
        mean_corr=number(scores.mean_corr) if scores else None,
        max_corr=number(scores.max_corr) if scores else None,
        min_corr=number(scores.min_corr) if scores else None,
        mean_baseline=number(scores.mean_baseline) if scores else None,
        max_baseline=number(scores.max_baseline) if scores else None,
        min_baseline=number(scores.min_baseline) if scores else None,
        partners=[
            PartnerScore(
                model=p.partner,
                best=NeuronRef.build(view.scope, p.partner, p.max_layer, p.max_neuron),
                corr=number(p.max_corr),
                baseline_corr=number(p.baseline_corr),
                baseline_layer=p.baseline_layer,
                baseline_unit=p.baseline_unit,
                excess=number(p.max_corr - p.baseline_corr),
            )
            for p in nq.partner_scores(conn, model_id, layer, neuron)
        ],
        matches=[_match(view, m) for m in nq.matches(conn, model_id, layer, neuron)],
        matched_by=[_match(view, m) for m in nq.matched_by(conn, model_id, layer, neuron, MATCHED_BY_ROWS)],
    )


def _neighbour(view: NeuronViewContext, flat: int) -> NeuronRef | None:
    """The neuron at a flat index (layer × d_mlp + neuron) of the model, if there is one."""
    model = view.model
    if not 0 <= flat < model.n_neurons:
        return None
    return NeuronRef.build(view.scope, model.name, *divmod(flat, model.d_mlp))


def _universal_neighbour(view: NeuronViewContext, direction: Literal["prev", "next"]) -> NeuronRef | None:
    """The previous or next universal neuron of the model (at the threshold in effect)."""
    found = nq.neighbour_universal(
        view.conn, view.model.id, view.layer, view.neuron, direction, view.scope.custom_threshold
    )
    return NeuronRef.build(view.scope, view.model.name, *found) if found else None


def build_navigation(view: NeuronViewContext) -> Navigation:
    scope, model = view.scope, view.model
    flat = view.layer * model.d_mlp + view.neuron
    return Navigation(
        prev=_neighbour(view, flat - 1),
        next=_neighbour(view, flat + 1),
        prev_universal=_universal_neighbour(view, "prev"),
        next_universal=_universal_neighbour(view, "next"),
        random_url=scope.random_url(model.name),
        random_universal_url=scope.random_url(model.name, {"universal": True}),
        model_url=scope.model_url(model.name),
        layer_url=scope.model_url(model.name, {"layer": view.layer}),
    )


def build_live_form(
    view: NeuronViewContext, text: str | None, clamp: float | str | None = None, positions: str | None = None
) -> LiveForm:
    """The "try your own text" form; it sends the text in the URL (shareable), so a URL's bound applies too.
    The intervention form beside it keeps its value and positions in the URL too (``?clamp=5&positions=3,4``)."""
    scope, settings = view.scope, view.settings
    return LiveForm(
        enabled=settings.live_enabled and not view.model.published,  # a published table has no weights to run
        text=text,
        max_chars=min(settings.live_max_chars, MAX_TEXT_IN_URL),
        max_tokens=view.live.max_tokens(scope.models),
        # A URL with an intervention shares that: the live panel then waits for its button (fewer live runs at once).
        partial_url=scope.partial_url(view.model.name, view.layer, view.neuron, "live", {"text": text})
        if text and clamp is None
        else None,
        api_url=scope.api_model_url(view.model.name, "/run"),
        intervene=build_intervene_form(view, text, clamp, positions),
    )


def build_neuron_page(
    view: NeuronViewContext,
    context: Context = "snippet",
    text: str | None = None,
    clamp: float | str | None = None,
    positions: str | None = None,
) -> NeuronPage:
    """The whole page: every panel's builder, and the URLs of the panels that load later (htmx).

    Args:
        context: how the top examples are shown (``snippet`` around the peak, or ``full``).
        text: a live text from the URL, run when the page loads.
        clamp, positions: an intervention from the URL, run on `text` when the page loads.
    """
    settings, scope, name, layer, neuron = view.settings, view.scope, view.model.name, view.layer, view.neuron
    universality = build_universality(view)
    vocab = build_vocab_panel(view)
    family = build_family_panel(view)
    roles = build_roles_panel(view)
    examples = build_examples(view, "top", context, settings.top_examples) if settings.top_examples else None
    has_twins = (
        settings.live_enabled and settings.twin_examples > 0 and bool(universality.partners) and examples is not None
    )
    return NeuronPage(
        **dict(build_header(view)),
        **dict(universality),
        activation=build_activation_panel(view),
        weights=build_weights_panel(view),
        vocab=vocab,
        tokens=build_token_tables_panel(view),
        family=family,
        explanation=explanation_text(family, roles),
        roles=roles,
        examples=examples,
        nav=build_navigation(view),
        live=build_live_form(view, text, clamp, positions),
        # Without stored token tables, the histogram's fragment lists the extreme tokens itself.
        vocab_histogram_url=scope.partial_url(name, layer, neuron, "vocab", {"tokens": vocab is None})
        if settings.live_enabled and not view.model.published
        else None,
        twins_url=scope.partial_url(name, layer, neuron, "twins", {"context": context}) if has_twins else None,
        twins_api_url=scope.api_neuron_url(name, layer, neuron, "/twins") if has_twins else None,
        published=build_published_panel(view, listed=universality.excess_corr is not None),
    )


def build_published_panel(view: NeuronViewContext, listed: bool) -> PublishedPanel | None:
    """What the paper's table holds and lacks for this neuron's run, and its labels of the neuron (issue 7)."""
    note = published_note(view.scope.run)
    if note is None:
        return None
    labels = paper_labels(view.scope.run, view.model, view.layer, view.neuron)
    return PublishedPanel(**dict(note), listed=listed, labels=labels)
