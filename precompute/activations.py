"""Run every model of a family on the same batches and stream MLP activations by hook name.

Activations are named by TransformerLens hook names, ``blocks.{layer}.mlp.hook_post`` (post-GELU, what the
paper correlates) and ``blocks.{layer}.mlp.hook_pre``. Each forward pass stops after the last block (no
unembedding) and only the requested hooks are cached (``names_filter``). Nothing holds more than one batch of
activations: consumers (the correlation engine, the statistics stages) fold each batch into running sums.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from tqdm.auto import tqdm

from precompute.data import TokenDataset
from precompute.models import LoadedModel

HookKind = Literal["hook_pre", "hook_post"]


def hook_name(layer: int, kind: HookKind = "hook_post") -> str:
    """The TransformerLens hook name of an MLP activation.

    >>> hook_name(3)
    'blocks.3.mlp.hook_post'
    """
    return f"blocks.{layer}.mlp.{kind}"


@dataclass
class ActivationBatch:
    """One batch of rows and every model's MLP activations on it."""

    row_start: int  # index of the batch's first row in the dataset
    tokens: torch.Tensor  # [batch, pos] int64
    counted: torch.Tensor  # [batch, pos] bool: positions statistics count
    hook_post: dict[str, torch.Tensor]  # model name -> [batch, pos, n_layers, d_mlp]
    hook_pre: dict[str, torch.Tensor]  # model name -> [batch, pos, n_layers, d_mlp] (when asked for)
    _counted: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict, repr=False)

    @functools.cached_property
    def counted_index(self) -> torch.Tensor:
        """Flat indices (into batch * pos) of the counted positions."""
        return self.counted.reshape(-1).nonzero().squeeze(1)

    def counted_acts(self, model: str, hook: HookKind = "hook_post") -> torch.Tensor:
        """Activations at counted positions, flattened: [tokens, n_layers * d_mlp].

        Selected once per (model, hook) and batch, then shared by every stage that reads the batch; callers must
        not modify it in place.
        """
        key = (model, hook)
        if key not in self._counted:
            acts = getattr(self, hook)[model]  # [batch, pos, n_layers, d_mlp]
            flat = acts.reshape(-1, acts.shape[-2] * acts.shape[-1])
            self._counted[key] = flat.index_select(0, self.counted_index)
        return self._counted[key]

    def counted_post(self, model: str) -> torch.Tensor:
        """Post-activations at counted positions, flattened: [tokens, n_layers * d_mlp]."""
        return self.counted_acts(model, "hook_post")


class ActivationConsumer(Protocol):
    """A stage that folds batches of activations into running state (checkpointable)."""

    hooks: frozenset[HookKind]

    def update(self, batch: ActivationBatch) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@torch.inference_mode()
def run_mlp_hooks(
    model: LoadedModel, tokens: torch.Tensor, kinds: Sequence[HookKind] = ("hook_post",)
) -> dict[HookKind, torch.Tensor]:
    """Run one model on ``tokens`` [batch, pos] and stack its MLP hooks per kind: [batch, pos, n_layers, d_mlp]."""
    names = [hook_name(layer, kind) for kind in kinds for layer in range(model.n_layers)]
    _, cache = model.bridge.run_with_cache(
        tokens, names_filter=names, stop_at_layer=model.n_layers, return_cache_object=False
    )
    return {
        kind: torch.stack([cache[hook_name(layer, kind)] for layer in range(model.n_layers)], dim=2) for kind in kinds
    }


def stream_batches(
    models: Sequence[LoadedModel],
    dataset: TokenDataset,
    kinds: Sequence[HookKind] = ("hook_post",),
    start_row: int = 0,
    device: str = "cpu",
    description: str = "activations",
) -> Iterator[ActivationBatch]:
    """Yield an `ActivationBatch` per batch of dataset rows from ``start_row`` on, with a progress bar."""
    starts = dataset.batch_starts(start_row)
    batch_size = dataset.config.batch_size
    with tqdm(
        total=dataset.tokens_seen,
        initial=start_row * dataset.ctx,
        unit="tok",
        unit_scale=True,
        desc=description,
        dynamic_ncols=True,
    ) as progress:
        for row_start in starts:
            rows = slice(row_start, row_start + batch_size)
            tokens = torch.from_numpy(dataset.rows[rows]).to(device)
            counted = torch.from_numpy(dataset.counted[rows]).to(device)
            hook_post: dict[str, torch.Tensor] = {}
            hook_pre: dict[str, torch.Tensor] = {}
            for model in models:
                outputs = run_mlp_hooks(model, tokens, kinds)
                if "hook_post" in outputs:
                    hook_post[model.name] = outputs["hook_post"]
                if "hook_pre" in outputs:
                    hook_pre[model.name] = outputs["hook_pre"]
            yield ActivationBatch(row_start, tokens, counted, hook_post, hook_pre)
            progress.update(tokens.numel())
