"""The neuron page, its htmx fragments (examples, twins, live) and their JSON twins, and live re-runs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Query, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, Field

from app import rendering
from app.deps import AppState, ConnDep, ModelDep, NeuronDep, NeuronKey, ScopeDep, StateDep
from app.errors import NotFound
from app.routes.common import error_responses
from app.urls import Scope
from app.viewmodels.live import LiveRun, TwinsPanel, build_live_run, build_twins_panel
from app.viewmodels.neuron import (
    Context,
    ExampleKind,
    ExamplesPanel,
    NeuronPage,
    VocabHistogram,
    build_examples,
    build_neuron_page,
    build_vocab_histogram,
)

pages = APIRouter(tags=["pages"], responses=error_responses(404, 422, 503))
api = APIRouter(prefix="/api/v1/models/{model}", tags=["neurons"], responses=error_responses(404, 422, 503))

ContextQuery = Annotated[Context, Query(description="snippet: tokens around the peak; full: the whole stored snippet")]
TextQuery = Annotated[str | None, Query(max_length=100_000, description="Text for a live re-run (shareable)")]
KindQuery = Annotated[ExampleKind, Query(description="top, quantile (grouped by bin) or random")]
LIVE_ERRORS = error_responses(404, 413, 422, 503, 504)


def _page(state: AppState, conn, scope: Scope, key: NeuronKey, context: Context, text: str | None) -> NeuronPage:
    return build_neuron_page(
        conn,
        scope,
        key.model,
        key.layer,
        key.neuron,
        state.settings,
        state.vocab(conn, scope),
        state.tables(conn, scope, key.model),
        context=context,
        text=text or None,
        live_max_tokens=state.live.max_tokens(scope.models),
    )


@pages.get("/models/{model}/neurons/{layer}/{neuron}", response_class=HTMLResponse, summary="A neuron's page")
def neuron_page(
    request: Request,
    state: StateDep,
    conn: ConnDep,
    scope: ScopeDep,
    key: NeuronDep,
    context: ContextQuery = "snippet",
    text: TextQuery = None,
) -> Response:
    """Universality, twins side by side, activations, examples, token tables, vocabulary, weights, family, roles."""
    tag = rendering.etag(scope)
    if cached := rendering.not_modified(request, tag):
        return cached
    page = _page(state, conn, scope, key, context, text)
    return rendering.html(request, "neuron.html", page, tag=tag, alternate=page.api_url, scope=scope)


@pages.get(
    "/models/{model}/neurons/{layer}/{neuron}/_partials/examples",
    response_class=HTMLResponse,
    summary="Examples of one kind (fragment)",
)
def examples_partial(
    request: Request,
    state: StateDep,
    conn: ConnDep,
    scope: ScopeDep,
    key: NeuronDep,
    kind: KindQuery = "quantile",
    context: ContextQuery = "snippet",
) -> Response:
    """htmx fragment: top, quantile or random examples, in snippet or full context."""
    panel = _examples(state, conn, scope, key, kind, context)
    return rendering.html(request, "_partials/_examples.html", panel, tag=rendering.etag(scope), key=key, scope=scope)


@pages.get(
    "/models/{model}/neurons/{layer}/{neuron}/_partials/twins",
    response_class=HTMLResponse,
    summary="Twins side by side (fragment)",
    responses=LIVE_ERRORS,
)
def twins_partial(
    request: Request, state: StateDep, conn: ConnDep, scope: ScopeDep, key: NeuronDep, context: ContextQuery = "snippet"
) -> Response:
    """htmx fragment: the top examples coloured by this neuron and by its twin in every other model."""
    panel = build_twins_panel(
        conn, scope, state.live, state.vocab(conn, scope), key.model, key.layer, key.neuron, state.settings, context
    )
    return rendering.html(request, "_partials/_twins.html", panel)


def _vocab_histogram(state: AppState, conn, scope: Scope, key: NeuronKey) -> VocabHistogram:
    vocab = state.vocab(conn, scope)  # SQL first: the request's SQL deadline keeps running during model work
    return build_vocab_histogram(state.live.vocab_effect(key.model, key.layer, key.neuron), vocab)


@pages.get(
    "/models/{model}/neurons/{layer}/{neuron}/_partials/vocab",
    response_class=HTMLResponse,
    summary="Vocabulary projection histogram (fragment)",
    responses=LIVE_ERRORS,
)
def vocab_partial(
    request: Request,
    state: StateDep,
    conn: ConnDep,
    scope: ScopeDep,
    key: NeuronDep,
    tokens: Annotated[bool, Query(description="Also list the top and bottom tokens")] = True,
) -> Response:
    """htmx fragment: the histogram of W_U·w_out over the whole vocabulary, from the model's weights."""
    page = _vocab_histogram(state, conn, scope, key)
    return rendering.html(request, "_partials/_vocab.html", page, show_tokens=tokens)


