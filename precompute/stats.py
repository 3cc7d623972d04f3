"""The ``stats`` stage: per-neuron activation, weight and vocabulary statistics, and within-layer percentiles.

Activation statistics (paper-spec §3.1) stream over exactly the counted tokens the correlations use, for every
model of the family, in the same forward passes:

- exact moments of ``mlp.hook_pre`` and ``mlp.hook_post``: mean, population variance, skew and NON-excess
  kurtosis (a Gaussian gives 3), from float64 power sums (no histogram binning, unlike the paper's
  `summary.py`); min, max; activation frequency P(pre > 0);
- fixed-bin histograms of both hooks (the paper's pre-activation edges linspace(-10, 15, 256): 255 regular bins
  plus an underflow and an overflow bin);
- position profiles: mean and standard deviation of both hooks at each position of the row;
- token tables: the tokens with the highest mean and max ``hook_post`` (paper `summary.py` vocab tables).

Weight statistics come from `precompute.weights` on the processed weights, with the top/bottom tokens of
W_U·w_out and the top tokens of W_E·w_in. Every numeric column of ``activation_stats`` and ``weight_stats`` also
gets its within-layer percentile (SciPy ``percentileofscore(kind="mean")``, paper Fig. 3).

Every stage reading a batch starts with the same steps, so `counted_activations` does them once per batch for
all of them (stats, examples, families): the forward passes and their first reductions are shared.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from precompute.stage_config import ConfigError, stage_config
from precompute.store import blob

if TYPE_CHECKING:
    from precompute.activations import ActivationBatch
    from precompute.pipeline import RunContext

logger = logging.getLogger(__name__)

#: Columns of ``activation_stats`` that get within-layer percentiles (n_tokens is the same for every neuron).
ACTIVATION_STAT_COLUMNS: tuple[str, ...] = (
    *(f"{hook}_{stat}" for hook in ("pre", "post") for stat in ("mean", "var", "skew", "kurt", "min", "max")),
    "frequency",
)


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
            max_vocab × n_neurons × 12 bytes per model); None tracks every id that occurs.
        vocab_top_k: tokens kept per neuron for W_U·w_out (top and bottom) and W_E·w_in.
    """

    bins: int = 255
    pre_range: tuple[float, ...] = (-10.0, 15.0)
    post_range: tuple[float, ...] = (-0.5, 15.0)
    token_top_k: int = 20
    token_min_count: int = 5
    max_vocab: int | None = None
    vocab_top_k: int = 20

    def __post_init__(self) -> None:
        for key in ("bins", "token_top_k", "token_min_count", "vocab_top_k"):
            if getattr(self, key) < 1:
                raise ConfigError(f"stats.{key} must be at least 1, got {getattr(self, key)}")
        if self.max_vocab is not None and self.max_vocab < 1:
            raise ConfigError(f"stats.max_vocab must be at least 1 or null, got {self.max_vocab}")
        for key in ("pre_range", "post_range"):
            low_high = getattr(self, key)
            if len(low_high) != 2 or not low_high[0] < low_high[1]:
                raise ConfigError(f"stats.{key} must be [low, high] with low < high, got {list(low_high)}")


@dataclass
class CountedActivations:
    """One model's activations of one hook at a batch's counted tokens, with their float64 power sums."""

    x: torch.Tensor  # [tokens, n_neurons] float32
    x64: torch.Tensor  # [tokens, n_neurons] float64
    x2: torch.Tensor  # [tokens, n_neurons] float64 squares
    sums: torch.Tensor  # [4, n_neurons] float64: Σx, Σx², Σx³, Σx⁴


