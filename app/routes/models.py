"""The model explorer: page, scatter fragment, random neuron, and the JSON list, scatter and CSV export."""

from __future__ import annotations

import csv
import io
import logging
import sqlite3
from collections.abc import Iterator

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse

from app import rendering
from app.deps import AppState, ConnDep, ModelDep, ScopeDep, StateDep
from app.errors import NotFound, QueryTimeout
from app.queries import neurons as nq
from app.queries.models import Model
from app.routes.common import ExplorerQueryDep, error_responses
from app.urls import Scope, neuron_label
from app.viewmodels.explorer import (
    ExplorerPage,
    ExplorerQuery,
    ScatterData,
    build_explorer,
    build_scatter,
    labels,
)

logger = logging.getLogger(__name__)

pages = APIRouter(tags=["pages"], responses=error_responses(404, 422, 503))
api = APIRouter(prefix="/api/v1/models/{model}", tags=["neurons"], responses=error_responses(404, 422, 503))


def _explorer(
    state: AppState, conn: sqlite3.Connection, scope: Scope, model: Model, query: ExplorerQuery
) -> ExplorerPage:
    tables = state.tables(conn, scope, model)
    label_values = state.memo(scope, ("labels", model.id), lambda: labels(conn, model.id, tables))
    return build_explorer(
        conn, scope, model, query, tables, state.n_universal(conn, scope, model), state.settings.max_rows, label_values
    )


@pages.get("/models/{model}", response_class=HTMLResponse, summary="Explore a model's neurons")
def explorer_page(
    request: Request, state: StateDep, conn: ConnDep, scope: ScopeDep, model: ModelDep, query: ExplorerQueryDep
) -> Response:
    """Scatter of two statistics, filters and sorting in the query string, a paginated table, CSV export."""
    tag = rendering.etag(scope)
    if cached := rendering.not_modified(request, tag):
        return cached
    page = _explorer(state, conn, scope, model, query)
    return rendering.html(request, "explorer.html", page, tag=tag, alternate=page.api_url, scope=scope)


@pages.get("/models/{model}/_partials/scatter", response_class=HTMLResponse, summary="Explorer scatter (fragment)")
def scatter_partial(
    request: Request, state: StateDep, conn: ConnDep, scope: ScopeDep, model: ModelDep, query: ExplorerQueryDep
) -> Response:
    """htmx fragment: the scatter plot of the filtered neurons."""
    data = build_scatter(conn, scope, model, query, state.settings.max_scatter_points)
    label_of = {s: nq.STATISTICS[s].label for s in nq.STATISTICS}
    return rendering.html(request, "_partials/_scatter.html", data, tag=rendering.etag(scope), labels=label_of)


@pages.get("/models/{model}/random", summary="Go to a random neuron", status_code=307, response_class=RedirectResponse)
def random_page(conn: ConnDep, scope: ScopeDep, model: ModelDep, query: ExplorerQueryDep) -> Response:
    """Redirects to a random neuron among those matching the filters (e.g. ?universal=true)."""
    picked = nq.random_neuron(conn, model.id, query.filter)
    if picked is None:
        raise NotFound(f"no neuron of {model.name} matches these filters")
    return RedirectResponse(
        scope.neuron_url(model.name, *picked), status_code=307, headers={"Cache-Control": "no-store"}
    )


@api.get("/neurons", response_model=ExplorerPage, summary="List a model's neurons")
def neurons_json(
    request: Request, state: StateDep, conn: ConnDep, scope: ScopeDep, model: ModelDep, query: ExplorerQueryDep
) -> Response:
    """``{"total", "items"}``: the filtered, sorted page (JSON twin of the explorer)."""
    tag = rendering.etag(scope)
    if cached := rendering.not_modified(request, tag):
        return cached
    return rendering.json(_explorer(state, conn, scope, model, query), tag=tag)


@api.get("/scatter", response_model=ScatterData, summary="Scatter data of two statistics")
def scatter_json(
    request: Request, state: StateDep, conn: ConnDep, scope: ScopeDep, model: ModelDep, query: ExplorerQueryDep
) -> Response:
    """Columns (layer, neuron, x, y, colour) of the filtered neurons; a fixed sample beyond max_scatter_points."""
    tag = rendering.etag(scope)
    if cached := rendering.not_modified(request, tag):
        return cached
    return rendering.json(build_scatter(conn, scope, model, query, state.settings.max_scatter_points), tag=tag)


CSV_BATCH = 2000


@api.get(
    "/neurons.csv",
    summary="Export the filtered neurons as CSV",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/csv": {}}, "description": "One row per neuron"}},
)
def neurons_csv(state: StateDep, conn: ConnDep, scope: ScopeDep, model: ModelDep, query: ExplorerQueryDep) -> Response:
    """Every neuron that matches the filters (up to max_export_rows; X-Truncated says when cut), sorted."""
    tables = state.tables(conn, scope, model)
    columns = tuple(s.name for s in nq.STATISTICS.values() if s.table == "neurons" or s.table in tables)
    total = nq.count_neurons(conn, model.id, query.filter)
    cap = state.settings.max_export_rows
    headers = {
        "Content-Disposition": f'attachment; filename="{_safe_filename(model.name)}-neurons.csv"',
        "X-Total-Count": str(total),
        "X-Truncated": "true" if total > cap else "false",
        "X-Universal-Threshold": str(scope.threshold),
        "Cache-Control": "no-store",
    }
    return StreamingResponse(_csv_rows(state, model, query, columns, cap), media_type="text/csv", headers=headers)


def _csv_rows(state: AppState, model: Model, query: ExplorerQuery, columns: tuple[str, ...], cap: int) -> Iterator[str]:
    """Stream the export on its own connection with the export time limit."""
    header = ["model", "id", *nq.EXPORT_LEADING, *nq.export_statistics(columns)]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    try:
        with state.db.connect(state.settings.export_time_limit_ms) as conn:
            capped = nq.export_rows(conn, model.id, query.filter, query.sort, query.order, columns, cap)
            for i, row in enumerate(capped.rows):
                layer, neuron = row[:2]  # every row starts with EXPORT_LEADING
                writer.writerow([_cell(model.name), neuron_label(layer, neuron), *(_cell(v) for v in row)])
                if i % CSV_BATCH == CSV_BATCH - 1:
                    yield buffer.getvalue()
                    buffer.seek(0)
                    buffer.truncate()
    except QueryTimeout:
        logger.warning("CSV export of %s ran past its time limit; the file is incomplete", model.name)
    yield buffer.getvalue()


def _cell(value: object) -> object:
    """CSV cells that a spreadsheet would run as a formula get a leading quote (CSV injection)."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _safe_filename(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:100] or "model"
