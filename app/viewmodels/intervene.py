"""Interventions on a neuron and on its twins: clamp or ablate it on a text and compare the predictions.

A neuron is set to a value (``clamp``), to 0 (``zero``) or to its mean over the precompute's counted tokens
(``mean``: ``activation_stats.post_mean`` of that neuron; each twin gets its own mean), at every position of the
text or at chosen ones; each model then predicts the next token with and without the change (`app.intervene`).
The same intervention runs on the neuron's twin in every other model of the family (its best match,
``partner_scores``, as the twins panel finds them), and each twin gets one agreement number (`AGREEMENT_METHOD`).

All SQL is done before the models run (see `app.live`); the models run in one live slot within the live time limit.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from pydantic import Field

from app.errors import NotFound, Unprocessable
from app.intervene import MOVED_TOKENS, Clamp, Intervention, NextToken, agreement, intervene
from app.queries import firing as fq
from app.queries.models import Model
from app.urls import MAX_TEXT_IN_URL, neuron_label
from app.viewmodels.common import ViewModel, number, token_texts
from app.viewmodels.context import ModelViewContext, NeuronViewContext
from app.viewmodels.live import Role, twin_targets

#: The largest |value| a neuron may be clamped to (a GPT-2 neuron's activations rarely pass 10; 1000 leaves room).
MAX_CLAMP = 1000.0
#: Predictions per position: the default and the most a request may ask for.
TOP_K = 5
MAX_TOP_K = 20
Ablation = Literal["zero", "mean"]
#: What a JSON body may set a neuron to: a finite number within ±MAX_CLAMP (strict: no "5", no true), or an ablation.
ClampValue = Annotated[float, Field(ge=-MAX_CLAMP, le=MAX_CLAMP, allow_inf_nan=False, strict=True)] | Ablation
#: The same in a URL's query string, where every value is text (``?clamp=5``).
ClampQueryValue = Annotated[float, Field(ge=-MAX_CLAMP, le=MAX_CLAMP, allow_inf_nan=False)] | Ablation
#: Positions in a URL: comma-separated token indices (empty: every position). Digits are [0-9]: JSON Schema's
#: ``\d`` is ASCII, Python's is not.
POSITIONS_PATTERN = r"^ *([0-9]{1,5} *(, *[0-9]{1,5} *)*)?$"
#: Longest ``positions`` a URL carries (about 100 positions), so a shared URL stays bounded (issue 8).
MAX_POSITIONS_IN_URL = 400

AGREEMENT_METHOD = (
    "Pearson's r between the change of log-probability (patched − clean) in the requested neuron's model and in "
    "the twin's, over the text's positions from the first clamped one on × the union of both models' "
    f"{MOVED_TOKENS} most-moved tokens (largest change of their mean probability over those positions); null "
    "where either change is constant (e.g. a clamp that changes nothing)"
)


class Prediction(ViewModel):
    token: str = Field(description="Decoded token text")
    token_id: int
    prob: float = Field(description="Probability of being the next token")


class NextTokenView(ViewModel):
    """One run's next-token distribution at each of the text's tokens."""

    top: list[list[Prediction]] = Field(description="Per position: the top_k most probable next tokens")
    entropy: list[float] = Field(description="Per position: entropy of the next-token distribution (nats)")
    loss: list[float | None] = Field(
        description="Per position: cross-entropy of the true next token (nats); null at the last position"
    )


class MovedToken(ViewModel):
    """A token whose probability moved most over the text (mean over the positions the clamp can change)."""

    token: str
    token_id: int
    clean: float = Field(description="Mean probability without the intervention")
    patched: float = Field(description="Mean probability with it")
    change: float = Field(description="patched − clean")


class InterventionResult(ViewModel):
    """One model's neuron (the requested one or a twin), clean and intervened."""

    model: str
    layer: int
    neuron: int
    id: str = Field(description="L{layer}N{neuron}")
    url: str = Field(description="The neuron's page")
    role: Role = Field(description="self: the requested neuron; twin: its best match in a partner model")
    corr: float | None = Field(description="For twins: correlation with the requested neuron")
    value: float = Field(description="The value the neuron was set to (for mean: this neuron's own mean)")
    clean: NextTokenView
    patched: NextTokenView
    kl: list[float] = Field(description="Per position: KL(clean ‖ patched) of the next-token distribution (nats)")
    mean_kl: float = Field(description="Mean KL over the positions the clamp can change")
    delta_loss: float | None = Field(description="Mean change of the loss there (patched − clean)")
    delta_entropy: float = Field(description="Mean change of the entropy there (patched − clean)")
    moved: list[MovedToken] = Field(description="Tokens whose mean probability moved most, largest change first")
    agreement: float | None = Field(
        description="For twins: agreement of the twin's effect with the requested neuron's (see agreement_method)"
    )


