"""Search: the jump box (neuron ids redirect), neurons by token, neurons by family."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from app import rendering
from app.deps import ConnDep, ScopeDep, StateDep
from app.errors import NotFound
from app.routes.common import error_responses
from app.viewmodels.search import SearchPage, build_search

pages = APIRouter(tags=["pages"], responses=error_responses(404, 422, 503))
api = APIRouter(prefix="/api/v1", tags=["search"], responses=error_responses(404, 422, 503))

QQuery = Annotated[str, Query(max_length=200, description="L5N1234 / 5:1234 / model/L5N1234, family:NAME, or a token")]
ModelQuery = Annotated[str | None, Query(max_length=200, description="Search one model (default: every model)")]
LimitQuery = Annotated[int, Query(ge=1, le=1000, description="Most hits")]


def _search(state, conn, scope, q: str, model: str | None, limit: int) -> SearchPage:
    target = None
    if model:
        target = scope.model(model)
        if target is None:
            raise NotFound(f"no model {model!r} in run {scope.run.id}")
    return build_search(conn, scope, state.vocab(conn, scope), q, target, min(limit, state.settings.max_rows))


@pages.get(
    "/search",
    response_class=HTMLResponse,
    summary="Search neurons",
    responses={303: {"description": "A neuron id: redirect to its page"}},
)
def search_page(
    request: Request,
    state: StateDep,
    conn: ConnDep,
    scope: ScopeDep,
    q: QQuery = "",
    model: ModelQuery = None,
    limit: LimitQuery = 100,
) -> Response:
    """Jump to a neuron id (redirect), or list neurons by token or family."""
    page = _search(state, conn, scope, q, model, limit)
    if page.redirect:
        return RedirectResponse(page.redirect, status_code=303)
    api_url = scope.api_url("/search", {"q": q, "model": model})
    return rendering.html(request, "search.html", page, alternate=api_url, scope=scope)


@api.get("/search", response_model=SearchPage, summary="Search neurons")
def search_json(
    state: StateDep, conn: ConnDep, scope: ScopeDep, q: QQuery = "", model: ModelQuery = None, limit: LimitQuery = 100
) -> Response:
    """JSON twin of /search (a neuron id gives its URL in `redirect`)."""
    return rendering.json(_search(state, conn, scope, q, model, limit))