def counted_activations(batch: ActivationBatch, model: str, hook: str) -> CountedActivations:
    """The counted activations of ``hook`` (``hook_pre``/``hook_post``), computed once per batch and kept on it.

    Several stages read the same batch; the selection, the float64 copy and the power sums are their common
    first steps, so the first stage to ask pays for them and the others reuse them (freed with the batch).
    """
    cache = batch.__dict__.setdefault("_counted_activations", {})
    if (model, hook) not in cache:
        x = batch.counted_acts(model, hook)  # [tokens, n_layers * d_mlp], shared with the correlation engine
        x64 = x.double()
        x2 = x64 * x64
        ones = torch.ones(1, x.shape[0], dtype=torch.float64, device=x.device)
        sums = torch.cat([ones @ x64, ones @ x2, ones @ (x2 * x64), ones @ (x2 * x2)])
        cache[(model, hook)] = CountedActivations(x, x64, x2, sums)
    return cache[(model, hook)]


def counted_positions(batch: ActivationBatch) -> torch.Tensor:
    """The position in the row of every counted token of a batch: [tokens] int64 (cached on the batch)."""
    cache = batch.__dict__.setdefault("_counted_activations", {})
    if "positions" not in cache:
        cache["positions"] = batch.counted_index % batch.counted.shape[1]
    return cache["positions"]


def firing_by_position(batch: ActivationBatch, model: str, ctx: int) -> torch.Tensor:
    """How many counted tokens have hook_pre > 0 at each position: [ctx, n_neurons] float64 (cached)."""
    cache = batch.__dict__.setdefault("_counted_activations", {})
    if (model, "firing") not in cache:
        x = counted_activations(batch, model, "hook_pre").x
        fire = torch.zeros(ctx, x.shape[1], dtype=torch.float64, device=x.device)
        cache[(model, "firing")] = fire.index_add_(0, counted_positions(batch), (x > 0).double())
    return cache[(model, "firing")]


