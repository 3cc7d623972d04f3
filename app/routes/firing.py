"""Which neurons fire on my text? The page (shareable: the text is in its URL), its htmx fragment, and
POST /api/v1/models/{model}/top-neurons. Same limits as live runs (`app.live`)."""

from __future__ import annotations

import sqlite3
from typing import Annotated

from fastapi import APIRouter, Body, Query, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, Field, StrictBool, StrictStr

from app import rendering
from app.deps import AppState, ConnDep, ModelViewDep, SearchScopeDep, StateDep
from app.errors import NotFound
from app.routes.common import error_responses
from app.routes.intervene import JsonInt
from app.urls import MAX_TEXT_IN_URL, Scope
from app.viewmodels.context import ModelViewContext
from app.viewmodels.top_neurons import (
    MAX_K,
    MAX_PER_TOKEN,
    PER_TOKEN,
    TOP_K,
    TopNeurons,
    build_top_neurons,
    build_top_neurons_page,
)

LIVE_ERRORS = error_responses(404, 413, 422, 503, 504)
#: A text has something to run: at least one character that is not white space (as for live runs).
NOT_BLANK = r"\S"

pages = APIRouter(tags=["pages"], responses=LIVE_ERRORS)
api = APIRouter(prefix="/api/v1/models/{model}", tags=["neurons"], responses=LIVE_ERRORS)

ModelQuery = Annotated[
    str | None, Query(max_length=200, description="The model to run (default: the run's reference model)")
]
KQuery = Annotated[int, Query(ge=1, le=MAX_K, description="Neurons listed over the whole text")]
UniversalOnlyQuery = Annotated[bool, Query(description="Only universal neurons (at the threshold in effect)")]


def _view(state: AppState, conn: sqlite3.Connection, scope: Scope, model: str | None) -> ModelViewContext:
    found = scope.model(model) if model else scope.models[0] if scope.models else None
    if found is None:
        names = ", ".join(m.name for m in scope.models)
        raise NotFound(f"no model {model!r} in run {scope.run.id}; models: {names}")
    return ModelViewContext(conn, scope, found, state.settings, state.vocab(conn, scope), state.live)


@pages.get("/top-neurons", response_class=HTMLResponse, summary="Which neurons fire on my text?")
def top_neurons_page(
    request: Request,
    state: StateDep,
    conn: ConnDep,
    scope: SearchScopeDep,
    model: ModelQuery = None,
    text: Annotated[
        str | None, Query(max_length=MAX_TEXT_IN_URL, description="The text (shareable; empty: the form only)")
    ] = None,
    k: KQuery = TOP_K,
    universal_only: UniversalOnlyQuery = False,
) -> Response:
    """A text box; with ?text=, the neurons of the model that fire most on it (JSON: POST …/top-neurons)."""
    page = build_top_neurons_page(_view(state, conn, scope, model), text or None, k, universal_only)
    return rendering.html(request, "top_neurons.html", page, scope=scope)


@pages.get("/_partials/top-neurons", response_class=HTMLResponse, summary="Which neurons fire on my text? (fragment)")
def top_neurons_partial(
    request: Request,
    state: StateDep,
    conn: ConnDep,
    scope: SearchScopeDep,
    text: Annotated[
        str, Query(min_length=1, max_length=MAX_TEXT_IN_URL, pattern=NOT_BLANK, description="The text to run")
    ],
    model: ModelQuery = None,
    k: KQuery = TOP_K,
    universal_only: UniversalOnlyQuery = False,
) -> Response:
    """htmx fragment: the top neurons over the whole text and per token (hover a token), with their twins."""
    view = _view(state, conn, scope, model)
    result = build_top_neurons(view, text, k, PER_TOKEN, universal_only, twins=True, connect=state.db.connect)
    return rendering.html(request, "_partials/_top_neurons.html", result)


class TopNeuronsRequest(BaseModel):
    """A text to rank the model's neurons on. Strict fields, as for live runs."""

    text: StrictStr = Field(
        min_length=1,
        max_length=1_000_000,
        pattern=NOT_BLANK,
        description="The text: not blank, at most live_max_chars characters (413 beyond; also 413 beyond "
        "live_max_tokens tokens)",
    )
    k: JsonInt = Field(TOP_K, ge=1, le=MAX_K, description="Neurons listed over the whole text")
    per_token: JsonInt = Field(PER_TOKEN, ge=1, le=MAX_PER_TOKEN, description="Neurons listed per token")
    universal_only: StrictBool = Field(False, description="Only universal neurons (at the threshold in effect)")
    twins: StrictBool = Field(False, description="Also each listed neuron's twin in every partner, on the same text")


@api.post("/top-neurons", response_model=TopNeurons, summary="Which neurons fire on a text")
def top_neurons_api(state: StateDep, view: ModelViewDep, body: Annotated[TopNeuronsRequest, Body()]) -> Response:
    """The neurons with the largest activations on the text (over the whole text and per token), universal ones
    flagged, with their twins' activations when asked."""
    result = build_top_neurons(
        view, body.text, body.k, body.per_token, body.universal_only, body.twins, connect=state.db.connect
    )
    return rendering.json(result)
