"""Annotated dependencies: app state, a read-only connection, the run in scope (and the universality threshold
it is looked at with), model and neuron lookups (404), and the view contexts that builders take.

A lookup that can fail is a dependency, so routes never repeat the checks: a route that takes `NeuronDep` (or
`NeuronViewDep`) only runs for a neuron that exists in a model of a complete run.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Path, Query, Request
from pydantic import Field

from app.db import Database
from app.errors import NotFound
from app.live import LRU, LiveRunner
from app.queries import models as mq
from app.queries import runs as rq
from app.queries import vocab as vq
from app.queries.models import Model
from app.settings import Settings
from app.urls import Scope, neuron_label
from app.viewmodels.context import ModelViewContext, NeuronViewContext

T = TypeVar("T")


@dataclass
class AppState:
    """What one app instance holds: settings, the connection pool, the live runner and small caches.

    Caches are keyed by a run's content hash: a complete run never changes, and a re-finished run gets a new
    hash, so nothing cached can go stale.
    """

    settings: Settings
    db: Database
    live: LiveRunner
    cache: LRU

    def memo(self, scope: Scope, key: tuple[Any, ...], compute: Callable[[], T]) -> T:
        full_key = (scope.run.id, scope.run.content_hash, *key)
        hit = self.cache.get(full_key)
        if hit is None:  # values are boxed so that a computed None is cached too
            hit = (compute(),)
            self.cache.put(full_key, hit)
        return hit[0]

    def vocab(self, conn: sqlite3.Connection, scope: Scope) -> list[str]:
        return self.memo(scope, ("vocab",), lambda: vq.load_vocab(conn, scope.run.id))

    def tables(self, conn: sqlite3.Connection, scope: Scope, model: Model) -> frozenset[str]:
        return self.memo(scope, ("tables", model.id), lambda: mq.analysis_tables(conn, model.id))

    def n_universal(self, conn: sqlite3.Connection, scope: Scope, model: Model) -> int | None:
        """Neurons above the scope's threshold; None for a model without aggregates (``--reference-only``)."""
        stored = self.memo(scope, ("n_universal", model.id), lambda: mq.count_universal(conn, model.id))
        if stored is None or scope.custom_threshold is None:
            return stored
        return mq.count_above(conn, model.id, scope.custom_threshold)  # a range of an index: not cached


def get_state(request: Request) -> AppState:
    return request.app.state.atlas


StateDep = Annotated[AppState, Depends(get_state)]


async def get_conn(state: StateDep) -> AsyncIterator[sqlite3.Connection]:
    with state.db.connect() as conn:
        yield conn


ConnDep = Annotated[sqlite3.Connection, Depends(get_conn)]


#: The universality threshold (paper: 0.5). An excess correlation lies in [-2, 2]; [-1, 2] covers every useful cut.
#: Forms always send a value (the fields are required), so ``threshold=`` is refused like any non-number (issue 8).
Threshold = Annotated[float, Field(ge=-1, le=2, allow_inf_nan=False)]
ThresholdQuery = Annotated[
    Threshold | None,
    Query(
        description="Excess correlation above which a neuron counts as universal: a finite number in [-1, 2]; "
        "default: the run's threshold"
    ),
]


RunQuery = Annotated[
    int | None,
    Query(
        ge=1,
        le=2**31,
        description="Run id; default: the newest complete run (on a model's pages: the newest that has the model)",
    ),
]


def default_runs(state: AppState, conn: sqlite3.Connection, runs: Sequence[rq.RunState]) -> dict[str, int]:
    """Model name -> the newest complete run that has it (what a bare model URL means), cached per set of runs."""
    key = ("default-runs", tuple((r.id, r.content_hash) for r in runs if r.status == "complete"))
    found = state.cache.get(key)
    if found is None:
        found = rq.newest_runs_by_model(conn)
        state.cache.put(key, found)
    return found


def choose_run(
    runs: Sequence[rq.RunState], defaults: dict[str, int], run: int | None, model: str | None = None
) -> rq.RunState:
    """The run a request means: `run` when given (it must be complete); else the newest complete run that has
    `model`, or the newest complete run (also for a model no run has: its lookup then 404s naming the models).

    Raises:
        NotFound: no such run, a run that is not complete, or no complete run at all.
    """
    if run is not None:
        chosen = next((r for r in runs if r.id == run), None)
        if chosen is None:
            raise NotFound(f"no run {run}")
        if chosen.status != "complete":
            raise NotFound(f"run {run} is {chosen.status}; only complete runs can be browsed")
        return chosen
    newest = next((r for r in runs if r.status == "complete"), None)
    if newest is None:
        raise NotFound("the atlas file has no complete run yet")
    owner = defaults.get(model) if model is not None else None
    return next((r for r in runs if r.id == owner), newest)


