"""The paper's published tables imported as runs: the paper's counts, its values row by row, idempotent imports."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sqlite3
from collections import Counter
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest

from precompute.published import (
    PAPER_TABLES,
    PUBLISHED_MODELS,
    UNIVERSAL_COLUMNS,
    PublishedTableError,
    import_paper,
    import_table,
    paper_table,
)
from precompute.store import AtlasStore, neurons

SMALL, MEDIUM, PYTHIA = "stanford-gpt2-small-a", "stanford-gpt2-medium-a", "pythia-160m"

#: Per-layer universal counts and totals of the released tables (paper-spec §2.5).
PAPER_LAYER_COUNTS = {
    SMALL: {0: 222, 1: 244, 2: 101, 3: 110, 4: 71, 5: 72, 6: 56, 7: 112, 8: 101, 9: 142, 10: 125, 11: 177},
    MEDIUM: {
        **{0: 132, 1: 140, 2: 44, 3: 40, 4: 40, 5: 30, 6: 23, 7: 21, 8: 26, 9: 24, 10: 25, 11: 17},
        **{12: 36, 13: 36, 14: 57, 15: 52, 16: 53, 17: 56, 18: 49, 19: 55, 20: 46, 21: 52, 22: 61, 23: 96},
    },
    PYTHIA: {0: 64, 1: 14, 2: 19, 3: 5, 4: 27, 5: 34, 6: 43, 7: 39, 8: 67, 9: 50, 10: 50, 11: 53},
}
PAPER_TOTALS = {SMALL: 1533, MEDIUM: 1211, PYTHIA: 465}

#: The shipped files are the published ones, unchanged (paper_data/NOTICE.md): pinned digests.
SHIPPED_SHA256 = {
    "pythia-160m/universal.csv": "70ac7ea2e4f2fa2e72cff837b58313048bae1b81261509ffdf408a3a14317982",
    "stanford-gpt2-medium-a/prediction_neurons.csv": "70f4de079c250ed7f6c685f3e988b546375279e5d9dac8b4aee756066e3f9c64",
    "stanford-gpt2-medium-a/universal.csv": "aeac7f3fceb79f8bc087e9dad6840587e7f0167a105473f2e4916dec88da6f6d",
    "stanford-gpt2-small-a/high_excess_correlation.csv": (
        "66a022cfdcda7aead6b9e328d54883ab5c3d014072e8737b8f2ea792b6588b5c"
    ),
    "stanford-gpt2-small-a/sub_gaussian_activation_kurtosis.csv": (
        "ec6c0a479bcc0926c1675f5196e59a18a15bdb423a53e8ac3583f585a2cca3c9"
    ),
    "stanford-gpt2-small-a/universal.csv": "a65e96b75451d505940572ed9b9003e116cfab08c108bf1d6c89b334c31f8d14",
    "LICENSE": "944d25f2b0616fa716a4a3528f57169ee9464bf880c97179ed54da85d628aacb",
}

#: universal.csv's columns as paper-spec §3.3 lists them (pinned).
SPEC_COLUMNS = [
    *("layer", "neuron", "max_corr", "mean_corr", "min_corr", "max_baseline", "min_baseline", "mean_baseline"),
    *("w_in_norm", "input_bias", "w_out_norm", "in_out_sim", "l2_penalty", "mean", "var", "skew", "kurt"),
    *("vocab_mean", "vocab_var", "vocab_skew", "vocab_kurt", "sparsity", "excess_corr"),
]

#: universal.csv column -> (table, column) in the atlas: parsed here independently of the importer's mapping.
STORED_AS = {
    **{c: ("neurons", c) for c in [*SPEC_COLUMNS[2:8], "excess_corr"]},
    **{c: ("weight_stats", c) for c in [*SPEC_COLUMNS[8:13], *SPEC_COLUMNS[17:21]]},
    **{c: ("activation_stats", f"pre_{c}") for c in ("mean", "var", "skew", "kurt")},
    "sparsity": ("activation_stats", "frequency_paper"),  # P(pre > -0.098): the paper's definition (revision 0003)
}


def csv_rows(model: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(paper_table(model).read_text(encoding="utf-8"))))


def connect(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    return conn


def model_id_of(conn: sqlite3.Connection, run_id: int) -> int:
    return int(conn.execute("SELECT id FROM models WHERE run_id = ?", (run_id,)).fetchone()[0])


def dump(db: Path, run_id: int | None = None) -> dict[str, list[tuple]]:
    """Every row of every table (or of one run's rows), for before/after comparisons."""
    with sqlite3.connect(db) as conn:
        tables = [
            r[0]
            for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name != 'alembic_version'")
        ]
        out = {}
        params: tuple[int, ...]
        for table in tables:
            columns = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
            where, params = "", ()
            if run_id is not None and table == "runs":
                where, params = "WHERE id = ?", (run_id,)
            elif run_id is not None and "run_id" in columns:
                where, params = "WHERE run_id = ?", (run_id,)
            elif run_id is not None and "model_id" in columns:
                where, params = "WHERE model_id IN (SELECT id FROM models WHERE run_id = ?)", (run_id,)
            out[table] = sorted(conn.execute(f"SELECT * FROM {table} {where}", params).fetchall(), key=repr)
    return out


def test_shipped_files_are_the_published_ones():
    folder = files("precompute").joinpath("paper_data")
    for name, digest in SHIPPED_SHA256.items():
        assert hashlib.sha256(folder.joinpath(*name.split("/")).read_bytes()).hexdigest() == digest, name
    assert {f"{m}/{t}" for m, tables in PAPER_TABLES.items() for t in tables} == set(SHIPPED_SHA256) - {"LICENSE"}
    assert "d797aaa" in folder.joinpath("NOTICE.md").read_text(encoding="utf-8")
    assert set(UNIVERSAL_COLUMNS) == set(SPEC_COLUMNS)
    for model in PUBLISHED_MODELS:
        assert next(csv.reader(io.StringIO(paper_table(model).read_text(encoding="utf-8")))) == SPEC_COLUMNS


def test_import_gives_the_papers_counts_and_shapes(tmp_path):
    db = tmp_path / "atlas.db"
    run_ids = import_paper(db)
    assert len(run_ids) == 3
    with connect(db) as conn:
        for model, run_id in zip(PUBLISHED_MODELS, run_ids, strict=True):
            run = conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
            assert run["status"] == "complete" and run["content_hash"]
            config, dataset = json.loads(run["config"]), json.loads(run["dataset"])
            assert config["published"]["commit"] == "d797aaa"
            assert config["published"]["table"] == f"{model}/universal.csv"
            assert config["models"] == [model] and config["threshold"] == 0.5
            assert dataset["ctx"] == 512 and dataset["tokens"] == 100_000_000

            spec = PUBLISHED_MODELS[model]
            row = conn.execute("SELECT * FROM models WHERE run_id = ?", (run_id,)).fetchone()
            assert (row["name"], row["source"], row["n_layers"], row["d_mlp"]) == (
                model,
                model,
                spec.n_layers,
                spec.d_mlp,
            )
            assert json.loads(row["processing"])["fold_ln"] is True

            model_id = row["id"]
            counts = dict(
                conn.execute("SELECT layer, count(*) FROM neurons WHERE model_id = ? GROUP BY layer", (model_id,))
            )
            assert counts == PAPER_LAYER_COUNTS[model]
            assert sum(counts.values()) == PAPER_TOTALS[model]
            assert (
                conn.execute(
                    "SELECT count(*) FROM neurons WHERE model_id = ? AND NOT universal", (model_id,)
                ).fetchone()[0]
                == 0
            )
            summaries = conn.execute(
                "SELECT layer, n_neurons, n_dead, n_universal FROM layer_summaries WHERE model_id = ? ORDER BY layer",
                (model_id,),
            ).fetchall()
            assert [tuple(s) for s in summaries] == [
                (layer, spec.d_mlp, 0, count) for layer, count in PAPER_LAYER_COUNTS[model].items()
            ]
            for table in ("weight_stats", "activation_stats"):
                n = conn.execute(f"SELECT count(*) FROM {table} WHERE model_id = ?", (model_id,)).fetchone()[0]
                assert n == PAPER_TOTALS[model], table
            histograms = {
                r["quantity"]: r for r in conn.execute("SELECT * FROM distributions WHERE model_id = ?", (model_id,))
            }
            assert {"excess_corr", "mean_corr", "mean_baseline"} <= set(histograms)
            assert sum(json.loads(histograms["excess_corr"]["counts"])) == PAPER_TOTALS[model]
            # paper-spec §2.5: median excess ≈ 0.57 in all three models
            assert json.loads(histograms["excess_corr"]["quantiles"])["0.5"] == pytest.approx(0.57, abs=0.01)


def test_a_neurons_values_equal_its_csv_row(tmp_path):
    db = tmp_path / "atlas.db"
    run_ids = dict(zip(PUBLISHED_MODELS, import_paper(db), strict=True))
    with connect(db) as conn:
        for model, run_id in run_ids.items():
            model_id = model_id_of(conn, run_id)
            rows = csv_rows(model)
            chosen = [rows[0], rows[len(rows) // 2], rows[-1], max(rows, key=lambda r: float(r["excess_corr"]))]
            for row in chosen:
                key = (model_id, int(row["layer"]), int(row["neuron"]))
                for column, (table, stored) in STORED_AS.items():
                    value = conn.execute(
                        f"SELECT {stored} FROM {table} WHERE model_id = ? AND layer = ? AND neuron = ?", key
                    ).fetchone()[0]
                    assert value == float(row[column]), (model, key, column)
                stats = conn.execute(
                    "SELECT frequency, n_tokens, post_mean FROM activation_stats "
                    "WHERE model_id = ? AND layer = ? AND neuron = ?",
                    key,
                ).fetchone()
                assert tuple(stats) == (None, 0, None)  # sparsity is P(pre > -0.098): not a `frequency`
                flags = conn.execute(
                    "SELECT dead, universal FROM neurons WHERE model_id = ? AND layer = ? AND neuron = ?", key
                ).fetchone()
                assert tuple(flags) == (0, 1)
        # the top small-a neuron of paper-spec §2.5
        top = conn.execute(
            "SELECT layer, neuron, round(excess_corr, 3) FROM neurons WHERE model_id = ? ORDER BY excess_corr DESC",
            (model_id_of(conn, run_ids[SMALL]),),
        ).fetchone()
        assert tuple(top) == (0, 2436, 0.821)
        # layer means and maxima over the published rows
        small = csv_rows(SMALL)
        excess = np.array([float(r["excess_corr"]) for r in small])
        layers = np.array([int(r["layer"]) for r in small])
        for layer, mean, high in conn.execute(
            "SELECT layer, mean_excess, max_excess FROM layer_summaries WHERE model_id = ?",
            (model_id_of(conn, run_ids[SMALL]),),
        ):
            assert mean == pytest.approx(excess[layers == layer].mean(), rel=1e-12)
            assert high == excess[layers == layer].max()


def test_importing_twice_changes_nothing(tmp_path):
    db = tmp_path / "atlas.db"
    first = import_paper(db)
    before = dump(db)
    assert import_paper(db) == first
    assert import_paper(db, [PYTHIA]) == [first[2]]
    assert dump(db) == before


def test_an_interrupted_import_is_written_again(tmp_path):
    db = tmp_path / "atlas.db"
    (run_id,) = import_paper(db, [PYTHIA])
    before = dump(db, run_id)
    with sqlite3.connect(db) as conn:  # what a kill between chunks leaves: a running run with part of its rows
        conn.execute("UPDATE runs SET status = 'running', content_hash = NULL WHERE id = ?", (run_id,))
        conn.execute("DELETE FROM neurons WHERE layer > 5")
    assert import_paper(db, [PYTHIA]) == [run_id]
    after = dump(db, run_id)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone() == ("complete",)
    assert {t: rows for t, rows in after.items() if t != "runs"} == {t: r for t, r in before.items() if t != "runs"}


def test_an_existing_run_is_untouched(tmp_path):
    db = tmp_path / "atlas.db"
    with AtlasStore(db) as store:
        run_id = store.create_run({"models": [SMALL, "b"], "threshold": 0.5}, {"python": "3"}, {"source": "stdlib"})
        model_id = store.add_model(run_id, position=0, is_reference=True, **PUBLISHED_MODELS[SMALL].record())
        store.insert_rows(
            neurons,
            [{"model_id": model_id, "layer": 0, "neuron": i, "dead": False, "excess_corr": 0.1 * i} for i in range(8)],
        )
        store.finish_run(run_id)
    before = dump(db, run_id)
    new_runs = import_paper(db)
    assert run_id not in new_runs
    assert dump(db, run_id) == before


def test_a_missing_column_is_named_and_nothing_is_written(tmp_path):
    db = tmp_path / "atlas.db"
    rows = csv_rows(SMALL)
    broken = tmp_path / "universal.csv"
    with broken.open("w", newline="") as f:
        writer = csv.DictWriter(f, [c for c in SPEC_COLUMNS if c != "skew"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows[:5])
    with AtlasStore(db) as store, pytest.raises(PublishedTableError, match=r"missing column 'skew'"):
        import_table(store, PUBLISHED_MODELS[SMALL], broken)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] == 0


def test_a_table_that_does_not_fit_its_model_is_refused(tmp_path):
    rows = csv_rows(SMALL)[:3]
    rows[1] = {**rows[1], "layer": "12"}  # GPT-2-small has layers 0-11
    table = tmp_path / "universal.csv"
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, SPEC_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    with AtlasStore(tmp_path / "atlas.db") as store, pytest.raises(PublishedTableError, match="outside"):
        import_table(store, PUBLISHED_MODELS[SMALL], table)


def test_an_unknown_model_lists_the_published_ones(tmp_path):
    with pytest.raises(PublishedTableError, match="pythia-160m"):
        import_paper(tmp_path / "atlas.db", ["gpt2"])


def test_layer_counts_of_the_tables_themselves():
    """The shipped CSVs hold the paper's per-layer counts (independent of the importer)."""
    for model, expected in PAPER_LAYER_COUNTS.items():
        assert Counter(int(r["layer"]) for r in csv_rows(model)) == expected
