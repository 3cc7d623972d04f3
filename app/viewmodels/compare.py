"""Does my run reproduce the paper? Two runs of the same model side by side (issue 7): the overlap of their universal
sets, per-layer counts, the correlation of every shared statistic, and the neurons they disagree on most.

The numbers are `precompute.compare.compare_runs`'s (one implementation for the CLI and the dashboard); this module
only names the two sides, adds links and says what the numbers cover. The page is also its own chooser: without
both ``a`` and ``b`` it lists every ``MODEL@RUN`` of the file's complete runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlencode

from pydantic import Field

from app.queries.models import Model
from app.urls import Scope, neuron_label
from app.viewmodels.common import ViewModel, number, published_label
from precompute.compare import DEFAULT_TOP_K, RunComparison

#: Most disagreements one request lists.
MAX_TOP = 200


@dataclass(frozen=True)
class Side:
    """One resolved side: the run it is looked at in, and its model."""

    scope: Scope
    model: Model

    @property
    def spec(self) -> str:
        return f"{self.model.name}@{self.scope.run.id}"


class CompareSide(ViewModel):
    """One of the two compared runs of the model."""

    spec: str = Field(description="MODEL@RUN")
    model: str = Field(description="The model's name")
    run: int = Field(description="The run id")
    published: str | None = Field(description="The paper's table the run was imported from (None: a run of ours)")
    threshold: float = Field(description="The run's universality threshold (universal ⇔ excess_corr > threshold)")
    n_neurons: int = Field(description="Neurons the run holds (a published run: its universal neurons only)")
    n_universal: int = Field(description="Universal neurons of the run")
    url: str = Field(description="The model's explorer in this run")
    universal_url: str = Field(description="The explorer filtered to the run's universal neurons")


class Agreement(ViewModel):
    """The universal sets A and B, with B as the reference (None where a ratio is 0/0)."""

    n_a: int
    n_b: int
    n_both: int = Field(description="Universal in both runs")
    jaccard: float | None = Field(description="|A ∩ B| / |A ∪ B|")
    precision: float | None = Field(description="|A ∩ B| / |A|: the share of A's universal neurons that B confirms")
    recall: float | None = Field(description="|A ∩ B| / |B|: the share of B's universal neurons that A finds")


class LayerAgreement(ViewModel):
    layer: int
    universal_a: int
    universal_b: int
    universal_both: int


class StatisticAgreement(ViewModel):
    """Pearson r of one per-neuron statistic over the neurons with a value in both runs."""

    table: str = Field(description="neurons | weight_stats | activation_stats")
    statistic: str
    n_shared: int = Field(description="Neurons with a value in both runs")
    pearson: float | None = Field(description="None with fewer than two shared values, or a constant one")


class NeuronDisagreement(ViewModel):
    """A neuron whose excess correlation differs between the runs, with links to both of its pages."""

    layer: int
    neuron: int
    id: str = Field(description="L{layer}N{neuron}")
    excess_a: float | None
    excess_b: float | None
    difference: float | None = Field(description="excess_a − excess_b")
    universal_a: bool
    universal_b: bool
    url_a: str = Field(description="The neuron's page in run A")
    url_b: str = Field(description="The neuron's page in run B")


class CompareOption(ViewModel):
    """A model of a complete run that can be compared (the chooser's entries)."""

    spec: str = Field(description="MODEL@RUN")
    model: str
    run: int
    label: str = Field(description="What the run is: published table, or dataset and tokens")


class ComparePage(ViewModel):
    """Two runs of one model compared (``a`` and ``b`` given), or the chooser (``comparison`` fields null)."""

    a: CompareSide | None = Field(description="The run under test")
    b: CompareSide | None = Field(description="The reference (e.g. the paper's published run)")
    agreement: Agreement | None = Field(description="Overlap of the universal sets")
    n_shared_neurons: int | None = Field(description="Neurons both runs hold a row for")
    layers: list[LayerAgreement] = Field(description="Universal neurons per layer: in A, in B, in both")
    correlations: list[StatisticAgreement] = Field(description="Every per-neuron statistic, over the shared neurons")
    disagreements: list[NeuronDisagreement] = Field(description="The largest |excess_a − excess_b| first")
    top: int = Field(description="How many disagreements were asked for")
    notes: list[str] = Field(description="What the numbers cover (e.g. a published run holds universal neurons only)")
    options: list[CompareOption] = Field(description="Every model of a complete run, newest run first")
    suggested_url: str | None = Field(description="A comparison worth making: two runs of one model, if any")
    url: str = Field(description="This page")
    api_url: str = Field(description="Its JSON twin")


def compare_url(a: str | None, b: str | None, top: int | None = None, api: bool = False) -> str:
    """The page (or its JSON twin) comparing ``a`` with ``b``.

    >>> compare_url("seed-0@1", "seed-0@2")
    '/compare?a=seed-0%401&b=seed-0%402'
    """
    items = [(k, v) for k, v in (("a", a), ("b", b), ("top", top)) if v is not None]
    return ("/api/v1/compare" if api else "/compare") + ("?" + urlencode(items) if items else "")


def _option(scope: Scope, model: Model) -> CompareOption:
    run = scope.run
    what = published_label(run)
    if what is None:
        tokens = f", {run.tokens_counted:,} tokens counted" if run.tokens_counted else ""
        what = f"{run.dataset.get('kind') or run.dataset.get('source') or 'dataset'}{tokens}"
    return CompareOption(spec=f"{model.name}@{run.id}", model=model.name, run=run.id, label=f"run {run.id}: {what}")


def _suggestion(scopes: Sequence[Scope]) -> tuple[str, str] | None:
    """A model in two complete runs: its newest run of ours as A, its published (else next newest) run as B."""
    runs_of: dict[str, list[Scope]] = {}
    for scope in scopes:  # newest first
        for model in scope.models:
            runs_of.setdefault(model.name, []).append(scope)
    for name, found in runs_of.items():
        if len(found) < 2:
            continue
        ours = [s for s in found if s.run.published is None]
        a = ours[0] if ours else found[0]
        published = [s for s in found if s.run.published is not None and s is not a]
        b = published[0] if published else next(s for s in found if s is not a)
        return f"{name}@{a.run.id}", f"{name}@{b.run.id}"
    return None


def _side(side: Side, result: RunComparison, first: bool) -> CompareSide:
    found = result.a if first else result.b
    scope, name = side.scope, side.model.name
    return CompareSide(
        spec=side.spec,
        model=name,
        run=scope.run.id,
        published=published_label(scope.run),
        threshold=found.threshold,
        n_neurons=found.n_neurons,
        n_universal=found.n_universal,
        url=scope.model_url(name),
        universal_url=scope.model_url(name, {"universal": True}),
    )


def _notes(a: Side, b: Side, result: RunComparison) -> list[str]:
    notes = []
    published = [label for label, side in (("A", a), ("B", b)) if side.scope.run.published is not None]
    if published:
        who = (
            f"{published[0]} is the paper's published table: it holds"
            if len(published) == 1
            else "A and B are published tables: they hold"
        )
        notes.append(
            f"{who} the universal neurons only, so the statistics are correlated over the neurons both runs hold, "
            f"and a neuron a table does not list counts as not universal."
        )
    if result.a.threshold != result.b.threshold:
        notes.append(
            f"The runs have different thresholds ({result.a.threshold:g} and {result.b.threshold:g}): each run's "
            f"universal set is taken at its own."
        )
    if a.scope.run.id == b.scope.run.id:
        notes.append("A and B are the same run: everything agrees by construction.")
    return notes


def build_compare_page(
    scopes: Sequence[Scope],
    sides: tuple[Side, Side] | None,
    result: RunComparison | None,
    top: int,
) -> ComparePage:
    """The page for a comparison already computed (`sides` and `result`), or the chooser when they are None.

    Args:
        scopes: every complete run, newest first (the chooser's options).
    """
    options = [_option(scope, model) for scope in scopes for model in scope.models]
    suggestion = _suggestion(scopes)
    suggested_url = compare_url(*suggestion) if suggestion else None
    if sides is None or result is None:
        return ComparePage(
            a=None,
            b=None,
            agreement=None,
            n_shared_neurons=None,
            layers=[],
            correlations=[],
            disagreements=[],
            notes=[],
            top=top,
            options=options,
            suggested_url=suggested_url,
            url=compare_url(None, None),
            api_url=compare_url(None, None, api=True),
        )
    a, b = sides
    agreement = result.agreement
    top_param = top if top != DEFAULT_TOP_K else None
    return ComparePage(
        a=_side(a, result, True),
        b=_side(b, result, False),
        agreement=Agreement(
            n_a=agreement.n_a,
            n_b=agreement.n_b,
            n_both=agreement.n_both,
            jaccard=number(agreement.jaccard),
            precision=number(agreement.precision),
            recall=number(agreement.recall),
        ),
        n_shared_neurons=result.n_shared_neurons,
        layers=[
            LayerAgreement(
                layer=c.layer, universal_a=c.universal_a, universal_b=c.universal_b, universal_both=c.universal_both
            )
            for c in result.layers
        ],
        correlations=[
            StatisticAgreement(table=c.table, statistic=c.statistic, n_shared=c.n_shared, pearson=number(c.pearson))
            for c in result.correlations
        ],
        disagreements=[
            NeuronDisagreement(
                layer=d.layer,
                neuron=d.neuron,
                id=neuron_label(d.layer, d.neuron),
                excess_a=number(d.excess_a),
                excess_b=number(d.excess_b),
                difference=number(d.difference),
                universal_a=d.universal_a,
                universal_b=d.universal_b,
                url_a=a.scope.neuron_url(a.model.name, d.layer, d.neuron),
                url_b=b.scope.neuron_url(b.model.name, d.layer, d.neuron),
            )
            for d in result.disagreements
        ],
        notes=_notes(a, b, result),
        top=top,
        options=options,
        suggested_url=suggested_url,
        url=compare_url(a.spec, b.spec, top_param),
        api_url=compare_url(a.spec, b.spec, top_param, api=True),
    )
