"""SQL for live interventions and "which neurons fire on my text?": universal neuron ids, twins of many neurons,
stored mean activations."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from app.queries.neurons import universal_column


def universal_ids(conn: sqlite3.Connection, model_id: int, d_mlp: int, threshold: float | None) -> np.ndarray | None:
    """Flat ids (``layer * d_mlp + neuron``) of the model's universal neurons at `threshold` (None: the run's),
    in one query; None for a model without aggregates (its flags are NULL: it was not correlated with every
    partner)."""
    universal, params = universal_column(threshold, "neurons")
    has_flags = conn.execute(
        "SELECT 1 FROM neurons WHERE model_id = ? AND universal IS NOT NULL LIMIT 1", (model_id,)
    ).fetchone()
    if has_flags is None:
        return None
    rows = conn.execute(
        f"SELECT layer * ? + neuron FROM neurons WHERE model_id = ? AND {universal} = 1", (d_mlp, model_id, *params)
    ).fetchall()
    return np.array([r[0] for r in rows], dtype=np.int64)


@dataclass(frozen=True, slots=True)
class TwinRow:
    """A neuron's best match (its twin) in one partner model."""

    layer: int
    neuron: int
    partner: str  # the partner model's name
    twin_layer: int
    twin_neuron: int
    corr: float


def twins_of(conn: sqlite3.Connection, model_id: int, neurons: Sequence[tuple[int, int]]) -> list[TwinRow]:
    """The twins of several neurons of one model (``partner_scores``), in family order per neuron."""
    if not neurons:
        return []
    values = ", ".join("(?, ?)" for _ in neurons)
    rows = conn.execute(
        "SELECT p.layer, p.neuron, m.name, p.max_layer, p.max_neuron, p.max_corr FROM partner_scores p "
        f"JOIN models m ON m.id = p.partner_model_id WHERE p.model_id = ? AND (p.layer, p.neuron) IN (VALUES {values}) "
        "ORDER BY p.layer, p.neuron, m.position",
        (model_id, *(x for pair in neurons for x in pair)),
    )
    return [TwinRow(*row) for row in rows]


def post_mean(conn: sqlite3.Connection, model_id: int, layer: int, neuron: int) -> float | None:
    """The neuron's mean ``hook_post`` over the precompute's counted tokens (``activation_stats``), if stored."""
    row = conn.execute(
        "SELECT post_mean FROM activation_stats WHERE model_id = ? AND layer = ? AND neuron = ?",
        (model_id, layer, neuron),
    ).fetchone()
    return None if row is None or row[0] is None else float(row[0])
