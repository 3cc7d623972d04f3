"""Run every model of a family on the same batches and stream MLP activations by hook name.

Activations are named by TransformerLens hook names, ``blocks.{layer}.mlp.hook_post`` (post-GELU, what the
paper correlates) and ``blocks.{layer}.mlp.hook_pre``. Each forward pass stops after the last block (no
unembedding) and only the requested hooks are cached (``names_filter``). Nothing holds more than one batch of
activations: the stages fold each batch into running sums.

Every stage reading a batch starts with the same steps (select the counted positions, float64 power sums, firing
counts per position), so `ActivationBatch` does the small ones once per batch and keeps them. Nothing the size of
the batch is copied whole: the counted positions are read in chunks of tokens (`ActivationBatch.counted_chunks`,
at most `precompute.memory.CHUNK_BYTES` of float64 each), so a batch costs its hook tensors and little more
(issue 11: a float64 copy and its squares of every hook, kept for the whole batch, used to cost 4x the batch).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from precompute.data import TokenDataset
from precompute.memory import chunk_bytes, chunk_rows
from precompute.models import LoadedModel

HookKind = Literal["hook_pre", "hook_post"]


def hook_name(layer: int, kind: HookKind = "hook_post") -> str:
    """The TransformerLens hook name of an MLP activation.

    >>> hook_name(3)
    'blocks.3.mlp.hook_post'
    """
    return f"blocks.{layer}.mlp.{kind}"


@dataclass
class CountedActivations:
    """One model's activations of one hook at a batch's counted tokens, with their float64 power sums."""

    x: torch.Tensor  # [tokens, n_neurons] float32 (a fresh copy: for tests and small batches)
    sums: torch.Tensor  # [4, n_neurons] float64: Σx, Σx², Σx³, Σx⁴


@dataclass
class ActivationBatch:
    """One batch of rows and every model's MLP activations on it, with the per-batch work the stages share."""

    row_start: int  # index of the batch's first row in the dataset
    tokens: torch.Tensor  # [batch, pos] int64
    counted: torch.Tensor  # [batch, pos] bool: positions statistics count
    hook_post: dict[str, torch.Tensor]  # model name -> [batch, pos, n_layers, d_mlp]
    hook_pre: dict[str, torch.Tensor]  # model name -> [batch, pos, n_layers, d_mlp] (when asked for)
    index: torch.Tensor | None = field(default=None, kw_only=True)  # flat counted positions, found on the host
    _sums: dict[tuple[str, HookKind], torch.Tensor] = field(default_factory=dict, init=False, repr=False)
    _firing: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)
    _views: dict[Hashable, ActivationBatch] = field(default_factory=dict, init=False, repr=False)

    @functools.cached_property
    def counted_index(self) -> torch.Tensor:
        """Flat indices (into batch * pos) of the counted positions.

        `stream_batches` finds them from the dataset's mask on the host before the forward pass, so a GPU never
        waits on a ``nonzero`` per batch; batches built by hand find them here.
        """
        if self.index is not None:
            return self.index
        return self.counted.reshape(-1).nonzero().squeeze(1)

    @functools.cached_property
    def counted_positions(self) -> torch.Tensor:
        """The position in the row of every counted token: [tokens] int64."""
        return self.counted_index % self.counted.shape[1]

    @property
    def n_counted(self) -> int:
        return int(self.counted_index.shape[0])

    def selecting(self, key: Hashable, mask: np.ndarray) -> ActivationBatch:
        """This batch with another set of counted positions, ``mask`` [batch, pos] bool on the host (a stage's own
        token set, `precompute.data.TokenSelection`): the same activation tensors, its own per-batch caches (power
        sums, firing counts). Made once per ``key`` and kept on this batch, so stages reading the same tokens share
        it; it goes when the batch goes."""
        if key not in self._views:
            device = self.counted.device
            self._views[key] = ActivationBatch(
                self.row_start,
                self.tokens,
                torch.from_numpy(np.ascontiguousarray(mask)).to(device),
                self.hook_post,
                self.hook_pre,
                index=torch.from_numpy(np.flatnonzero(mask)).to(device),
            )
        return self._views[key]

    def flat(self, model: str, hook: HookKind = "hook_post") -> torch.Tensor:
        """One model's activations as [batch * pos, n_layers * d_mlp] (a view)."""
        acts = getattr(self, hook)[model]  # [batch, pos, n_layers, d_mlp]
        return acts.reshape(-1, acts.shape[-2] * acts.shape[-1])

    def counted_rows(
        self, model: str, hook: HookKind, tokens: slice | torch.Tensor, columns: slice | None = None
    ) -> torch.Tensor:
        """A fresh [len(tokens), n] copy of some counted tokens (indices among the batch's counted tokens), all
        neurons or a slice of them."""
        flat = self.flat(model, hook)
        if columns is not None:
            flat = flat[:, columns]
        return flat.index_select(0, self.counted_index[tokens])

    def token_chunks(self, n_columns: int, itemsize: int = 8) -> Iterator[slice]:
        """Consecutive slices of the counted tokens, each at most `CHUNK_BYTES` as ``n_columns`` of ``itemsize``."""
        step = chunk_rows(n_columns, itemsize)
        for start in range(0, self.n_counted, step):
            yield slice(start, min(start + step, self.n_counted))

    def counted_chunks(
        self, model: str, hook: HookKind, columns: slice | None = None, itemsize: int = 8
    ) -> Iterator[tuple[slice, torch.Tensor]]:
        """(token slice, float32 activations [chunk, n]) over the counted tokens, chunked for ``itemsize``-byte
        copies of the chunk (8: the caller makes a float64 copy)."""
        flat = self.flat(model, hook)
        n = (flat if columns is None else flat[:, columns]).shape[1]
        for tokens in self.token_chunks(n, itemsize):
            yield tokens, self.counted_rows(model, hook, tokens, columns)

    def counted_acts(self, model: str, hook: HookKind = "hook_post") -> torch.Tensor:
        """Activations at every counted position: a fresh [tokens, n_layers * d_mlp] float32 copy (tests, small
        batches; the stages read `counted_chunks`)."""
        return self.counted_rows(model, hook, slice(None))

    def counted_post(self, model: str) -> torch.Tensor:
        """Post-activations at counted positions, flattened: [tokens, n_layers * d_mlp]."""
        return self.counted_acts(model, "hook_post")

    def power_sums(self, model: str, hook: HookKind) -> torch.Tensor:
        """Σx, Σx², Σx³, Σx⁴ over the counted tokens in float64: [4, n_neurons] (once per batch)."""
        key = (model, hook)
        if key not in self._sums:
            n = self.flat(model, hook).shape[1]
            sums = torch.zeros(4, n, dtype=torch.float64, device=self.counted.device)
            for _, x in self.counted_chunks(model, hook, itemsize=16):  # the float64 copy and one power of it
                x64 = x.double()
                power = x64.clone()
                for k in range(4):
                    sums[k] += power.sum(0)
                    if k < 3:
                        power.mul_(x64)
            self._sums[key] = sums
        return self._sums[key]

    def counted_activations(self, model: str, hook: HookKind) -> CountedActivations:
        """The counted activations of ``hook`` (a fresh copy) with their float64 power sums."""
        return CountedActivations(self.counted_acts(model, hook), self.power_sums(model, hook))

    def firing_by_position(self, model: str) -> torch.Tensor:
        """How many counted tokens have hook_pre > 0 at each position: [pos, n_neurons] float64 (once per batch)."""
        if model not in self._firing:
            n = self.flat(model, "hook_pre").shape[1]
            fire = torch.zeros(self.counted.shape[1], n, dtype=torch.float64, device=self.counted.device)
            for tokens, x in self.counted_chunks(model, "hook_pre"):
                fire.index_add_(0, self.counted_positions[tokens], (x > 0).double())
            self._firing[model] = fire
        return self._firing[model]


