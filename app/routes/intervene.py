"""Interventions on a neuron: the neuron page's panel (an htmx fragment) and POST /api/v1/models/{model}/intervene.

Same limits as live runs (`app.live`): characters and tokens (413), time (504), concurrency (503 with
Retry-After), published tables and missing model folders (503).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Query, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, BeforeValidator, Field, StrictBool, StrictStr

from app import rendering
from app.deps import ModelViewDep, NeuronViewDep
from app.routes.common import error_responses
from app.urls import MAX_TEXT_IN_URL
from app.viewmodels.intervene import (
    MAX_POSITIONS_IN_URL,
    MAX_TOP_K,
    POSITIONS_PATTERN,
    TOP_K,
    ClampQueryValue,
    ClampValue,
    InterventionRun,
    build_intervention,
    parse_positions,
)

#: Statuses of every intervention: 422 also for a position outside the text's tokens, which no schema can state
#: (it depends on how the text tokenizes), and for ``mean`` where the run stores no mean activation.
INTERVENE_ERRORS = error_responses(404, 413, 422, 503, 504)
#: A text has something to run: at least one character that is not white space (as for live runs).
NOT_BLANK = r"\S"
#: The most positions a request sets; the settings cap a text at 8,192 tokens.
MAX_POSITION = 8191
#: The id of the panel's form: htmx names it in ``HX-Trigger``, and only its requests move the page's URL.
FORM_ID = "intervene-form"


def _json_integer(value: object) -> object:
    """JSON Schema's integer: 17 and 17.0 (an integral number), never "17" or true.

    >>> _json_integer(17.0), _json_integer(3)
    (17.0, 3)
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be an integer")
    return value  # pydantic's int then takes 17.0 and refuses 17.5


#: An integer field of a JSON body: its schema is ``integer``, which 17.0 satisfies (pydantic's StrictInt would
#: refuse it); text and booleans are refused as the schema says.
JsonInt = Annotated[int, BeforeValidator(_json_integer)]

pages = APIRouter(tags=["pages"], responses=INTERVENE_ERRORS)
api = APIRouter(prefix="/api/v1/models/{model}", tags=["interventions"], responses=INTERVENE_ERRORS)

ClampQuery = Annotated[
    ClampQueryValue,
    Query(description="A number within ±1000 to clamp the neuron to, zero, or mean (its mean activation)"),
]
PositionsQuery = Annotated[
    str | None,
    Query(
        max_length=MAX_POSITIONS_IN_URL,
        pattern=POSITIONS_PATTERN,
        description="Comma-separated token positions (from 0, BOS excluded) to set; empty: every position "
        "(BOS included); 422 for one outside the text's tokens",
    ),
]


@pages.get(
    "/models/{model}/neurons/{layer}/{neuron}/_partials/intervene",
    response_class=HTMLResponse,
    summary="Intervention on a neuron and its twins (fragment)",
)
def intervene_partial(
    request: Request,
    view: NeuronViewDep,
    text: Annotated[
        str, Query(min_length=1, max_length=MAX_TEXT_IN_URL, pattern=NOT_BLANK, description="The text to run")
    ],
    clamp: ClampQuery,
    positions: PositionsQuery = None,
) -> Response:
    """htmx fragment: predictions before and after, per position, for this neuron and its twins side by side."""
    result = build_intervention(view, text, view.layer, view.neuron, clamp, parse_positions(positions), twins=True)
    response = rendering.html(request, "_partials/_intervene.html", result)
    if request.headers.get("HX-Trigger") == FORM_ID:  # a submitted form: the page's URL now holds the intervention
        response.headers["HX-Push-Url"] = result.url
    return response


class InterveneRequest(BaseModel):
    """An intervention: a text, a neuron of this model, the value to set it to, and where.

    The fields are strict (no ``"1"`` for 1, no 0 for false), as for live runs; an integer may be written 17.0.
    """

    text: StrictStr = Field(
        min_length=1,
        max_length=1_000_000,
        pattern=NOT_BLANK,
        description="The text: not blank, at most live_max_chars characters (413 beyond; also 413 beyond "
        "live_max_tokens tokens)",
    )
    neuron: tuple[JsonInt, JsonInt] = Field(
        description="[layer, neuron] of this model (404 for one it does not have)", examples=[[0, 1]]
    )
    value: ClampValue = Field(
        description="A number within ±1000 to clamp the neuron to; zero; or mean: its mean activation over the "
        "precompute's tokens (each twin its own; 422 where the run stores none)",
        examples=[5.0, "zero"],
    )
    positions: list[Annotated[JsonInt, Field(ge=0, le=MAX_POSITION)]] | None = Field(
        None,
        min_length=1,
        max_length=MAX_POSITION + 1,
        description="Token positions to set (from 0, BOS excluded; 422 outside the text's tokens); omitted or "
        "null: every position, BOS included",
    )
    twins: StrictBool = Field(False, description="Also run the same intervention on the neuron's twin in every partner")
    top_k: JsonInt = Field(TOP_K, ge=1, le=MAX_TOP_K, description="Predictions listed per position")


@api.post("/intervene", response_model=InterventionRun, summary="Clamp or ablate a neuron on a text")
def intervene_api(view: ModelViewDep, body: Annotated[InterveneRequest, Body()]) -> Response:
    """Per position, the next-token predictions before and after, loss, entropy and KL; the twins' too, each with
    its agreement with the requested neuron's effect."""
    layer, neuron = body.neuron
    result = build_intervention(view, body.text, layer, neuron, body.value, body.positions, body.twins, body.top_k)
    return rendering.json(result)
