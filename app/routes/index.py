"""The front page (runs and families) and its JSON twins: /api/v1/, /api/v1/runs, /api/v1/models."""

from __future__ import annotations

import sqlite3

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from app import rendering
from app.deps import (
    AppState,
    ConnDep,
    ModelDep,
    RunQuery,
    ScopeDep,
    StateDep,
    ThresholdQuery,
    choose_run,
    default_runs,
    load_scope,
)
from app.queries import runs as rq
from app.routes.common import error_responses
from app.urls import Scope
from app.viewmodels.common import ModelSummary, RunSummary
from app.viewmodels.index import IndexPage, ModelOverview, RunView, build_index, build_model_overview, run_summaries

pages = APIRouter(tags=["pages"], responses=error_responses(404, 422, 503))
api = APIRouter(prefix="/api/v1", tags=["runs and models"], responses=error_responses(404, 422, 503))


def _index(
    state: AppState, conn: sqlite3.Connection, run: int | None, threshold: float | None
) -> tuple[IndexPage, Scope | None, dict[int, Scope]]:
    """The page, the scope of the newest complete run (or of ?run=), and every complete run's scope by id."""
    runs = rq.list_runs(conn)
    states = rq.run_states(conn)
    newest = next((r for r in runs if r.complete), None)
    if newest is None and run is None:
        return build_index(conn, runs, None, None, []), None, {}
    chosen = choose_run(states, default_runs(state, conn, states), run)
    scope = load_scope(state, conn, chosen, states, threshold)
    views = []
    for other in states:
        if other.status != "complete":
            continue
        other_scope = scope if other.id == chosen.id else load_scope(state, conn, other, states, threshold)
        if run is not None:  # ?run=ID: that run's models, as before
            shown = other_scope.models if other.id == chosen.id else ()
        else:  # each model name where its bare URL leads
            shown = tuple(m for m in other_scope.models if m.name in other_scope.defaults or other_scope.default)
        views.append(
            RunView(
                scope=other_scope,
                shown=shown,
                n_universal={m.id: state.n_universal(conn, other_scope, m) for m in other_scope.models},
                tables={m.id: state.tables(conn, other_scope, m) for m in shown},
            )
        )
    return (
        build_index(conn, runs, scope, newest.id if newest else None, views),
        scope,
        {v.scope.run.id: v.scope for v in views},
    )


@pages.get("/", response_class=HTMLResponse, summary="Runs, model families and universality overview")
def index_page(
    request: Request, state: StateDep, conn: ConnDep, run: RunQuery = None, threshold: ThresholdQuery = None
) -> Response:
    """The runs in the file with their models and, grouped by run, the universality overview of each model a bare
    URL shows (with ?run=: of that run's models) at the chosen threshold."""
    page, scope, scopes = _index(state, conn, run, threshold)
    api_url = scope.api_url("/") if scope else "/api/v1/"
    return rendering.html(request, "index.html", page, alternate=api_url, scope=scope, scopes=scopes)


@api.get("/", response_model=IndexPage, summary="Runs and the shown run's model overviews")
def index_json(state: StateDep, conn: ConnDep, run: RunQuery = None, threshold: ThresholdQuery = None) -> Response:
    """JSON twin of the front page."""
    page, _, _ = _index(state, conn, run, threshold)
    return rendering.json(page)


@api.get("/runs", response_model=list[RunSummary], summary="Every run in the file")
def runs_json(conn: ConnDep) -> Response:
    """Every run (running, failed and complete), newest first."""
    runs = rq.list_runs(conn)
    newest = next((r for r in runs if r.complete), None)
    return rendering.json(run_summaries(conn, runs, newest.id if newest else None))


@api.get("/models", response_model=list[ModelSummary], summary="Models of the run")
def models_json(state: StateDep, conn: ConnDep, scope: ScopeDep) -> Response:
    """The family of the run: name, shape and universal-neuron count of each model."""
    tag = rendering.etag(scope)
    return rendering.json(
        [ModelSummary.build(scope, m, state.n_universal(conn, scope, m)) for m in scope.models], tag=tag
    )


@api.get("/models/{model}", response_model=ModelOverview, summary="One model's universality overview")
def model_json(request: Request, state: StateDep, conn: ConnDep, scope: ScopeDep, model: ModelDep) -> Response:
    """Per-layer universal counts, the correlation/baseline/excess distributions and the top neurons."""
    tag = rendering.etag(scope)
    if cached := rendering.not_modified(request, tag):
        return cached
    return rendering.json(build_model_overview(conn, scope, model, state.tables(conn, scope, model)), tag=tag)
