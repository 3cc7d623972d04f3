"""The front page: runs and model families; per model the universality overview (paper Fig. 2a) at the threshold
in scope (the run's, or ``?threshold=``).

Several runs sit side by side (issue 7): without ``?run=`` the page shows, grouped by run, each model name in the
newest complete run that has it (our family next to the paper's published tables), and lists every complete
run's models; ``?run=ID`` shows that run alone, as it always did."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from pydantic import Field

from app.queries import models as mq
from app.queries.models import Model
from app.queries.runs import Run
from app.urls import Scope, neuron_label
from app.viewmodels.common import ModelSummary, RunSummary, ViewModel, number
from app.viewmodels.published import PublishedNote, published_note

TOP_NEURONS = 10


class LayerCount(ViewModel):
    layer: int
    n_neurons: int
    n_dead: int
    n_universal: int | None = Field(description="Neurons above the threshold in effect (None: no aggregates)")
    mean_excess: float | None
    max_excess: float | None
    url: str = Field(description="The explorer filtered to this layer's universal neurons")


class DistributionData(ViewModel):
    """A histogram computed at write time (fixed edges) and its quantiles."""

    quantity: str = Field(description="max_corr | mean_corr | mean_baseline | excess_corr")
    bin_edges: list[float]
    counts: list[int]
    quantiles: dict[str, float]


class TopNeuron(ViewModel):
    layer: int
    neuron: int
    id: str
    url: str
    excess_corr: float | None
    mean_corr: float | None
    mean_baseline: float | None
    universal: bool | None = Field(description="excess_corr > the threshold in effect")


class ModelOverview(ViewModel):
    """One model's universality overview (GET /api/v1/models/{model})."""

    model: ModelSummary
    fraction_universal: float | None = Field(description="n_universal / n_neurons")
    layers: list[LayerCount] = Field(description="Universal-neuron counts per layer")
    distributions: dict[str, DistributionData] = Field(description="Max correlation, baseline and excess (Fig. 2a)")
    top: list[TopNeuron] = Field(description=f"The {TOP_NEURONS} neurons with the highest excess correlation")
    analyses: list[str] = Field(description="Analysis tables with rows for this model")
    threshold: float = Field(description="The universality threshold in effect (?threshold=, default: the run's)")


class RunGroup(ViewModel):
    """One complete run and its models (a published run is the paper's table of one model)."""

    run: RunSummary
    published: PublishedNote | None = Field(description="For a run imported from the paper's tables: its note")
    models: list[ModelSummary] = Field(
        description="Every model of the run; each url names the run when a bare URL would show a newer run"
    )


class IndexPage(ViewModel):
    """Runs and their models; the overviews of the models a bare URL shows (or of the run of ?run=)."""

    runs: list[RunSummary] = Field(description="Every run in the file, newest first")
    run: RunSummary | None = Field(description="The newest complete run, or the run of ?run=")
    models: list[ModelOverview] = Field(
        description="Overviews, grouped by run: without ?run=, of each model name in the newest complete run that "
        "has it (what /models/{model} shows); with ?run=, of that run's models"
    )
    threshold: float | None = Field(
        description="The universality threshold in effect (?threshold=, default: the run's; None: no run shown)"
    )
    groups: list[RunGroup] = Field(description="Every complete run with its models, newest first")
    compare_url: str | None = Field(
        description="The page comparing two runs of one model (None unless a model is in two complete runs)"
    )


@dataclass(frozen=True)
class RunView:
    """A complete run as the front page uses it: its scope, and the models whose overviews it shows."""

    scope: Scope
    shown: tuple[Model, ...]
    n_universal: dict[int, int | None]  # model id -> neurons above the scope's threshold (None: no aggregates)
    tables: dict[int, frozenset[str]]  # model id -> analysis tables with rows, for the shown models


def universal_per_layer(
    conn: sqlite3.Connection, scope: Scope, model: Model, layers: list[mq.LayerSummary]
) -> dict[int, int | None]:
    """Universal neurons per layer at the scope's threshold (None for a layer without aggregates).

    At the run's threshold the write-time counts answer; another one counts a range of the excess index.
    """
    if scope.custom_threshold is None:
        return {s.layer: s.n_universal for s in layers}
    above = mq.count_above_by_layer(conn, model.id, scope.custom_threshold)
    return {s.layer: None if s.n_universal is None else above.get(s.layer, 0) for s in layers}


def build_model_overview(conn: sqlite3.Connection, scope: Scope, model: Model, tables: frozenset[str]) -> ModelOverview:
    layers = mq.layer_summaries(conn, model.id)
    per_layer = universal_per_layer(conn, scope, model, layers)
    counted = [n for n in per_layer.values() if n is not None]
    n_universal = sum(counted) if counted else None
    return ModelOverview(
        model=ModelSummary.build(scope, model, n_universal),
        fraction_universal=number(n_universal / model.n_neurons) if n_universal is not None else None,
        layers=[
            LayerCount(
                layer=s.layer,
                n_neurons=s.n_neurons,
                n_dead=s.n_dead,
                n_universal=per_layer[s.layer],
                mean_excess=number(s.mean_excess),
                max_excess=number(s.max_excess),
                url=scope.model_url(model.name, {"layer": s.layer, "universal": True}),
            )
            for s in layers
        ],
        distributions={
            k: DistributionData(quantity=d.quantity, bin_edges=d.bin_edges, counts=d.counts, quantiles=d.quantiles)
            for k, d in mq.distributions(conn, model.id).items()
        },
        top=[
            TopNeuron(
                layer=r.layer,
                neuron=r.neuron,
                id=neuron_label(r.layer, r.neuron),
                url=scope.neuron_url(model.name, r.layer, r.neuron),
                excess_corr=number(r.excess_corr),
                mean_corr=number(r.mean_corr),
                mean_baseline=number(r.mean_baseline),
                universal=r.universal,
            )
            for r in mq.top_neurons(conn, model.id, TOP_NEURONS, scope.custom_threshold)
        ],
        analyses=sorted(tables),
        threshold=scope.threshold,
    )


def run_summaries(conn: sqlite3.Connection, runs: list[Run], default_id: int | None) -> list[RunSummary]:
    names: dict[int, list[str]] = {}
    for run_id, name in conn.execute("SELECT run_id, name FROM models ORDER BY run_id, position"):
        names.setdefault(run_id, []).append(name)
    return [RunSummary.build(r, names.get(r.id, []), r.id == default_id) for r in runs]


def build_index(
    conn: sqlite3.Connection,
    runs: list[Run],
    scope: Scope | None,
    default_id: int | None,
    views: list[RunView],
) -> IndexPage:
    """The front page: `views` holds every complete run, newest first (`scope` is the newest or ?run=)."""
    summaries = run_summaries(conn, runs, default_id)
    by_id = {s.id: s for s in summaries}
    selected = by_id.get(scope.run.id) if scope else None
    names = [m.name for view in views for m in view.scope.models]
    return IndexPage(
        runs=summaries,
        run=selected,
        models=[build_model_overview(conn, v.scope, m, v.tables[m.id]) for v in views for m in v.shown],
        threshold=scope.threshold if scope else None,
        groups=[
            RunGroup(
                run=by_id[v.scope.run.id],
                published=published_note(v.scope.run),
                models=[ModelSummary.build(v.scope, m, v.n_universal[m.id]) for m in v.scope.models],
            )
            for v in views
        ],
        compare_url="/compare" if len(names) > len(set(names)) else None,
    )
