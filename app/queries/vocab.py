"""Token text of a run's vocabulary (neurons found by token: `app.queries.search`)."""

from __future__ import annotations

import sqlite3


def load_vocab(conn: sqlite3.Connection, run_id: int) -> list[str]:
    """Decoded text of every token id of the run (index = token id)."""
    rows = conn.execute("SELECT token_id, text FROM vocab WHERE run_id = ? ORDER BY token_id", (run_id,)).fetchall()
    size = rows[-1][0] + 1 if rows else 0
    texts = [""] * size
    for token_id, text in rows:
        texts[token_id] = text
    return texts
