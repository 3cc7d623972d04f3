"""The ``stats`` stage: per-neuron activation, weight and vocabulary statistics, and within-layer percentiles.

Activation statistics (paper-spec §3.1) stream over the counted tokens the correlations use (``tokens:
counted``, the default) or over every token as the paper's do (``tokens: all``, BOS included), at most the first
``max_tokens`` of them, for every model of the family, in the same forward passes:

- exact moments of ``mlp.hook_pre`` and ``mlp.hook_post``: mean, population variance, skew and NON-excess
  kurtosis (a Gaussian gives 3), from float64 power sums (no histogram binning, unlike the paper's
  `summary.py`); min, max; activation frequency P(pre > 0) and the paper's ``sparsity`` P(pre > e), e ≈ -0.098
  the edge its histogram counts from (`precompute.moments.paper_frequency_threshold`), both exact counts;
- fixed-bin histograms of both hooks (the paper's pre-activation edges linspace(-10, 15, 256): 255 regular bins
  plus an underflow and an overflow bin);
- position profiles: mean and standard deviation of both hooks at each position of the row;
- token tables: the tokens with the highest mean and max ``hook_post`` (paper `summary.py` vocab tables).

Weight statistics come from `precompute.weights` on the processed weights, with the top/bottom tokens of
W_U·w_out and the top tokens of W_E·w_in. Every numeric column of ``activation_stats`` and ``weight_stats`` also
gets its within-layer percentile (SciPy ``percentileofscore(kind="rank")``, the paper's Fig. 3).

The forward passes and their first reductions (`ActivationBatch.power_sums`, `firing_by_position`) are shared
with the ``examples`` and ``families`` stages; the pure computations live in `precompute.moments`.

Memory (issue 11): the token tables are [tokens seen, neurons] per model, tens of GB at the paper's scale, so
they are the stage's splittable state: with a split of P passes each pass keeps the tables of one block of
neurons and closes it into the top ``token_top_k`` tokens per neuron; everything else streams in the first pass.
Tables are written column by column, neurons in chunks.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from precompute.activations import ActivationBatch, HookKind
from precompute.data import TokenSelection, TokenSet
from precompute.distributed import Distributed
from precompute.memory import StageMemory, chunk_bytes
from precompute.models import LoadedModel
from precompute.moments import (
    StreamingMoments,
    histogram_update,
    load_per_model_state,
    paper_frequency_threshold,
    per_model_state_dict,
    within_layer_percentiles,
)
from precompute.rows import neuron_key_columns, ranked_columns
from precompute.stage_config import ConfigError, stage_config
from precompute.stages.base import (
    RunContext,
    RunInputs,
    Stage,
    batch_tokens,
    block_widths,
    family_blocks,
    in_block_order,
    models_with_neurons,
    selected_batch,
    selection_bytes,
    split_of,
    vocab_size,
)
from precompute.store import (
    WRITE_CHUNK_BYTES,
    WRITE_CHUNK_ROWS,
    AtlasStore,
    activation_stats,
    encode_counts,
    encode_u8_rows,
    histograms,
    percentile_columns,
    percentile_statistics,
    percentiles,
    position_counts,
    position_profiles,
    posting_columns,
    token_kind_code,
    token_postings,
    token_table_columns,
    token_tables,
    weight_stats,
)
from precompute.weights import processed_weights, weight_tables, weights_bytes

logger = logging.getLogger(__name__)

#: The two hooks, by the prefix of their ``activation_stats`` columns.
HOOKS: tuple[tuple[str, HookKind], ...] = (("pre", "hook_pre"), ("post", "hook_post"))

#: Columns of ``activation_stats`` that get within-layer percentiles (n_tokens is the same for every neuron).
ACTIVATION_STAT_COLUMNS: tuple[str, ...] = (
    *(f"{hook}_{stat}" for hook in ("pre", "post") for stat in ("mean", "var", "skew", "kurt", "min", "max")),
    "frequency",
    "frequency_paper",
)

#: The token tables kept per neuron: (kind in ``token_tables``, what is ranked).
TOKEN_KINDS: tuple[str, ...] = ("mean_activation", "max_activation")


@dataclass(frozen=True)
class StatsConfig:
    """Settings of the ``stats`` stage (``analysis["stats"]`` in the run config).

    Args:
        bins: regular histogram bins between the range's ends (plus an underflow and an overflow bin).
        pre_range: histogram range of ``hook_pre`` (the paper's edges are linspace(-10, 15, 256)).
        post_range: histogram range of ``hook_post``.
        token_top_k: tokens kept per neuron in the mean- and max-activation token tables.
        token_min_count: least occurrences for a token to enter the mean-activation table.
        max_vocab: track the token tables for only this many of the most frequent token ids (memory:
            max_vocab × n_neurons × 12 bytes per model, split over the run's passes); None tracks every id that
            occurs.
        vocab_top_k: tokens kept per neuron for W_U·w_out (top and bottom) and W_E·w_in.
        tokens: which tokens the activation statistics cover: ``counted`` (default: the correlations' tokens,
            BOS/EOS/pad and newlines left out) or ``all`` (every token, BOS included, as the paper's moments,
            histograms and ``sparsity``).
        max_tokens: use only the first this many of those tokens (in row order) and stop updating after them
            (the paper: 10M for statistics in a 100M-token run); None: all of them.
    """

    bins: int = 255
    pre_range: tuple[float, ...] = (-10.0, 15.0)
    post_range: tuple[float, ...] = (-0.5, 15.0)
    token_top_k: int = 20
    token_min_count: int = 5
    max_vocab: int | None = None
    vocab_top_k: int = 20
    tokens: TokenSet = "counted"
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        for key in ("bins", "token_top_k", "token_min_count", "vocab_top_k"):
            if getattr(self, key) < 1:
                raise ConfigError(f"stats.{key} must be at least 1, got {getattr(self, key)}")
        for key in ("max_vocab", "max_tokens"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"stats.{key} must be at least 1 or null, got {getattr(self, key)}")
        for key in ("pre_range", "post_range"):
            low_high = getattr(self, key)
            if len(low_high) != 2 or not low_high[0] < low_high[1]:
                raise ConfigError(f"stats.{key} must be [low, high] with low < high, got {list(low_high)}")


def token_selection(inputs: RunInputs, config: StatsConfig) -> TokenSelection:
    """The tokens the stage reads (`StatsConfig.tokens`, `StatsConfig.max_tokens`)."""
    return inputs.dataset.selection(config.tokens, config.max_tokens)


def tracked_token_ids(inputs: RunInputs, config: StatsConfig) -> np.ndarray:
    """The token ids with a token-table slot: those the stage reads at least once, at most the ``max_vocab`` most
    frequent."""
    counts = token_selection(inputs, config).token_counts
    tracked = np.flatnonzero(counts > 0)
    return np.sort(tracked[np.argsort(-counts[tracked], kind="stable")][: config.max_vocab])


class StatsStage(Stage):
    """The ``stats`` stage: streaming activation statistics (token tables split over the run's passes when the
    memory plan asks), plus weight statistics at write time."""

    name = "stats"
    tables = (
        activation_stats,
        histograms,
        position_profiles,
        position_counts,
        weight_stats,
        percentile_statistics,
        percentiles,
        token_tables,
        token_postings,
    )
    config_class = StatsConfig
    hooks = frozenset({"hook_pre", "hook_post"})
    splittable = True

    def __init__(self, inputs: RunInputs) -> None:
        super().__init__(inputs)
        self.config = stage_config(StatsConfig, inputs.config.analysis.get(self.name), self.name)
        self.device = torch.device(inputs.config.device)
        self.selection = token_selection(inputs, self.config)
        self.tracked = torch.from_numpy(tracked_token_ids(inputs, self.config))
        slot = torch.full((vocab_size(inputs),), -1, dtype=torch.int64)
        slot[self.tracked] = torch.arange(len(self.tracked))
        self.slot = slot.to(self.device)  # token id -> its token-table slot, or -1
        self.ctx = inputs.dataset.ctx
        self.shapes = {m.name: m.n_neurons for m in inputs.models}
        self.passes = split_of(inputs).passes_for(self.name)
        self.pass_index = 0
        self.blocks = family_blocks(in_block_order(inputs, self.shapes), self.passes)
        self.top_k = min(self.config.token_top_k, len(self.tracked))
        self.state: dict[str, dict[str, Any]] = {name: self._empty(n) for name, n in self.shapes.items()}
        self.shared: dict[str, Any] = {
            "position_count": torch.zeros(self.ctx, dtype=torch.int64, device=self.device),
            "token_count": torch.zeros(len(self.tracked), dtype=torch.int64, device=self.device),
        }
        self.token_block = self._empty_block()

    @classmethod
    def memory_bytes(cls, inputs: RunInputs) -> StageMemory:
        config = stage_config(StatsConfig, inputs.config.analysis.get(cls.name), cls.name)
        tracked, ctx = len(tracked_token_ids(inputs, config)), inputs.dataset.ctx
        passes, k = split_of(inputs).passes_for(cls.name), min(config.token_top_k, tracked)
        # per neuron: both frequencies and, for each hook, its power sums, min and max (float32), histogram counts
        # and per-position sums and sums of squares; the top tokens of each token table (values, slots)
        # and per-position means and standard deviations (float32, closed a block at a time); the top tokens of
        # each token table (values, slots)
        per_neuron = 2 * 8 + 2 * (StreamingMoments.bytes_for(1) + 2 * 4 + (config.bins + 2) * 8 + 2 * ctx * 4)
        per_neuron += len(TOKEN_KINDS) * k * (8 + 8)
        shared = 8 * (ctx + 2 * tracked + vocab_size(inputs))  # counts per position and token, slots, tracked ids
        n_all = sum(m.n_neurons for m in inputs.models)
        # one pass's blocks of neurons, every model's together, and the widest of one model (`family_blocks`)
        widths, widest = block_widths(in_block_order(inputs, {m.name: m.n_neurons for m in inputs.models}), passes)
        block = widths * tracked  # one block's token sums and maxima
        positions = widths * 2 * 2 * ctx * 8  # one block's per-position sums and sums of squares, both hooks
        largest, tokens = max(m.n_neurons for m in inputs.models), batch_tokens(inputs)
        hist = (config.bins + 2) * largest * 8  # torch.bincount's counts of one hook, before they are added
        write = max(weights_bytes(m) + len(ACTIVATION_STAT_COLUMNS) * m.n_neurons * 8 for m in inputs.models)
        write += 4 * largest * 8 + 2 * ctx * WRITE_CHUNK_ROWS * 8 + WRITE_CHUNK_BYTES  # percentiles; profile chunk
        return StageMemory(
            state=shared + n_all * per_neuron + block * 12 + positions,
            update=max(chunk_bytes(tokens, largest, 12), chunk_bytes(tokens, widest, 12))
            + hist
            + selection_bytes(inputs, token_selection(inputs, config), firing=True),
            # means, their masked copy, the maxima in float64; or a position block's mean and variance
            finish=max(3 * block * 8, 3 * widest * ctx * 8),
            written=shared + n_all * per_neuron,
            write=write,
        )

    def _empty(self, n: int) -> dict[str, Any]:
        device, bins = self.device, self.config.bins
        state: dict[str, Any] = {
            "frequency": torch.zeros(n, dtype=torch.float64, device=device),
            "frequency_paper": torch.zeros(n, dtype=torch.int64, device=device),  # tokens with pre > e (exact)
        }
        for kind in TOKEN_KINDS:
            state[f"{kind}_value"] = torch.full((self.top_k, n), -torch.inf, dtype=torch.float64)
            state[f"{kind}_slot"] = torch.zeros(self.top_k, n, dtype=torch.int64)
        for hook, _ in HOOKS:
            state[f"{hook}_moments"] = StreamingMoments(n, device)
            state[f"{hook}_min"] = torch.full((n,), torch.inf, device=device)
            state[f"{hook}_max"] = torch.full((n,), -torch.inf, device=device)
            state[f"{hook}_hist"] = torch.zeros(n * (bins + 2), dtype=torch.int64, device=device)
            # closed from each pass's block of sums (`finish_pass`): float32, as written
            state[f"{hook}_position_mean"] = torch.full((self.ctx, n), torch.nan)
            state[f"{hook}_position_std"] = torch.full((self.ctx, n), torch.nan)
        return state

    def _empty_block(self) -> dict[str, dict[str, torch.Tensor]]:
        """This pass's block of neurons: per model, its token tables' sums (float64) and maxima, and both hooks'
        per-position sums and sums of squares (float64; [ctx, neurons], 4 KB a neuron at ctx 256: held for every
        neuron at once they were most of the stage's memory at GPT-2 shapes, issue 11)."""
        block: dict[str, dict[str, torch.Tensor]] = {}
        for name, blocks in self.blocks.items():
            width = len(range(*blocks[self.pass_index].indices(self.shapes[name])))
            block[name] = {
                "sum": torch.zeros(len(self.tracked), width, dtype=torch.float64, device=self.device),
                "max": torch.full((len(self.tracked), width), -torch.inf, device=self.device),
            }
            for hook, _ in HOOKS:
                for key in ("position_sum", "position_sq"):
                    block[name][f"{hook}_{key}"] = torch.zeros(self.ctx, width, dtype=torch.float64, device=self.device)
        return block

    def update(self, batch: ActivationBatch) -> None:
        batch = selected_batch(batch, self.selection)  # this stage's tokens (`StatsConfig.tokens`, max_tokens)
        if batch.n_counted == 0:
            return
        slots = self.slot[batch.tokens.reshape(-1)[batch.counted_index]]
        tracked = slots >= 0
        all_tracked = bool(tracked.all())
        if self.pass_index == 0:
            self._update_statistics(batch, slots, tracked)
        positions = batch.counted_positions
        for name, block in self.token_block.items():
            columns = self.blocks[name][self.pass_index]
            if columns.stop <= columns.start:  # none of this model's neurons in this pass: it may not have run
                continue
            for hook, kind in HOOKS:
                for rows, x in batch.counted_chunks(name, kind, itemsize=12, columns=columns):
                    x64 = x.double()
                    block[f"{hook}_position_sum"].index_add_(0, positions[rows], x64)
                    block[f"{hook}_position_sq"].index_add_(0, positions[rows], x64.mul_(x64))
            for rows, x in batch.counted_chunks(name, "hook_post", columns=columns):
                slot = slots[rows] if all_tracked else slots[rows][tracked[rows]]
                x = x if all_tracked else x[tracked[rows]]
                block["sum"].index_add_(0, slot, x.double())
                block["max"].scatter_reduce_(0, slot.unsqueeze(1).expand_as(x), x, "amax")

    @classmethod
    def models_by_pass(cls, inputs: RunInputs) -> list[frozenset[str] | None]:
        """Every model in the first pass (the statistics), then the models of each pass's block (`family_blocks`)."""
        passes = max(1, split_of(inputs).passes_for(cls.name))
        blocks = family_blocks(in_block_order(inputs, {m.name: m.n_neurons for m in inputs.models}), passes)
        return [None, *(models_with_neurons(blocks, index) for index in range(1, passes))]

    def models_in_pass(self) -> frozenset[str] | None:
        if self._done:
            return frozenset()
        return None if self.pass_index == 0 else models_with_neurons(self.blocks, self.pass_index)

    def _update_statistics(self, batch: ActivationBatch, slots: torch.Tensor, tracked: torch.Tensor) -> None:
        """Everything but the token tables: moments, extremes, histograms, position profiles, frequencies."""
        positions = batch.counted_positions  # [tokens]
        paper_edge = paper_frequency_threshold()  # a float32 value: x > it compares exactly in float32
        self.shared["position_count"] += torch.bincount(positions, minlength=self.ctx)
        self.shared["token_count"] += torch.bincount(slots[tracked], minlength=len(self.tracked))
        for name, state in self.state.items():
            for hook, kind in HOOKS:
                state[f"{hook}_moments"].update(batch.n_counted, batch.power_sums(name, kind))
                low, high = self.config.pre_range if hook == "pre" else self.config.post_range
                for _rows, x in batch.counted_chunks(name, kind, itemsize=12):  # x: [chunk, n_neurons]
                    state[f"{hook}_min"] = torch.minimum(state[f"{hook}_min"], x.amin(0))
                    state[f"{hook}_max"] = torch.maximum(state[f"{hook}_max"], x.amax(0))
                    histogram_update(state[f"{hook}_hist"], x, low, high, self.config.bins)
                    if hook == "pre":  # the paper's sparsity, counted exactly (not from the binned histogram)
                        state["frequency_paper"] += (x > paper_edge).sum(0)
            state["frequency"] += batch.firing_by_position(name).sum(0)

    def reduce(self, group: Distributed) -> None:
        """Combine the ranks' state: in pass 0 every statistic (counts, power sums and histograms added, minima and
        maxima taken); in every pass this pass's block of token sums and maxima and of position sums."""
        if self.pass_index == 0:
            for counts in self.shared.values():
                group.all_reduce(counts)
            for state in self.state.values():
                group.all_reduce(state["frequency"])
                group.all_reduce(state["frequency_paper"])
                for hook, _ in HOOKS:
                    state[f"{hook}_moments"].reduce(group)
                    group.all_reduce(state[f"{hook}_min"], "min")
                    group.all_reduce(state[f"{hook}_max"], "max")
                    group.all_reduce(state[f"{hook}_hist"])
        for block in self.token_block.values():
            group.all_reduce(block["sum"])
            group.all_reduce(block["max"], "max")
            for hook, _ in HOOKS:
                group.all_reduce(block[f"{hook}_position_sum"])
                group.all_reduce(block[f"{hook}_position_sq"])

    def finish_pass(self) -> None:
        """Close this pass's block of neurons: its token tables into their top tokens, its position sums into
        means and standard deviations (every row has been counted by now: pass 0 counts the positions); the next
        block follows."""
        count = self.shared["token_count"]
        position_count = self.shared["position_count"].double().unsqueeze(1)
        for name, block in self.token_block.items():
            columns, state = self.blocks[name][self.pass_index], self.state[name]
            for hook, _ in HOOKS:
                mean = block.pop(f"{hook}_position_sum") / position_count  # 0/0 = NaN where nothing was counted
                variance = block.pop(f"{hook}_position_sq") / position_count - mean**2
                state[f"{hook}_position_mean"][:, columns] = mean.float().cpu()
                state[f"{hook}_position_std"][:, columns] = variance.clamp_min_(0).sqrt_().float().cpu()
                del mean, variance
            means = (block["sum"] / count.unsqueeze(1).double()).masked_fill_(
                (count < self.config.token_min_count).unsqueeze(1), -torch.inf
            )
            maxima = block["max"].double().masked_fill_((count == 0).unsqueeze(1), -torch.inf)
            for kind, values in zip(TOKEN_KINDS, (means, maxima), strict=True):
                top_values, top_slots = torch.topk(values, self.top_k, dim=0)
                state[f"{kind}_value"][:, columns] = top_values.cpu()
                state[f"{kind}_slot"][:, columns] = top_slots.cpu()
            del means, maxima
        self.pass_index += 1
        self.token_block = {}
        if self.pass_index >= self.passes:
            self._done = True
        else:
            self.token_block = self._empty_block()

    def state_dict(self) -> dict[str, Any]:
        return {
            "models": per_model_state_dict(self.state),
            "shared": self.shared,
            "token_block": self.token_block,
            "pass_index": self.pass_index,
            "done": self._done,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        load_per_model_state(self.state, state["models"], self.device)
        self.shared = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in state["shared"].items()}
        self.pass_index = state.get("pass_index", 0)
        self.token_block = {}
        self.token_block = {
            name: {k: v.to(self.device) for k, v in block.items()} for name, block in state["token_block"].items()
        }
        self._done = state["done"]

    # --- results ------------------------------------------------------------------------------------------

    def activation_columns(self, name: str) -> dict[str, np.ndarray]:
        """Every ``activation_stats`` column of one model, flat over neurons (layer-major)."""
        state = self.state[name]
        columns: dict[str, np.ndarray] = {}
        for hook, _ in HOOKS:
            m: StreamingMoments = state[f"{hook}_moments"]
            values = (m.mean(), m.variance(), m.skew(), m.kurtosis(), state[f"{hook}_min"], state[f"{hook}_max"])
            for stat, value in zip(("mean", "var", "skew", "kurt", "min", "max"), values, strict=True):
                columns[f"{hook}_{stat}"] = value.double().cpu().numpy()
        n_tokens = state["pre_moments"].n
        columns["frequency"] = state["frequency"].cpu().numpy() / max(n_tokens, 1)
        columns["frequency_paper"] = state["frequency_paper"].cpu().numpy() / max(n_tokens, 1)
        if n_tokens == 0:
            columns = {k: np.full_like(v, np.nan) for k, v in columns.items()}
        return columns

    def position_profile(self, name: str, hook: str, neurons: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation [ctx, neurons] (float32; NaN where a position has no counted token), of
        the neurons whose pass has closed."""
        state = self.state[name]  # .cpu(): a resumed CUDA run's checkpoint puts every tensor on the GPU
        mean, std = state[f"{hook}_position_mean"][:, neurons], state[f"{hook}_position_std"][:, neurons]
        return mean.cpu().numpy(), std.cpu().numpy()

    def token_columns(self, name: str, model_id: int, d_mlp: int) -> list[dict[str, Any]]:
        """The mean- and max-activation token tables (hook_post), best first, with each token's count."""
        state, count = self.state[name], self.shared["token_count"].cpu().numpy()
        tracked = self.tracked.cpu().numpy()
        tables = []
        for kind in TOKEN_KINDS:
            slots = state[f"{kind}_slot"].T.cpu().numpy()  # [n_neurons, k]
            values = state[f"{kind}_value"].T.cpu().numpy()
            table = ranked_columns(model_id, d_mlp, kind, tracked[slots], values, count[slots])
            tables.append(table | {"kind": token_kind_code(kind)})
        return tables

    def write(self, context: RunContext) -> None:
        store = context.store
        for model in context.models:
            model_id = context.model_ids[model.name]
            flat = np.arange(model.n_neurons)
            key = neuron_key_columns(model_id, model.d_mlp, flat)
            columns = self.activation_columns(model.name)
            n_tokens = self.state[model.name]["pre_moments"].n
            store.insert_columns(activation_stats, key | {"n_tokens": n_tokens} | columns)
            self._write_histograms(store, model, model_id)
            self._write_positions(store, model, model_id)
            tables = self.token_columns(model.name, model_id, model.d_mlp)
            weights = processed_weights(model, device=self.device)  # on the GPU in a CUDA run
            statistics, projection = weight_tables(weights, top_k=min(self.config.vocab_top_k, weights.d_vocab))
            del weights
            assert projection is not None
            weight_columns = {k: v.reshape(-1) for k, v in statistics.items()}
            store.insert_columns(weight_stats, key | weight_columns)
            for kind in ("unembed_top", "unembed_bottom", "embed_top"):
                ids = getattr(projection, f"{kind}_ids").reshape(model.n_neurons, -1)
                values = getattr(projection, f"{kind}_values").reshape(model.n_neurons, -1)
                tables.append(
                    ranked_columns(model_id, model.d_mlp, kind, ids, values) | {"kind": token_kind_code(kind)}
                )
            write_token_tables(store, model_id, model.d_mlp, tables)
            del tables
            # one row per neuron: the percentiles of the model's statistics (by name) as one array (issue 11)
            names = sorted(columns | weight_columns)
            values = np.full((model.n_neurons, len(names)), np.nan)
            for i, statistic in enumerate(names):
                by_layer = np.asarray((columns | weight_columns)[statistic], dtype=np.float64)
                values[:, i] = within_layer_percentiles(by_layer.reshape(model.n_layers, -1)).reshape(-1)
            positions = {"model_id": model_id, "position": np.arange(len(names)), "statistic": names}
            store.insert_columns(percentile_statistics, positions)
            store.insert_columns(percentiles, percentile_columns(model_id, model.d_mlp, values))
            logger.info("stats: wrote %s (%d neurons)", model.name, model.n_neurons)

    def _write_histograms(self, store: AtlasStore, model: LoadedModel, model_id: int) -> None:
        bins = self.config.bins
        for hook, kind in HOOKS:
            low, high = self.config.pre_range if hook == "pre" else self.config.post_range
            counts = self.state[model.name][f"{hook}_hist"].cpu().numpy().reshape(-1, bins + 2)
            for start in range(0, model.n_neurons, WRITE_CHUNK_ROWS):
                flat = np.arange(start, min(start + WRITE_CHUNK_ROWS, model.n_neurons))
                blobs = [encode_counts(counts[i]) for i in flat]  # narrow and compressed (issue 11)
                store.insert_columns(
                    histograms,
                    neuron_key_columns(model_id, model.d_mlp, flat)
                    | {"hook": kind, "low": low, "high": high, "n_bins": bins, "counts": blobs},
                )

    def _write_positions(self, store: AtlasStore, model: LoadedModel, model_id: int) -> None:
        # the counted tokens per position are the same for every neuron: one row per model (issue 11)
        count = self.shared["position_count"].cpu().numpy().astype("<i8").tobytes()
        store.insert_columns(position_counts, {"model_id": [model_id], "count": [count]})
        for hook, kind in HOOKS:
            for start in range(0, model.n_neurons, WRITE_CHUNK_ROWS):
                neurons = slice(start, min(start + WRITE_CHUNK_ROWS, model.n_neurons))
                mean, std = self.position_profile(model.name, hook, neurons)
                flat = np.arange(neurons.start, neurons.stop)
                store.insert_columns(
                    position_profiles,
                    neuron_key_columns(model_id, model.d_mlp, flat)
                    | {"hook": kind, "mean": encode_u8_rows(mean.T), "std": encode_u8_rows(std.T)},
                )


def write_token_tables(store: AtlasStore, model_id: int, d_mlp: int, tables: list[dict[str, Any]]) -> None:
    """A model's token tables (`ranked_columns` with an integer ``kind``, one per kind): one ``token_tables`` row
    per neuron and kind for the neuron page, and the search's ``token_postings`` (issue 11)."""
    parts: dict[str, list[np.ndarray]] = {"kind": [], "token_id": [], "flat": [], "rank": []}
    for table in tables:
        layer, neuron = np.asarray(table["layer"]), np.asarray(table["neuron"])
        kind = np.full(layer.size, table["kind"], dtype=np.int64)
        token_id, value = np.asarray(table["token_id"]), np.asarray(table["value"], dtype=np.float64)
        count = None if table["count"] is None else np.asarray(table["count"])
        store.insert_columns(token_tables, token_table_columns(model_id, layer, neuron, kind, token_id, value, count))
        for name, array in zip(parts, (kind, token_id, layer * d_mlp + neuron, np.asarray(table["rank"])), strict=True):
            parts[name].append(array)
    if tables:
        merged = {name: np.concatenate(arrays) for name, arrays in parts.items()}
        store.insert_columns(token_postings, posting_columns(model_id, **merged))


__all__ = ["ACTIVATION_STAT_COLUMNS", "StatsConfig", "StatsStage", "token_selection", "tracked_token_ids"]