@api.get(
    "/neurons/{layer}/{neuron}/vocab",
    response_model=VocabHistogram,
    summary="Vocabulary projection histogram",
    responses=LIVE_ERRORS,
)
def vocab_json(state: StateDep, conn: ConnDep, scope: ScopeDep, key: NeuronDep) -> Response:
    """The distribution of the direct logit effect W_U·w_out over the vocabulary, with its top and bottom tokens."""
    return rendering.json(_vocab_histogram(state, conn, scope, key))


@pages.get(
    "/models/{model}/neurons/{layer}/{neuron}/_partials/live",
    response_class=HTMLResponse,
    summary="Live re-run of a text (fragment)",
    responses=LIVE_ERRORS,
)
def live_partial(
    request: Request,
    state: StateDep,
    conn: ConnDep,
    scope: ScopeDep,
    key: NeuronDep,
    text: Annotated[str, Query(max_length=100_000, description="The text to run")],
) -> Response:
    """htmx fragment: the text's tokens shaded by this neuron and by its twins."""
    result = build_live_run(
        conn, scope, state.live, state.vocab(conn, scope), key.model, text, [(key.layer, key.neuron)], twins=True
    )
    return rendering.html(request, "_partials/_live.html", result)


@api.get("/neurons/{layer}/{neuron}", response_model=NeuronPage, summary="Everything about one neuron")
def neuron_json(
    request: Request, state: StateDep, conn: ConnDep, scope: ScopeDep, key: NeuronDep, context: ContextQuery = "snippet"
) -> Response:
    """Universality (matches per partner, best first), analyses when present (activation, weights, vocab,
    family, explanation, roles, examples)."""
    tag = rendering.etag(scope)
    if cached := rendering.not_modified(request, tag):
        return cached
    return rendering.json(_page(state, conn, scope, key, context, None), tag=tag)


def _examples(
    state: AppState, conn, scope: Scope, key: NeuronKey, kind: ExampleKind, context: Context
) -> ExamplesPanel:
    panel = build_examples(
        conn, (key.model.id, key.layer, key.neuron), kind, context, state.settings, state.vocab(conn, scope), limit=200
    )
    if panel is None:
        raise NotFound(f"{key.model.name}/{key.label} has no stored examples")
    return panel


@api.get("/neurons/{layer}/{neuron}/examples", response_model=ExamplesPanel, summary="A neuron's examples")
def examples_json(
    request: Request,
    state: StateDep,
    conn: ConnDep,
    scope: ScopeDep,
    key: NeuronDep,
    kind: KindQuery = "quantile",
    context: ContextQuery = "snippet",
) -> Response:
    """Stored examples of one kind with every token's activation (JSON twin of the examples fragment)."""
    tag = rendering.etag(scope)
    if cached := rendering.not_modified(request, tag):
        return cached
    return rendering.json(_examples(state, conn, scope, key, kind, context), tag=tag)


@api.get(
    "/neurons/{layer}/{neuron}/twins", response_model=TwinsPanel, summary="Twins side by side", responses=LIVE_ERRORS
)
def twins_json(
    state: StateDep, conn: ConnDep, scope: ScopeDep, key: NeuronDep, context: ContextQuery = "snippet"
) -> Response:
    """The top examples re-run through every model: activations of this neuron and of each partner's twin."""
    return rendering.json(
        build_twins_panel(
            conn, scope, state.live, state.vocab(conn, scope), key.model, key.layer, key.neuron, state.settings, context
        )
    )


class RunRequest(BaseModel):
    """A live re-run: a text and the neurons to read."""

    text: str = Field(max_length=1_000_000, description="The text (at most live_max_chars characters: 413 beyond)")
    neurons: list[tuple[int, int]] = Field(
        max_length=1000, description="[[layer, neuron], ...] of this model", examples=[[[0, 1]]]
    )
    twins: bool = Field(False, description="Also read each neuron's twin in every partner model")


@api.post("/run", response_model=LiveRun, summary="Run the model on a text", responses=LIVE_ERRORS)
def run_live(
    state: StateDep, conn: ConnDep, scope: ScopeDep, model: ModelDep, body: Annotated[RunRequest, Body()]
) -> Response:
    """Tokens of the text and, per neuron (and twin when asked), its activation at every token."""
    result = build_live_run(
        conn, scope, state.live, state.vocab(conn, scope), model, body.text, body.neurons, twins=body.twins
    )
    return rendering.json(result)
