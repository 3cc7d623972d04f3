"""compact atlas: narrow arrays with a stored scale, nothing stored twice, one index where there were two (issue 11)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28 10:00:00.000000

The large tables are rewritten, their data converted (docs/performance.md, "A compact atlas"):

- ``histograms.counts``: one byte for the width, then the zlib-compressed counts in the narrowest unsigned width
  that holds the largest (was int64);
- ``position_profiles``: ``mean`` and ``std`` as uint8 codes with a stored low and step (was float32); the counted
  tokens per position, the same for every neuron of a model, move to ``position_counts`` (one row per model);
- ``examples``: one row per (neuron, kind) holding every example of it as arrays (`precompute.store.example_columns`:
  ranks, bins, each bin's range and share once, dataset rows, starts, peaks, peak activations, and the snippets'
  activations as uint8 codes with a stored low and step; was one row per example with float16 activations); the
  token ids leave the examples (was int32 per example) for ``example_rows``, one row of uint16 (or uint32 for a
  vocabulary over 65,536) token ids per model and dataset row; the top examples' peak tokens, which the search
  looks for, are ``example_peaks`` (was the expression index ``ix_examples_top_peak`` on the BLOB);
- ``token_tables``: one row per (neuron, kind) with the ranked token ids (narrowest unsigned width), values
  (float32 when exact, else float64) and counts as arrays (was one row per entry, a text kind); the token search
  reads ``token_postings`` (one row per model, kind and token listing the neurons and the token's rank in their
  table: was the index ``ix_token_tables_token``);
- ``percentiles``: one row per neuron, the percentiles as an array in the order of the model's
  ``percentile_statistics`` (was one row per neuron and statistic);
- ``feature_scores``: the feature's id in ``feature_names`` (the model's distinct features with their set and
  share of tokens, once) instead of its name, set and share on every row.

Every rewritten table but ``examples`` and ``token_postings`` is WITHOUT ROWID: the primary key is the table, no
separate ``sqlite_autoindex_*``; so are the tables whose rows stay as they are (``WITHOUT_ROWID``: matches,
partner and attention scores, statistics, roles). ``examples`` and ``token_postings`` are rowid tables:
their rows of a kilobyte or more stay on their page (a WITHOUT ROWID table's row over about 1,000 bytes of a 4 KB
page spills into an overflow page of its own). The rows of an older file's ``example_rows`` hold the tokens its
snippets cover (zeros elsewhere). Each table is streamed in its old primary key's order, a model (token tables,
percentiles, feature scores) or a chunk at a time, so memory stays bounded whatever the file's size.
`precompute.store.upgrade` runs ``VACUUM`` after this revision.
"""

import re
import sqlite3
import struct
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import sqlalchemy as sa
from alembic import op

from precompute.store import (
    example_columns,
    feature_columns,
    percentile_columns,
    posting_columns,
    token_table_columns,
)

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

TOKEN_TABLE_KINDS = ("unembed_top", "unembed_bottom", "embed_top", "mean_activation", "max_activation")
CHUNK = 20_000
U8_MISSING = 255


def _key(*more: sa.Column) -> list[Any]:
    return [
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("neuron", sa.Integer(), nullable=False),
        *more,
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE"),
    ]


def _encode_u8(values: np.ndarray) -> bytes:
    """As `precompute.store.encode_u8` (a migration keeps its own copy: the store may change later)."""
    x = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(x)
    low = float(x[finite].min()) if finite.any() else 0.0
    high = float(x[finite].max()) if finite.any() else 0.0
    low32 = np.float32(low)
    step = np.float32((high - low32) / (U8_MISSING - 1))
    codes = np.rint((np.where(finite, x, 0.0) - low32) / (float(step) if step > 0 else 1.0))
    codes = np.where(finite, np.clip(codes, 0, U8_MISSING - 1), U8_MISSING).astype(np.uint8)
    return struct.pack("<ff", low32, step) + codes.tobytes()


def _encode_counts(counts: np.ndarray) -> bytes:
    largest = int(counts.max()) if counts.size else 0
    width = next(w for w in (1, 2, 4, 8) if largest < 1 << (8 * w))
    return bytes([width]) + zlib.compress(counts.astype(f"<u{width}").tobytes(), 6)


