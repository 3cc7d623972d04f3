"""End to end through the CLI: a tiny model and permuted copies must be recognised as the same neurons."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cli.main import main


def query(db: Path, sql: str, *params: object) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql, params).fetchall()


def test_permuted_copies_recover_the_permutation_exactly(tiny_family, tmp_path):
    from tests.factories import permuted_copy

    base = tiny_family["base"]
    second = tmp_path / "tiny-a-permuted-2"
    perms = {"tiny-a-permuted": tiny_family["permutations"], "tiny-a-permuted-2": permuted_copy(base, second, 7)}
    db = tmp_path / "atlas.db"
    code = main(
        [
            "precompute",
            "--db",
            str(db),
            "--tokens",
            "12000",
            "--batch-size",
            "8",
            str(base),
            str(tiny_family["permuted"]),
            str(second),
        ]
    )
    assert code == 0
    assert query(db, "SELECT status FROM runs") == [("complete",)]
    ids = dict(query(db, "SELECT name, id FROM models"))
    for partner, permutations in perms.items():
        rows = query(
            db,
            "SELECT p.layer, p.neuron, p.max_layer, p.max_neuron, p.max_corr FROM partner_scores p "
            "JOIN neurons n USING (model_id, layer, neuron) WHERE p.model_id = ? AND p.partner_model_id = ? "
            "AND NOT n.dead",
            ids["tiny-a"],
            ids[partner],
        )
        assert len(rows) > 100
        for layer, neuron, max_layer, max_neuron, corr in rows:
            twin = int(np.flatnonzero(permutations[layer] == neuron)[0])
            assert (max_layer, max_neuron) == (layer, twin)
            assert corr > 0.999
    # excess = 1 - baseline for every live neuron, since every partner's best match is a perfect twin
    for excess, mean_baseline, mean_corr in query(
        db, "SELECT excess_corr, mean_baseline, mean_corr FROM neurons WHERE NOT dead AND model_id = ?", ids["tiny-a"]
    ):
        assert mean_corr == pytest.approx(1.0, abs=1e-3)
        assert excess == pytest.approx(1.0 - mean_baseline, abs=1e-3)
        assert mean_baseline < 0.999


def test_command_line_options_reach_the_run(tiny_family, tmp_path):
    """Every correlation and run option lands in the run's recorded configuration (the configuration that names
    the run), with values unlike the defaults, and the ones that shape the tables do shape them."""
    db = tmp_path / "atlas.db"
    options = ["--baseline", "haar", "--baseline-seed", "4", "--top-k", "3", "--memory-budget-gb", "1.5"]
    options += ["--precision", "float64", "--reference-only", "--threshold", "0.25", "--device", "cpu:0"]
    options += ["--dtype", "bfloat16", "--stages", "correlations"]
    models = [str(tiny_family["base"]), str(tiny_family["other"])]
    assert main(["precompute", "--db", str(db), "--tokens", "3000", *options, *models]) == 0
    config = json.loads(query(db, "SELECT config FROM runs")[0][0])
    assert config["correlation"] == {
        "baseline": "haar",
        "baseline_seed": 4,
        "top_k": 3,
        "precision": "float64",
        "reference_only": True,
        "memory_budget_gb": 1.5,
    }
    assert (config["threshold"], config["device"], config["dtype"]) == (0.25, "cpu:0", "bfloat16")
    assert query(db, "SELECT DISTINCT rank FROM matches ORDER BY rank") == [(0,), (1,), (2,)]  # --top-k 3
    assert query(db, "SELECT count(*) FROM neurons WHERE universal != (excess_corr > 0.25)") == [(0,)]
    assert query(db, "SELECT json_extract(environment, '$.device') FROM runs") == [("cpu:0",)]


def test_counted_tokens_skip_bos_eos_and_newlines(tiny_family, tmp_path):
    from precompute.data import DatasetConfig, build_dataset, newline_token_ids
    from tests.factories import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    dataset = build_dataset(DatasetConfig(tokens=5000, ctx=64), tokenizer, model_ctx=64)
    newline = newline_token_ids(tokenizer)
    assert newline, "the stdlib tokenizer has a newline token"
    expected = int((~np.isin(dataset.rows, [0, *newline])).sum())
    assert dataset.tokens_counted == expected
    assert (dataset.rows[:, 0] == 0).all()
    db = tmp_path / "atlas.db"
    assert (
        main(
            [
                "precompute",
                "--db",
                str(db),
                "--tokens",
                "5000",
                "--ctx",
                "64",
                str(tiny_family["base"]),
                str(tiny_family["other"]),
            ]
        )
        == 0
    )
    assert query(db, "SELECT tokens_counted, tokens_seen FROM runs") == [(expected, dataset.tokens_seen)]


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda f, t: ["no-such-model-xyz", str(f["base"])], "unknown model 'no-such-model-xyz'"),
        (lambda f, t: [str(t / "missing" / "folder"), str(f["base"])], "no model folder"),
        (lambda f, t: [str(f["base"]), str(f["mismatched"])], "share a tokenizer"),
        (lambda f, t: ["--tokens", "0", str(f["base"]), str(f["other"])], "--tokens must be a positive"),
        (lambda f, t: ["--set", "roles.rows=3", str(f["base"]), str(f["other"])], "unknown roles setting 'rows'"),
    ],
    ids=["unknown-name", "missing-folder", "mismatched-tokenizers", "zero-tokens", "unknown-setting"],
)
def test_bad_input_gives_one_clear_line_and_no_complete_db(tiny_family, tmp_path, make_args, message):
    from tests.factories import tiny_gpt2

    family = dict(tiny_family)
    family["mismatched"] = tiny_gpt2(tmp_path / "other-vocab", seed=3, vocab_size=400)
    db = tmp_path / "atlas.db"
    # The installed console script, as a user runs it.
    command = [
        str(Path(sys.executable).with_name("universal-neurons")),
        "precompute",
        "--db",
        str(db),
        *make_args(family, tmp_path),
    ]
    process = subprocess.run(command, capture_output=True, text=True, timeout=300)
    err = process.stderr.strip().splitlines()
    assert process.returncode != 0
    assert len(err) == 1 and message in err[0], err
    assert err[0].startswith("universal-neurons: error: ")
    assert not db.exists() or query(db, "SELECT count(*) FROM runs WHERE status = 'complete'") == [(0,)]
