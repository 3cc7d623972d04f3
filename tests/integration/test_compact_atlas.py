"""A compact atlas (issue 11): an older file migrated to revision 0005 shows the same values at display precision.

A tiny family is precomputed (the compact tables), written back in the layout of revision 0004 (int64 histogram
counts, float32 position profiles with their counts on every row, int32 token ids and float16 activations on every
example, text token-table kinds), migrated with `precompute.store.upgrade`, and every neuron's JSON answers are
compared with the original file's: equal, except the arrays stored as uint8 codes with a scale (position
profiles, snippet activations), which agree within one code step of their array's range (less than a pixel of a
200-pixel plot, less than a shade of a snippet's colour).
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from precompute.store import (
    TOKEN_TABLE_KINDS,
    current_revision,
    decode_array,
    decode_counts,
    decode_examples,
    decode_u8,
    encode_counts,
    encode_u8,
    upgrade,
)
from tests.dashboard_factories import build_atlas

#: Tables revision 0005 rewrites or adds; every other table is copied as it is.
CHANGED = {
    "histograms",
    "position_profiles",
    "position_counts",
    "examples",
    "example_rows",
    "example_peaks",
    "token_tables",
    "token_postings",
    "percentiles",
    "percentile_statistics",
    "feature_scores",
    "feature_names",
}


@pytest.fixture(scope="module")
def compact_atlas(tiny_family: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("compact") / "atlas.db"
    return build_atlas(db, [tiny_family["base"], tiny_family["other"]], tokens=3000)


def make_client(db: Path) -> TestClient:
    # a generous time limit: the point is the values, on a machine other work may be loading
    return TestClient(create_app(Settings(db_path=db, query_time_limit_ms=20_000)), raise_server_exceptions=True)


def legacy_copy(atlas: Path, target: Path) -> Path:
    """The atlas in the layout of revision 0004 (what an older precompute wrote)."""
    upgrade(target, "0004")
    conn = sqlite3.connect(target)
    conn.execute("ATTACH DATABASE ? AS new", (str(atlas),))
    tables = [r[0] for r in conn.execute("SELECT name FROM main.sqlite_master WHERE type = 'table'")]
    for table in tables:
        if table not in CHANGED and table != "alembic_version":
            conn.execute(f"INSERT INTO main.{table} SELECT * FROM new.{table}")
    conn.execute(
        "INSERT INTO main.feature_scores SELECT s.model_id, layer, neuron, rank, feature, feature_set, "
        "variance_reduction, fraction FROM new.feature_scores s JOIN new.feature_names f "
        "ON f.model_id = s.model_id AND f.feature_id = s.feature_id"
    )
    names: dict[int, dict[int, str]] = {}
    for model_id, position, statistic in conn.execute("SELECT * FROM new.percentile_statistics"):
        names.setdefault(model_id, {})[position] = statistic
    percentiles = conn.execute("SELECT model_id, layer, neuron, percentiles FROM new.percentiles").fetchall()
    conn.executemany(
        "INSERT INTO main.percentiles VALUES (?, ?, ?, ?, ?)",
        [
            (*r[:3], names[r[0]][i], float(v))
            for r in percentiles
            for i, v in enumerate(decode_array(r[3]).tolist())
            if np.isfinite(v)
        ],
    )
    tables = conn.execute("SELECT model_id, layer, neuron, kind, token_ids, token_values, counts FROM new.token_tables")
    conn.executemany(
        "INSERT INTO main.token_tables VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (*r[:3], TOKEN_TABLE_KINDS[r[3]], rank, t, v, c)
            for r in tables.fetchall()
            for rank, (t, v, c) in enumerate(
                zip(
                    decode_array(r[4]).tolist(),
                    decode_array(r[5]).tolist(),
                    decode_array(r[6]).tolist() if r[6] is not None else [None] * decode_array(r[4]).size,
                    strict=True,
                )
            )
        ],
    )
    hist = conn.execute("SELECT model_id, layer, neuron, hook, low, high, n_bins, counts FROM new.histograms")
    conn.executemany(
        "INSERT INTO main.histograms VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [(*r[:7], decode_counts(r[7]).astype("<i8").tobytes()) for r in hist.fetchall()],
    )
    profiles = conn.execute(
        'SELECT p.model_id, layer, neuron, hook, mean, std, c."count" FROM new.position_profiles p '
        "JOIN new.position_counts c USING (model_id)"
    ).fetchall()
    conn.executemany(
        "INSERT INTO main.position_profiles VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(*r[:4], decode_u8(r[4]).tobytes(), decode_u8(r[5]).tobytes(), r[6]) for r in profiles],
    )
    tokens = {
        (m, r): np.frombuffer(ids, dtype=f"<u{size}")
        for m, r, size, ids in conn.execute("SELECT model_id, dataset_row, itemsize, token_ids FROM new.example_rows")
    }
    columns = "ranks, bins, bin_ranges, dataset_rows, starts, peaks, activations, lengths, snippets"
    rows = []
    for r in conn.execute(f"SELECT model_id, layer, neuron, kind, {columns} FROM new.examples").fetchall():
        for e in decode_examples(r[4:]):
            ids = tokens[(r[0], e["dataset_row"])][e["start"] : e["start"] + e["activations"].size].astype("<i4")
            scalars = [e[n] for n in ("rank", "bin", "bin_low", "bin_high", "bin_fraction", "dataset_row", "start")]
            acts = e["activations"].astype("<f2").tobytes()
            rows.append((*r[:4], *scalars, e["peak"], e["activation"], ids.tobytes(), acts))
    conn.executemany("INSERT INTO main.examples VALUES (" + ", ".join("?" * 15) + ")", rows)
    conn.commit()
    conn.close()
    return target


def neuron_answers(client: TestClient, db: Path) -> dict[str, Any]:
    """Every neuron-level JSON answer of every neuron of the last run, and a few searches."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        run = conn.execute("SELECT max(id) FROM runs").fetchone()[0]
        names = [r[0] for r in conn.execute("SELECT name FROM models WHERE run_id = ? ORDER BY position", (run,))]
        keys = conn.execute(
            "SELECT m.name, layer, neuron FROM neurons JOIN models m ON m.id = model_id WHERE m.run_id = ?", (run,)
        ).fetchall()
    answers: dict[str, Any] = {}
    for name, layer, neuron in keys:
        base = f"/api/v1/models/{name}/neurons/{layer}/{neuron}"
        answers[base] = client.get(base).json()
        for kind in ("top", "quantile", "random"):
            url = f"{base}/examples?kind={kind}&context=full"
            answers[url] = client.get(url).json()
    for q in ("def", "return", "self", "family:none"):
        for name in names:
            answers[f"search {q} {name}"] = client.get("/api/v1/search", params={"q": q, "model": name}).json()
    return answers