def _raw(conn: sa.Connection) -> sqlite3.Connection:
    """The sqlite3 connection under Alembic's: its cursors stream (nothing is buffered beyond a chunk)."""
    raw = conn.connection.driver_connection
    assert isinstance(raw, sqlite3.Connection)
    return raw


def _chunks(conn: sa.Connection, sql: str, params: tuple[Any, ...] = ()) -> Iterator[list[Any]]:
    cursor = _raw(conn).execute(sql, params)
    while rows := cursor.fetchmany(CHUNK):
        yield rows


def _insert(conn: sa.Connection, table: str, columns: dict[str, Any]) -> None:
    """Insert rows given column by column (arrays, lists, or one value for every row), a chunk at a time."""
    length = max(len(v) for v in columns.values() if isinstance(v, np.ndarray | list))
    values = [v if isinstance(v, np.ndarray | list) else [v] * length for v in columns.values()]
    names = ", ".join(f'"{name}"' for name in columns)
    sql = f'INSERT INTO "{table}" ({names}) VALUES ({", ".join("?" * len(columns))})'
    raw = _raw(conn)
    for start in range(0, length, CHUNK):
        parts = [v[start : start + CHUNK] for v in values]
        parts = [p.tolist() if isinstance(p, np.ndarray) else p for p in parts]
        raw.executemany(sql, list(zip(*parts, strict=True)))


def _swap(conn: sa.Connection, old: str, new: str) -> None:
    op.drop_table(old)
    conn.exec_driver_sql(f'ALTER TABLE "{new}" RENAME TO "{old}"')


def _models(conn: sa.Connection) -> list[tuple[int, int, int]]:
    return [tuple(r) for r in _raw(conn).execute("SELECT id, n_layers, d_mlp FROM models ORDER BY id").fetchall()]


def _token_tables(conn: sa.Connection) -> None:
    """One row per (neuron, kind) with the ranked arrays, and the search's postings; a model at a time, streamed
    in the old primary key's order."""
    op.create_table(
        "token_tables_new",
        *_key(
            sa.Column("kind", sa.Integer(), nullable=False),
            sa.Column("token_ids", sa.LargeBinary(), nullable=False),
            sa.Column("token_values", sa.LargeBinary(), nullable=False),
            sa.Column("counts", sa.LargeBinary(), nullable=True),
        ),
        sa.PrimaryKeyConstraint("model_id", "layer", "neuron", "kind"),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "token_postings",
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.Integer(), nullable=False),
        sa.Column("token_id", sa.Integer(), nullable=False),
        sa.Column("postings", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("model_id", "kind", "token_id"),
    )  # a rowid table: postings of up to a page stay on it (docs/performance.md, "A compact atlas")
    codes = {kind: i for i, kind in enumerate(TOKEN_TABLE_KINDS)}
    for model_id, _, d_mlp in _models(conn):
        parts: list[list[np.ndarray]] = [[] for _ in range(7)]
        select = (
            'SELECT layer, neuron, kind, rank, token_id, value, "count" FROM token_tables WHERE model_id = ? '
            "ORDER BY layer, neuron, kind, rank"
        )
        for rows in _chunks(conn, select, (model_id,)):
            rows = [r for r in rows if r[2] in codes]
            if not rows:
                continue
            layer, neuron, kind, rank, token_id, value, count = zip(*rows, strict=True)
            converted = (
                np.array(layer, dtype=np.int64),
                np.array(neuron, dtype=np.int64),
                np.array([codes[k] for k in kind], dtype=np.int64),
                np.array(rank, dtype=np.int64),
                np.array(token_id, dtype=np.int64),
                np.array(value, dtype=np.float64),
                np.array([-1 if c is None else c for c in count], dtype=np.int64),
            )
            for part, array in zip(parts, converted, strict=True):
                part.append(array)
            del rows, layer, neuron, kind, rank, token_id, value, count
        if not parts[0]:
            continue
        layer, neuron, kind, rank, token_id, value, count = (np.concatenate(p) for p in parts)
        del parts
        for code in np.unique(kind):  # the activation tables have counts, the projections none
            at = kind == code
            counts = count[at] if (count[at] >= 0).any() else None
            _insert(
                conn,
                "token_tables_new",
                token_table_columns(model_id, layer[at], neuron[at], kind[at], token_id[at], value[at], counts),
            )
        _insert(conn, "token_postings", posting_columns(model_id, kind, token_id, layer * d_mlp + neuron, rank))
    _swap(conn, "token_tables", "token_tables_new")


