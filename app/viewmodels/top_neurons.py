"""Which neurons fire on my text? The neurons of a model with the largest activations on a text, over the whole
text (each neuron's largest activation) and per token, universal ones flagged, with their twins' activations.

The ranking runs on the model's device (`app.intervene.firing`): only k neurons per token come back. With
``universal_only`` the ranking is restricted by a boolean mask built from one query (`app.queries.firing`).
The twins of the listed neurons are known only after the run, so they are looked up on a fresh connection (the
request's SQL deadline started before the model work; see `app.live`) and run through the partner models by the
live runner's `run`, like the live panel.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

import numpy as np
from pydantic import Field

from app.intervene import Firing, firing
from app.live import LiveRequest
from app.queries import firing as fq
from app.queries.models import Model
from app.urls import MAX_TEXT_IN_URL, neuron_label
from app.viewmodels.common import ViewModel, number, rounded, token_texts
from app.viewmodels.context import ModelViewContext

#: Neurons over the whole text: the default and the most a request may ask for.
TOP_K = 20
MAX_K = 100
#: Neurons per token: the default and the most.
PER_TOKEN = 5
MAX_PER_TOKEN = 20

#: Opens a connection with a fresh SQL deadline (`app.db.Database.connect`).
Connect = Callable[[], AbstractContextManager[sqlite3.Connection]]


class TwinFiring(ViewModel):
    """A listed neuron's twin (best match in a partner model) on the same text."""

    model: str
    layer: int
    neuron: int
    id: str
    url: str
    corr: float | None = Field(description="Correlation with the listed neuron (precompute)")
    max: float = Field(description="Its largest activation on the text")
    activations: list[float] = Field(description="hook_post at every token")


class FiringNeuron(ViewModel):
    """One of the neurons that fire most on the text."""

    model: str
    layer: int
    neuron: int
    id: str = Field(description="L{layer}N{neuron}")
    url: str = Field(description="The neuron's page")
    universal: bool | None = Field(description="Universal at the threshold in effect (null: no aggregates)")
    max: float = Field(description="Its largest activation on the text")
    peak: int = Field(description="The token position of that activation")
    peak_token: str
    activations: list[float] = Field(description="hook_post at every token")
    twins: list[TwinFiring] = Field(description="Its twin in every partner model (with twins=true)")


class TokenNeuron(ViewModel):
    """A neuron among the top ones at one token."""

    layer: int
    neuron: int
    id: str
    url: str
    activation: float
    universal: bool | None


class TokenFiring(ViewModel):
    position: int
    token: str
    neurons: list[TokenNeuron] = Field(description="The per_token neurons with the largest activation here")


class TopNeurons(ViewModel):
    """The answer of POST /api/v1/models/{model}/top-neurons and of the "which neurons fire" panel."""

    model: str
    text: str
    tokens: list[str] = Field(description="Decoded token texts (BOS excluded)")
    token_ids: list[int]
    k: int
    per_token: int
    universal_only: bool
    threshold: float = Field(description="The universality threshold in effect")
    n_universal: int | None = Field(description="The model's universal neurons (null: no aggregates)")
    neurons: list[FiringNeuron] = Field(description="Largest activation over the whole text first")
    by_token: list[TokenFiring] = Field(description="Per token, its top neurons")
    url: str = Field(description="This result's page (shareable)")
    seconds: float = Field(description="Time of the forward passes (cached parts repeat their first time)")


def _flag(universal: set[int] | None, flat: int) -> bool | None:
    return None if universal is None else flat in universal