class InterventionRun(ViewModel):
    """The answer of POST /api/v1/models/{model}/intervene and of the intervention panel."""

    model: str = Field(description="The model the text was sent to")
    layer: int
    neuron: int
    text: str
    tokens: list[str] = Field(description="Decoded token texts (BOS excluded); positions index this list")
    token_ids: list[int]
    value: float | Ablation = Field(description="What was asked: a value, zero or mean")
    positions: list[int] | None = Field(description="Positions set (null: every position, BOS included)")
    affected_from: int = Field(description="First position the intervention can change (attention is causal)")
    top_k: int
    results: list[InterventionResult] = Field(description="The requested neuron first, then its twins")
    agreement_method: str = Field(description="How `agreement` is computed")
    url: str = Field(description="The neuron's page with this intervention in its URL (shareable)")
    seconds: float = Field(description="Time of the forward passes (a cached answer repeats the first run's)")


class InterveneForm(ViewModel):
    """The intervention form of a neuron page; its state (text, clamp, positions) is in the page's URL."""

    text: str | None = Field(description="The text in the URL (?text=)")
    clamp: str | None = Field(description="The value in the URL (?clamp=): a number, zero or mean")
    positions: str | None = Field(description="The positions in the URL (?positions=3,4; empty: all)")
    has_mean: bool = Field(description="Whether the neuron's mean activation is stored (for clamp=mean)")
    max_value: float = Field(description="Largest |value| accepted")
    partial_url: str | None = Field(description="htmx fragment with the result for the URL's intervention")
    form_url: str = Field(description="The fragment the form loads")
    api_url: str = Field(description="POST endpoint of interventions")


def parse_positions(text: str | None) -> list[int] | None:
    """Positions from a URL's ``3,4`` (already matched by `POSITIONS_PATTERN`); None when empty.

    >>> parse_positions(" 3, 4 "), parse_positions(""), parse_positions(None)
    ([3, 4], None, None)
    """
    if not text or not text.strip():
        return None
    return [int(p) for p in text.split(",")]


def clamp_text(value: float | str | None) -> str | None:
    """A clamp as the URL writes it.

    >>> clamp_text(5.0), clamp_text(-0.25), clamp_text("mean"), clamp_text(None)
    ('5', '-0.25', 'mean', None)
    """
    if value is None or isinstance(value, str):
        return value
    return f"{value:g}" if float(value).is_integer() else repr(float(value))


def build_intervene_form(
    view: NeuronViewContext, text: str | None, clamp: float | str | None, positions: str | None
) -> InterveneForm:
    scope, name, layer, neuron = view.scope, view.model.name, view.layer, view.neuron
    stats = view.activation_stats
    shown = clamp_text(clamp)
    return InterveneForm(
        text=text,
        clamp=shown,
        positions=positions,
        has_mean=stats is not None and stats.values.get("post_mean") is not None,
        max_value=MAX_CLAMP,
        partial_url=scope.partial_url(
            name, layer, neuron, "intervene", {"text": text, "clamp": shown, "positions": positions}
        )
        if text and shown is not None
        else None,
        # the path alone: the form sends the view state (run, threshold) as its own hidden fields
        form_url=scope.partial_url(name, layer, neuron, "intervene").split("?")[0],
        api_url=scope.api_model_url(name, "/intervene"),
    )


@dataclass(frozen=True)
class _Target:
    model: Model
    layer: int
    neuron: int
    role: Role
    corr: float | None
    value: float


@dataclass(frozen=True)
class _Outcome:
    """What the live runner memoises: per target its intervention and agreement (the first has none)."""

    items: tuple[tuple[Intervention, float | None], ...]
    seconds: float


def _value(view: ModelViewContext, model: Model, layer: int, neuron: int, value: float | str) -> float:
    if value == "zero":
        return 0.0
    if value == "mean":
        mean = fq.post_mean(view.conn, model.id, layer, neuron)
        if mean is None:
            raise Unprocessable(
                f"{model.name}/{neuron_label(layer, neuron)} has no stored mean activation (the run has no "
                "activation statistics: its stats stage did not run); clamp to a number or to zero"
            )
        return mean
    return float(value)


def _targets(view: ModelViewContext, layer: int, neuron: int, value: float | str, twins: bool) -> list[_Target]:
    model = view.model
    if not (0 <= layer < model.n_layers and 0 <= neuron < model.d_mlp):
        raise NotFound(
            f"model {model.name!r} has no neuron {neuron_label(layer, neuron)} "
            f"({model.n_layers} layers of {model.d_mlp} neurons)"
        )
    targets = [_Target(model, layer, neuron, "self", None, _value(view, model, layer, neuron, value))]
    if twins:
        for m, tl, tn, corr in twin_targets(view, layer, neuron):
            targets.append(_Target(m, tl, tn, "twin", corr, _value(view, m, tl, tn, value)))
    return targets


def _next_token_view(vocab: Sequence[str], run: NextToken) -> NextTokenView:
    texts = token_texts(vocab, run.top_ids.reshape(-1).tolist())
    k = run.top_ids.shape[1] if run.top_ids.ndim == 2 else 0
    top = [
        [
            Prediction(
                token=texts[i * k + j], token_id=int(run.top_ids[i, j]), prob=round(float(run.top_probs[i, j]), 6)
            )
            for j in range(k)
        ]
        for i in range(run.top_ids.shape[0])
    ]
    return NextTokenView(
        top=top,
        entropy=[round(float(x), 5) for x in run.entropy],
        loss=[number(x, 5) for x in run.loss],
    )


