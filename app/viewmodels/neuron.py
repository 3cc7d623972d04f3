"""The neuron page: one view model for the HTML page, its JSON twin and its htmx partials.

The JSON twin is the API's neuron endpoint, so the contract's keys (``model``, ``layer``, ``neuron``,
``excess_corr``, ``mean_corr``, ``max_corr``, ``min_corr``, ``mean_baseline``, ``universal``, ``matches``, and
the analyses' ``activation``, ``weights``, ``vocab``, ``family``, ``explanation``, ``roles``, ``examples``) are
top-level fields here. An analysis whose table holds no rows for the model is ``null`` and its panel is hidden.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import Field

from app.queries import analyses as q
from app.queries import neurons as nq
from app.queries.models import Model
from app.settings import Settings
from app.urls import Scope, neuron_label
from app.viewmodels.common import NeuronRef, TokenValue, ViewModel, number, rounded

Context = Literal["snippet", "full"]
ExampleKind = Literal["top", "quantile", "random"]

#: Rows kept per token table and per feature list on a page.
TOKEN_TABLE_ROWS = 10
FEATURE_ROWS = 10
ATTENTION_ROWS = 10
PATH_POINTS = 400
MATCHED_BY_ROWS = 12
#: Entropy ranks below this are called out (every neuron of the last layers has a rank).
ENTROPY_TOP = 10


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


class HistogramData(ViewModel):
    """Counts of one hook's activation over fixed bins."""

    hook: str = Field(description="hook_pre or hook_post")
    low: float = Field(description="Left edge of the first regular bin")
    high: float = Field(description="Right edge of the last regular bin")
    counts: list[int] = Field(description="Counts of the regular bins")
    underflow: int = Field(description="Count below `low`")
    overflow: int = Field(description="Count above `high`")


class PositionProfileData(ViewModel):
    hook: str = Field(description="hook_pre or hook_post")
    mean: list[float] = Field(description="Mean activation at each position")
    std: list[float] = Field(description="Standard deviation at each position")
    count: list[int] = Field(description="Counted tokens at each position")


class ActivationPanel(ViewModel):
    """Activation moments (of mlp.hook_pre and hook_post), histograms and the position profile."""

    n_tokens: int | None = Field(description="Counted tokens the moments cover")
    stats: dict[str, float | None] = Field(description="pre_/post_ mean, var, skew, kurt, min, max; frequency")
    percentiles: dict[str, float] = Field(description="Within-layer percentile (0-100) of each statistic")
    histograms: list[HistogramData] = Field(description="Activation histograms per hook")
    position_profiles: list[PositionProfileData] = Field(description="Mean ± std by position per hook")


class WeightsPanel(ViewModel):
    """Weight statistics of the processed weights (paper-spec §3.2)."""

    stats: dict[str, float | None] = Field(description="w_in_norm, w_out_norm, input_bias, in_out_sim, l2_penalty, ...")
    percentiles: dict[str, float] = Field(description="Within-layer percentile (0-100) of each statistic (Fig. 3)")


class VocabPanel(ViewModel):
    """The neuron's direct effect on the vocabulary (W_U w_out) and its input tokens (W_E w_in)."""

    unembed_top: list[TokenValue] = Field(description="Tokens w_out promotes most")
    unembed_bottom: list[TokenValue] = Field(description="Tokens w_out suppresses most")
    embed_top: list[TokenValue] = Field(description="Input tokens that excite w_in most")
    moments: dict[str, float | None] = Field(description="vocab_mean/var/skew/kurt of cos(W_U, w_out)")


class VocabHistogram(ViewModel):
    """The distribution of the neuron's direct logit effect ``W_U·w_out`` over the whole vocabulary (paper Fig. 5),
    computed from the model's weights."""

    bin_edges: list[float] = Field(description="Edges of the histogram bins")
    counts: list[int] = Field(description="Tokens per bin")
    top: list[TokenValue] = Field(description="Tokens with the largest effect")
    bottom: list[TokenValue] = Field(description="Tokens with the smallest (most negative) effect")
    moments: dict[str, float | None] = Field(description="mean, var, skew, kurt of the effect")


class TokenTablesPanel(ViewModel):
    mean_activation: list[TokenValue] = Field(description="Tokens with the highest mean activation")
    max_activation: list[TokenValue] = Field(description="Tokens with the highest max activation")