class StreamingMoments:
    """Exact streaming mean, variance, skew and kurtosis per column from float64 power sums.

    Raw power sums lose about log10((|mean| / std)^4) of float64's 16 digits to cancellation: nothing for
    activations (the paper's precision problems came from float16/float32 sums, paper-spec §7.3).

    >>> m = StreamingMoments(1, torch.device("cpu"))
    >>> for part in ([1.0, 2.0], [3.0, 4.0, 10.0]):
    ...     x = torch.tensor(part, dtype=torch.float64)[:, None]
    ...     m.update(len(part), torch.cat([x.sum(0), (x**2).sum(0), (x**3).sum(0), (x**4).sum(0)])[:, None])
    >>> [round(float(v[0]), 4) for v in (m.mean(), m.variance(), m.skew(), m.kurtosis())]
    [4.0, 10.0, 1.1384, 2.788]
    """

    def __init__(self, n_columns: int, device: torch.device) -> None:
        self.n = 0
        self.sums = torch.zeros(4, n_columns, dtype=torch.float64, device=device)

    def update(self, n: int, sums: torch.Tensor) -> None:
        """Add ``n`` rows summarised by their power sums [4, n_columns] (Σx, Σx², Σx³, Σx⁴)."""
        self.n += n
        self.sums += sums

    def mean(self) -> torch.Tensor:
        return self.sums[0] / max(self.n, 1)

    def central(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Central moments E[(x−μ)^k] for k = 2, 3, 4."""
        n = max(self.n, 1)
        mu, e2, e3, e4 = self.mean(), self.sums[1] / n, self.sums[2] / n, self.sums[3] / n
        m2 = (e2 - mu**2).clamp_min(0)
        return m2, e3 - 3 * mu * e2 + 2 * mu**3, e4 - 4 * mu * e3 + 6 * mu**2 * e2 - 3 * mu**4

    def variance(self) -> torch.Tensor:
        return self.central()[0]

    def skew(self) -> torch.Tensor:
        m2, m3, _ = self.central()
        return torch.where(m2 > 0, m3 / m2.clamp_min(1e-300) ** 1.5, torch.nan)

    def kurtosis(self) -> torch.Tensor:
        """Non-excess kurtosis (a Gaussian gives 3); NaN for a constant column."""
        m2, _, m4 = self.central()
        return torch.where(m2 > 0, m4 / m2.clamp_min(1e-300) ** 2, torch.nan)

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "sums": self.sums}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.n, self.sums = state["n"], state["sums"].to(self.sums.device)


def per_model_state_dict(state: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """A checkpointable copy of per-model running state (tensors, and `StreamingMoments` as their sums)."""
    return {
        name: {k: (v.state_dict() if isinstance(v, StreamingMoments) else v) for k, v in values.items()}
        for name, values in state.items()
    }


def load_per_model_state(
    state: Mapping[str, dict[str, Any]], saved: Mapping[str, Mapping[str, Any]], device: torch.device | str
) -> None:
    """Restore `per_model_state_dict` output into live per-model state, moving tensors to `device`."""
    for name, values in saved.items():
        for key, value in values.items():
            if isinstance(state[name][key], StreamingMoments):
                state[name][key].load_state_dict(value)
            else:
                state[name][key] = value.to(device) if isinstance(value, torch.Tensor) else value


def within_layer_percentiles(values: np.ndarray) -> np.ndarray:
    """Percentile (0-100) of each value within its layer, SciPy's ``percentileofscore(kind="mean")``.

    Args:
        values: [n_layers, d_mlp]; NaN values get NaN and do not count.

    >>> within_layer_percentiles(np.array([[1.0, 2.0, 2.0, 4.0]])).tolist()
    [[12.5, 50.0, 50.0, 87.5]]
    """
    out = np.full(values.shape, np.nan)
    for layer, row in enumerate(values):
        finite = np.isfinite(row)
        ordered = np.sort(row[finite])
        if ordered.size:
            left = np.searchsorted(ordered, row[finite], side="left")
            right = np.searchsorted(ordered, row[finite], side="right")
            out[layer, finite] = (left + right) * 50.0 / ordered.size
    return out


def histogram_update(counts: torch.Tensor, x: torch.Tensor, low: float, high: float, bins: int) -> None:
    """Add ``x`` [tokens, n] to ``counts`` [n * (bins + 2)]: bin 0 is (-inf, low), bin bins + 1 is [high, inf).

    Regular bins are left-closed, [edge_i, edge_i+1) (the paper's ``searchsorted`` is left-open: the two differ
    only for values exactly on an edge).

    >>> c = torch.zeros(2 * 4, dtype=torch.int64)
    >>> histogram_update(c, torch.tensor([[-1.0, 0.5], [0.0, 9.0]]), 0.0, 1.0, 2); c.tolist()
    [1, 1, 0, 0, 0, 0, 1, 1]
    """
    n, scale = x.shape[1], bins / (high - low)
    base = torch.tensor(1.0 - low * scale, dtype=x.dtype, device=x.device)
    index = torch.addcmul(base, x, torch.tensor(scale, dtype=x.dtype, device=x.device)).clamp_(0, bins + 1)
    index = index.to(torch.int32).add_(torch.arange(n, dtype=torch.int32, device=x.device) * (bins + 2))
    counts += torch.bincount(index.view(-1), minlength=n * (bins + 2))


class StatsStage:
    """The ``stats`` stage: one pass of streaming activation statistics, plus weight statistics at write time."""

    config_class = StatsConfig

    name = "stats"
    hooks: frozenset = frozenset({"hook_pre", "hook_post"})

    def __init__(self, context: RunContext) -> None:
        self.config = stage_config(StatsConfig, context.config.analysis.get("stats"), "stats")
        self.device = torch.device(context.config.device)
        dataset = context.dataset
        d_vocab = max(max(m.d_vocab for m in context.models), int(dataset.rows.max()) + 1)
        counts = np.bincount(dataset.rows[dataset.counted], minlength=d_vocab)
        tracked = np.flatnonzero(counts > 0)
        tracked = tracked[np.argsort(-counts[tracked], kind="stable")][: self.config.max_vocab]
        self.tracked = torch.from_numpy(np.sort(tracked))  # token ids with a token-table slot
        slot = torch.full((d_vocab,), -1, dtype=torch.int64)
        slot[self.tracked] = torch.arange(len(self.tracked))
        self.slot = slot.to(self.device)
        self.ctx = dataset.ctx
        self.shapes = {m.name: m.n_neurons for m in context.models}
        self.state: dict[str, dict[str, Any]] = {name: self._empty(n) for name, n in self.shapes.items()}
        self.shared: dict[str, Any] = {
            "position_count": torch.zeros(self.ctx, dtype=torch.int64, device=self.device),
            "token_count": torch.zeros(len(self.tracked), dtype=torch.int64, device=self.device),
        }
        self._done = False

    def _empty(self, n: int) -> dict[str, Any]:
        device, bins = self.device, self.config.bins
        state: dict[str, Any] = {
            "frequency": torch.zeros(n, dtype=torch.float64, device=device),
            "token_sum": torch.zeros(len(self.tracked), n, dtype=torch.float64, device=device),
            "token_max": torch.full((len(self.tracked), n), -torch.inf, device=device),
        }
        for hook in ("pre", "post"):
            state[f"{hook}_moments"] = StreamingMoments(n, device)
            state[f"{hook}_min"] = torch.full((n,), torch.inf, device=device)
            state[f"{hook}_max"] = torch.full((n,), -torch.inf, device=device)
            state[f"{hook}_hist"] = torch.zeros(n * (bins + 2), dtype=torch.int64, device=device)
            state[f"{hook}_position_sum"] = torch.zeros(self.ctx, n, dtype=torch.float64, device=device)
            state[f"{hook}_position_sq"] = torch.zeros(self.ctx, n, dtype=torch.float64, device=device)
        return state

    @property
    def done_streaming(self) -> bool:
        return self._done

    def update(self, batch: ActivationBatch) -> None:
        positions = counted_positions(batch)  # [tokens]
        if positions.numel() == 0:
            return
        slots = self.slot[batch.tokens[batch.counted]]
        tracked = slots >= 0
        all_tracked = bool(tracked.all())
        self.shared["position_count"] += torch.bincount(positions, minlength=self.ctx)
        self.shared["token_count"] += torch.bincount(slots[tracked], minlength=len(self.tracked))
        for name, state in self.state.items():
            for hook in ("pre", "post"):
                acts = counted_activations(batch, name, f"hook_{hook}")  # x: [tokens, n_neurons]
                state[f"{hook}_moments"].update(acts.x.shape[0], acts.sums)
                state[f"{hook}_min"] = torch.minimum(state[f"{hook}_min"], acts.x.amin(0))
                state[f"{hook}_max"] = torch.maximum(state[f"{hook}_max"], acts.x.amax(0))
                low, high = self.config.pre_range if hook == "pre" else self.config.post_range
                histogram_update(state[f"{hook}_hist"], acts.x, low, high, self.config.bins)
                state[f"{hook}_position_sum"].index_add_(0, positions, acts.x64)
                state[f"{hook}_position_sq"].index_add_(0, positions, acts.x2)
            state["frequency"] += firing_by_position(batch, name, self.ctx).sum(0)
            post = acts.x if all_tracked else acts.x[tracked]
            state["token_sum"].index_add_(0, slots[tracked], acts.x64 if all_tracked else acts.x64[tracked])
            state["token_max"].scatter_reduce_(0, slots[tracked].unsqueeze(1).expand_as(post), post, "amax")

    def finish_pass(self) -> None:
        self._done = True

    def state_dict(self) -> dict:
        return {"models": per_model_state_dict(self.state), "shared": self.shared, "done": self._done}

    def load_state_dict(self, state: dict) -> None:
        load_per_model_state(self.state, state["models"], self.device)
        self.shared = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in state["shared"].items()}
        self._done = state["done"]

    # --- results ------------------------------------------------------------------------------------------

    def activation_columns(self, name: str) -> dict[str, np.ndarray]:
        """Every ``activation_stats`` column of one model, flat over neurons (layer-major)."""
        state = self.state[name]
        columns: dict[str, np.ndarray] = {}
        for hook in ("pre", "post"):
            m: StreamingMoments = state[f"{hook}_moments"]
            values = (m.mean(), m.variance(), m.skew(), m.kurtosis(), state[f"{hook}_min"], state[f"{hook}_max"])
            for stat, value in zip(("mean", "var", "skew", "kurt", "min", "max"), values, strict=True):
                columns[f"{hook}_{stat}"] = value.double().cpu().numpy()
        n_tokens = state["pre_moments"].n
        columns["frequency"] = state["frequency"].cpu().numpy() / max(n_tokens, 1)
        if n_tokens == 0:
            columns = {k: np.full_like(v, np.nan) for k, v in columns.items()}
        return columns

    def position_profile(self, name: str, hook: str) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation [ctx, n_neurons] (float32; NaN where a position has no counted token)."""
        state = self.state[name]
        count = self.shared["position_count"].double().unsqueeze(1)
        mean = (state[f"{hook}_position_sum"] / count).cpu()  # 0/0 = NaN where nothing was counted
        var = (state[f"{hook}_position_sq"] / count).cpu() - mean**2
        return mean.float().numpy(), var.clamp_min(0).sqrt().float().numpy()

    def write(self, context: RunContext) -> None:
        from precompute import store as tables

        context.store.clear_model_tables(context.model_ids.values(), tables.STAGE_TABLES[self.name])
        for model in context.models:
            model_id = context.model_ids[model.name]
            columns = self.activation_columns(model.name)
            weight_columns, projection = self._weight_columns(model)
            store = context.store
            store.insert_rows(tables.activation_stats, self._activation_rows(model, model_id, columns))
            store.insert_rows(tables.histograms, self._histogram_rows(model, model_id))
            store.insert_rows(tables.position_profiles, self._position_rows(model, model_id))
            store.insert_rows(tables.token_tables, self._token_rows(model, model_id))
            store.insert_rows(tables.weight_stats, _flat_rows(model, model_id, weight_columns))
            store.insert_rows(tables.token_tables, _projection_rows(model, model_id, projection))
            columns = columns | {k: v.reshape(-1) for k, v in weight_columns.items()}
            store.insert_rows(tables.percentiles, _percentile_rows(model, model_id, columns))
            logger.info("stats: wrote %s (%d neurons)", model.name, model.n_neurons)

    def _weight_columns(self, model: Any) -> tuple[dict[str, np.ndarray], Any]:
        from precompute.weights import processed_weights, vocab_projection, weight_statistics

        weights = processed_weights(model)
        top_k = min(self.config.vocab_top_k, weights.d_vocab)
        return weight_statistics(weights), vocab_projection(weights, top_k=top_k)

    def _activation_rows(self, model: Any, model_id: int, columns: dict[str, np.ndarray]) -> Iterator[dict]:
        n_tokens = self.state[model.name]["pre_moments"].n
        for row in _flat_rows(model, model_id, columns):
            yield row | {"n_tokens": n_tokens}

    def _histogram_rows(self, model: Any, model_id: int) -> Iterator[dict]:
        bins = self.config.bins
        for hook in ("pre", "post"):
            low, high = self.config.pre_range if hook == "pre" else self.config.post_range
            counts = np.ascontiguousarray(self.state[model.name][f"{hook}_hist"].cpu().numpy(), dtype="<i8")
            counts = counts.reshape(-1, bins + 2)
            for flat in range(model.n_neurons):
                key = neuron_key(model_id, model.d_mlp, flat)
                yield key | dict(hook=f"hook_{hook}", low=low, high=high, n_bins=bins, counts=blob(counts[flat]))

    def _position_rows(self, model: Any, model_id: int) -> Iterator[dict]:
        count = blob(self.shared["position_count"].cpu().numpy().astype("<i8"))
        for hook in ("pre", "post"):
            mean, std = self.position_profile(model.name, hook)
            mean, std = np.ascontiguousarray(mean.T, dtype="<f4"), np.ascontiguousarray(std.T, dtype="<f4")
            for flat in range(model.n_neurons):
                key = neuron_key(model_id, model.d_mlp, flat)
                yield key | dict(hook=f"hook_{hook}", mean=blob(mean[flat]), std=blob(std[flat]), count=count)

    def _token_rows(self, model: Any, model_id: int) -> Iterator[dict]:
        """The mean- and max-activation token tables (hook_post), best first, with each token's count."""
        state, count = self.state[model.name], self.shared["token_count"].cpu()
        mean = state["token_sum"].cpu() / count.unsqueeze(1).double()
        tables = {
            "mean_activation": mean.masked_fill((count < self.config.token_min_count).unsqueeze(1), -torch.inf),
            "max_activation": state["token_max"].cpu().double().masked_fill((count == 0).unsqueeze(1), -torch.inf),
        }
        for kind, values in tables.items():
            top_values, top_slots = torch.topk(values, min(self.config.token_top_k, values.shape[0]), dim=0)
            slots = top_slots.T.numpy()  # [n_neurons, k]
            yield from ranked_rows(
                model, model_id, kind, self.tracked.numpy()[slots], top_values.T.numpy(), count.numpy()[slots]
            )


def neuron_key(model_id: int, d_mlp: int, flat: int) -> dict[str, int]:
    """The key columns of a neuron's row from its flat (layer-major) index.

    >>> neuron_key(3, 512, 1030)
    {'model_id': 3, 'layer': 2, 'neuron': 6}
    """
    return {"model_id": model_id, "layer": int(flat // d_mlp), "neuron": int(flat % d_mlp)}


def ranked_rows(
    model: Any, model_id: int, kind: str, ids: np.ndarray, values: np.ndarray, counts: np.ndarray | None = None
) -> Iterator[dict]:
    """``token_tables`` rows from [n_neurons, k] token ids and values, best first; stops at a non-finite value."""
    for flat in range(model.n_neurons):
        key = neuron_key(model_id, model.d_mlp, flat)
        for rank in range(ids.shape[1]):
            if not np.isfinite(values[flat, rank]):
                break
            count = None if counts is None else int(counts[flat, rank])
            yield key | dict(kind=kind, rank=rank, token_id=int(ids[flat, rank]), value=float(values[flat, rank]),
                             count=count)  # fmt: skip


def _flat_rows(model: Any, model_id: int, columns: Mapping[str, np.ndarray]) -> Iterator[dict]:
    flat_columns = {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in columns.items()}
    for flat in range(model.n_neurons):
        yield neuron_key(model_id, model.d_mlp, flat) | {k: float(v[flat]) for k, v in flat_columns.items()}


def _projection_rows(model: Any, model_id: int, projection: Any) -> Iterator[dict]:
    """``unembed_top``/``unembed_bottom`` (W_U·w_out) and ``embed_top`` (W_E·w_in) token tables."""
    for kind in ("unembed_top", "unembed_bottom", "embed_top"):
        ids = getattr(projection, f"{kind}_ids").reshape(model.n_neurons, -1)
        values = getattr(projection, f"{kind}_values").reshape(model.n_neurons, -1)
        yield from ranked_rows(model, model_id, kind, ids, values)


def _percentile_rows(model: Any, model_id: int, columns: Mapping[str, np.ndarray]) -> Iterator[dict]:
    for statistic, values in columns.items():
        percentile = within_layer_percentiles(np.asarray(values, dtype=np.float64).reshape(model.n_layers, -1))
        flat_percentile = percentile.reshape(-1)
        for flat in np.flatnonzero(np.isfinite(flat_percentile)):
            key = neuron_key(model_id, model.d_mlp, flat)
            yield key | {"statistic": statistic, "percentile": float(flat_percentile[flat])}


__all__ = [
    "ACTIVATION_STAT_COLUMNS",
    "CountedActivations",
    "StatsConfig",
    "StatsStage",
    "StreamingMoments",
    "counted_activations",
    "counted_positions",
    "firing_by_position",
    "histogram_update",
    "neuron_key",
    "ranked_rows",
    "within_layer_percentiles",
]