def build_top_neurons(
    view: ModelViewContext,
    text: str,
    k: int,
    per_token: int,
    universal_only: bool,
    twins: bool,
    connect: Connect,
) -> TopNeurons:
    """Run `text` through the model and list the neurons that fire most on it; see the module's docstring."""
    runner, scope, model = view.live, view.scope, view.model
    runner.check_has_weights([model])
    runner.check_text(text)
    universal_ids = fq.universal_ids(view.conn, model.id, model.d_mlp, scope.custom_threshold)
    universal = None if universal_ids is None else set(universal_ids.tolist())
    allowed = None
    if universal_only:
        allowed = np.zeros(model.n_neurons, dtype=bool)
        if universal_ids is not None:
            allowed[universal_ids] = True
    partners = [m for m in scope.models if m.id != model.id and not m.published] if twins else []
    ids, skip = runner.tokenize(model, text, scope.run.bos_id, [model, *partners])
    key = (
        "firing",
        (model.run_id, model.name, model.tokenizer_hash),
        ids,
        skip,
        k,
        per_token,
        scope.threshold if universal_only else None,
    )

    def work() -> tuple[Firing, float]:
        started = time.perf_counter()
        with runner.using(model) as loaded:
            found = firing(loaded, ids, skip, k, per_token, allowed)
        return found, time.perf_counter() - started

    found, seconds = runner.compute(key, [model], work, "finding the top neurons")
    body = list(ids[skip:])
    tokens = token_texts(view.vocab, body)
    listed = [divmod(int(flat), model.d_mlp) for flat in found.top]
    twin_rows = _twins(connect, model, listed, {m.name for m in partners}) if partners else {}
    twin_acts: dict[tuple[str, int, int], np.ndarray] = {}
    wanted = sorted({(row.partner, row.twin_layer, row.twin_neuron) for rows in twin_rows.values() for row in rows})
    if wanted:
        models = [m for m in partners if any(w[0] == m.name for w in wanted)]
        pairs = tuple(tuple((tl, tn) for name, tl, tn in wanted if name == m.name) for m in models)
        result = runner.run(LiveRequest(tuple(models), (ids,), pairs))
        seconds += result.seconds
        for m, model_pairs, rows in zip(models, pairs, result.activations, strict=True):
            for i, (tl, tn) in enumerate(model_pairs):
                twin_acts[(m.name, tl, tn)] = rows[0][skip:, i]
    neurons = []
    for i, (layer, neuron) in enumerate(listed):
        twins_of = []
        for row in twin_rows.get((layer, neuron), []):
            acts = twin_acts[(row.partner, row.twin_layer, row.twin_neuron)]
            twins_of.append(
                TwinFiring(
                    model=row.partner,
                    layer=row.twin_layer,
                    neuron=row.twin_neuron,
                    id=neuron_label(row.twin_layer, row.twin_neuron),
                    url=scope.neuron_url(row.partner, row.twin_layer, row.twin_neuron),
                    corr=number(row.corr),
                    max=round(float(acts.max()), 4) if acts.size else 0.0,
                    activations=rounded(acts),
                )
            )
        peak = int(found.top_peak[i])
        neurons.append(
            FiringNeuron(
                model=model.name,
                layer=layer,
                neuron=neuron,
                id=neuron_label(layer, neuron),
                url=scope.neuron_url(model.name, layer, neuron),
                universal=_flag(universal, int(found.top[i])),
                max=round(float(found.top_max[i]), 4),
                peak=peak,
                peak_token=tokens[peak],
                activations=rounded(found.top_acts[i]),
                twins=twins_of,
            )
        )
    by_token = []
    for position, token in enumerate(tokens):
        row_neurons = []
        for flat, value in zip(found.token_top[position], found.token_values[position], strict=True):
            layer, neuron = divmod(int(flat), model.d_mlp)
            row_neurons.append(
                TokenNeuron(
                    layer=layer,
                    neuron=neuron,
                    id=neuron_label(layer, neuron),
                    url=scope.neuron_url(model.name, layer, neuron),
                    activation=round(float(value), 4),
                    universal=_flag(universal, int(flat)),
                )
            )
        by_token.append(TokenFiring(position=position, token=token, neurons=row_neurons))
    return TopNeurons(
        model=model.name,
        text=text,
        tokens=tokens,
        token_ids=body,
        k=k,
        per_token=per_token,
        universal_only=universal_only,
        threshold=scope.threshold,
        n_universal=None if universal_ids is None else int(universal_ids.size),
        neurons=neurons,
        by_token=by_token,
        url=scope.top_neurons_url(
            model.name,
            {
                "text": text if len(text) <= MAX_TEXT_IN_URL else None,
                "k": k if k != TOP_K else None,
                "universal_only": True if universal_only else None,
            },
        ),
        seconds=round(seconds, 4),
    )


def _twins(
    connect: Connect, model: Model, listed: list[tuple[int, int]], partners: set[str]
) -> dict[tuple[int, int], list[fq.TwinRow]]:
    """Twins of the listed neurons in `partners`, per neuron, read on a fresh connection (after the model work)."""
    with connect() as conn:
        rows = fq.twins_of(conn, model.id, listed)
    out: dict[tuple[int, int], list[fq.TwinRow]] = {}
    for row in rows:
        if row.partner in partners:
            out.setdefault((row.layer, row.neuron), []).append(row)
    return out


class TopNeuronsPage(ViewModel):
    """The "which neurons fire on my text?" page: its form's state (all in the URL) and where the result loads."""

    model: str = Field(description="The model the text is run through")
    models: list[str] = Field(description="The run's models that can run live")
    text: str | None = Field(description="The text in the URL (?text=)")
    k: int
    universal_only: bool
    enabled: bool = Field(description="Live runs are on and the model has weights here")
    max_chars: int = Field(description="Longest text the form sends")
    partial_url: str | None = Field(description="htmx fragment with the result for `text`")
    api_url: str = Field(description="POST endpoint (the JSON twin of the result)")


def build_top_neurons_page(view: ModelViewContext, text: str | None, k: int, universal_only: bool) -> TopNeuronsPage:
    scope, model, settings = view.scope, view.model, view.settings
    params: dict[str, object] = {"text": text, "k": k if k != TOP_K else None}
    params["universal_only"] = True if universal_only else None
    return TopNeuronsPage(
        model=model.name,
        models=[m.name for m in scope.models if not m.published],
        text=text,
        k=k,
        universal_only=universal_only,
        enabled=settings.live_enabled and not model.published,
        max_chars=min(settings.live_max_chars, MAX_TEXT_IN_URL),
        partial_url=scope.top_neurons_url(model.name, params, partial=True) if text else None,
        api_url=scope.api_model_url(model.name, "/top-neurons"),
    )
