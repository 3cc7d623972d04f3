"""From per-partner correlations to per-neuron universality scores, and the rows the store keeps (pure functions).

For neuron i of model x and each partner y: maxcorr_y(i) (the best partner neuron, all layers, signed max) and
baseline_y(i) (the best rotated unit). Over partners: max/mean/min of both, and the excess correlation
ϱ_i = mean_corr − mean_baseline (paper eq. 3, paper-spec §2.4); universal ⇔ ϱ_i > threshold (0.5 in the paper).
A model gets these aggregates only when every other model of the run is among its partners (all pairs), so
``--reference-only`` fills them for the reference model alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from precompute.correlation import ModelShape, PartnerResult

#: Fixed histogram edges for the distributions the dashboard plots (paper Fig. 2a / Fig. 11).
DISTRIBUTION_EDGES = {
    "max_corr": np.linspace(-1, 1, 201),
    "mean_corr": np.linspace(-1, 1, 201),
    "mean_baseline": np.linspace(-1, 1, 201),
    "excess_corr": np.linspace(-1, 1, 201),
}
QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999)


@dataclass
class NeuronScores:
    """Aggregates for every neuron of one model; NaN where undefined (dead neuron, missing partners)."""

    max_corr: np.ndarray  # [n_neurons]
    mean_corr: np.ndarray
    min_corr: np.ndarray
    max_baseline: np.ndarray
    mean_baseline: np.ndarray
    min_baseline: np.ndarray
    excess_corr: np.ndarray
    dead: np.ndarray  # [n_neurons] bool


def score_model(
    index: int, n_models: int, results: dict[tuple[int, int], PartnerResult], dead: np.ndarray
) -> NeuronScores:
    """Aggregate one model's partner results; aggregates stay NaN unless all other models are partners."""
    partners = [y for (x, y) in results if x == index]
    n_neurons = dead.shape[0]
    if len(partners) != n_models - 1:
        nan = np.full(n_neurons, np.nan)
        return NeuronScores(nan, nan, nan, nan, nan, nan, nan, dead)
    best = np.stack([results[(index, y)].top_corr[:, 0].numpy() for y in partners])  # [partners, n]
    baseline = np.stack([results[(index, y)].baseline_corr.numpy() for y in partners])
    best[:, dead] = np.nan
    baseline[:, dead] = np.nan
    best[~np.isfinite(best)] = np.nan
    baseline[~np.isfinite(baseline)] = np.nan
    mean_corr, mean_baseline = best.mean(axis=0), baseline.mean(axis=0)
    return NeuronScores(
        max_corr=best.max(axis=0),
        mean_corr=mean_corr,
        min_corr=best.min(axis=0),
        max_baseline=baseline.max(axis=0),
        mean_baseline=mean_baseline,
        min_baseline=baseline.min(axis=0),
        excess_corr=mean_corr - mean_baseline,
        dead=dead,
    )


def neuron_columns(model_id: int, shape: ModelShape, scores: NeuronScores, threshold: float) -> dict[str, Any]:
    """The ``neurons`` rows of one model, column by column (`precompute.store.AtlasStore.insert_columns`; NaN is
    NULL)."""
    flat = np.arange(shape.n_neurons)
    excess = scores.excess_corr
    universal = (excess > threshold).astype(object)
    universal[~np.isfinite(excess)] = None
    return {
        "model_id": model_id,
        "layer": flat // shape.d_mlp,
        "neuron": flat % shape.d_mlp,
        "dead": scores.dead.astype(bool),
        **{name: getattr(scores, name) for name in ("max_corr", "mean_corr", "min_corr")},
        **{name: getattr(scores, name) for name in ("max_baseline", "mean_baseline", "min_baseline")},
        "excess_corr": excess,
        "universal": list(universal),
    }


def partner_columns(
    model_id: int,
    partner_id: int,
    shape: ModelShape,
    partner: ModelShape,
    result: PartnerResult,
    dead: np.ndarray,
) -> dict[str, Any]:
    """One row per live neuron: its best partner neuron and its best rotated unit (columns)."""
    top_corr, top_index = result.top_corr[:, 0].numpy(), result.top_index[:, 0].numpy()
    base_corr, base_index = result.baseline_corr.numpy(), result.baseline_index.numpy()
    flat = np.flatnonzero(~dead & np.isfinite(top_corr) & np.isfinite(base_corr))
    return {
        "model_id": model_id,
        "layer": flat // shape.d_mlp,
        "neuron": flat % shape.d_mlp,
        "partner_model_id": partner_id,
        "max_corr": top_corr[flat],
        "max_layer": top_index[flat] // partner.d_mlp,
        "max_neuron": top_index[flat] % partner.d_mlp,
        "baseline_corr": base_corr[flat],
        "baseline_layer": base_index[flat] // partner.d_mlp,
        "baseline_unit": base_index[flat] % partner.d_mlp,
    }


def match_columns(
    model_id: int,
    partner_id: int,
    shape: ModelShape,
    partner: ModelShape,
    result: PartnerResult,
    dead: np.ndarray,
) -> dict[str, Any]:
    """The top-k partner neurons of every live neuron, best first, up to the first undefined one (columns)."""
    corr, index = result.top_corr.numpy(), result.top_index.numpy()
    # a rank is kept while every rank before it is finite (the writer used to stop at the first non-finite one)
    keep = np.cumprod(np.isfinite(corr), axis=1).astype(bool) & ~dead[:, None]
    flat, rank = np.nonzero(keep)
    return {
        "model_id": model_id,
        "layer": flat // shape.d_mlp,
        "neuron": flat % shape.d_mlp,
        "partner_model_id": partner_id,
        "rank": rank,
        "partner_layer": index[flat, rank] // partner.d_mlp,
        "partner_neuron": index[flat, rank] % partner.d_mlp,
        "corr": corr[flat, rank],
    }


def layer_summary_rows(model_id: int, shape: ModelShape, scores: NeuronScores, threshold: float) -> list[dict]:
    rows = []
    for layer in range(shape.n_layers):
        part = slice(layer * shape.d_mlp, (layer + 1) * shape.d_mlp)
        excess = scores.excess_corr[part]
        finite = excess[np.isfinite(excess)]
        rows.append(
            {
                "model_id": model_id,
                "layer": layer,
                "n_neurons": shape.d_mlp,
                "n_dead": int(scores.dead[part].sum()),
                "n_universal": int((finite > threshold).sum()) if finite.size else None,
                "mean_excess": float(finite.mean()) if finite.size else None,
                "max_excess": float(finite.max()) if finite.size else None,
            }
        )
    return rows


def distribution_rows(model_id: int, scores: NeuronScores) -> list[dict[str, Any]]:
    """Histograms and quantiles of the universality quantities, computed once at write time."""
    rows = []
    for quantity, edges in DISTRIBUTION_EDGES.items():
        values = getattr(scores, quantity)
        values = values[np.isfinite(values)]
        if values.size == 0:
            continue
        counts, _ = np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)
        rows.append(
            {
                "model_id": model_id,
                "quantity": quantity,
                "bin_edges": [round(float(e), 6) for e in edges],
                "counts": counts.tolist(),
                "quantiles": {str(q): float(np.quantile(values, q)) for q in QUANTILES},
            }
        )
    return rows


def universal_fraction(scores: Sequence[NeuronScores], threshold: float) -> list[float | None]:
    """The fraction of neurons above the threshold, per model (None where undefined)."""
    out: list[float | None] = []
    for s in scores:
        finite = np.isfinite(s.excess_corr)
        out.append(float((s.excess_corr[finite] > threshold).sum() / s.excess_corr.size) if finite.any() else None)
    return out
