"""Comparing two runs of one model (issue 7): the page /compare and its JSON twin /api/v1/compare."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response

from app import rendering
from app.deps import AppState, ConnDep, StateDep, choose_run, default_runs, load_scope
from app.errors import NotFound, Unprocessable
from app.queries import runs as rq
from app.routes.common import error_responses
from app.urls import Scope
from app.viewmodels.compare import MAX_TOP, ComparePage, Side, build_compare_page
from precompute.compare import DEFAULT_TOP_K, SPEC_PATTERN, ComparisonError, RunComparison, compare_runs, parse_spec

pages = APIRouter(tags=["pages"], responses=error_responses(404, 422, 503))
api = APIRouter(prefix="/api/v1", tags=["runs and models"], responses=error_responses(404, 422, 503))

#: ``MODEL@RUN`` is at most a 200-character name, ``@`` and a 10-digit run id.
SPEC_MAX_LENGTH = 211
SpecQuery = Annotated[
    str | None,
    Query(
        min_length=1,
        max_length=SPEC_MAX_LENGTH,
        pattern=SPEC_PATTERN,
        description="MODEL or MODEL@RUN: a model's name and optionally a run id (default: the newest complete run "
        "that has the model). Without both a and b the page lists the models to choose from",
    ),
]
TopQuery = Annotated[int, Query(ge=0, le=MAX_TOP, description="How many of the largest disagreements to list")]


def _side(
    state: AppState, conn: sqlite3.Connection, runs: Sequence[rq.RunState], defaults: dict[str, int], spec: str
) -> Side:
    name, run = parse_spec(spec)
    scope = load_scope(state, conn, choose_run(runs, defaults, run, name), runs)
    model = scope.model(name)
    if model is None:
        if run is not None:
            names = ", ".join(m.name for m in scope.models)
            raise NotFound(f"no model {name!r} in run {run}; its models: {names}")
        raise NotFound(f"no complete run has a model {name!r}; models: {', '.join(sorted(defaults)) or 'none'}")
    return Side(scope, model)


def _compare(state: AppState, conn: sqlite3.Connection, a: str | None, b: str | None, top: int) -> ComparePage:
    runs = rq.run_states(conn)
    defaults = default_runs(state, conn, runs)
    scopes: list[Scope] = [load_scope(state, conn, r, runs) for r in runs if r.status == "complete"]
    if a is None or b is None:
        return build_compare_page(scopes, None, None, top)
    side_a, side_b = _side(state, conn, runs, defaults, a), _side(state, conn, runs, defaults, b)
    if side_a.model.name != side_b.model.name:
        raise Unprocessable(
            f"a is {side_a.model.name} and b is {side_b.model.name}: only two runs of the same model can be compared"
        )

    def compute() -> RunComparison:
        # It joins every neuron of both runs (seconds for GPT-2-medium), so it gets the exports' deadline.
        with state.db.connect(state.settings.export_time_limit_ms) as long_conn:
            try:
                return compare_runs(long_conn, side_a.model.id, side_b.model.id, top_k=top)
            except ComparisonError as exc:  # same name, other shape (two local folders of one name)
                raise Unprocessable(str(exc)) from None

    # Both runs are complete, so their comparison never changes: it is cached by both content hashes.
    key = ("compare", side_a.model.id, side_a.scope.run.content_hash, side_b.model.id, side_b.scope.run.content_hash)
    result = state.memo(side_a.scope, (*key, top), compute)
    return build_compare_page(scopes, (side_a, side_b), result, top)


@pages.get("/compare", response_class=HTMLResponse, summary="Compare two runs of one model")
def compare_page(
    request: Request,
    state: StateDep,
    conn: ConnDep,
    a: SpecQuery = None,
    b: SpecQuery = None,
    top: TopQuery = DEFAULT_TOP_K,
) -> Response:
    """Does a run reproduce another (e.g. the paper's table)? Overlap of the universal sets, per-layer counts,
    correlation of every statistic, largest disagreements; without a and b, the models to choose from."""
    page = _compare(state, conn, a, b, top)
    return rendering.html(request, "compare.html", page, alternate=page.api_url)


@api.get("/compare", response_model=ComparePage, summary="Compare two runs of one model")
def compare_json(
    state: StateDep, conn: ConnDep, a: SpecQuery = None, b: SpecQuery = None, top: TopQuery = DEFAULT_TOP_K
) -> Response:
    """JSON twin of /compare."""
    return rendering.json(_compare(state, conn, a, b, top))
