"""Live re-runs and the twins side by side: activations computed now, by `app.live`, for a neuron and its twins.

A neuron's twins are, for each partner model, its best-matching partner neuron (``partner_scores``). Both
views run every model of the family on the same tokens (they share a tokenizer: the precompute checked it),
so one row of tokens is shaded once per neuron.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import Field

from app.errors import NotFound, Unprocessable
from app.live import LiveRequest, check_vocab_ids
from app.queries import analyses as q
from app.queries import neurons as nq
from app.queries.models import Model
from app.urls import neuron_label
from app.viewmodels.common import ViewModel, number, rounded, token_texts
from app.viewmodels.context import ModelViewContext, NeuronViewContext
from app.viewmodels.examples import Context, example_window, peak_index

Role = Literal["self", "twin"]

#: Most neurons one live request may ask for (before twins are added); the request schema states it.
MAX_LIVE_NEURONS = 32


class LiveNeuron(ViewModel):
    """One neuron of a live result, with its activation at every token."""

    model: str = Field(description="Model name")
    layer: int
    neuron: int
    id: str = Field(description="L{layer}N{neuron}")
    url: str = Field(description="The neuron's page")
    role: Role = Field(description="self: a requested neuron; twin: a partner model's best match of one")
    twin_of: str | None = Field(description="For twins: the requested neuron (model/L{l}N{n})")
    corr: float | None = Field(description="For twins: correlation with the requested neuron")
    activations: list[float] = Field(description="hook_post at every token")
    max: float = Field(description="Largest activation")
    min: float = Field(description="Smallest activation")


class LiveRun(ViewModel):
    """The answer of POST /api/v1/models/{model}/run and of the live panel."""

    model: str = Field(description="The model the text was sent to")
    text: str = Field(description="The text that was run")
    tokens: list[str] = Field(description="Decoded token texts (BOS excluded)")
    token_ids: list[int]
    neurons: list[LiveNeuron]
    seconds: float = Field(
        description="Time of the forward passes that computed this result; "
        "a cached answer repeats the first run's value"
    )


class TwinExample(ViewModel):
    """One top example of the neuron, re-run through every model of the family."""

    rank: int
    dataset_row: int
    peak: int
    window: tuple[int, int] = Field(description="[first, last) token shown in the current context mode")
    stored_activation: float | None = Field(description="The neuron's stored activation at the peak")
    tokens: list[str]
    activations: list[list[float]] = Field(description="Per neuron (same order as `neurons`), per token")

    @property
    def number(self) -> int:
        """The example's place among the top examples, from 1."""
        return self.rank + 1


class TwinsPanel(ViewModel):
    """The same top examples coloured by this neuron and by each of its twins."""

    neurons: list[LiveNeuron] = Field(description="This neuron first, then its twins (activations left empty)")
    scales: list[float] = Field(description="Per neuron: the |activation| that gets full colour")
    examples: list[TwinExample]
    context: Context
    note: str = Field(description="How the activations were computed")


def twin_targets(view: ModelViewContext, layer: int, neuron: int) -> list[tuple[Model, int, int, float | None]]:
    """(model, layer, neuron, corr) for each partner's best match, in family order."""
    out = []
    for p in nq.partner_scores(view.conn, view.model.id, layer, neuron):
        partner = view.scope.model(p.partner)
        if partner is not None:
            out.append((partner, p.max_layer, p.max_neuron, number(p.max_corr)))
    return out


def _plan(
    view: ModelViewContext, neurons: Sequence[tuple[int, int]], twins: bool
) -> tuple[list[Model], list[list[tuple[int, int]]], list[tuple[Model, int, int, Role, str | None, float | None]]]:
    """Group the neurons to read by model; return (models, neurons per model, output order)."""
    model = view.model
    order: list[tuple[Model, int, int, Role, str | None, float | None]] = []
    for layer, neuron in neurons:
        if not (0 <= layer < model.n_layers and 0 <= neuron < model.d_mlp):
            raise NotFound(f"model {model.name!r} has no neuron {neuron_label(layer, neuron)}")
        order.append((model, layer, neuron, "self", None, None))
        if twins:
            owner = f"{model.name}/{neuron_label(layer, neuron)}"
            order += [(m, tl, tn, "twin", owner, c) for m, tl, tn, c in twin_targets(view, layer, neuron)]
    models: list[Model] = []
    pairs: list[list[tuple[int, int]]] = []
    for m, layer, neuron, *_ in order:
        if m not in models:
            models.append(m)
            pairs.append([])
        group = pairs[models.index(m)]
        if (layer, neuron) not in group:
            group.append((layer, neuron))
    return models, pairs, order


