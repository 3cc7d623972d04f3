"""The shape of the rows the stages write: a row type, the key columns of a per-neuron row, and ranked lists as
columns (`precompute.store.AtlasStore.insert_columns` takes a table column by column, which is what keeps the
writes of a GPT-2-sized model fast: no Python dict per row)."""

from __future__ import annotations

from typing import Any

import numpy as np

#: One row for `precompute.store.AtlasStore.insert_rows`: column name -> value (numbers, text, bytes, JSON, None).
Row = dict[str, Any]


def neuron_key(model_id: int, d_mlp: int, flat: int) -> dict[str, int]:
    """The key columns of a neuron's row from its flat (layer-major) index.

    >>> neuron_key(3, 512, 1030)
    {'model_id': 3, 'layer': 2, 'neuron': 6}
    """
    return {"model_id": model_id, "layer": int(flat // d_mlp), "neuron": int(flat % d_mlp)}


def neuron_key_columns(model_id: int, d_mlp: int, flat: np.ndarray) -> dict[str, Any]:
    """The key columns of many neurons' rows from their flat indices.

    >>> {k: np.asarray(v).tolist() for k, v in neuron_key_columns(3, 512, np.array([1030, 5])).items()}
    {'model_id': 3, 'layer': [2, 0], 'neuron': [6, 5]}
    """
    return {"model_id": model_id, "layer": flat // d_mlp, "neuron": flat % d_mlp}


def ranked_columns(
    model_id: int,
    d_mlp: int,
    kind: str,
    ids: np.ndarray,
    values: np.ndarray,
    counts: np.ndarray | None = None,
) -> dict[str, Any]:
    """``token_tables`` columns from [n_neurons, k] token ids and values, best first; a neuron's list stops at its
    first non-finite value.

    >>> c = ranked_columns(1, 2, "max", np.array([[7, 8], [9, 4]]), np.array([[2.0, -np.inf], [3.0, 1.0]]))
    >>> c["layer"].tolist(), c["neuron"].tolist(), c["rank"].tolist(), c["token_id"].tolist()
    ([0, 0, 0], [0, 1, 1], [0, 0, 1], [7, 9, 4])
    """
    keep = np.cumprod(np.isfinite(values), axis=1).astype(bool)
    flat, rank = np.nonzero(keep)
    columns = neuron_key_columns(model_id, d_mlp, flat) | {
        "kind": kind,
        "rank": rank,
        "token_id": ids[flat, rank].astype(np.int64),
        "value": values[flat, rank].astype(np.float64),
    }
    columns["count"] = None if counts is None else counts[flat, rank].astype(np.int64)
    return columns


__all__ = ["Row", "neuron_key", "neuron_key_columns", "ranked_columns"]
