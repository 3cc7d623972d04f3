"""The store's compact arrays and writers (precompute/store.py, revision 0005), checked against values built by hand.

Written for the mutation round "store" (docs/testing.md, "Third round"): each test pins a value that a surviving
mutant changed silently (a stored byte, a decoded array, a width, a row written). Expected values come from how the
inputs are built (quantisation steps of exactly 1, ids at the dtype boundaries, records packed with `struct`),
never from the implementation's output.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import sqlite3
import struct
import warnings
import zlib
from contextlib import closing
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from precompute.store import (
    ARRAY_DTYPES,
    PAGE_SIZE,
    POSTING,
    TOKEN_TABLE_KINDS,
    U8_HEADER,
    U8_MISSING,
    AtlasStore,
    blob,
    config_hash,
    current_revision,
    decode_array,
    decode_counts,
    decode_examples,
    decode_postings,
    decode_snippets,
    decode_u8,
    distributions,
    encode_array,
    encode_counts,
    encode_u8,
    encode_u8_rows,
    example_columns,
    feature_columns,
    float_dtype,
    layer_summaries,
    models,
    neurons,
    percentile_columns,
    posting_columns,
    runs,
    token_itemsize,
    token_kind_code,
    token_table_columns,
    u8_length,
    unsigned_dtype,
    upgrade,
    utc_now,
    vacuum,
    vocab,
)

# --- widths -------------------------------------------------------------------------------------------------


def test_token_itemsize_is_two_bytes_up_to_65536_ids_and_four_beyond():
    # ids 0..d_vocab-1: 65536 ids end at 65535, the largest uint16
    assert [token_itemsize(n) for n in (1, 256, 65535, 65536)] == [2, 2, 2, 2]
    assert [token_itemsize(n) for n in (65537, 100_000, 1 << 20)] == [4, 4, 4]


@pytest.mark.parametrize(
    ("largest", "dtype"),
    [
        (0, "<u1"),
        (255, "<u1"),
        (256, "<u2"),
        (65535, "<u2"),
        (65536, "<u4"),
        (2**32 - 1, "<u4"),
        (2**32, "<u8"),
        (2**64 - 1, "<u8"),
    ],
)
def test_unsigned_dtype_is_the_narrowest_that_holds_the_largest(largest, dtype):
    assert unsigned_dtype(largest) == dtype
    assert np.iinfo(np.dtype(dtype)).max >= largest


def test_float_dtype_keeps_float64_only_where_float32_would_lose_digits():
    assert float_dtype(np.array([0.5, -2.25, np.nan, 1024.0])) == "<f4"
    assert float_dtype(np.array([np.inf, -np.inf, 0.0])) == "<f4"
    assert float_dtype(np.array([0.5, 0.1])) == "<f8"  # 0.1 is not a float32
    assert float_dtype(np.array([1e300])) == "<f8"  # overflows float32 (to inf): not exact
    assert float_dtype(np.array([np.float32(0.1)], dtype=np.float64)) == "<f4"
    assert float_dtype(np.zeros(0)) == "<f4"


def test_token_kind_codes_are_the_positions_of_the_kinds():
    assert [token_kind_code(k) for k in TOKEN_TABLE_KINDS] == [0, 1, 2, 3, 4]
    assert token_kind_code("unembed_top") == 0 and token_kind_code("max_activation") == 4
    with pytest.raises(ValueError, match="unknown token-table kind 'nope'"):
        token_kind_code("nope")


# --- encode_array / decode_array ------------------------------------------------------------------------------


@pytest.mark.parametrize("code", range(6))
def test_encode_array_is_a_dtype_code_then_the_little_endian_bytes(code):
    dtype = ARRAY_DTYPES[code]
    values = [0, 1, 7, 200] if dtype[1] == "u" else [0.5, -1.25, 3.0, 200.0]
    data = encode_array(values, dtype)
    assert data[0] == code
    fmt = {"<u1": "B", "<u2": "H", "<u4": "I", "<u8": "Q", "<f4": "f", "<f8": "d"}[dtype]
    assert data[1:] == struct.pack(f"<{len(values)}{fmt}", *values)
    decoded = decode_array(data)
    assert decoded.dtype == np.dtype(dtype)
    assert decoded.tolist() == values


def test_array_dtype_codes_are_fixed():
    # stored files name their dtype by this index: reordering the tuple would misread every BLOB
    assert ARRAY_DTYPES == ("<u1", "<u2", "<u4", "<u8", "<f4", "<f8")


# --- encode_counts --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("counts", "width"),
    [
        ([], 1),
        ([0, 0], 1),
        ([3, 255], 1),
        ([256, 0], 2),
        ([65535], 2),
        ([0, 65536], 4),
        ([2**32 - 1], 4),
        ([2**32, 5], 8),
    ],
)
def test_counts_are_stored_in_the_narrowest_width_and_decode_exactly(counts, width):
    data = encode_counts(np.array(counts, dtype=np.int64))
    assert data[0] == width
    raw = zlib.decompress(data[1:])
    fmt = {1: "B", 2: "H", 4: "I", 8: "Q"}[width]
    assert raw == struct.pack(f"<{len(counts)}{fmt}", *counts)
    decoded = decode_counts(data)
    assert decoded.dtype == np.int64
    assert decoded.tolist() == counts


def test_negative_counts_are_refused():
    with pytest.raises(ValueError, match="non-negative"):
        encode_counts(np.array([3, -1]))
    assert decode_counts(encode_counts(np.array([0]))).tolist() == [0]  # zero is allowed


# --- encode_u8 ------------------------------------------------------------------------------------------------


def header(data: bytes) -> tuple[float, float]:
    low, step = struct.unpack_from("<ff", data)
    return low, step


def test_u8_codes_on_a_range_of_254_are_the_values_minus_the_low():
    # low -10, high 244: the step is exactly 1, so every code is (value + 10) rounded to the nearest integer
    x = np.array([-10.0, -9.6, -9.4, 0.0, 2.5 + 0.01, 100.49, np.nan, 244.0, np.inf, -np.inf])
    data = encode_u8(x)
    assert u8_length(data) == x.size and len(data) == 8 + x.size
    assert header(data) == (-10.0, 1.0)
    assert list(data[8:]) == [0, 0, 1, 10, 13, 110, U8_MISSING, 254, U8_MISSING, U8_MISSING]
    decoded = decode_u8(data)
    assert decoded.dtype == np.float32
    expected = [-10.0, -10.0, -9.0, 0.0, 3.0, 100.0, math.nan, 244.0, math.nan, math.nan]
    np.testing.assert_array_equal(decoded, np.array(expected, dtype=np.float32))


def test_u8_rows_each_have_their_own_low_and_step():
    rows = np.array(
        [
            [0.0, 254.0, 127.0, np.nan],  # step 1 from 0
            [100.0, 608.0, 354.0, 100.8],  # step 2 from 100
            [5.0, 5.0, 5.0, 5.0],  # constant: step 0, every code 0
            [np.nan, np.nan, np.nan, np.nan],  # nothing finite: low 0, step 0, every code missing
        ]
    )
    blobs = encode_u8_rows(rows)
    assert len(blobs) == 4
    assert [header(b) for b in blobs] == [(0.0, 1.0), (100.0, 2.0), (5.0, 0.0), (0.0, 0.0)]
    assert [list(b[8:]) for b in blobs] == [[0, 254, 127, 255], [0, 254, 127, 0], [0, 0, 0, 0], [255] * 4]
    np.testing.assert_array_equal(decode_u8(blobs[0]), np.array([0, 254, 127, np.nan], dtype=np.float32))
    np.testing.assert_array_equal(decode_u8(blobs[1]), np.array([100, 608, 354, 100], dtype=np.float32))
    np.testing.assert_array_equal(decode_u8(blobs[2]), np.full(4, 5.0, dtype=np.float32))
    assert np.isnan(decode_u8(blobs[3])).all()
    # the one-row form is the same as a row of the vectorised one
    assert encode_u8(rows[1]) == blobs[1]


def test_u8_error_is_at_most_half_a_step():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 7.0, size=1000)
    x[::97] = np.nan
    decoded = decode_u8(encode_u8(x)).astype(np.float64)
    finite = np.isfinite(x)
    assert np.array_equal(np.isnan(decoded), ~finite)
    half_step = (np.nanmax(x) - np.nanmin(x)) / 254 / 2
    error = np.abs(decoded[finite] - x[finite])
    assert error.max() <= half_step * (1 + 1e-4) + 1e-5
    assert error.max() > half_step * 0.5  # rounding to the nearest code, not an exact copy
    assert decoded[finite].min() == pytest.approx(np.nanmin(x), abs=1e-5)
    assert decoded[finite].max() == pytest.approx(np.nanmax(x), abs=half_step)


# --- token tables and postings ----------------------------------------------------------------------------------


def token_entries(largest_token: int, values: np.ndarray | None = None):
    """Ranked entries of 2 layers x 2 neurons x 2 kinds, 3 tokens each, sorted by (layer, neuron, kind, rank)."""
    layer, neuron, kind, token, rank = [], [], [], [], []
    for lay in (0, 1):
        for neu in (0, 5):
            for k in (0, 3):
                for r in range(3):
                    layer.append(lay)
                    neuron.append(neu)
                    kind.append(k)
                    rank.append(r)
                    token.append((lay * 100 + neu * 10 + k + 7 * r) % (largest_token + 1))
    token[5] = largest_token
    n = len(layer)
    value = np.arange(n, dtype=np.float64) * 0.5 if values is None else values
    return (np.array(layer), np.array(neuron), np.array(kind), np.array(token), value, np.array(rank))


def test_token_table_rows_group_each_neuron_and_kind_in_rank_order():
    layer, neuron, kind, token, value, _ = token_entries(300)
    count = np.arange(len(layer)) * 3000 - 1  # the first is -1: unknown, stored as 0
    columns = token_table_columns(9, layer, neuron, kind, token, value, count)
    assert columns["model_id"] == 9
    assert columns["layer"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert columns["neuron"].tolist() == [0, 0, 5, 5, 0, 0, 5, 5]
    assert columns["kind"].tolist() == [0, 3, 0, 3, 0, 3, 0, 3]
    assert len(columns["token_ids"]) == len(columns["token_values"]) == len(columns["counts"]) == 8
    for row in range(8):
        part = slice(3 * row, 3 * row + 3)
        ids = decode_array(columns["token_ids"][row])
        assert ids.dtype == np.dtype("<u2")  # the largest id, 300, needs two bytes
        assert ids.tolist() == token[part].tolist()
        values = decode_array(columns["token_values"][row])
        assert values.dtype == np.dtype("<f4")  # halves are exact float32
        assert values.tolist() == value[part].tolist()
        counts = decode_array(columns["counts"][row])
        assert counts.dtype == np.dtype("<u4")  # 23 * 3000 - 1 > 65535
        assert counts.tolist() == [max(c, 0) for c in count[part].tolist()]


def test_token_table_widths_follow_the_model_values():
    layer, neuron, kind, token, _, _ = token_entries(255, values=np.full(24, 0.1))
    columns = token_table_columns(1, layer, neuron, kind, token, np.full(24, 0.1), np.full(24, 255))
    assert decode_array(columns["token_ids"][0]).dtype == np.dtype("<u1")
    assert decode_array(columns["token_values"][0]).dtype == np.dtype("<f8")  # 0.1 keeps its digits
    assert decode_array(columns["token_values"][0]).tolist() == [0.1, 0.1, 0.1]
    assert decode_array(columns["counts"][0]).dtype == np.dtype("<u1")
    assert decode_array(columns["counts"][0]).tolist() == [255] * 3
    no_counts = token_table_columns(1, layer, neuron, kind, token, np.full(24, 0.1), None)
    assert no_counts["counts"] is None
    negative = token_table_columns(1, layer, neuron, kind, token, np.full(24, 0.1), np.full(24, -1))
    assert decode_array(negative["counts"][0]).tolist() == [0, 0, 0]
    assert decode_array(negative["counts"][0]).dtype == np.dtype("<u1")


def test_token_table_rows_split_where_only_the_layer_changes():
    # (0, 3, 0) then (1, 3, 0): the same neuron and kind in two layers are two rows
    layer, neuron, kind = np.array([0, 0, 1]), np.array([3, 3, 3]), np.array([0, 0, 0])
    columns = token_table_columns(1, layer, neuron, kind, np.array([4, 5, 6]), np.array([1.0, 2.0, 3.0]), None)
    assert columns["layer"].tolist() == [0, 1]
    assert [decode_array(b).tolist() for b in columns["token_ids"]] == [[4, 5], [6]]


def test_postings_list_each_token_neurons_by_neuron_then_rank():
    # entries in any order; flat = layer * d_mlp + neuron
    kind = np.array([3, 0, 3, 3, 0, 3, 4])
    token = np.array([7, 7, 7, 2, 7, 7, 70000])
    flat = np.array([130, 5, 9, 9, 5, 130, 1 << 20])
    rank = np.array([2, 1, 0, 4, 0, 1, 19])
    columns = posting_columns(4, kind, token, flat, rank)
    assert columns["model_id"] == 4
    assert columns["kind"].tolist() == [0, 3, 3, 4]
    assert columns["token_id"].tolist() == [7, 2, 7, 70000]
    expected = [
        [(5, 0), (5, 1)],
        [(9, 4)],
        [(9, 0), (130, 1), (130, 2)],
        [(1 << 20, 19)],
    ]
    assert len(columns["postings"]) == 4
    for data, records in zip(columns["postings"], expected, strict=True):
        assert data == b"".join(struct.pack("<IB", n, r) for n, r in records)
        assert [tuple(x) for x in decode_postings(data).tolist()] == records
    assert POSTING.itemsize == 5


def test_postings_of_one_token_sort_by_neuron_before_rank():
    columns = posting_columns(1, np.array([0, 0, 0]), np.array([1, 1, 1]), np.array([9, 2, 5]), np.array([0, 3, 1]))
    assert [tuple(x) for x in decode_postings(columns["postings"][0]).tolist()] == [(2, 3), (5, 1), (9, 0)]


# --- percentiles ---------------------------------------------------------------------------------------------


def test_percentile_rows_are_the_neurons_in_layer_order():
    values = np.arange(7 * 2, dtype=np.float64).reshape(7, 2) / 4
    values[3, 1] = np.nan
    columns = percentile_columns(2, 3, values)
    assert columns["model_id"] == 2
    assert columns["layer"].tolist() == [0, 0, 0, 1, 1, 1, 2]
    assert columns["neuron"].tolist() == [0, 1, 2, 0, 1, 2, 0]
    decoded = [decode_array(b) for b in columns["percentiles"]]
    assert {d.dtype for d in decoded} == {np.dtype("<f4")}
    np.testing.assert_array_equal(np.stack(decoded), values)
    # float32 whatever the values: the JSON shows a percentile with two decimals (`round(v, 2)`)
    precise = percentile_columns(2, 3, 100 * values / values[np.isfinite(values)].max() + 1 / 3)
    assert decode_array(precise["percentiles"][0]).dtype == np.dtype("<f4")
    expected = 100 * values[6] / values[np.isfinite(values)].max() + 1 / 3
    assert [round(float(v), 2) for v in decode_array(precise["percentiles"][6])] == [round(v, 2) for v in expected]
    np.testing.assert_allclose(decode_array(precise["percentiles"][6]), expected, rtol=1e-7)


# --- examples ------------------------------------------------------------------------------------------------


def snippet_of(rank: int) -> np.ndarray:
    return np.array([0.0, 254.0 * (rank + 1), np.nan][: 2 + (rank % 2)])


def example(rank: int, bin_: int, **extra):
    snippet = snippet_of(rank)
    row = {
        "model_id": 3,
        "layer": 1,
        "neuron": 17,
        "kind": "quantile",
        "rank": rank,
        "bin": bin_,
        "dataset_row": 1000 * rank + bin_,
        "start": 5 + rank,
        "peak": 6 + bin_,
        "activation": 0.25 * rank + bin_,
        "activations": encode_u8(snippet),
    }
    return row | extra


def test_examples_pack_and_unpack_in_bin_then_rank_order():
    rows = [
        example(1, 2, bin_low=0.5, bin_high=0.75, bin_fraction=0.125),
        example(0, 2, bin_low=0.5, bin_high=0.75, bin_fraction=0.125),
        example(1, 0, bin_low=None, bin_high=1.5, bin_fraction=None),
        example(0, 0, bin_low=None, bin_high=1.5, bin_fraction=None),
        example(0, 1),  # no range known
        example(2, 2, dataset_row=70000, bin_low=0.5, bin_high=0.75, bin_fraction=0.125),
    ]
    columns = example_columns(rows)
    assert (columns["model_id"], columns["layer"], columns["neuron"], columns["kind"]) == (3, 1, 17, "quantile")
    assert columns["n_examples"] == 6
    order = [(0, 0), (0, 1), (1, 0), (2, 0), (2, 1), (2, 2)]  # (bin, rank), sorted
    assert decode_array(columns["bins"]).tolist() == [b for b, _ in order]
    assert decode_array(columns["ranks"]).tolist() == [r for _, r in order]
    assert decode_array(columns["ranks"]).dtype == np.dtype("<u1")
    assert decode_array(columns["dataset_rows"]).dtype == np.dtype("<u4")  # 70000
    assert decode_array(columns["starts"]).tolist() == [5 + r for _, r in order]
    assert decode_array(columns["peaks"]).tolist() == [6 + b for b, _ in order]
    assert decode_array(columns["activations"]).dtype == np.dtype("<f4")  # quarters are exact
    assert decode_array(columns["activations"]).tolist() == [0.25 * r + b for b, r in order]
    assert decode_array(columns["lengths"]).tolist() == [2 + r % 2 for _, r in order]
    ranges = decode_array(columns["bin_ranges"]).reshape(-1, 4)
    np.testing.assert_array_equal(ranges, [[0.0, np.nan, 1.5, np.nan], [2.0, 0.5, 0.75, 0.125]])

    key = ("ranks", "bins", "bin_ranges", "dataset_rows", "starts", "peaks", "activations", "lengths", "snippets")
    decoded = decode_examples([columns[k] for k in key])
    assert [(e["bin"], e["rank"]) for e in decoded] == order
    by_key = {(r["bin"], r["rank"]): r for r in rows}
    for e in decoded:
        source = by_key[e["bin"], e["rank"]]
        assert e["dataset_row"] == source["dataset_row"]
        assert e["start"] == source["start"] and e["peak"] == source["peak"]
        assert e["activation"] == source["activation"]
        # one scale for the row: 0 to 254 × 3 in 254 steps of 3, so within half a step (1.5) of each value
        np.testing.assert_allclose(e["activations"], snippet_of(e["rank"]), atol=1.5, rtol=0)
        expected_range = {0: (None, 1.5, None), 1: (None, None, None), 2: (0.5, 0.75, 0.125)}[e["bin"]]
        assert (e["bin_low"], e["bin_high"], e["bin_fraction"]) == expected_range


def test_examples_without_any_bin_range_store_none_and_keep_float64_activations():
    rows = [example(0, 0, activation=0.1), example(1, 0, activation=2.0)]
    columns = example_columns(rows)
    assert columns["bin_ranges"] is None
    assert decode_array(columns["activations"]).dtype == np.dtype("<f8")
    assert decode_array(columns["activations"]).tolist() == [0.1, 2.0]
    assert decode_array(columns["dataset_rows"]).dtype == np.dtype("<u2")  # 1000
    assert decode_array(columns["lengths"]).dtype == np.dtype("<u1")
    key = ("ranks", "bins", "bin_ranges", "dataset_rows", "starts", "peaks", "activations", "lengths", "snippets")
    decoded = decode_examples([columns[k] for k in key])
    assert [(e["bin_low"], e["bin_high"], e["bin_fraction"]) for e in decoded] == [(None, None, None)] * 2
    assert [e["activations"].size for e in decoded] == [2, 3]


def test_a_rows_snippets_share_one_scale_and_rows_of_the_older_layout_still_decode():
    """Revision 0006: one `encode_u8` (8-byte low and step) for all the snippets of a row, given as floats or as
    each snippet's own BLOB; a 0005 row (a header a snippet) decodes too, and the migration turns it into the
    new layout (`one_scale`, the migration's own code)."""
    values = [np.array([0.0, 1.0, 2.0]), np.array([np.nan, 254.0]), np.array([127.0])]
    rows = [example(rank, 0, activations=v) for rank, v in enumerate(values)]
    columns = example_columns(rows)
    assert len(columns["snippets"]) == 8 + 6  # one header, a code a value
    assert decode_u8(columns["snippets"])[3] != decode_u8(columns["snippets"])[3]  # NaN keeps its code
    decoded = decode_snippets(columns["lengths"], columns["snippets"])
    for got, want in zip(decoded, values, strict=True):
        np.testing.assert_allclose(got, want, atol=0.5, rtol=0)  # steps of 1 over 0..254
    old_layout = b"".join(encode_u8(v) for v in values)  # what revision 0005 wrote
    for got, want in zip(decode_snippets(columns["lengths"], old_layout), values, strict=True):
        np.testing.assert_allclose(got, want, atol=0.5, rtol=0)
    path = Path(__file__).parents[2] / "alembic" / "versions" / "0006_one_snippet_scale.py"
    spec = importlib.util.spec_from_file_location("migration_0006", path)
    assert spec is not None and spec.loader is not None
    migration = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(migration)
    migrated = migration.one_scale(columns["lengths"], old_layout)
    assert migrated == columns["snippets"]  # re-encoding the decoded codes gives the codes of the values
    assert migration.one_scale(columns["lengths"], columns["snippets"]) is None  # already one scale
    single = encode_u8(values[0])
    assert migration.one_scale(encode_array([3], "<u1"), single) is None  # one snippet: the same bytes


# --- feature names -------------------------------------------------------------------------------------------


def test_feature_ids_number_the_distinct_feature_set_and_fraction():
    features = ["a", "b", "a", "a", "a", "c", "c"]
    sets = ["s", "s", "s", "t", "s", "s", "s"]
    fractions = np.array([0.5, 0.25, 0.5, 0.5, 0.75, np.nan, np.nan])
    columns, ids = feature_columns(6, features, sets, fractions)
    assert ids.tolist() == [0, 1, 0, 2, 3, 4, 4]  # NaN fractions of one feature are one name
    assert columns["model_id"] == 6
    assert columns["feature_id"].tolist() == [0, 1, 2, 3, 4]
    assert columns["feature"] == ["a", "b", "a", "a", "c"]
    assert columns["feature_set"] == ["s", "s", "t", "s", "s"]
    np.testing.assert_array_equal(columns["fraction"], [0.5, 0.25, 0.5, 0.75, np.nan])


# --- AtlasStore ------------------------------------------------------------------------------------------------

MODEL = {
    "source": "/m",
    "is_reference": True,
    "n_layers": 2,
    "d_model": 4,
    "d_mlp": 3,
    "d_vocab": 10,
    "n_ctx": 8,
    "n_heads": 1,
    "act_fn": "gelu_new",
    "processing": {"fold_ln": True},
    "tokenizer_hash": "x",
}


def rows_of(db, sql: str) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


def test_insert_columns_writes_every_chunk_with_nan_as_null_and_broadcast_scalars(tmp_path):
    db = tmp_path / "a.db"
    with AtlasStore(db) as store:
        run = store.create_run({"k": 1}, {}, {})
        model = store.add_model(run, name="m", position=0, **MODEL)
        excess = np.array([0.5, np.nan, np.inf, -0.25, 1.0])
        written = store.insert_columns(
            neurons,
            {
                "model_id": model,
                "layer": np.array([0, 0, 0, 1, 1]),
                "neuron": [0, 1, 2, 0, 1],
                "dead": np.array([False, True, False, False, False]),
                "excess_corr": excess,
                "max_corr": (0.1, 0.2, 0.3, 0.4, float("nan")),
            },
            chunk=2,
        )
        assert written == 5
        with pytest.raises(ValueError, match="differ in length"):
            store.insert_columns(neurons, {"layer": np.arange(2), "neuron": [0, 1, 2]})
        got = store.model_columns(neurons, model, ["excess_corr", "layer"])
        np.testing.assert_array_equal(got["excess_corr"], [0.5, np.nan, np.nan, -0.25, 1.0])
        np.testing.assert_array_equal(got["layer"], [0, 0, 0, 1, 1])
        assert store.model_columns(neurons, model + 1, ["excess_corr"])["excess_corr"].shape == (0,)
    assert rows_of(db, "SELECT model_id, layer, neuron, dead, excess_corr, max_corr FROM neurons ORDER BY rowid") == [
        (model, 0, 0, 0, 0.5, 0.1),
        (model, 0, 1, 1, None, 0.2),
        (model, 0, 2, 0, None, 0.3),
        (model, 1, 0, 0, -0.25, 0.4),
        (model, 1, 1, 0, 1.0, None),
    ]


def test_insert_rows_writes_every_chunk_and_groups_rows_by_their_keys(tmp_path):
    db = tmp_path / "a.db"
    with AtlasStore(db) as store:
        run = store.create_run({}, {}, {})
        model = store.add_model(run, name="m", position=0, **MODEL)
        rows = [
            {"model_id": model, "layer": 0, "neuron": i, "dead": i == 3, "excess_corr": v}
            for i, v in enumerate([0.25, -math.inf, 0.75, 1.5, 2.0])
        ]
        rows.append({"model_id": model, "layer": 1, "neuron": 0, "dead": False})  # other keys: excess NULL
        rows.append({"model_id": model, "layer": 1, "neuron": 1, "dead": True})  # 7 rows: a last, short chunk
        assert store.insert_rows(neurons, rows, chunk=2) == 7
        assert store.insert_rows(neurons, [], chunk=2) == 0
    assert rows_of(db, "SELECT layer, neuron, dead, excess_corr FROM neurons ORDER BY layer, neuron") == [
        (0, 0, 0, 0.25),
        (0, 1, 0, None),
        (0, 2, 0, 0.75),
        (0, 3, 1, 1.5),
        (0, 4, 0, 2.0),
        (1, 0, 0, None),
        (1, 1, 1, None),
    ]


def test_runs_record_stages_timings_and_the_newest_run_of_a_config(tmp_path):
    db = tmp_path / "a.db"
    with AtlasStore(db) as store:
        first = store.create_run({"b": 1, "a": 2}, {"python": "3.11"}, {"source": "x"})
        second = store.create_run({"a": 2, "b": 1}, {}, {})
        newest = store.find_run(config_hash({"a": 2, "b": 1}))
        assert newest is not None and newest["id"] == second
        assert store.find_run(config_hash({"a": 3})) is None
        run = store.get_run(first)
        assert (run["status"], run["config"], run["environment"], run["dataset"]) == (
            "running",
            {"b": 1, "a": 2},
            {"python": "3.11"},
            {"source": "x"},
        )
        assert (run["stages"], run["timings"], run["finished_at"]) == ([], {}, None)
        store.mark_stage_done(first, "stats", 1.23456)
        store.mark_stage_done(first, "roles", 2.0)
        store.mark_stage_done(first, "stats", 3.0004)  # again: moved to the end, its time replaced
        store.record_timing(first, "total", 10.1239)
        run = store.get_run(first)
        assert run["stages"] == ["roles", "stats"]
        assert run["timings"] == {"stats": 3.0, "roles": 2.0, "total": 10.124}
        store.fail_run(second, "boom")
        failed = store.get_run(second)
        assert (failed["status"], failed["error"]) == ("failed", "boom")
        assert failed["finished_at"] is not None
        store.update_run(first, error="old")
        digest = store.finish_run(first)
        done = store.get_run(first)
        assert (done["status"], done["error"], done["content_hash"]) == ("complete", None, digest)
        assert done["finished_at"] is not None and len(digest) == 16
    assert rows_of(db, "SELECT id, status FROM runs ORDER BY id") == [(first, "complete"), (second, "failed")]


def test_content_hash_changes_with_row_counts_and_the_excess_sum(tmp_path):
    with AtlasStore(tmp_path / "a.db") as store:
        run = store.create_run({"x": 1}, {}, {})
        other = store.create_run({"x": 1}, {}, {})
        assert store.content_hash(other) == store.content_hash(run)  # same config, no models
        model = store.add_model(run, name="m", position=0, **MODEL)
        empty = store.content_hash(run)
        assert store.content_hash(run) == empty  # deterministic
        store.insert_rows(neurons, [{"model_id": model, "layer": 0, "neuron": 0, "dead": False, "excess_corr": 0.5}])
        one = store.content_hash(run)
        assert one != empty
        store.clear_model_tables([model], [neurons])
        store.insert_rows(neurons, [{"model_id": model, "layer": 0, "neuron": 0, "dead": False, "excess_corr": 0.25}])
        assert store.content_hash(run) not in (empty, one)  # same counts, another excess sum
        quarter = store.content_hash(run)
        store.mark_stage_done(run, "stats", 0.0)
        assert store.content_hash(run) not in (empty, one, quarter)


def test_models_vocab_and_clearing_touch_only_what_they_name(tmp_path):
    db = tmp_path / "a.db"
    with AtlasStore(db) as store:
        run = store.create_run({}, {}, {})
        other = store.create_run({"other": True}, {}, {})
        a = store.add_model(run, name="a", position=0, **MODEL)
        b = store.add_model(run, name="b", position=1, **MODEL)
        c = store.add_model(other, name="a", position=0, **MODEL)
        assert store.add_model(run, name="b", position=5, **MODEL) == b
        assert len({a, b, c}) == 3
        assert store.model_ids(run) == {"a": a, "b": b}
        assert store.model_ids(other) == {"a": c}
        store.write_vocab(run, ["x", "y", "z"])
        store.write_vocab(other, ["p"])
        store.write_vocab(run, ["<s>", " the"])  # replaces the run's vocabulary only
        for model in (a, b, c):
            store.insert_rows(neurons, [{"model_id": model, "layer": 0, "neuron": 0, "dead": False}])
        store.clear_model_tables([a, c], [neurons])
    assert rows_of(db, "SELECT run_id, token_id, text FROM vocab ORDER BY run_id, token_id") == [
        (run, 0, "<s>"),
        (run, 1, " the"),
        (other, 0, "p"),
    ]
    assert rows_of(db, "SELECT model_id FROM neurons") == [(b,)]
    assert rows_of(db, f"SELECT processing, position FROM {models.name} WHERE id = {b}") == [('{"fold_ln": true}', 1)]
    assert rows_of(db, f"SELECT count(*) FROM {runs.name}") == [(2,)]
    assert rows_of(db, f"SELECT count(*) FROM {vocab.name}") == [(3,)]


def test_current_revision_of_a_new_and_a_migrated_file(tmp_path):
    plain = tmp_path / "plain.db"
    sqlite3.connect(plain).close()
    assert current_revision(plain) is None
    with AtlasStore(tmp_path / "a.db"):
        pass
    revision = current_revision(tmp_path / "a.db")
    assert revision is not None and revision >= "0005"


def test_json_columns_are_written_as_json_text(tmp_path):
    db = tmp_path / "a.db"
    with AtlasStore(db) as store:
        run = store.create_run({}, {}, {})
        model = store.add_model(run, name="m", position=0, **MODEL)
        row = {
            "model_id": model,
            "quantity": "excess_corr",
            "bin_edges": [0.0, 0.5, 1.0],
            "counts": [3, 4],
            "quantiles": {"0.5": 0.25},
        }
        assert store.insert_rows(distributions, [row]) == 1
        store.insert_columns(
            distributions,
            {
                "model_id": model,
                "quantity": ["mean_corr"],
                "bin_edges": [[1.0, 2.0]],
                "counts": [[7]],
                "quantiles": [{"0.9": 1.5}],
            },
        )
    stored = rows_of(db, "SELECT quantity, bin_edges, counts, quantiles FROM distributions ORDER BY quantity")
    assert [(q, json.loads(e), json.loads(c), json.loads(x)) for q, e, c, x in stored] == [
        ("excess_corr", [0.0, 0.5, 1.0], [3, 4], {"0.5": 0.25}),
        ("mean_corr", [1.0, 2.0], [7], {"0.9": 1.5}),
    ]


def test_config_hash_is_the_sha256_of_the_sorted_json_with_paths_as_text():
    # the text each configuration is hashed as, written out by hand
    assert config_hash({"b": 1, "a": [1, 2]}) == hashlib.sha256(b'{"a": [1, 2], "b": 1}').hexdigest()
    assert config_hash({"model": Path("/m/x")}) == hashlib.sha256(b'{"model": "/m/x"}').hexdigest()


def test_times_are_utc_with_their_offset():
    stamp = utc_now()
    assert stamp.endswith("+00:00")
    assert datetime.fromisoformat(stamp).utcoffset() == timedelta(0)


def test_an_empty_alembic_version_table_is_no_revision(tmp_path):
    db = tmp_path / "empty.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
    assert current_revision(db) is None


def test_a_file_migrated_across_the_compact_revision_is_vacuumed(tmp_path):
    """Revision 0005 drops the old large tables: their pages are free until the VACUUM that `upgrade` runs."""
    db = tmp_path / "old.db"
    upgrade(db, "0004")
    assert current_revision(db) == "0004"
    upgrade(db, "0005")
    assert current_revision(db) == "0005"
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA freelist_count").fetchone()[0] == 0


def test_a_file_migrated_across_the_snippet_scale_revision_is_vacuumed(tmp_path):
    """Revision 0006 shortens every examples row of several snippets: the freed pages go back by VACUUM too."""
    db = tmp_path / "old.db"
    with closing(sqlite3.connect(db)) as conn:  # a file made before 8 KB pages
        conn.execute("PRAGMA page_size=4096")
        conn.execute("PRAGMA journal_mode=WAL")
    upgrade(db, "0005")
    with closing(sqlite3.connect(db)) as conn, conn:
        assert conn.execute("PRAGMA page_size").fetchone()[0] == 4096
        # (no runs or models rows: sqlite3 leaves foreign keys unchecked unless asked)
        values = [np.linspace(0.0, 1.0 + r, 1000) for r in range(4)]
        lengths = encode_array([1000] * 4, "<u2")
        for neuron in range(40):  # 40 rows of 4 snippets, each with its own header (0005's layout): ~160 KB
            conn.execute(
                "INSERT INTO examples VALUES (1, 0, ?, 'top', 4, ?, ?, NULL, ?, ?, ?, ?, ?, ?)",
                (
                    neuron,
                    *(encode_array([0, 1, 2, 3], "<u1") for _ in range(5)),
                    encode_array([1.0] * 4, "<f4"),
                    lengths,
                    b"".join(encode_u8(v) for v in values),
                ),
            )
    upgrade(db)
    assert current_revision(db) == "0006"
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA freelist_count").fetchone()[0] == 0
        assert conn.execute("PRAGMA page_size").fetchone()[0] == PAGE_SIZE  # and rewritten in 8 KB pages
        stored = conn.execute("SELECT lengths, snippets FROM examples ORDER BY neuron").fetchall()
    assert len(stored) == 40
    for lengths_blob, snippets in stored:
        assert len(snippets) == 8 + 4000  # one header for the row
        for got, want in zip(decode_snippets(lengths_blob, snippets), values, strict=True):
            np.testing.assert_allclose(got, want, atol=4 / 254, rtol=0)  # a step of the row's range 0..4


def test_content_hash_counts_the_rows_of_every_model_table(tmp_path):
    with AtlasStore(tmp_path / "a.db") as store:
        run = store.create_run({"x": 1}, {}, {})
        other = store.create_run({"x": 2}, {}, {})
        model = store.add_model(run, name="m", position=0, **MODEL)
        other_model = store.add_model(other, name="m", position=0, **MODEL)
        before = store.content_hash(run)
        # a table other than neurons, no excess: only its row count can change the hash
        store.insert_rows(layer_summaries, [{"model_id": model, "layer": 0, "n_neurons": 4, "n_dead": 0}])
        after = store.content_hash(run)
        assert after != before
        # another run's rows do not change it
        store.insert_rows(layer_summaries, [{"model_id": other_model, "layer": 0, "n_neurons": 4, "n_dead": 0}])
        store.insert_rows(
            neurons, [{"model_id": other_model, "layer": 0, "neuron": 0, "dead": False, "excess_corr": 0.5}]
        )
        assert store.content_hash(run) == after


def test_u8_codes_are_the_nearest_to_each_value_given_the_stored_low_and_step():
    """The codes are rounded against the float32 low and step the header holds (what a reader decodes with), not
    the float64 ones they were computed from: a value half a step from two codes picks by the stored ones."""
    third = 1 / 3  # float64; its float32 is 1/3 * (1 + 3e-8)
    cases = [
        np.array([0.1, 3.6, 254.1]),  # low 0.1 is not a float32: 3.6 is just below half-way from the stored low
        np.array([0.0, third * 200.500003, third * 254]),  # step 1/3 is not a float32
    ]
    for x in cases:
        data = encode_u8(x)
        low, step = header(data)
        codes = np.frombuffer(data, dtype=np.uint8, offset=8).astype(np.float64)
        assert np.all(np.abs(low + codes * step - x) <= step / 2 + 1e-12)
    # and the codes those give, worked out from the float32 header: 3.6 - 0.1000000015 = 3.4999999985 -> 3
    assert list(encode_u8(cases[0])[8:]) == [0, 3, 254]


def test_u8_of_constant_and_empty_rows_warns_of_nothing():
    """A constant row (step 0) divides by 1, not 0: no invalid value reaches the uint8 cast."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        blobs = encode_u8_rows(np.array([[2.0, 2.0, np.nan], [np.nan, np.nan, np.nan]]))
    assert [list(b[8:]) for b in blobs] == [[0, 0, 255], [255, 255, 255]]


def test_float_dtype_of_values_beyond_float32_warns_of_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert float_dtype(np.array([1e300, -1e300])) == "<f8"


def test_token_table_rows_split_where_only_the_neuron_changes():
    # (0, 1, kind 0) then (0, 2, kind 0): layer and kind the same
    columns = token_table_columns(
        1, np.array([0, 0, 0]), np.array([1, 1, 2]), np.array([0, 0, 0]), np.array([4, 5, 6]), np.ones(3), None
    )
    assert columns["neuron"].tolist() == [1, 2]
    assert [decode_array(b).tolist() for b in columns["token_ids"]] == [[4, 5], [6]]


def test_a_model_without_token_entries_has_no_rows():
    empty = np.zeros(0, dtype=np.int64)
    columns = token_table_columns(1, empty, empty, empty, empty, np.zeros(0), empty)
    assert columns["layer"].tolist() == [] and columns["token_ids"] == [] and columns["counts"] == []
    postings = posting_columns(1, empty, empty, empty, empty)
    assert postings["postings"] == [] and postings["token_id"].tolist() == []


def test_postings_split_where_only_the_kind_changes():
    # token 5 is the last token of kind 0 and the first of kind 3
    columns = posting_columns(1, np.array([3, 0]), np.array([5, 5]), np.array([8, 9]), np.array([0, 2]))
    assert columns["kind"].tolist() == [0, 3] and columns["token_id"].tolist() == [5, 5]
    assert [decode_postings(b).tolist() for b in columns["postings"]] == [[(9, 2)], [(8, 0)]]


def test_a_neuron_with_one_example():
    columns = example_columns([example(0, 0)])
    assert (columns["model_id"], columns["layer"], columns["neuron"], columns["n_examples"]) == (3, 1, 17, 1)
    assert decode_array(columns["ranks"]).tolist() == [0]


def test_feature_ids_are_integers():
    columns, ids = feature_columns(1, ["a", "b"], ["s", "s"], np.array([0.5, 0.5]))
    assert ids.dtype == np.int64 and ids.tolist() == [0, 1]
    assert columns["fraction"].dtype == np.float64


def test_blob_is_the_arrays_bytes():
    assert blob(np.array([1, 258], dtype="<i8")) == struct.pack("<2q", 1, 258)
    assert blob(np.array([[0.5, -1.0]], dtype="<f4")) == struct.pack("<2f", 0.5, -1.0)


def test_insert_columns_of_scalars_only_writes_one_row(tmp_path):
    db = tmp_path / "a.db"
    with AtlasStore(db) as store:
        run = store.create_run({}, {}, {})
        assert store.insert_columns(vocab, {"run_id": run, "token_id": 5, "text": "x"}) == 1
        model = store.add_model(run, name="m", position=0, **MODEL)
        store.insert_rows(neurons, [{"model_id": model, "layer": 0, "neuron": 0, "dead": False}])
        layer = store.model_columns(neurons, model, ["layer", "neuron"])["layer"]
        assert layer.dtype == np.float64  # integer columns too: float64, NULL as NaN
    assert rows_of(db, "SELECT run_id, token_id, text FROM vocab") == [(run, 5, "x")]


def test_compact_gives_the_free_pages_back(tmp_path):
    db = tmp_path / "a.db"
    with AtlasStore(db) as store:
        run = store.create_run({}, {}, {})
        store.write_vocab(run, [f"token {i}" * 20 for i in range(3000)])
        store.write_vocab(run, ["a"])  # deletes the 3000 rows: their pages are free
        with sqlite3.connect(db) as conn:
            assert conn.execute("PRAGMA freelist_count").fetchone()[0] > 0
        store.compact()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA freelist_count").fetchone()[0] == 0
        assert conn.execute("SELECT text FROM vocab").fetchall() == [("a",)]


def test_atlas_files_use_8_kb_pages_and_vacuum_converts_older_files(tmp_path):
    """A new file gets `PAGE_SIZE` pages; `vacuum` rewrites a 4 KB-page WAL file in 8 KB pages and leaves it in
    WAL mode, unless another connection holds it open (then the VACUUM still runs, at the file's page size)."""
    with AtlasStore(tmp_path / "new.db") as store:
        store.create_run({}, {}, {})
    with sqlite3.connect(tmp_path / "new.db") as conn:
        assert conn.execute("PRAGMA page_size").fetchone()[0] == PAGE_SIZE == 8192
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    def old_file(name: str) -> Path:
        path = tmp_path / name
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA page_size=4096")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE t (x BLOB)")
        conn.executemany("INSERT INTO t VALUES (?)", [(bytes(300),) for _ in range(100)])
        conn.commit()
        conn.close()
        return path

    old = old_file("old.db")
    vacuum(old)
    with sqlite3.connect(old) as conn:
        assert conn.execute("PRAGMA page_size").fetchone()[0] == 8192
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT count(*), sum(length(x)) FROM t").fetchone() == (100, 30_000)

    busy = old_file("busy.db")
    reader = sqlite3.connect(busy)
    reader.execute("SELECT count(*) FROM t").fetchone()  # a dashboard's open connection
    try:
        vacuum(busy)
    finally:
        reader.close()
    with sqlite3.connect(busy) as conn:
        assert conn.execute("PRAGMA page_size").fetchone()[0] == 4096
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_examples_encoded_by_the_stage_are_joined_on_their_shared_scale():
    """The examples stage hands each row's codes and its one scale: they are joined in (bin, rank) order, and
    rows whose examples disagree on the scale are refused."""
    scale = U8_HEADER.pack(-1.0, 0.5)
    rows = [
        example(1, 0, snippet_codes=bytes([7, 8]), snippet_scale=scale),
        example(0, 0, snippet_codes=bytes([1, 2, 3]), snippet_scale=scale),
    ]
    for row in rows:
        del row["activations"]
    columns = example_columns(rows)
    assert columns["snippets"] == scale + bytes([1, 2, 3, 7, 8])
    assert decode_array(columns["lengths"]).tolist() == [3, 2]
    decoded = decode_snippets(columns["lengths"], columns["snippets"])
    assert [a.tolist() for a in decoded] == [[-0.5, 0.0, 0.5], [2.5, 3.0]]
    rows[1]["snippet_scale"] = U8_HEADER.pack(-1.0, 0.25)
    with pytest.raises(ValueError, match="share one scale"):
        example_columns(rows)


def test_encode_u8_gives_the_bytes_of_the_vectorised_encoder():
    """`encode_u8`'s one-array path (finite values) and its general path (NaN) equal `encode_u8_rows`."""
    rng = np.random.default_rng(11)
    arrays = [
        rng.normal(size=int(rng.integers(1, 60))) * 10 ** rng.uniform(-3, 3) + rng.normal() * 5 for _ in range(300)
    ]
    arrays += [np.full(7, 1.25), np.array([3.0]), np.array([np.nan, 2.0, 5.0]), np.array([np.nan])]
    arrays += [a.astype(np.float32) for a in arrays[:50]]
    for x in arrays:
        assert encode_u8(x) == encode_u8_rows(np.asarray(x).reshape(1, -1))[0]