def _mean(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return round(float(finite.mean()), 6) if finite.size else None


def _result(view: ModelViewContext, target: _Target, outcome: Intervention, score: float | None) -> InterventionResult:
    start = outcome.affected
    moved_texts = token_texts(view.vocab, outcome.moved_ids.tolist())
    return InterventionResult(
        model=target.model.name,
        layer=target.layer,
        neuron=target.neuron,
        id=neuron_label(target.layer, target.neuron),
        url=view.scope.neuron_url(target.model.name, target.layer, target.neuron),
        role=target.role,
        corr=target.corr,
        value=round(target.value, 6),
        clean=_next_token_view(view.vocab, outcome.clean),
        patched=_next_token_view(view.vocab, outcome.patched),
        kl=[round(float(x), 6) for x in outcome.kl],
        mean_kl=_mean(outcome.kl[start:]) or 0.0,
        delta_loss=_mean(outcome.patched.loss[start:] - outcome.clean.loss[start:]),
        delta_entropy=_mean(outcome.patched.entropy[start:] - outcome.clean.entropy[start:]) or 0.0,
        moved=[
            MovedToken(
                token=moved_texts[i],
                token_id=int(outcome.moved_ids[i]),
                clean=round(float(outcome.moved_clean[i]), 6),
                patched=round(float(outcome.moved_patched[i]), 6),
                change=round(float(outcome.moved_patched[i] - outcome.moved_clean[i]), 6),
            )
            for i in range(outcome.moved_ids.size)
        ],
        agreement=None if score is None else round(score, 9),
    )


def build_intervention(
    view: ModelViewContext,
    text: str,
    layer: int,
    neuron: int,
    value: float | Ablation,
    positions: Sequence[int] | None,
    twins: bool,
    top_k: int = TOP_K,
) -> InterventionRun:
    """Set the neuron (and, with `twins`, its twin in every partner model) on `text` and compare the predictions.

    Raises:
        NotFound: the model has no such neuron.
        Unprocessable: a position outside the text's tokens, or ``mean`` for a neuron without a stored mean.
        PayloadTooLarge, ServiceUnavailable, GatewayTimeout: the live runner's bounds (see `app.live`).
    """
    runner, scope, model = view.live, view.scope, view.model
    runner.check_has_weights([model])
    runner.check_text(text)
    targets = _targets(view, layer, neuron, value, twins)  # all SQL happens here, before any model runs
    models = list({t.model.name: t.model for t in targets}.values())  # Model holds a dict: not hashable
    ids, skip = runner.tokenize(model, text, scope.run.bos_id, models)
    n_tokens = len(ids) - skip
    if positions:
        outside = sorted({p for p in positions if not 0 <= p < n_tokens})
        if outside:
            raise Unprocessable(f"positions {outside} are outside the text's {n_tokens} tokens (0 to {n_tokens - 1})")
    rows = tuple(sorted({p + skip for p in positions})) if positions else None
    key = (
        "intervene",
        tuple((t.model.run_id, t.model.name, t.model.tokenizer_hash, t.layer, t.neuron, t.value) for t in targets),
        ids,
        skip,
        rows,
        top_k,
    )

    def work() -> _Outcome:
        started = time.perf_counter()
        runs = []
        for t in targets:
            with runner.using(t.model) as loaded:
                runs.append(intervene(loaded, ids, skip, Clamp(t.layer, t.neuron, t.value, rows), top_k))
        first, first_delta = runs[0]
        items: list[tuple[Intervention, float | None]] = [(first, None)]
        for outcome, delta in runs[1:]:
            tokens = np.union1d(first.moved_ids, outcome.moved_ids)
            items.append((outcome, agreement(first_delta, delta, tokens)))
        return _Outcome(tuple(items), time.perf_counter() - started)

    result: _Outcome = runner.compute(key, models, work, "the intervention")
    body = list(ids[skip:])
    return InterventionRun(
        model=model.name,
        layer=layer,
        neuron=neuron,
        text=text,
        tokens=token_texts(view.vocab, body),
        token_ids=body,
        value=value,
        positions=sorted(set(positions)) if positions else None,
        affected_from=result.items[0][0].affected,
        top_k=top_k,
        results=[_result(view, t, o, s) for t, (o, s) in zip(targets, result.items, strict=True)],
        agreement_method=AGREEMENT_METHOD,
        url=scope.neuron_url(
            model.name,
            layer,
            neuron,
            {
                "text": text if len(text) <= MAX_TEXT_IN_URL else None,
                "clamp": clamp_text(value),
                "positions": ",".join(str(p) for p in sorted(set(positions))) if positions else None,
            },
        ),
        seconds=round(result.seconds, 4),
    )