def load_scope(
    state: AppState,
    conn: sqlite3.Connection,
    chosen: rq.RunState,
    runs: Sequence[rq.RunState],
    threshold: float | None = None,
) -> Scope:
    """The scope of a complete run: its record, its models, and which of their URLs need no ``?run=``."""
    defaults = default_runs(state, conn, runs)
    newest = next(r for r in runs if r.status == "complete")
    # A complete run never changes (a re-finished run gets a new content hash), so its scope is cached; which of
    # its models are the newest of their name depends on the other complete runs, which are part of the key.
    others = tuple((r.id, r.content_hash) for r in runs if r.status == "complete")
    key = ("scope", chosen.id, chosen.content_hash, others)
    scope = state.cache.get(key)
    if scope is None:
        full = rq.get_run(conn, chosen.id)
        if full is None:  # deleted since the runs were listed
            raise NotFound(f"no run {chosen.id}")
        models = tuple(mq.models_of_run(conn, chosen.id))
        names = frozenset(m.name for m in models if defaults.get(m.name) == chosen.id)
        scope = Scope(full, models, default=chosen.id == newest.id, defaults=names)
        state.cache.put(key, scope)
    return scope.at_threshold(threshold)


async def get_scope(
    request: Request, state: StateDep, conn: ConnDep, run: RunQuery = None, threshold: ThresholdQuery = None
) -> Scope:
    # On a model's pages (the {model} path segment) a URL without ?run= means the newest complete run with it.
    runs = rq.run_states(conn)
    chosen = choose_run(runs, default_runs(state, conn, runs), run, request.path_params.get("model"))
    return load_scope(state, conn, chosen, runs, threshold)


ScopeDep = Annotated[Scope, Depends(get_scope)]


async def get_search_scope(
    request: Request, state: StateDep, conn: ConnDep, run: RunQuery = None, threshold: ThresholdQuery = None
) -> Scope:
    # A search in one model (?model=, validated by the route) means the newest complete run with it, like its pages.
    runs = rq.run_states(conn)
    chosen = choose_run(runs, default_runs(state, conn, runs), run, request.query_params.get("model") or None)
    return load_scope(state, conn, chosen, runs, threshold)


#: The run a search looks in.
SearchScopeDep = Annotated[Scope, Depends(get_search_scope)]


async def get_model(
    scope: ScopeDep,
    model: Annotated[str, Path(min_length=1, max_length=200, description="Model name (see GET /api/v1/models)")],
) -> Model:
    found = scope.model(model)
    if found is None:
        names = ", ".join(m.name for m in scope.models)
        raise NotFound(f"no model {model!r} in run {scope.run.id}; models: {names}")
    return found


ModelDep = Annotated[Model, Depends(get_model)]


async def get_model_view(state: StateDep, conn: ConnDep, scope: ScopeDep, model: ModelDep) -> ModelViewContext:
    return ModelViewContext(conn, scope, model, state.settings, state.vocab(conn, scope), state.live)


#: What a builder about one model takes (live runs).
ModelViewDep = Annotated[ModelViewContext, Depends(get_model_view)]


@dataclass(frozen=True)
class NeuronKey:
    model: Model
    layer: int
    neuron: int

    @property
    def label(self) -> str:
        return neuron_label(self.layer, self.neuron)


async def get_neuron(
    model: ModelDep,
    layer: Annotated[int, Path(description="Layer index")],
    neuron: Annotated[int, Path(description="Neuron index within the layer")],
) -> NeuronKey:
    if not (0 <= layer < model.n_layers and 0 <= neuron < model.d_mlp):
        raise NotFound(
            f"model {model.name!r} has no neuron {neuron_label(layer, neuron)} "
            f"({model.n_layers} layers of {model.d_mlp} neurons)"
        )
    return NeuronKey(model, layer, neuron)


NeuronDep = Annotated[NeuronKey, Depends(get_neuron)]


async def get_neuron_view(state: StateDep, conn: ConnDep, scope: ScopeDep, key: NeuronDep) -> NeuronViewContext:
    vocab = state.vocab(conn, scope)
    return NeuronViewContext(conn, scope, key.model, state.settings, vocab, state.live, key.layer, key.neuron)


#: What the neuron page's builders take: the neuron (404 when it does not exist) and how it is looked at.
NeuronViewDep = Annotated[NeuronViewContext, Depends(get_neuron_view)]
