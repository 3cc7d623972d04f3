"""Search: the jump box (neuron ids redirect), and neurons ranked by token, feature, family or role."""

from __future__ import annotations

import sqlite3
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import Field

from app import rendering
from app.deps import AppState, ConnDep, SearchScopeDep, StateDep
from app.errors import NotFound
from app.queries import search as sq
from app.queries.models import Model
from app.routes.common import Empty, error_responses
from app.urls import Scope
from app.viewmodels.explorer import labels
from app.viewmodels.search import (
    DEFAULT_PER_PAGE,
    EVIDENCE_LABELS,
    RoleName,
    SearchContext,
    SearchFilters,
    SearchPage,
    SearchQuery,
    build_search,
)

pages = APIRouter(tags=["pages"], responses=error_responses(404, 422, 503))
api = APIRouter(prefix="/api/v1", tags=["search"], responses=error_responses(404, 422, 503))

MAX_PAGE = 1000
MAX_PER_PAGE = 200


# The filters are optional fields of the search page's plain GET form, which sends a field left empty as
# ``name=`` (`Empty`); bounds sit on the inner types so that they apply to given values only (as the explorer's).
async def get_search_query(
    q: Annotated[
        str,
        Query(
            max_length=200,
            description="L5N1234 / 5:1234 / model/L5N1234 (jump), a token, token:TEXT, feature:NAME or a feature's "
            "name (syntax:newline), family:NAME, role:NAME",
        ),
    ] = "",
    model: Annotated[str | None, Query(max_length=200, description="Search one model (empty: every model)")] = None,
    layer: Annotated[
        Annotated[int, Field(ge=0, le=100_000)] | Empty | None, Query(description="Only this layer (empty: all)")
    ] = None,
    universal: Annotated[
        bool | Empty | None,
        Query(description="Only universal (true) or non-universal (false) neurons, at the threshold in effect"),
    ] = None,
    family: Annotated[str | None, Query(max_length=100, description="Only this family label (empty: any)")] = None,
    role: Annotated[RoleName | Empty | None, Query(description="Only neurons with this role (empty: any)")] = None,
    page: Annotated[int, Query(ge=1, le=MAX_PAGE, description="Page of results (1-based)")] = 1,
    per_page: Annotated[int, Query(ge=1, le=MAX_PER_PAGE, description="Rows per page")] = DEFAULT_PER_PAGE,
    group: Annotated[
        bool, Query(description="Put a neuron's best matches in the other searched models in its row")
    ] = True,
) -> SearchQuery:
    filters = SearchFilters(
        model=model or None,
        layer=layer if isinstance(layer, int) else None,
        universal=universal if isinstance(universal, bool) else None,
        family=family or None,
        role=role or None,
    )
    return SearchQuery(q=q, filters=filters, page=page, per_page=per_page, group=group)


SearchQueryDep = Annotated[SearchQuery, Depends(get_search_query)]


def _labels(state: AppState, conn: sqlite3.Connection, scope: Scope, model: Model) -> tuple[list[str], list[str]]:
    """The family and role labels of a model (cached; the explorer's filter choices share the entry)."""
    return state.memo(scope, ("labels", model.id), lambda: labels(conn, model.id, state.tables(conn, scope, model)))


def _search(state: AppState, conn: sqlite3.Connection, scope: Scope, query: SearchQuery) -> SearchPage:
    target = None
    if query.filters.model:
        target = scope.model(query.filters.model)
        if target is None:
            raise NotFound(f"no model {query.filters.model!r} in run {scope.run.id}")
    models = [target] if target else list(scope.models)
    label_values = {m.id: _labels(state, conn, scope, m) for m in models}
    context = SearchContext(
        vocab=state.vocab(conn, scope),
        labels=label_values,
        indexes=state.memo(scope, ("search indexes",), lambda: sq.present_indexes(conn)),
        cap=state.settings.max_rows,
    )
    return build_search(conn, scope, query, target, context)


@pages.get(
    "/search",
    response_class=HTMLResponse,
    summary="Search neurons",
    responses={303: {"description": "A neuron id: redirect to its page"}},
)
def search_page(
    request: Request, state: StateDep, conn: ConnDep, scope: SearchScopeDep, query: SearchQueryDep
) -> Response:
    """Jump to a neuron id (redirect), or neurons ranked by token, feature, family or role."""
    page = _search(state, conn, scope, query)
    if page.redirect:
        return RedirectResponse(page.redirect, status_code=303)
    api_url = page.api_url or scope.api_url("/search", query.params())
    return rendering.html(request, "search.html", page, alternate=api_url, scope=scope, labels=EVIDENCE_LABELS)


@api.get("/search", response_model=SearchPage, summary="Search neurons")
def search_json(state: StateDep, conn: ConnDep, scope: SearchScopeDep, query: SearchQueryDep) -> Response:
    """``{"total", "items"}``: ranked neurons, one row per neuron (JSON twin of /search; a neuron id gives
    its URL in `redirect`)."""
    return rendering.json(_search(state, conn, scope, query))
