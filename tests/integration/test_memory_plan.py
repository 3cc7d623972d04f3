"""Memory is a contract (issue 11): the plan a run prints is what it holds, and a run that cannot fit is refused.

A precompute runs in a subprocess under the watchdog of `bench/memory_watchdog.py` (its process tree's resident memory
sampled every 0.1 s); the same watchdog measures a process that only imports what a precompute imports. The
difference is the run's own memory, which must be within 25% of the total of the plan recorded in the run.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sqlite3
import sys
from pathlib import Path
from types import ModuleType

import pytest

from cli.main import main

pytestmark = pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="the watchdog reads /proc (Linux)")

#: Small enough for CI (seconds), large enough that the run's tensors, not the interpreter's noise, dominate.
SHAPE = {"n_layers": 3, "d_model": 128, "d_mlp": 512, "n_heads": 4, "ctx": 128}
VOCAB = 4096
LIMIT = 4 * 2**30  # the watchdog kills anything above this
ROOT = Path(__file__).resolve().parents[2]

IMPORTS = "import torch, transformers, transformer_lens.model_bridge, alembic.command, cli.main, precompute.pipeline"


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    from tests.factories import tiny_gpt2

    root = tmp_path_factory.mktemp("memory-family")
    return [str(tiny_gpt2(root / f"seed-{seed}", seed=seed, vocab_size=VOCAB, **SHAPE)) for seed in range(3)]


def python(*arguments: str) -> list[str]:
    return [sys.executable, *arguments]


def load_watchdog() -> ModuleType:
    """`bench/memory_watchdog.py`: bench/ is a folder of scripts, not a package."""
    spec = importlib.util.spec_from_file_location("memory_watchdog", ROOT / "bench" / "memory_watchdog.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def test_measured_peak_is_the_plan(family, tmp_path):
    watch, root = load_watchdog().watch, ROOT
    baseline = watch(python("-c", IMPORTS), LIMIT, interval=0.1, cwd=root)
    assert baseline.returncode == 0, baseline.stderr
    db = tmp_path / "atlas.db"
    command = python("-m", "cli.main", "precompute", "--db", str(db), "--tokens", "4096", "--batch-size", "16", *family)
    run = watch(command, LIMIT, interval=0.1, cwd=root)
    assert run.returncode == 0 and not run.killed, run.stderr[-3000:]
    assert "memory plan" in run.stderr and "= streaming" in run.stderr  # the plan is logged as a table
    with sqlite3.connect(db) as conn:
        environment = json.loads(conn.execute("SELECT environment FROM runs").fetchone()[0])
    plan = environment["memory_plan"]
    assert plan["total"] <= plan["budget"]
    assert set(plan["stages"]) == {"correlations", "stats", "examples", "families", "roles"}
    measured = run.peak_rss - baseline.peak_rss
    assert abs(measured - plan["total"]) <= 0.25 * plan["total"], (measured, plan["total"], plan["phases"])
    assert plan["measured_peak_rss"] >= 0.95 * run.peak_rss  # the run's own high-water mark, recorded with it


def test_a_budget_below_the_minimum_is_refused_before_any_file(tiny_family, tmp_path, capsys):
    models = [str(tiny_family["base"]), str(tiny_family["other"])]
    db = tmp_path / "atlas.db"
    args = ["precompute", "--db", str(db), "--tokens", "2000", "--batch-size", "4", *models]
    assert main([*args, "--memory-budget-gb", "0.001"]) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]  # one line, after the models' loading bars
    assert not db.exists() and not db.with_name(db.name + ".checkpoints").exists()
    assert message.startswith("universal-neurons: error: the run needs at least"), message
    found = re.search(r"needs at least ([\d.]+) (MiB|GiB) of memory", message)
    assert found, message
    minimum = float(found.group(1)) * (2**20 if found.group(2) == "MiB" else 2**30)
    # the minimum is true: a budget of it (rounded up) runs
    assert main([*args, "--memory-budget-gb", f"{(minimum + 2**20) / 2**30:.6f}"]) == 0
    assert db.exists()