def _percentiles(conn: sa.Connection) -> None:
    """One row per neuron with the model's statistics' percentiles as an array (names: percentile_statistics)."""
    op.create_table(
        "percentile_statistics",
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("statistic", sa.String(), nullable=False),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("model_id", "position"),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "percentiles_new",
        *_key(sa.Column("percentiles", sa.LargeBinary(), nullable=False)),
        sa.PrimaryKeyConstraint("model_id", "layer", "neuron"),
        sqlite_with_rowid=False,
    )
    for model_id, n_layers, d_mlp in _models(conn):
        flat: list[np.ndarray] = []
        statistic: list[str] = []
        value: list[np.ndarray] = []
        select = "SELECT layer, neuron, statistic, percentile FROM percentiles WHERE model_id = ?"
        for rows in _chunks(conn, select, (model_id,)):
            layer, neuron, names, values = zip(*rows, strict=True)
            flat.append(np.array(layer, dtype=np.int64) * d_mlp + np.array(neuron, dtype=np.int64))
            statistic.extend(names)
            value.append(np.array(values, dtype=np.float64))
        if not flat:
            continue
        names = sorted(set(statistic))
        position = {name: i for i, name in enumerate(names)}
        matrix = np.full((n_layers * d_mlp, len(names)), np.nan)
        matrix[np.concatenate(flat), np.array([position[s] for s in statistic])] = np.concatenate(value)
        del flat, statistic, value
        _insert(
            conn, "percentile_statistics", {"model_id": model_id, "position": np.arange(len(names)), "statistic": names}
        )
        _insert(conn, "percentiles_new", percentile_columns(model_id, d_mlp, matrix))
    _swap(conn, "percentiles", "percentiles_new")


def _histograms(conn: sa.Connection) -> None:
    op.create_table(
        "histograms_new",
        *_key(
            sa.Column("hook", sa.String(), nullable=False),
            sa.Column("low", sa.Float(), nullable=False),
            sa.Column("high", sa.Float(), nullable=False),
            sa.Column("n_bins", sa.Integer(), nullable=False),
            sa.Column("counts", sa.LargeBinary(), nullable=False),
        ),
        sa.PrimaryKeyConstraint("model_id", "layer", "neuron", "hook"),
        sqlite_with_rowid=False,
    )
    insert = "INSERT INTO histograms_new VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    for rows in _chunks(conn, "SELECT model_id, layer, neuron, hook, low, high, n_bins, counts FROM histograms"):
        converted = [(*r[:7], _encode_counts(np.frombuffer(r[7], dtype="<i8"))) for r in rows]
        _raw(conn).executemany(insert, converted)
    _swap(conn, "histograms", "histograms_new")