def _pick(
    result_rows: Sequence[Sequence[np.ndarray]],
    models: list[Model],
    pairs: list[list[tuple[int, int]]],
    m: Model,
    layer: int,
    neuron: int,
    row: int,
) -> np.ndarray:
    i = models.index(m)
    return result_rows[i][row][:, pairs[i].index((layer, neuron))]


def build_live_run(view: ModelViewContext, text: str, neurons: Sequence[tuple[int, int]], twins: bool) -> LiveRun:
    """Run the model (and, with `twins`, every partner) on `text` and read the neurons at every token."""
    # The request schema bounds the count already; this guards callers that build the list themselves.
    if not 1 <= len(neurons) <= MAX_LIVE_NEURONS:
        raise Unprocessable(f"give 1 to {MAX_LIVE_NEURONS} [layer, neuron] pairs")
    runner, scope, model = view.live, view.scope, view.model
    runner.check_text(text)
    models, pairs, order = _plan(view, neurons, twins)
    ids, skip = runner.tokenize(model, text, scope.run.bos_id, models)
    result = runner.run(LiveRequest(tuple(models), (ids,), tuple(tuple(p) for p in pairs)))
    body = list(ids[skip:])
    out = []
    for m, layer, neuron, role, owner, corr in order:
        acts = _pick(result.activations, models, pairs, m, layer, neuron, 0)[skip:]
        out.append(
            LiveNeuron(
                model=m.name,
                layer=layer,
                neuron=neuron,
                id=neuron_label(layer, neuron),
                url=view.scope.neuron_url(m.name, layer, neuron),
                role=role,
                twin_of=owner,
                corr=corr,
                activations=rounded(acts),
                max=round(float(acts.max()), 4) if acts.size else 0.0,
                min=round(float(acts.min()), 4) if acts.size else 0.0,
            )
        )
    return LiveRun(
        model=model.name,
        text=text,
        tokens=token_texts(view.vocab, body),
        token_ids=body,
        neurons=out,
        seconds=round(result.seconds, 4),
    )


def build_twins_panel(view: NeuronViewContext, context: Context) -> TwinsPanel:
    """The neuron's top examples re-run now through every model, coloured by this neuron and by each twin."""
    stored = q.examples(view.conn, view.key, "top", view.settings.twin_examples)
    if not stored:
        raise NotFound(f"{view.model.name}/{view.label} has no stored examples to compare")
    models, pairs, order = _plan(view, [(view.layer, view.neuron)], twins=True)
    bos = view.scope.run.bos_id
    # Snippets that start mid-row get the BOS every dataset row starts with; it is dropped from the display.
    rows = tuple(tuple(([bos] if bos is not None and row.start > 0 else []) + row.token_ids.tolist()) for row in stored)
    check_vocab_ids(rows, min(m.d_vocab for m in models))
    result = view.live.run(LiveRequest(tuple(models), rows, tuple(tuple(p) for p in pairs)))
    examples = []
    per_neuron_max = np.zeros(len(order))
    for r, row in enumerate(stored):
        skip = len(rows[r]) - row.token_ids.size
        acts = [_pick(result.activations, models, pairs, m, tl, tn, r)[skip:] for m, tl, tn, *_ in order]
        per_neuron_max = np.maximum(per_neuron_max, [float(np.abs(a).max()) if a.size else 0.0 for a in acts])
        peak = peak_index(row)
        examples.append(
            TwinExample(
                rank=row.rank,
                dataset_row=row.dataset_row,
                peak=peak,
                window=example_window(peak, int(row.token_ids.size), context, view.settings),
                stored_activation=number(row.activation),
                tokens=token_texts(view.vocab, row.token_ids.tolist()),
                activations=[rounded(a) for a in acts],
            )
        )
    return TwinsPanel(
        neurons=[
            LiveNeuron(
                model=m.name,
                layer=tl,
                neuron=tn,
                id=neuron_label(tl, tn),
                url=view.scope.neuron_url(m.name, tl, tn),
                role=role,
                twin_of=owner,
                corr=corr,
                activations=[],
                max=0.0,
                min=0.0,
            )
            for m, tl, tn, role, owner, corr in order
        ],
        scales=[round(max(float(s), 1e-6), 6) for s in per_neuron_max],
        examples=examples,
        context=context,
        note="Every row is re-run now on the stored snippet (with BOS in front); the first row is this neuron.",
    )