class FeatureScore(ViewModel):
    rank: int
    feature: str = Field(description="e.g. token:def, prev_token:(, syntax:keyword")
    feature_set: str = Field(
        description="unigram | alphabet | token_class | previous_token | position | syntax | spacy"
    )
    variance_reduction: float | None = Field(description="Paper eq. 4")
    fraction: float | None = Field(description="Share of counted tokens where the feature holds")


class FamilyPanel(ViewModel):
    """The neuron family (paper §4.3) and the evidence for it."""

    family: str = Field(description="unigram | alphabet | previous_token | position | syntax | semantic | none")
    best_feature: str | None = Field(description="The feature that explains the activation best")
    best_vr: float | None = Field(description="Its variance reduction")
    position_mi: float | None = Field(description="Mutual information of firing with position")
    evidence: Any = Field(description="How the label was reached (stage-defined JSON)")
    features: list[FeatureScore] = Field(description="The best features by variance reduction")


class EntropyPoint(ViewModel):
    value: float = Field(description="The fixed activation")
    is_baseline: bool = Field(description="A random last-two-layer neuron, for comparison")
    ln_scale: float | None
    entropy: float | None
    loss: float | None
    reciprocal_rank: float | None
    n_tokens: int


class AttentionScore(ViewModel):
    rank: int
    attention_layer: int
    head: int
    score: float | None


class PathAblationData(ViewModel):
    attention_layer: int
    head: int
    pearson_bos: float | None
    spearman_bos: float | None
    pearson_norm: float | None
    spearman_norm: float | None
    n_points: int
    points: list[list[float]] = Field(description=f"Up to {PATH_POINTS} (activation, Δ BOS attention, Δ |z|)")


class RolesPanel(ViewModel):
    """Functional roles (paper §5) with their evidence."""

    vocab_role: str | None = Field(description="prediction | suppression | partition")
    entropy_rank: int | None = Field(description="Rank among entropy-neuron candidates")
    attention_role: str | None = Field(description="deactivation | activation")
    attention_layer: int | None
    attention_head: int | None
    attention_score: float | None
    evidence: dict[str, float | None] = Field(description="The weight statistics the vocab role rule reads")
    entropy_interventions: list[EntropyPoint] = Field(description="This neuron's curve, when it has one")
    entropy_baseline: list[EntropyPoint] = Field(description="Mean curve of the model's random baseline neurons")
    attention_scores: list[AttentionScore]
    path_ablations: list[PathAblationData]


class Example(ViewModel):
    """A stored example: a snippet of a dataset row with every token's activation."""

    kind: str = Field(description="top | quantile | random")
    rank: int
    bin: int = Field(description="Quantile bin (0 for top and random)")
    dataset_row: int
    start: int = Field(description="Position in the row of the snippet's first token")
    peak: int = Field(description="Index in `tokens` of the example's token")
    activation: float | None = Field(description="hook_post at the peak token")
    tokens: list[str] = Field(description="Decoded token texts")
    token_ids: list[int]
    activations: list[float] = Field(description="hook_post of every token")
    window: tuple[int, int] = Field(description="[first, last) token shown in the current context mode")


class ExampleGroup(ViewModel):
    bin: int
    bin_low: float | None = Field(description="Activation range of the bin")
    bin_high: float | None
    bin_fraction: float | None = Field(description="Share of counted tokens in the bin")
    examples: list[Example]


class ExamplesPanel(ViewModel):
    """Examples of one kind (the page shows the top ones; quantile and random groups load lazily)."""

    kind: str = Field(description="top | quantile | random")
    context: Context = Field(description="snippet (around the peak) or full (the whole stored snippet)")
    scale: float = Field(description="|activation| that gets full colour (shared by all examples of the neuron)")
    groups: list[ExampleGroup] = Field(description="One group for top/random; one per bin for quantile")
    counts: dict[str, int] = Field(description="Stored examples per kind")


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
    max_chars: int
    max_tokens: int
    partial_url: str | None = Field(description="htmx fragment with the result for `text`")
    api_url: str = Field(description="POST endpoint of live runs")


class NeuronPage(ViewModel):
    """Everything known about one neuron."""

    model: str = Field(description="Model name")
    run: int = Field(description="Run id")
    layer: int
    neuron: int
    id: str = Field(description="L{layer}N{neuron}")
    url: str = Field(description="This page")
    permalink: str = Field(description="This page pinned to its run")
    api_url: str = Field(description="This JSON")
    family_models: list[str] = Field(description="Models of the family")
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