def batch_bytes(models: Sequence[LoadedModel], kinds: int, rows: int, ctx: int, firing: bool) -> int:
    """What one batch of ``rows`` rows holds: every model's hook tensors (float32) with the power sums and firing
    counts kept for it, the chunk being read with its float64 copy, and the largest model's forward pass (a few
    residual-stream tensors, one block's attention scores and pattern, its MLP hidden layer and GELU temporaries).

    >>> from types import SimpleNamespace
    >>> m = SimpleNamespace(n_neurons=8, d_mlp=4, d_model=4, n_heads=1)
    >>> batch_bytes([m], kinds=1, rows=1, ctx=4, firing=False) > 1 * 4 * 8 * 4
    True
    """
    tokens = rows * ctx
    widest = max((m.n_neurons for m in models), default=0)
    total = chunk_bytes(tokens, widest, 16) + 3 * tokens * 8  # a chunk of the power sums; index, positions, ids
    forward = 0
    for model in models:
        total += kinds * tokens * model.n_neurons * 4 + kinds * 4 * model.n_neurons * 8
        if firing:
            total += ctx * model.n_neurons * 8
        attention = 3 * rows * model.n_heads * ctx * ctx * 4
        forward = max(forward, 8 * tokens * model.d_model * 4 + attention + 5 * tokens * model.d_mlp * 4)
    return total + forward


