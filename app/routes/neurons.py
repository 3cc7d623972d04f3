"""The neuron page, its htmx fragments (examples, twins, live) and their JSON twins, and live re-runs.

Every handler takes the neuron's view context (`NeuronViewDep`: 404 for a neuron that does not exist) and hands
it to the builder of its panel.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Query, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, Field, StrictBool, StrictInt, StrictStr

from app import rendering
from app.deps import ModelViewDep, NeuronViewDep
from app.errors import NotFound
from app.routes.common import error_responses
from app.routes.intervene import PositionsQuery
from app.urls import MAX_TEXT_IN_URL
from app.viewmodels.context import NeuronViewContext
from app.viewmodels.examples import Context, ExampleKind, ExamplesPanel, build_examples
from app.viewmodels.intervene import ClampQueryValue
from app.viewmodels.live import MAX_LIVE_NEURONS, LiveRun, TwinsPanel, build_live_run, build_twins_panel
from app.viewmodels.neuron import NeuronPage, build_neuron_page
from app.viewmodels.stats import VocabHistogram, build_vocab_histogram

pages = APIRouter(tags=["pages"], responses=error_responses(404, 422, 503))
api = APIRouter(prefix="/api/v1/models/{model}", tags=["neurons"], responses=error_responses(404, 422, 503))

ContextQuery = Annotated[Context, Query(description="snippet: tokens around the peak; full: the whole stored snippet")]
TextQuery = Annotated[
    str | None,
    Query(max_length=MAX_TEXT_IN_URL, description="Text for a live re-run (shareable; empty: none)"),
]
KindQuery = Annotated[ExampleKind, Query(description="top, quantile (grouped by bin) or random")]
LIVE_ERRORS = error_responses(404, 413, 422, 503, 504)
#: Most examples per bin that one examples request returns.
EXAMPLES_LIMIT = 200
#: A live text has something to run: at least one character that is not white space.
NOT_BLANK = r"\S"


@pages.get("/models/{model}/neurons/{layer}/{neuron}", response_class=HTMLResponse, summary="A neuron's page")
def neuron_page(
    request: Request,
    view: NeuronViewDep,
    context: ContextQuery = "snippet",
    text: TextQuery = None,
    clamp: Annotated[
        ClampQueryValue | None,
        Query(description="An intervention to run on ?text= when the page loads: a number within ±1000, zero or mean"),
    ] = None,
    positions: PositionsQuery = None,
) -> Response:
    """Universality, twins side by side, activations, examples, token tables, vocabulary, weights, family, roles."""
    tag = rendering.etag(view.scope)
    if cached := rendering.not_modified(request, tag):
        return cached
    page = build_neuron_page(view, context, text or None, clamp, positions or None)
    return rendering.html(request, "neuron.html", page, tag=tag, alternate=page.api_url, scope=view.scope)


@api.get("/neurons/{layer}/{neuron}", response_model=NeuronPage, summary="Everything about one neuron")
def neuron_json(request: Request, view: NeuronViewDep, context: ContextQuery = "snippet") -> Response:
    """Universality (matches per partner, best first), analyses when present (activation, weights, vocab,
    family, explanation, roles, examples)."""
    tag = rendering.etag(view.scope)
    if cached := rendering.not_modified(request, tag):
        return cached
    return rendering.json(build_neuron_page(view, context), tag=tag)


def _examples(view: NeuronViewContext, kind: ExampleKind, context: Context) -> ExamplesPanel:
    panel = build_examples(view, kind, context, EXAMPLES_LIMIT)
    if panel is None:
        raise NotFound(f"{view.model.name}/{view.label} has no stored examples")
    return panel


@pages.get(
    "/models/{model}/neurons/{layer}/{neuron}/_partials/examples",
    response_class=HTMLResponse,
    summary="Examples of one kind (fragment)",
)
def examples_partial(
    request: Request, view: NeuronViewDep, kind: KindQuery = "quantile", context: ContextQuery = "snippet"
) -> Response:
    """htmx fragment: top, quantile or random examples, in snippet or full context."""
    panel = _examples(view, kind, context)
    return rendering.html(request, "_partials/_examples.html", panel, tag=rendering.etag(view.scope))


@api.get("/neurons/{layer}/{neuron}/examples", response_model=ExamplesPanel, summary="A neuron's examples")
def examples_json(
    request: Request, view: NeuronViewDep, kind: KindQuery = "quantile", context: ContextQuery = "snippet"
) -> Response:
    """Stored examples of one kind with every token's activation (JSON twin of the examples fragment)."""
    tag = rendering.etag(view.scope)
    if cached := rendering.not_modified(request, tag):
        return cached
    return rendering.json(_examples(view, kind, context), tag=tag)