ACTIVATION_STATS = (
    "pre_mean",
    "pre_var",
    "pre_skew",
    "pre_kurt",
    "pre_min",
    "pre_max",
    "frequency",
    "post_mean",
    "post_var",
    "post_skew",
    "post_kurt",
    "post_min",
    "post_max",
)
WEIGHT_STATS = ("w_in_norm", "w_out_norm", "input_bias", "in_out_sim", "l2_penalty", "null_space_fraction")
VOCAB_MOMENTS = ("vocab_mean", "vocab_var", "vocab_skew", "vocab_kurt")


def token_text(vocab: Sequence[str], token_id: int) -> str:
    return vocab[token_id] if 0 <= token_id < len(vocab) else f"<{token_id}>"


def token_texts(vocab: Sequence[str], ids: list[int]) -> list[str]:
    """Decoded texts of many token ids (ids outside the vocabulary show as ``<id>``).

    >>> token_texts(["a", "b"], [1, 0, 7])
    ['b', 'a', '<7>']
    """
    if ids and min(ids) >= 0 and max(ids) < len(vocab):
        return [vocab[i] for i in ids]  # the common case, without a call per token
    return [token_text(vocab, i) for i in ids]


def _token_values(rows: list[sqlite3.Row] | None, vocab: Sequence[str]) -> list[TokenValue]:
    return [
        TokenValue(
            token_id=r["token_id"], token=token_text(vocab, r["token_id"]), value=number(r["value"]), count=r["count"]
        )
        for r in rows or []
    ]


def example_view(row: q.ExampleRow, vocab: Sequence[str], context: Context, settings: Settings) -> Example:
    n = int(row.token_ids.size)
    peak = min(max(int(row.peak), 0), n - 1)
    window = (
        (0, n)
        if context == "full"
        else (max(0, peak - settings.snippet_before), min(n, peak + settings.snippet_after + 1))
    )
    ids = row.token_ids.tolist()
    return Example(
        kind=row.kind,
        rank=row.rank,
        bin=row.bin,
        dataset_row=row.dataset_row,
        start=row.start,
        peak=peak,
        activation=number(row.activation),
        tokens=token_texts(vocab, ids),
        token_ids=ids,
        activations=rounded(row.activations),
        window=window,
    )


def example_scale(rows: Sequence[q.ExampleRow], post_max: float | None = None) -> float:
    """The |activation| that gets full colour: the largest of the neuron's stored max and its shown examples."""
    values = [abs(float(post_max))] if post_max is not None and np.isfinite(post_max) else []
    values += [float(np.abs(r.activations).max()) for r in rows if r.activations.size]
    return max([1e-6, *values])


def build_examples(
    conn: sqlite3.Connection,
    key: q.Key,
    kind: ExampleKind,
    context: Context,
    settings: Settings,
    vocab: Sequence[str],
    limit: int,
    stats: sqlite3.Row | None = None,
) -> ExamplesPanel | None:
    counts = q.example_kinds(conn, key)
    if not counts:
        return None
    rows = q.examples(conn, key, kind, limit)
    stats = stats if stats is not None else q.activation_stats(conn, key)
    scale_rows = rows if kind == "top" else q.examples(conn, key, "top", 1) + rows
    scale = example_scale(scale_rows, stats["post_max"] if stats else None)
    groups: dict[int, list[q.ExampleRow]] = {}
    for row in rows:
        groups.setdefault(row.bin, []).append(row)
    return ExamplesPanel(
        kind=kind,
        context=context,
        scale=round(scale, 6),
        counts=counts,
        groups=[
            ExampleGroup(
                bin=bin_,
                bin_low=number(members[0].bin_low),
                bin_high=number(members[0].bin_high),
                bin_fraction=number(members[0].bin_fraction),
                examples=[example_view(r, vocab, context, settings) for r in members],
            )
            for bin_, members in sorted(groups.items())
        ],
    )


