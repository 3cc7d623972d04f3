"""``precompute --preset paper`` end to end on the tiny family with a local dataset (no network): the preset and
every value it sets are in the run's configuration, and its token sets reach the tables (issue 7)."""

from __future__ import annotations

import json
import sqlite3

from cli.main import main
from precompute.presets import PAPER_ANALYSIS_TOKENS


def test_the_paper_preset_runs_with_local_overrides_and_is_recorded(tiny_family, tmp_path):
    db = tmp_path / "atlas.db"
    argv = ["precompute", "--preset", "paper", "--db", str(db), "--dataset", "stdlib", "--tokens", "3000"]
    argv += ["--batch-size", "8", "--set", "stats.max_tokens=640", str(tiny_family["base"]), str(tiny_family["other"])]
    assert main(argv) == 0
    with sqlite3.connect(db) as conn:
        config, dataset, seen, counted = conn.execute(
            "SELECT config, dataset, tokens_seen, tokens_counted FROM runs"
        ).fetchone()
        config, dataset = json.loads(config), json.loads(dataset)
        assert config["preset"] == "paper"
        assert config["dataset"]["source"] == "stdlib" and config["dataset"]["tokens"] == 3000  # the overrides
        assert (config["dataset"]["max_ctx"], config["dataset"]["hf_split"]) == (512, "test")  # the preset's
        assert (config["threshold"], config["correlation"]["baseline"]) == (0.5, "gaussian")
        assert config["analysis"]["stats"] == {"tokens": "all", "max_tokens": 640}
        assert config["analysis"]["families"]["tokens"] == "all"
        assert config["analysis"]["examples"] == {"max_tokens": PAPER_ANALYSIS_TOKENS}
        assert dataset["ctx"] == 64  # the paper's 512, cut to the tiny models' context
        assert counted < seen  # the correlations skip BOS/EOS/newlines
        # statistics on all tokens, the first 640 (BOS included): position 0 has its profile
        assert conn.execute("SELECT DISTINCT n_tokens FROM activation_stats").fetchall() == [(640,)]
        assert conn.execute(
            "SELECT count(*) FROM activation_stats WHERE frequency_paper IS NULL OR frequency_paper < frequency"
        ).fetchone() == (0,)  # P(pre > -0.098) >= P(pre > 0)
        assert conn.execute("SELECT count(*) FROM families").fetchone()[0] > 0