@torch.inference_mode()
def run_mlp_hooks(
    model: LoadedModel, tokens: torch.Tensor, kinds: Sequence[HookKind] = ("hook_post",)
) -> dict[HookKind, torch.Tensor]:
    """Run one model on ``tokens`` [batch, pos] and stack its MLP hooks per kind: [batch, pos, n_layers, d_mlp].

    Each hook copies its layer straight into the stacked tensor (the hooks are removed when the run ends), so no
    per-layer cache and a stacked copy of it exist at the same time.
    """
    out = {
        kind: torch.empty(*tokens.shape, model.n_layers, model.d_mlp, device=tokens.device, dtype=torch.float32)
        for kind in kinds
    }

    def keep(kind: HookKind, layer: int) -> Callable[[torch.Tensor, object], None]:
        def hook(value: torch.Tensor, hook: object) -> None:
            out[kind][:, :, layer].copy_(value)

        return hook

    hooks = [(hook_name(layer, kind), keep(kind, layer)) for kind in kinds for layer in range(model.n_layers)]
    model.bridge.run_with_hooks(tokens, fwd_hooks=hooks, stop_at_layer=model.n_layers, return_type=None)
    return out


def stream_batches(
    models: Sequence[LoadedModel],
    dataset: TokenDataset,
    kinds: Sequence[HookKind] = ("hook_post",),
    start_row: int = 0,
    device: str = "cpu",
    description: str = "activations",
    batch_rows: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[ActivationBatch]:
    """Yield an `ActivationBatch` per batch of dataset rows from ``start_row`` on, with a progress bar.

    Args:
        batch_rows: rows per forward pass; None: the dataset's batch size (the memory plan may ask for fewer).
        rank, world_size: the batches of one rank of several (`precompute.distributed`): the batches from
            ``start_row`` on are dealt out in turn, so rank ``r`` reads the ``r``-th of every ``world_size`` and
            rank 0 reads the first (the pilot batch of the stages that need one). Only rank 0 shows progress, for
            all ranks (each step of ``world_size`` batches).
    """
    rows_per_batch = batch_rows or dataset.config.batch_size
    step = rows_per_batch * world_size
    with tqdm(
        total=dataset.tokens_seen,
        initial=start_row * dataset.ctx,
        unit="tok",
        unit_scale=True,
        desc=description,
        dynamic_ncols=True,
        disable=rank != 0,
    ) as progress:
        for row_start in range(start_row + rank * rows_per_batch, dataset.n_rows, step):
            rows = slice(row_start, row_start + rows_per_batch)
            mask = dataset.counted[rows]
            tokens = torch.from_numpy(dataset.rows[rows]).to(device)
            counted = torch.from_numpy(mask).to(device)
            index = torch.from_numpy(np.flatnonzero(mask)).to(device)
            hook_post: dict[str, torch.Tensor] = {}
            hook_pre: dict[str, torch.Tensor] = {}
            for model in models:
                for kind, value in run_mlp_hooks(model, tokens, kinds).items():
                    (hook_post if kind == "hook_post" else hook_pre)[model.name] = value
            yield ActivationBatch(row_start, tokens, counted, hook_post, hook_pre, index=index)
            del hook_post, hook_pre  # this batch must not outlive its consumer into the next forward pass
            step_start = row_start - rank * rows_per_batch
            progress.update((min(step_start + step, dataset.n_rows) - step_start) * dataset.ctx)
