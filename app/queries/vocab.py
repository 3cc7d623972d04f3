"""Token text of a run's vocabulary, and neurons found by token (token tables, example peaks)."""

from __future__ import annotations

import sqlite3
import struct
from dataclasses import dataclass

#: Token-table kinds searched by token, in the order results are shown.
TOKEN_TABLE_KINDS = ("mean_activation", "max_activation", "unembed_top", "unembed_bottom", "embed_top")


def load_vocab(conn: sqlite3.Connection, run_id: int) -> list[str]:
    """Decoded text of every token id of the run (index = token id)."""
    rows = conn.execute("SELECT token_id, text FROM vocab WHERE run_id = ? ORDER BY token_id", (run_id,)).fetchall()
    size = rows[-1][0] + 1 if rows else 0
    texts = [""] * size
    for token_id, text in rows:
        texts[token_id] = text
    return texts


@dataclass(frozen=True, slots=True)
class TokenHit:
    model_id: int
    layer: int
    neuron: int
    source: str  # a token-table kind, or "example_peak"
    rank: int
    value: float
    token_id: int


def neurons_by_token_tables(
    conn: sqlite3.Connection, model_ids: list[int], token_ids: list[int], cap: int
) -> tuple[list[TokenHit], bool]:
    """Neurons whose token tables list any of the tokens (index on (model_id, kind, token_id))."""
    if not token_ids or not model_ids:
        return [], False
    hits: list[TokenHit] = []
    marks = ",".join("?" * len(token_ids))
    for model_id in model_ids:
        for kind in TOKEN_TABLE_KINDS:
            rows = conn.execute(
                f"SELECT layer, neuron, rank, value, token_id FROM token_tables WHERE model_id = ? AND kind = ? "
                f"AND token_id IN ({marks}) ORDER BY rank, abs(value) DESC LIMIT ?",
                (model_id, kind, *token_ids, cap + 1 - len(hits)),
            ).fetchall()
            hits.extend(TokenHit(model_id, r[0], r[1], kind, r[2], r[3], r[4]) for r in rows)
            if len(hits) > cap:
                return hits[:cap], True
    return hits, False


def neurons_by_example_peak(
    conn: sqlite3.Connection, model_ids: list[int], token_ids: list[int], max_rank: int, cap: int
) -> tuple[list[TokenHit], bool]:
    """Neurons whose top examples peak on one of the tokens.

    The peak token is read inside SQLite from the int32 BLOB (4 bytes at ``peak * 4``), so no BLOB leaves
    the database; this scans the model's top examples and is bounded by the request's deadline.
    """
    if not token_ids or not model_ids:
        return [], False
    blobs = [struct.pack("<i", token_id) for token_id in token_ids]
    marks = ",".join("?" * len(blobs))
    models = ",".join("?" * len(model_ids))
    rows = conn.execute(
        "SELECT model_id, layer, neuron, rank, activation, substr(token_ids, peak * 4 + 1, 4) AS peak_token "
        f"FROM examples WHERE model_id IN ({models}) AND kind = 'top' AND rank < ? "
        f"AND substr(token_ids, peak * 4 + 1, 4) IN ({marks}) ORDER BY activation DESC LIMIT ?",
        (*model_ids, max_rank, *blobs, cap + 1),
    ).fetchall()
    hits = [TokenHit(r[0], r[1], r[2], "example_peak", r[3], r[4], struct.unpack("<i", r[5])[0]) for r in rows[:cap]]
    return hits, len(rows) > cap
