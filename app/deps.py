"""Annotated dependencies: app state, a read-only connection, the run in scope (and the universality threshold
it is looked at with), model and neuron lookups (404).

A lookup that can fail is a dependency, so routes never repeat the checks: a route that takes `NeuronDep` only
runs for a neuron that exists in a model of a complete run.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Path, Query, Request
from pydantic import BeforeValidator, Field

from app.db import Database
from app.errors import NotFound
from app.live import LRU, LiveRunner
from app.queries import models as mq
from app.queries import runs as rq
from app.queries import vocab as vq
from app.queries.models import Model
from app.settings import Settings
from app.urls import Scope, neuron_label

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


def _empty_as_none(value: object) -> object:
    """HTML forms send a field left empty as ``name=``; that means the parameter is absent."""
    return None if value == "" else value


#: Put on optional query parameters that plain HTML forms send (the explorer's filters, the threshold).
EmptyAsNone = BeforeValidator(_empty_as_none)

#: The universality threshold (paper: 0.5). An excess correlation lies in [-2, 2]; [-1, 2] covers every useful cut.
Threshold = Annotated[float, Field(ge=-1, le=2, allow_inf_nan=False)]
ThresholdQuery = Annotated[
    Threshold | None,
    EmptyAsNone,
    Query(
        description="Excess correlation above which a neuron counts as universal: a finite number in [-1, 2]; "
        "default: the run's threshold"
    ),
]


async def get_scope(
    state: StateDep,
    conn: ConnDep,
    run: Annotated[
        int | None,
        Query(ge=1, le=2**31, description="Run id; default: the newest complete run"),
    ] = None,
    threshold: ThresholdQuery = None,
) -> Scope:
    runs = rq.run_states(conn)
    newest = next((r for r in runs if r.status == "complete"), None)
    if run is None:
        if newest is None:
            raise NotFound("the atlas file has no complete run yet")
        chosen = newest
    else:
        chosen = next((r for r in runs if r.id == run), None)
        if chosen is None:
            raise NotFound(f"no run {run}")
        if chosen.status != "complete":
            raise NotFound(f"run {run} is {chosen.status}; only complete runs can be browsed")
    default = chosen is newest
    # A complete run never changes (a re-finished run gets a new content hash), so its scope is cached.
    key = ("scope", chosen.id, chosen.content_hash, default)
    scope = state.cache.get(key)
    if scope is None:
        full = rq.get_run(conn, chosen.id)
        assert full is not None
        scope = Scope(full, tuple(mq.models_of_run(conn, chosen.id)), default=default)
        state.cache.put(key, scope)
    return scope.at_threshold(threshold)


ScopeDep = Annotated[Scope, Depends(get_scope)]


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
