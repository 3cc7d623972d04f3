"""From per-partner correlations to per-neuron universality scores, and the rows the store keeps.

For neuron i of model x and each partner y: maxcorr_y(i) (the best partner neuron, all layers, signed max) and
baseline_y(i) (the best rotated unit). Over partners: max/mean/min of both, and the excess correlation
ϱ_i = mean_corr − mean_baseline (paper eq. 3, paper-spec §2.4); universal ⇔ ϱ_i > threshold (0.5 in the paper).
A model gets these aggregates only when every other model of the run is among its partners (all pairs), so
``--reference-only`` fills them for the reference model alone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from precompute.correlation import ModelShape, PartnerResult

logger = logging.getLogger(__name__)

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


def _number(value: float) -> float | None:
    return None if not np.isfinite(value) else float(value)


def neuron_rows(model_id: int, shape: ModelShape, scores: NeuronScores, threshold: float) -> Iterator[dict]:
    for flat in range(shape.n_neurons):
        excess = _number(scores.excess_corr[flat])
        yield {
            "model_id": model_id,
            "layer": flat // shape.d_mlp,
            "neuron": flat % shape.d_mlp,
            "dead": bool(scores.dead[flat]),
            "max_corr": _number(scores.max_corr[flat]),
            "mean_corr": _number(scores.mean_corr[flat]),
            "min_corr": _number(scores.min_corr[flat]),
            "max_baseline": _number(scores.max_baseline[flat]),
            "mean_baseline": _number(scores.mean_baseline[flat]),
            "min_baseline": _number(scores.min_baseline[flat]),
            "excess_corr": excess,
            "universal": None if excess is None else excess > threshold,
        }


def partner_rows(
    model_id: int,
    partner_id: int,
    shape: ModelShape,
    partner: ModelShape,
    result: PartnerResult,
    dead: np.ndarray,
) -> Iterator[dict]:
    """One row per live neuron: its best partner neuron and its best rotated unit."""
    top_corr, top_index = result.top_corr[:, 0].numpy(), result.top_index[:, 0].numpy()
    base_corr, base_index = result.baseline_corr.numpy(), result.baseline_index.numpy()
    for flat in np.flatnonzero(~dead & np.isfinite(top_corr) & np.isfinite(base_corr)):
        yield {
            "model_id": model_id,
            "layer": int(flat // shape.d_mlp),
            "neuron": int(flat % shape.d_mlp),
            "partner_model_id": partner_id,
            "max_corr": float(top_corr[flat]),
            "max_layer": int(top_index[flat] // partner.d_mlp),
            "max_neuron": int(top_index[flat] % partner.d_mlp),
            "baseline_corr": float(base_corr[flat]),
            "baseline_layer": int(base_index[flat] // partner.d_mlp),
            "baseline_unit": int(base_index[flat] % partner.d_mlp),
        }


def match_rows(
    model_id: int,
    partner_id: int,
    shape: ModelShape,
    partner: ModelShape,
    result: PartnerResult,
    dead: np.ndarray,
) -> Iterator[dict]:
    """The top-k partner neurons of every live neuron, best first."""
    corr, index = result.top_corr.numpy(), result.top_index.numpy()
    for flat in np.flatnonzero(~dead):
        for rank in range(corr.shape[1]):
            if not np.isfinite(corr[flat, rank]):
                break
            yield {
                "model_id": model_id,
                "layer": int(flat // shape.d_mlp),
                "neuron": int(flat % shape.d_mlp),
                "partner_model_id": partner_id,
                "rank": rank,
                "partner_layer": int(index[flat, rank] // partner.d_mlp),
                "partner_neuron": int(index[flat, rank] % partner.d_mlp),
                "corr": float(corr[flat, rank]),
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


class CorrelationStage:
    """The ``correlations`` stage: runs the `CorrelationEngine` and writes the universality tables."""

    name = "correlations"

    def __init__(self, context: Any) -> None:
        from precompute.correlation import CorrelationEngine

        self.shapes = [ModelShape(m.name, m.n_layers, m.d_mlp) for m in context.models]
        self.engine = CorrelationEngine(self.shapes, context.config.correlation, device=context.config.device)
        self.hooks = self.engine.hooks
        logger.info(
            "correlations: %d model pairs in %d pass(es), %s products",
            len(self.engine.pairs),
            self.engine.n_passes,
            self.engine.precision,
        )

    @property
    def done_streaming(self) -> bool:
        return self.engine.done

    def update(self, batch: Any) -> None:
        self.engine.update(batch)

    def finish_pass(self) -> None:
        self.engine.finish_pass()

    def state_dict(self) -> dict:
        return self.engine.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.engine.load_state_dict(state)

    def write(self, context: Any) -> None:
        from precompute.store import (
            CORRELATION_TABLES,
            distributions,
            layer_summaries,
            matches,
            neurons,
            partner_scores,
        )

        store, threshold = context.store, context.config.threshold
        ids = [context.model_ids[shape.name] for shape in self.shapes]
        store.clear_model_tables(ids, CORRELATION_TABLES)
        dead = [self.engine.dead_neurons(i).numpy() for i in range(len(self.shapes))]
        all_scores = []
        for index, shape in enumerate(self.shapes):
            scores = score_model(index, len(self.shapes), self.engine.results, dead[index])
            all_scores.append(scores)
            store.insert_rows(neurons, neuron_rows(ids[index], shape, scores, threshold))
            store.insert_rows(layer_summaries, layer_summary_rows(ids[index], shape, scores, threshold))
            store.insert_rows(distributions, distribution_rows(ids[index], scores))
        for (x, y), result in self.engine.results.items():
            store.insert_rows(
                partner_scores, partner_rows(ids[x], ids[y], self.shapes[x], self.shapes[y], result, dead[x])
            )
            store.insert_rows(matches, match_rows(ids[x], ids[y], self.shapes[x], self.shapes[y], result, dead[x]))
        for shape, fraction in zip(self.shapes, universal_fraction(all_scores, threshold), strict=True):
            if fraction is not None:
                logger.info("%s: %.2f%% of neurons have excess correlation > %s", shape.name, 100 * fraction, threshold)
