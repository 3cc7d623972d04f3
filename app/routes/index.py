"""The front page (runs and families) and its JSON twins: /api/v1/, /api/v1/runs, /api/v1/models."""

from __future__ import annotations

import sqlite3
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response

from app import rendering
from app.deps import AppState, ConnDep, ModelDep, ScopeDep, StateDep, ThresholdQuery
from app.errors import NotFound
from app.queries import models as mq
from app.queries import runs as rq
from app.routes.common import error_responses
from app.urls import Scope
from app.viewmodels.common import ModelSummary, RunSummary
from app.viewmodels.index import IndexPage, ModelOverview, build_index, build_model_overview, run_summaries

pages = APIRouter(tags=["pages"], responses=error_responses(404, 422, 503))
api = APIRouter(prefix="/api/v1", tags=["runs and models"], responses=error_responses(404, 422, 503))

RunQuery = Annotated[int | None, Query(ge=1, le=2**31, description="Run id; default: the newest complete run")]


def _index(
    state: AppState, conn: sqlite3.Connection, run: int | None, threshold: float | None
) -> tuple[IndexPage, Scope | None]:
    runs = rq.list_runs(conn)
    newest = next((r for r in runs if r.complete), None)
    chosen = newest
    if run is not None:
        chosen = next((r for r in runs if r.id == run), None)
        if chosen is None:
            raise NotFound(f"no run {run}")
        if not chosen.complete:
            raise NotFound(f"run {run} is {chosen.status}; only complete runs can be browsed")
    scope = None
    tables = {}
    if chosen is not None:
        scope = Scope(chosen, tuple(mq.models_of_run(conn, chosen.id)), default=chosen is newest)
        scope = scope.at_threshold(threshold)
        tables = {m.id: state.tables(conn, scope, m) for m in scope.models}
    return build_index(conn, runs, scope, newest.id if newest else None, tables), scope


@pages.get("/", response_class=HTMLResponse, summary="Runs, model families and universality overview")
def index_page(
    request: Request, state: StateDep, conn: ConnDep, run: RunQuery = None, threshold: ThresholdQuery = None
) -> Response:
    """The runs in the file and, per model of the shown run, its universality overview at the chosen threshold."""
    page, scope = _index(state, conn, run, threshold)
    api_url = scope.api_url("/") if scope else "/api/v1/"
    return rendering.html(request, "index.html", page, alternate=api_url, scope=scope)


@api.get("/", response_model=IndexPage, summary="Runs and the shown run's model overviews")
def index_json(state: StateDep, conn: ConnDep, run: RunQuery = None, threshold: ThresholdQuery = None) -> Response:
    """JSON twin of the front page."""
    page, _ = _index(state, conn, run, threshold)
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