def _position_profiles(conn: sa.Connection) -> None:
    op.create_table(
        "position_counts",
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("count", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("model_id"),
    )
    op.create_table(
        "position_profiles_new",
        *_key(
            sa.Column("hook", sa.String(), nullable=False),
            sa.Column("mean", sa.LargeBinary(), nullable=False),
            sa.Column("std", sa.LargeBinary(), nullable=False),
        ),
        sa.PrimaryKeyConstraint("model_id", "layer", "neuron", "hook"),
        sqlite_with_rowid=False,
    )
    # every neuron of a model has the same counts; take the first row's
    for model_id, _, _ in _models(conn):
        first = (
            _raw(conn)
            .execute('SELECT "count" FROM position_profiles WHERE model_id = ? LIMIT 1', (model_id,))
            .fetchone()
        )
        if first is not None:
            _raw(conn).execute('INSERT INTO position_counts (model_id, "count") VALUES (?, ?)', (model_id, first[0]))
    insert = "INSERT INTO position_profiles_new VALUES (?, ?, ?, ?, ?, ?)"
    for rows in _chunks(conn, "SELECT model_id, layer, neuron, hook, mean, std FROM position_profiles"):
        converted = [
            (*r[:4], _encode_u8(np.frombuffer(r[4], dtype="<f4")), _encode_u8(np.frombuffer(r[5], dtype="<f4")))
            for r in rows
        ]
        _raw(conn).executemany(insert, converted)
    _swap(conn, "position_profiles", "position_profiles_new")


def _examples(conn: sa.Connection) -> None:
    """One row per (neuron, kind) of arrays; the top examples' peaks; the rows' token ids once per dataset row.
    Streamed in the old primary key's order, one (neuron, kind) held at a time besides the token rows."""
    op.create_table(
        "example_rows",
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("dataset_row", sa.Integer(), nullable=False),
        sa.Column("itemsize", sa.Integer(), nullable=False),
        sa.Column("token_ids", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("model_id", "dataset_row"),
    )
    op.create_table(
        "examples_new",
        *_key(
            sa.Column("kind", sa.String(), nullable=False),
            sa.Column("n_examples", sa.Integer(), nullable=False),
            *(
                sa.Column(name, sa.LargeBinary(), nullable=name == "bin_ranges")
                for name in (
                    "ranks",
                    "bins",
                    "bin_ranges",
                    "dataset_rows",
                    "starts",
                    "peaks",
                    "activations",
                    "lengths",
                    "snippets",
                )
            ),
        ),
        sa.PrimaryKeyConstraint("model_id", "layer", "neuron", "kind"),
    )  # a rowid table: a row of about a kilobyte stays on its page
    op.create_table(
        "example_peaks",
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("peak_token", sa.Integer(), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("neuron", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("activation", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("model_id", "peak_token", "layer", "neuron", "rank"),
        sqlite_with_rowid=False,
    )
    itemsizes = {m: 2 if v <= 1 << 16 else 4 for m, v in _raw(conn).execute("SELECT id, d_vocab FROM models")}
    tokens: dict[tuple[int, int], np.ndarray] = {}  # (model, row) -> the token ids its snippets cover
    names = ("model_id", "layer", "neuron", "kind", "rank", "bin", "bin_low", "bin_high", "bin_fraction")
    names += ("dataset_row", "start", "peak", "activation")
    select = (
        f"SELECT {', '.join(names)}, token_ids, activations FROM examples "
        "ORDER BY model_id, layer, neuron, kind, rank, bin"
    )
    packed: list[dict[str, Any]] = []
    peaks: list[tuple[Any, ...]] = []
    group: list[dict[str, Any]] = []

    def flush() -> None:
        if packed:
            _insert(conn, "examples_new", {name: [row[name] for row in packed] for name in packed[0]})
            packed.clear()
        if peaks:
            _raw(conn).executemany("INSERT INTO example_peaks VALUES (?, ?, ?, ?, ?, ?)", peaks)
            peaks.clear()

    for rows in _chunks(conn, select):
        for r in rows:
            example = dict(zip(names, r[:13], strict=True))
            if group and r[:4] != tuple(group[0][n] for n in names[:4]):
                packed.append(example_columns(group))
                group = []
            ids = np.frombuffer(r[13], dtype="<i4")
            model_id, row, start, peak = r[0], r[9], r[10], r[11]
            known = tokens.get((model_id, row), np.zeros(0, dtype=np.uint32))
            if known.size < start + ids.size:
                known = np.concatenate([known, np.zeros(start + ids.size - known.size, dtype=np.uint32)])
            known[start : start + ids.size] = ids
            tokens[(model_id, row)] = known
            # the float16 values themselves: `example_columns` encodes a row's snippets on one scale (0006)
            example["activations"] = np.frombuffer(r[14], dtype="<f2")
            group.append(example)
            if r[3] == "top" and ids.size:
                peak_token = int(ids[min(max(peak, 0), ids.size - 1)])
                peaks.append((model_id, peak_token, r[1], r[2], r[4], r[12]))
        if len(packed) >= CHUNK // 10:
            flush()
    if group:
        packed.append(example_columns(group))
    flush()
    rows_out = []
    for (model_id, row), known in sorted(tokens.items()):
        rows_out.append((model_id, row, itemsizes[model_id], known.astype(f"<u{itemsizes[model_id]}").tobytes()))
    for start in range(0, len(rows_out), CHUNK):
        _raw(conn).executemany("INSERT INTO example_rows VALUES (?, ?, ?, ?)", rows_out[start : start + CHUNK])
    _swap(conn, "examples", "examples_new")


def _feature_scores(conn: sa.Connection) -> None:
    """The features once per model (``feature_names``), each score naming its feature by id; a model at a time."""
    op.create_table(
        "feature_names",
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("feature_id", sa.Integer(), nullable=False),
        sa.Column("feature", sa.String(), nullable=False),
        sa.Column("feature_set", sa.String(), nullable=False),
        sa.Column("fraction", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("model_id", "feature_id"),
        sqlite_with_rowid=False,
    )
    op.create_index("ix_feature_names_feature", "feature_names", ["model_id", "feature"], unique=False)
    op.create_table(
        "feature_scores_new",
        *_key(
            sa.Column("rank", sa.Integer(), nullable=False),
            sa.Column("feature_id", sa.Integer(), nullable=False),
            sa.Column("variance_reduction", sa.Float(), nullable=False),
        ),
        sa.PrimaryKeyConstraint("model_id", "layer", "neuron", "rank"),
        sqlite_with_rowid=False,
    )
    for model_id, _, _ in _models(conn):
        parts: list[list[Any]] = [[] for _ in range(7)]
        select = (
            "SELECT layer, neuron, rank, feature, feature_set, variance_reduction, fraction FROM feature_scores "
            "WHERE model_id = ? ORDER BY layer, neuron, rank"
        )
        for rows in _chunks(conn, select, (model_id,)):
            for part, column in zip(parts, zip(*rows, strict=True), strict=True):
                part.extend(column)
        if not parts[0]:
            continue
        layer, neuron, rank, feature, feature_set, variance_reduction, fraction = parts
        fractions = np.array([np.nan if f is None else f for f in fraction], dtype=np.float64)
        names, ids = feature_columns(model_id, feature, feature_set, fractions)
        _insert(conn, "feature_names", names)
        scores = {"model_id": model_id, "layer": layer, "neuron": neuron, "rank": rank, "feature_id": ids}
        _insert(conn, "feature_scores_new", scores | {"variance_reduction": variance_reduction})
    _swap(conn, "feature_scores", "feature_scores_new")
    op.create_index("ix_feature_scores_feature", "feature_scores", ["model_id", "feature_id"], unique=False)


#: Tables whose rows are kept as they are, rebuilt WITHOUT ROWID (their primary key's index was a second copy).
#: Not ``neurons``: without statistics SQLite would count a model's primary-key range for a threshold instead of
#: reading the range of ``ix_neurons_model_excess`` above it.
WITHOUT_ROWID = (
    "partner_scores",
    "matches",
    "activation_stats",
    "weight_stats",
    "roles",
    "attention_scores",
)


def _without_rowid(conn: sa.Connection, table: str) -> None:
    """Rebuild a table WITHOUT ROWID with the same columns, rows and indexes, inside SQLite (``INSERT … SELECT``
    in the primary key's order: read through its index, nothing sorted, nothing held in Python)."""
    raw = _raw(conn)
    found = raw.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()
    if found is None:
        return
    head = re.match(rf'CREATE TABLE\s+"?{table}"?\s*\(', found[0])
    assert head is not None, found[0]
    indexes = raw.execute(
        "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = ? AND sql IS NOT NULL", (table,)
    ).fetchall()
    key = [
        name
        for _, name in sorted((pk, name) for _, name, _, _, _, pk in raw.execute(f'PRAGMA table_info("{table}")') if pk)
    ]
    raw.execute(f'CREATE TABLE "{table}_new" (' + found[0][head.end() :].rstrip() + " WITHOUT ROWID")
    order = ", ".join(f'"{name}"' for name in key)
    raw.execute(f'INSERT INTO "{table}_new" SELECT * FROM "{table}" ORDER BY {order}')
    _swap(conn, table, f"{table}_new")
    for (sql,) in indexes:
        raw.execute(sql)


def upgrade() -> None:
    conn = op.get_bind()
    # dropped tables' pages are not overwritten with zeros (some builds default to secure_delete): the VACUUM
    # that follows the upgrade rewrites the file without them anyway, and zeroing doubles what is written
    _raw(conn).execute("PRAGMA secure_delete = OFF")
    _token_tables(conn)
    _percentiles(conn)
    _histograms(conn)
    _position_profiles(conn)
    _examples(conn)
    _feature_scores(conn)
    for table in WITHOUT_ROWID:
        _without_rowid(conn, table)


def downgrade() -> None:
    raise NotImplementedError(
        "revision 0005 stores arrays at display precision and drops the examples' own token ids; "
        "restore the file from a copy made before the upgrade instead of downgrading"
    )