def _activation_panel(
    conn: sqlite3.Connection, key: q.Key, tables: frozenset[str], pct: dict[str, float], stats: sqlite3.Row | None
) -> ActivationPanel | None:
    if not tables & {"activation_stats", "histograms", "position_profiles"}:
        return None
    histograms = q.histograms(conn, key) if "histograms" in tables else []
    profiles = q.position_profiles(conn, key) if "position_profiles" in tables else []
    if stats is None and not histograms and not profiles:
        return None
    return ActivationPanel(
        n_tokens=stats["n_tokens"] if stats else None,
        stats={name: number(stats[name]) for name in ACTIVATION_STATS} if stats else {},
        percentiles={k: round(v, 2) for k, v in pct.items() if k in ACTIVATION_STATS},
        histograms=[
            HistogramData(
                hook=h.hook,
                low=h.low,
                high=h.high,
                counts=h.counts[1:-1].tolist(),
                underflow=int(h.counts[0]),
                overflow=int(h.counts[-1]),
            )
            for h in histograms
        ],
        position_profiles=[
            PositionProfileData(hook=p.hook, mean=rounded(p.mean), std=rounded(p.std), count=p.count.tolist())
            for p in profiles
        ],
    )


def _entropy_point(e: sqlite3.Row) -> EntropyPoint:
    return EntropyPoint(
        value=e["value"],
        is_baseline=bool(e["is_baseline"]),
        ln_scale=number(e["ln_scale"]),
        entropy=number(e["entropy"]),
        loss=number(e["loss"]),
        reciprocal_rank=number(e["reciprocal_rank"]),
        n_tokens=e["n_tokens"],
    )


def _roles_panel(
    conn: sqlite3.Connection, key: q.Key, tables: frozenset[str], weights: sqlite3.Row | None
) -> RolesPanel | None:
    row = q.roles(conn, key) if "roles" in tables else None
    entropy = q.entropy_interventions(conn, key) if "entropy_interventions" in tables else []
    attention = q.attention_scores(conn, key, ATTENTION_ROWS) if "attention_scores" in tables else []
    paths = q.path_ablations(conn, key) if "path_ablations" in tables else []
    if row is None and not entropy and not attention and not paths:
        return None
    baseline = q.entropy_baseline(conn, key[0]) if entropy else []
    evidence = (
        {k: number(weights[k]) for k in ("vocab_kurt", "vocab_skew", "vocab_var", "null_space_fraction", "w_out_norm")}
        if weights
        else {}
    )
    return RolesPanel(
        vocab_role=row["vocab_role"] if row else None,
        entropy_rank=row["entropy_rank"] if row else None,
        attention_role=row["attention_role"] if row else None,
        attention_layer=row["attention_layer"] if row else None,
        attention_head=row["attention_head"] if row else None,
        attention_score=number(row["attention_score"]) if row else None,
        evidence=evidence,
        entropy_interventions=[_entropy_point(e) for e in entropy],
        entropy_baseline=[_entropy_point(e) for e in baseline],
        attention_scores=[
            AttentionScore(
                rank=a["rank"], attention_layer=a["attention_layer"], head=a["head"], score=number(a["score"])
            )
            for a in attention
        ],
        path_ablations=[
            PathAblationData(
                attention_layer=p.attention_layer,
                head=p.head,
                pearson_bos=number(p.pearson_bos),
                spearman_bos=number(p.spearman_bos),
                pearson_norm=number(p.pearson_norm),
                spearman_norm=number(p.spearman_norm),
                n_points=p.n_points,
                points=np.round(p.points[:PATH_POINTS].astype(np.float64), 4).tolist(),
            )
            for p in paths
        ],
    )


def explanation_text(family: FamilyPanel | None, roles: RolesPanel | None) -> str | None:
    """A one-line summary of what is known about the neuron's function.

    >>> explanation_text(None, None) is None
    True
    """
    parts = []
    if family is not None and family.family != "none":
        text = f"{family.family.replace('_', ' ')} neuron"
        if family.best_feature:
            text += f": best explained by {family.best_feature}"
            if family.best_vr is not None:
                text += f" (variance reduction {family.best_vr:.2f})"
        if family.position_mi is not None and family.family == "position":
            text += f", position MI {family.position_mi:.2f}"
        parts.append(text)
    if roles is not None:
        if roles.vocab_role:
            parts.append(f"{roles.vocab_role} neuron")
        if roles.entropy_rank is not None and roles.entropy_rank < ENTROPY_TOP:
            parts.append(f"entropy-neuron candidate #{roles.entropy_rank + 1}")
        if roles.attention_role:
            parts.append(f"attention {roles.attention_role} neuron (L{roles.attention_layer}H{roles.attention_head})")
    return "; ".join(parts) if parts else None


def _ref(scope: Scope, model: Model, layer: int, neuron: int) -> NeuronRef | None:
    if not (0 <= layer < model.n_layers and 0 <= neuron < model.d_mlp):
        return None
    return NeuronRef.build(scope, model.name, layer, neuron)