def assert_same_at_display_precision(before: Any, after: Any, where: str = "", tolerance: float = 0.0) -> None:
    """Equal JSON, except floats inside the compact arrays, equal within `tolerance` (one code step)."""
    if isinstance(before, dict):
        assert isinstance(after, dict) and before.keys() == after.keys(), where
        for key in before:
            assert_same_at_display_precision(before[key], after[key], f"{where}.{key}", tolerance)
    elif isinstance(before, list) and before and all(isinstance(v, float | int) for v in before) and tolerance:
        assert len(before) == len(after), where
        np.testing.assert_allclose(after, before, rtol=0, atol=tolerance, err_msg=where)
    elif isinstance(before, list):
        assert isinstance(after, list) and len(before) == len(after), where
        for i, (b, a) in enumerate(zip(before, after, strict=True)):
            assert_same_at_display_precision(b, a, f"{where}[{i}]", tolerance)
    else:
        assert before == after, where


def compare_answers(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before.keys() == after.keys()
    for url, answer in before.items():
        if "/examples" in url:
            for group_b, group_a in zip(answer["groups"], after[url]["groups"], strict=True):
                for ex_b, ex_a in zip(group_b["examples"], group_a["examples"], strict=True):
                    spread = np.ptp(ex_b["activations"]) if ex_b["activations"] else 0.0
                    # one code step of the snippet's range, plus the JSON's 4-decimal rounding
                    assert_same_at_display_precision(
                        ex_b.pop("activations"), ex_a.pop("activations"), url, spread / 254 + 1e-4
                    )
        elif answer.get("activation"):
            assert "activation" in after[url], (url, after[url])
            for prof_b, prof_a in zip(
                answer["activation"]["position_profiles"], after[url]["activation"]["position_profiles"], strict=True
            ):
                for array in ("mean", "std"):
                    step = np.ptp(prof_b[array]) / 254 + 1e-4
                    assert_same_at_display_precision(prof_b.pop(array), prof_a.pop(array), url, step)
        assert_same_at_display_precision(answer, after[url], url)


def test_an_older_file_migrates_and_shows_the_same_values(compact_atlas, tmp_path):
    original = tmp_path / "original.db"
    shutil.copy(compact_atlas, original)
    legacy = legacy_copy(original, tmp_path / "legacy.db")
    assert current_revision(legacy) == "0004"
    upgrade(legacy)  # revision 0005 converts the data, then VACUUM
    assert current_revision(legacy) == current_revision(original)
    with sqlite3.connect(legacy) as conn:
        assert conn.execute("PRAGMA freelist_count").fetchone()[0] == 0  # vacuumed
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT count(*) FROM examples").fetchone()[0] > 0
    with make_client(original) as client:
        before = neuron_answers(client, original)
    with make_client(legacy) as client:
        after = neuron_answers(client, legacy)
    compare_answers(before, after)


def test_the_migration_keeps_the_search_indexes_and_plans(compact_atlas, tmp_path):
    legacy = legacy_copy(compact_atlas, tmp_path / "legacy.db")
    upgrade(legacy)
    sql = "SELECT name, sql FROM sqlite_master WHERE type IN ('index', 'table') AND sql IS NOT NULL ORDER BY name"
    with sqlite3.connect(legacy) as migrated, sqlite3.connect(f"file:{compact_atlas}?mode=ro", uri=True) as fresh:
        assert migrated.execute(sql).fetchall() == fresh.execute(sql).fetchall()
        indexes = {r[0] for r in migrated.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    # the primary keys are the tables (WITHOUT ROWID): no second index of the same columns
    compact = ("token_tables", "histograms", "percentiles", "feature_scores", "example_peaks", "matches", "roles")
    assert not {f"sqlite_autoindex_{t}_1" for t in compact} & indexes


def test_compact_arrays_round_trip_within_half_a_step():
    rng = np.random.default_rng(0)
    for values in (rng.normal(size=256) * 3, np.array([np.nan, 0.25, 0.25]), np.zeros(4), rng.random(33) - 0.17):
        decoded = decode_u8(encode_u8(values))
        finite = np.isfinite(values)
        assert np.array_equal(np.isnan(decoded), ~finite)
        spread = np.ptp(values[finite]) if finite.any() else 0.0
        assert np.all(np.abs(decoded[finite] - values[finite]) <= spread / 508 * 1.01 + 1e-6)
    for counts in (np.zeros(257, dtype=np.int64), np.array([0, 5, 300, 2**33]), np.arange(257)):
        data = encode_counts(counts)
        assert np.array_equal(decode_counts(data), counts)
        assert data[0] == next(w for w in (1, 2, 4, 8) if counts.max() < 1 << (8 * w))