@pages.get(
    "/models/{model}/neurons/{layer}/{neuron}/_partials/twins",
    response_class=HTMLResponse,
    summary="Twins side by side (fragment)",
    responses=LIVE_ERRORS,
)
def twins_partial(request: Request, view: NeuronViewDep, context: ContextQuery = "snippet") -> Response:
    """htmx fragment: the top examples coloured by this neuron and by its twin in every other model."""
    return rendering.html(request, "_partials/_twins.html", build_twins_panel(view, context))


@api.get(
    "/neurons/{layer}/{neuron}/twins", response_model=TwinsPanel, summary="Twins side by side", responses=LIVE_ERRORS
)
def twins_json(view: NeuronViewDep, context: ContextQuery = "snippet") -> Response:
    """The top examples re-run through every model: activations of this neuron and of each partner's twin."""
    return rendering.json(build_twins_panel(view, context))


@pages.get(
    "/models/{model}/neurons/{layer}/{neuron}/_partials/vocab",
    response_class=HTMLResponse,
    summary="Vocabulary projection histogram (fragment)",
    responses=LIVE_ERRORS,
)
def vocab_partial(
    request: Request,
    view: NeuronViewDep,
    tokens: Annotated[bool, Query(description="Also list the top and bottom tokens")] = True,
) -> Response:
    """htmx fragment: the histogram of W_U·w_out over the whole vocabulary, from the model's weights."""
    return rendering.html(request, "_partials/_vocab.html", build_vocab_histogram(view), show_tokens=tokens)


@api.get(
    "/neurons/{layer}/{neuron}/vocab",
    response_model=VocabHistogram,
    summary="Vocabulary projection histogram",
    responses=LIVE_ERRORS,
)
def vocab_json(view: NeuronViewDep) -> Response:
    """The distribution of the direct logit effect W_U·w_out over the vocabulary, with its top and bottom tokens."""
    return rendering.json(build_vocab_histogram(view))


@pages.get(
    "/models/{model}/neurons/{layer}/{neuron}/_partials/live",
    response_class=HTMLResponse,
    summary="Live re-run of a text (fragment)",
    responses=LIVE_ERRORS,
)
def live_partial(
    request: Request,
    view: NeuronViewDep,
    text: Annotated[
        str, Query(min_length=1, max_length=MAX_TEXT_IN_URL, pattern=NOT_BLANK, description="The text to run")
    ],
) -> Response:
    """htmx fragment: the text's tokens shaded by this neuron and by its twins."""
    result = build_live_run(view, text, [(view.layer, view.neuron)], twins=True)
    return rendering.html(request, "_partials/_live.html", result)


class RunRequest(BaseModel):
    """A live re-run: a text and the neurons to read.

    The fields are strict (no ``"1"`` for 1, no 0 for false): a JSON body has types, and the schema promises them.
    """

    text: StrictStr = Field(
        min_length=1,
        max_length=1_000_000,
        pattern=NOT_BLANK,
        description="The text: not blank, at most live_max_chars characters (413 beyond; also 413 beyond "
        "live_max_tokens tokens)",
    )
    neurons: list[tuple[StrictInt, StrictInt]] = Field(
        min_length=1,
        max_length=MAX_LIVE_NEURONS,
        description="[[layer, neuron], ...] of this model (404 for one it does not have)",
        examples=[[[0, 1]]],
    )
    twins: StrictBool = Field(False, description="Also read each neuron's twin in every partner model")


@api.post("/run", response_model=LiveRun, summary="Run the model on a text", responses=LIVE_ERRORS)
def run_live(view: ModelViewDep, body: Annotated[RunRequest, Body()]) -> Response:
    """Tokens of the text and, per neuron (and twin when asked), its activation at every token."""
    return rendering.json(build_live_run(view, body.text, body.neurons, twins=body.twins))