def navigation(conn: sqlite3.Connection, scope: Scope, model: Model, layer: int, neuron: int) -> Navigation:
    flat = layer * model.d_mlp + neuron
    prev_flat, next_flat = flat - 1, flat + 1
    prev_u = nq.neighbour_universal(conn, model.id, layer, neuron, "prev", scope.custom_threshold)
    next_u = nq.neighbour_universal(conn, model.id, layer, neuron, "next", scope.custom_threshold)
    return Navigation(
        prev=_ref(scope, model, *divmod(prev_flat, model.d_mlp)) if prev_flat >= 0 else None,
        next=_ref(scope, model, *divmod(next_flat, model.d_mlp)) if next_flat < model.n_neurons else None,
        prev_universal=NeuronRef.build(scope, model.name, *prev_u) if prev_u else None,
        next_universal=NeuronRef.build(scope, model.name, *next_u) if next_u else None,
        random_url=scope.random_url(model.name),
        random_universal_url=scope.random_url(model.name, {"universal": True}),
        model_url=scope.model_url(model.name),
        layer_url=scope.model_url(model.name, {"layer": layer}),
    )


def build_neuron_page(
    conn: sqlite3.Connection,
    scope: Scope,
    model: Model,
    layer: int,
    neuron: int,
    settings: Settings,
    vocab: Sequence[str],
    tables: frozenset[str],
    context: Context = "snippet",
    text: str | None = None,
    live_max_tokens: int | None = None,
) -> NeuronPage:
    key = (model.id, layer, neuron)
    row = nq.get_neuron(conn, model.id, layer, neuron, scope.custom_threshold)
    partners = [
        PartnerScore(
            model=p["partner"],
            best=NeuronRef.build(scope, p["partner"], p["max_layer"], p["max_neuron"]),
            corr=number(p["max_corr"]),
            baseline_corr=number(p["baseline_corr"]),
            baseline_layer=p["baseline_layer"],
            baseline_unit=p["baseline_unit"],
            excess=number(p["max_corr"] - p["baseline_corr"]),
        )
        for p in nq.partner_scores(conn, model.id, layer, neuron)
    ]
    matches = [
        Match(
            model=m["partner"],
            layer=m["partner_layer"],
            neuron=m["partner_neuron"],
            corr=number(m["corr"]),
            rank=m["rank"],
            id=neuron_label(m["partner_layer"], m["partner_neuron"]),
            url=scope.neuron_url(m["partner"], m["partner_layer"], m["partner_neuron"]),
        )
        for m in nq.matches(conn, model.id, layer, neuron)
    ]
    matched_by = [
        Match(
            model=m["model"],
            layer=m["layer"],
            neuron=m["neuron"],
            corr=number(m["corr"]),
            rank=m["rank"],
            id=neuron_label(m["layer"], m["neuron"]),
            url=scope.neuron_url(m["model"], m["layer"], m["neuron"]),
        )
        for m in nq.matched_by(conn, model.id, layer, neuron, MATCHED_BY_ROWS)
    ]
    pct = q.percentiles(conn, key) if "percentiles" in tables else {}
    weights_row = q.weight_stats(conn, key) if "weight_stats" in tables else None
    weights = (
        WeightsPanel(
            stats={k: number(weights_row[k]) for k in WEIGHT_STATS},
            percentiles={k: round(v, 2) for k, v in pct.items() if k in WEIGHT_STATS or k in VOCAB_MOMENTS},
        )
        if weights_row
        else None
    )
    token_rows = q.token_tables(conn, key, TOKEN_TABLE_ROWS) if "token_tables" in tables else {}
    vocab_panel = None
    if weights_row is not None or token_rows.keys() & {"unembed_top", "unembed_bottom", "embed_top"}:
        vocab_panel = VocabPanel(
            unembed_top=_token_values(token_rows.get("unembed_top"), vocab),
            unembed_bottom=_token_values(token_rows.get("unembed_bottom"), vocab),
            embed_top=_token_values(token_rows.get("embed_top"), vocab),
            moments={k: number(weights_row[k]) for k in VOCAB_MOMENTS} if weights_row else {},
        )
    tokens_panel = None
    if token_rows.keys() & {"mean_activation", "max_activation"}:
        tokens_panel = TokenTablesPanel(
            mean_activation=_token_values(token_rows.get("mean_activation"), vocab),
            max_activation=_token_values(token_rows.get("max_activation"), vocab),
        )
    family_row = q.family(conn, key) if "families" in tables else None
    features = q.feature_scores(conn, key, FEATURE_ROWS) if "feature_scores" in tables else []
    family = None
    if family_row is not None or features:
        family = FamilyPanel(
            family=family_row["family"] if family_row else "none",
            best_feature=family_row["best_feature"] if family_row else None,
            best_vr=number(family_row["best_vr"]) if family_row else None,
            position_mi=number(family_row["position_mi"]) if family_row else None,
            evidence=q.parse_json(family_row["evidence"]) if family_row else None,
            features=[
                FeatureScore(
                    rank=f["rank"],
                    feature=f["feature"],
                    feature_set=f["feature_set"],
                    variance_reduction=number(f["variance_reduction"]),
                    fraction=number(f["fraction"]),
                )
                for f in features
            ],
        )
    roles = _roles_panel(conn, key, tables, weights_row)
    stats = q.activation_stats(conn, key) if "activation_stats" in tables else None
    examples = (
        build_examples(conn, key, "top", context, settings, vocab, settings.top_examples, stats)
        if "examples" in tables and settings.top_examples
        else None
    )
    has_twins = bool(partners) and examples is not None and settings.twin_examples > 0 and settings.live_enabled
    return NeuronPage(
        model=model.name,
        run=scope.run.id,
        layer=layer,
        neuron=neuron,
        id=neuron_label(layer, neuron),
        url=scope.neuron_url(model.name, layer, neuron),
        permalink=scope.neuron_url(model.name, layer, neuron, pin=True),
        api_url=scope.api_neuron_url(model.name, layer, neuron),
        family_models=[m.name for m in scope.models],
        dead=bool(row["dead"]) if row else False,
        universal=None if row is None or row["universal"] is None else bool(row["universal"]),
        threshold=scope.threshold,
        excess_corr=number(row["excess_corr"]) if row else None,
        mean_corr=number(row["mean_corr"]) if row else None,
        max_corr=number(row["max_corr"]) if row else None,
        min_corr=number(row["min_corr"]) if row else None,
        mean_baseline=number(row["mean_baseline"]) if row else None,
        max_baseline=number(row["max_baseline"]) if row else None,
        min_baseline=number(row["min_baseline"]) if row else None,
        partners=partners,
        matches=matches,
        matched_by=matched_by,
        activation=_activation_panel(conn, key, tables, pct, stats),
        weights=weights,
        vocab=vocab_panel,
        tokens=tokens_panel,
        family=family,
        explanation=explanation_text(family, roles),
        roles=roles,
        examples=examples,
        nav=navigation(conn, scope, model, layer, neuron),
        live=LiveForm(
            enabled=settings.live_enabled,
            text=text,
            max_chars=settings.live_max_chars,
            max_tokens=live_max_tokens or settings.live_max_tokens,
            partial_url=scope.partial_url(model.name, layer, neuron, "live", {"text": text}) if text else None,
            api_url=scope.api_url(f"{scope.api_model_path(model.name)}/run"),
        ),
        vocab_histogram_url=scope.partial_url(model.name, layer, neuron, "vocab", {"tokens": vocab_panel is None})
        if settings.live_enabled
        else None,
        twins_url=scope.partial_url(model.name, layer, neuron, "twins", {"context": context}) if has_twins else None,
        twins_api_url=scope.api_neuron_url(model.name, layer, neuron, "/twins") if has_twins else None,
    )


def build_vocab_histogram(effect: np.ndarray, vocab: Sequence[str], bins: int = 60, k: int = 10) -> VocabHistogram:
    values = effect.astype(np.float64)
    counts, edges = np.histogram(values, bins=bins)
    order = np.argsort(values)
    mean, var = float(values.mean()), float(values.var())
    centred = values - mean
    skew = float((centred**3).mean() / var**1.5) if var > 0 else None
    kurt = float((centred**4).mean() / var**2) if var > 0 else None

    def tokens(ids: np.ndarray) -> list[TokenValue]:
        return [TokenValue(token_id=int(t), token=token_text(vocab, int(t)), value=number(values[t])) for t in ids]

    return VocabHistogram(
        bin_edges=np.round(edges, 6).tolist(),
        counts=counts.tolist(),
        top=tokens(order[::-1][:k]),
        bottom=tokens(order[:k]),
        moments={"mean": number(mean), "var": number(var), "skew": number(skew), "kurt": number(kurt)},
    )
