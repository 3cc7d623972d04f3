"""one scale a row for the examples' snippets (issue 11: a compact atlas)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26 23:40:00.000000

Revision 0005 stores each snippet of an ``examples`` row (a neuron and kind, about 32 snippets a neuron) as its own
`encode_u8` BLOB: a float32 low and step, then a uint8 code a token. Every snippet of a neuron is coloured on one
scale, the neuron's, so one low and step for the row's snippets is within a shade of each snippet's own: this
revision re-encodes every row's snippets as one `encode_u8` of their values one after the other, 8 bytes fewer a
snippet (about 230 bytes a neuron). No column changes; a row of one snippet is the same bytes in both layouts, and
a row's layout is told by its length (``precompute.store.decode_snippets``).

The values are decoded from the old codes and encoded again: within half a step of each old snippet's range plus
half a step of the row's, at most one step of the row's range from what was computed.
"""

from __future__ import annotations

import sqlite3
import struct

import numpy as np
from alembic import op
from tqdm.auto import tqdm

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

BATCH = 5_000
U8_MISSING = 255
HEADER = struct.Struct("<ff")  # float32 low, float32 step


def _decode_u8(data: bytes) -> np.ndarray:
    """As `precompute.store.decode_u8` (a migration keeps its own copy: the store may change later)."""
    low, step = HEADER.unpack_from(data)
    codes = np.frombuffer(data, dtype=np.uint8, offset=HEADER.size)
    values = (low + codes * np.float64(step)).astype(np.float32)
    values[codes == U8_MISSING] = np.nan
    return values


def _encode_u8(values: np.ndarray) -> bytes:
    """As `precompute.store.encode_u8` (own copy, as above)."""
    x = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(x)
    low = np.float32(x[finite].min() if finite.any() else 0.0)
    high = x[finite].max() if finite.any() else 0.0
    step = np.float32((high - low) / (U8_MISSING - 1))
    safe = np.float64(step) if step > 0 else 1.0
    codes = np.rint((np.where(finite, x, 0.0) - low) / safe)
    codes = np.where(finite, np.clip(codes, 0, U8_MISSING - 1), U8_MISSING).astype(np.uint8)
    return HEADER.pack(low, step) + codes.tobytes()


def _lengths(data: bytes) -> np.ndarray:
    """An ``encode_array`` BLOB of unsigned lengths (first byte: the dtype's index among u1, u2, u4, u8)."""
    return np.frombuffer(data, dtype=("<u1", "<u2", "<u4", "<u8")[data[0]], offset=1).astype(np.int64)


def one_scale(lengths: bytes, snippets: bytes) -> bytes | None:
    """A row's snippets as one `encode_u8`, or None when they are already (one snippet, or a row written so)."""
    sizes = _lengths(lengths)
    if len(snippets) == int(sizes.sum()) + HEADER.size:
        return None
    ends = np.cumsum(sizes + HEADER.size)
    starts = ends - (sizes + HEADER.size)
    values = [_decode_u8(snippets[a:b]) for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]
    return _encode_u8(np.concatenate(values))


def upgrade() -> None:
    raw = op.get_bind().connection.driver_connection
    assert isinstance(raw, sqlite3.Connection)
    # freed pages are not zeroed (some builds default to secure_delete): the VACUUM after the upgrade drops them
    raw.execute("PRAGMA secure_delete = OFF")
    last = -1
    (total,) = raw.execute("SELECT count(*) FROM examples").fetchone()
    with tqdm(total=total, unit="rows", desc="0006: examples on one scale a row", disable=total == 0) as progress:
        # a batch of rows by rowid, then their updates: no cursor is open on the table while it is written
        while rows := raw.execute(
            "SELECT rowid, lengths, snippets FROM examples WHERE rowid > ? ORDER BY rowid LIMIT ?", (last, BATCH)
        ).fetchall():
            updates = [(new, rowid) for rowid, lengths, snippets in rows if (new := one_scale(lengths, snippets))]
            raw.executemany("UPDATE examples SET snippets = ? WHERE rowid = ?", updates)
            last = rows[-1][0]
            progress.update(len(rows))


def downgrade() -> None:
    raise NotImplementedError(
        "revision 0006 re-encodes the examples' snippets on one scale a row; restore the file from a copy made "
        "before the upgrade instead of downgrading"
    )
