"""Types shared by several view models: neuron references, model and run summaries, token sequences."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from app.queries.models import Model, public_source
from app.queries.runs import Run
from app.urls import Scope, neuron_label


class ViewModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())


def number(value: Any, digits: int = 6) -> float | None:
    """A finite float rounded for transport, or None.

    >>> number(0.1234567891), number(float("nan")), number(None)
    (0.123457, None, None)
    """
    if value is None:
        return None
    value = float(value)
    return round(value, digits) if math.isfinite(value) else None


def rounded(array: np.ndarray, digits: int = 4) -> list[float]:
    """A float array as a JSON-safe list (non-finite values become 0).

    >>> rounded(np.array([0.123456, np.nan, np.inf], dtype=np.float32))
    [0.1235, 0.0, 0.0]
    """
    values = np.asarray(array, dtype=np.float64)
    if not np.isfinite(values).all():
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    return np.round(values, digits).tolist()


class NeuronRef(ViewModel):
    """A link to one neuron."""

    model: str = Field(description="Model name (unique within the run)")
    layer: int = Field(description="Layer index")
    neuron: int = Field(description="Neuron index within the layer")
    id: str = Field(description="Display id L{layer}N{neuron}")
    url: str = Field(description="The neuron's page")

    @classmethod
    def build(cls, scope: Scope, model: str, layer: int, neuron: int) -> NeuronRef:
        return cls(
            model=model,
            layer=layer,
            neuron=neuron,
            id=neuron_label(layer, neuron),
            url=scope.neuron_url(model, layer, neuron),
        )


def published_label(run: Run) -> str | None:
    """A one-line description of a published run, for lists of runs.

    >>> run = Run(1, "t", None, "complete", "h", [], None, None,
    ...           {"published": {"source": "Gurnee et al. 2024", "table": "pythia-160m/universal.csv"}}, {}, {}, {})
    >>> published_label(run)
    'Gurnee et al. 2024: pythia-160m/universal.csv'
    """
    info = run.published
    if info is None:
        return None
    table = info.get("table")
    return f"{info.get('source', 'published')}: {table}" if table else str(info.get("source", "published"))


class RunSummary(ViewModel):
    """One precompute run (a model family on one dataset)."""

    id: int = Field(description="Run id (use ?run=ID to look at it)")
    status: str = Field(description="running | complete | failed (only complete runs are browsable)")
    created_at: str = Field(description="UTC time the run started")
    finished_at: str | None = Field(description="UTC time the run finished")
    content_hash: str | None = Field(description="Hash of the results; the ETag of its pages")
    models: list[str] = Field(description="The family, reference model first")
    stages: list[str] = Field(description="Stages completed")
    tokens_seen: int | None = Field(description="Tokens run through the models")
    tokens_counted: int | None = Field(description="Tokens left after the BOS/EOS/pad/newline filter")
    threshold: float = Field(description="Excess correlation above which a neuron is universal")
    dataset: str = Field(description="Dataset source (a file's name, never its folder on the server)")
    default: bool = Field(description="True for the newest complete run (URLs without ?run= show it)")
    url: str | None = Field(description="The run's index page (None unless complete)")
    error: str | None = Field(description="Why a failed run failed")
    published: str | None = Field(
        description="The paper's table this run was imported from (universal-neurons import-paper); None for a "
        "run computed here"
    )

    @classmethod
    def build(cls, run: Run, models: list[str], default: bool) -> RunSummary:
        return cls(
            id=run.id,
            status=run.status,
            created_at=run.created_at,
            finished_at=run.finished_at,
            content_hash=run.content_hash,
            models=models,
            stages=run.stages,
            tokens_seen=run.tokens_seen,
            tokens_counted=run.tokens_counted,
            threshold=run.threshold,
            dataset=public_source(str(run.dataset.get("source") or run.dataset.get("kind") or "?")),
            default=default,
            url=("/" if default else f"/?run={run.id}") if run.complete else None,
            error=run.error,
            published=published_label(run),
        )


class ModelSummary(ViewModel):
    """One model of a family (the items of GET /api/v1/models)."""

    name: str = Field(description="Model name (unique within the run)")
    run: int = Field(description="The run the model belongs to")
    position: int = Field(description="Order in the family (0 = reference)")
    is_reference: bool = Field(description="First model of the family")
    n_layers: int = Field(description="Transformer blocks")
    d_mlp: int = Field(description="MLP neurons per layer")
    d_model: int = Field(description="Residual stream width")
    d_vocab: int = Field(description="Vocabulary size")
    n_ctx: int = Field(description="Context length")
    n_heads: int = Field(description="Attention heads per layer")
    act_fn: str = Field(description="MLP activation function")
    n_neurons: int = Field(description="n_layers × d_mlp")
    n_universal: int | None = Field(
        description="Neurons above the universality threshold in effect (None: no aggregates)"
    )
    source: str = Field(
        description="What was loaded: a TransformerLens name, or a local folder's name (never its server path)"
    )
    processing: dict[str, Any] = Field(description="Weight processing flags (fold_ln, center_*)")
    url: str = Field(description="The model's explorer page")
    api_url: str = Field(description="The model's JSON overview")

    @classmethod
    def build(cls, scope: Scope, model: Model, n_universal: int | None) -> ModelSummary:
        return cls(
            name=model.name,
            run=model.run_id,
            position=model.position,
            is_reference=model.is_reference,
            n_layers=model.n_layers,
            d_mlp=model.d_mlp,
            d_model=model.d_model,
            d_vocab=model.d_vocab,
            n_ctx=model.n_ctx,
            n_heads=model.n_heads,
            act_fn=model.act_fn,
            n_neurons=model.n_neurons,
            n_universal=n_universal,
            source=model.public_source,
            processing=model.processing,
            url=scope.model_url(model.name),
            api_url=scope.api_model_url(model.name),
        )


def token_text(vocab: Sequence[str], token_id: int) -> str:
    """The decoded text of a token id (``<id>`` outside the vocabulary)."""
    return vocab[token_id] if 0 <= token_id < len(vocab) else f"<{token_id}>"


def token_texts(vocab: Sequence[str], ids: list[int]) -> list[str]:
    """Decoded texts of many token ids (ids outside the vocabulary show as ``<id>``).

    >>> token_texts(["a", "b"], [1, 0, 7])
    ['b', 'a', '<7>']
    """
    if ids and min(ids) >= 0 and max(ids) < len(vocab):
        return [vocab[i] for i in ids]  # the common case, without a call per token
    return [token_text(vocab, i) for i in ids]


class TokenValue(ViewModel):
    """A token with a value (a logit effect, a mean activation, ...)."""

    token_id: int = Field(description="Token id")
    token: str = Field(description="Decoded token text")
    value: float | None = Field(description="The value for this token")
    count: int | None = Field(None, description="Occurrences among counted tokens (activation tables)")
