"""Streaming per-neuron statistics: exact moments from float64 power sums, fixed-bin histograms, percentiles.

Pure computations on tensors, for the ``stats`` and ``families`` stages. They keep, per model, a dict of running
tensors and `StreamingMoments`; `per_model_state_dict` and `load_per_model_state` turn that state into a
checkpoint and back.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from precompute.distributed import Distributed


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
        self.sums = torch.zeros(4, n_columns, dtype=torch.float64, device=device)  # [4, n_columns]

    @staticmethod
    def bytes_for(n_columns: int) -> int:
        """The memory of the power sums of ``n_columns`` columns.

        >>> StreamingMoments.bytes_for(10)
        320
        """
        return 4 * n_columns * 8

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

    def reduce(self, group: Distributed) -> None:
        """Add up the ranks' counts and power sums (`precompute.distributed`): the moments of all their rows."""
        self.n = group.all_reduce_int(self.n)
        group.all_reduce(self.sums)

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
    """Percentile (0-100) of each value within its layer, as the paper's Fig. 3 computes it (paper-spec §3.4):
    SciPy's ``percentileofscore(layer, value)`` with its default ``kind="rank"``, for every neuron at once.

    With ``left`` values of the layer below v and ``right`` at or below it (v itself included, so left < right),
    kind "rank" is (left + right + 1) · 50 / n: the mean of the 1-based ranks the tied values share, as a
    percentage. Ties share one percentile.

    Args:
        values: [n_layers, d_mlp]. NaN values get NaN and are left out of their layer's population, as
            ``percentileofscore(..., nan_policy="omit")`` does; ±inf are ordinary (extreme) values.

    >>> within_layer_percentiles(np.array([[1.0, 2.0, 2.0, 4.0]])).tolist()
    [[25.0, 62.5, 62.5, 100.0]]
    >>> within_layer_percentiles(np.array([[np.nan, 3.0]])).tolist()
    [[nan, 100.0]]
    """
    out = np.full(values.shape, np.nan)
    for layer, row in enumerate(values):  # one sort per layer; the neurons of a layer are vectorised
        present = ~np.isnan(row)
        ordered = np.sort(row[present])
        if ordered.size:
            left = np.searchsorted(ordered, row[present], side="left")
            right = np.searchsorted(ordered, row[present], side="right")
            out[layer, present] = (left + right + (left < right)) * (50.0 / ordered.size)  # SciPy's arithmetic
    return out


#: The paper's histogram edges (`summary.py`): ``torch.linspace(-10, 15, 256)``, float32 (paper-spec §3.1).
PAPER_EDGES: tuple[float, float, int] = (-10.0, 15.0, 256)


@functools.cache
def paper_frequency_threshold() -> float:
    """The e of the paper's published ``sparsity`` = P(hook_pre > e) (paper-spec §3.1, §7.3 item 5).

    The paper bins each value v at ``searchsorted(edges, v)`` (bin i holds edges[i-1] < v <= edges[i]) and sums
    the bins from index k = argmax(edges >= 0), the first edge >= 0. Those bins hold exactly the values above
    edges[k - 1], so e is the edge just below the first edge >= 0 of the float32 linspace, computed here as the
    paper's code does (torch's float32 ``linspace`` on the CPU, whose edge 102 is +1.6e-7, not 0): e ≈ -0.098.

    >>> paper_frequency_threshold()
    -0.09803905338048935
    """
    low, high, steps = PAPER_EDGES
    edges = torch.linspace(low, high, steps, dtype=torch.float32, device="cpu")
    first = int(torch.argmax((edges >= 0).to(torch.uint8)))  # the first edge >= 0 (argmax: the first True)
    return float(edges[first - 1])


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


__all__ = [
    "PAPER_EDGES",
    "StreamingMoments",
    "histogram_update",
    "load_per_model_state",
    "paper_frequency_threshold",
    "per_model_state_dict",
    "within_layer_percentiles",
]
