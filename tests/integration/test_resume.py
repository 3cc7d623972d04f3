"""An interrupted precompute leaves no file that looks complete, and re-running resumes from its checkpoint.

Resuming must skip work, not only end with the same tables: a restart from row zero gives the same tables too. Each
streaming stage's ``update`` is wrapped to count the rows it folds in, and a resumed run must stream exactly the rows
its checkpoint had left, for every stage (a stage done before the checkpoint streams none).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from cli.main import main
from precompute import pipeline
from precompute.activations import ActivationBatch
from precompute.stages import DEFAULT_STAGES, STAGES, RolesStage, Stage
from precompute.store import current_revision, upgrade

#: The stages that stream batches (the others do all their work in `Stage.write`).
STREAMING: tuple[type[Stage], ...] = tuple(stage for stage in STAGES if stage.hooks)


class Interrupted(KeyboardInterrupt):
    """What a Ctrl-C raises: the pipeline marks the run failed and the CLI exits 130."""


class RowCounter:
    """Counts the rows every streaming stage folds in; optionally interrupts once one stage has seen enough."""

    def __init__(self) -> None:
        self.rows = dict.fromkeys((stage.name for stage in STREAMING), 0)
        self.interrupt_at: tuple[str, int] | None = None

    def reset(self) -> dict[str, int]:
        seen, self.rows = self.rows, dict.fromkeys(self.rows, 0)
        return seen

    def wrap(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for stage in STREAMING:

            def update(self_: Stage, batch: ActivationBatch, original: Any = stage.update) -> None:
                if (
                    self.interrupt_at
                    and self_.name == self.interrupt_at[0]
                    and self.rows[self_.name] >= self.interrupt_at[1]
                ):
                    raise Interrupted
                self.rows[self_.name] += int(batch.tokens.shape[0])
                original(self_, batch)

            monkeypatch.setattr(stage, "update", update)


@pytest.fixture
def counter(monkeypatch: pytest.MonkeyPatch) -> RowCounter:
    rows = RowCounter()
    rows.wrap(monkeypatch)
    return rows


def passes_of(state: dict[str, Any], name: str) -> int:
    """The passes over the rows a stage makes (the correlation engine: as many as its memory budget needs)."""
    return len(state["stages"][name]["passes"]) if name == "correlations" else 1


def rows_left(state: dict[str, Any], name: str, fresh_rows: int) -> int:
    """The rows a stage still had to stream when the checkpoint was written: the rest of the pass under way (the
    checkpoint's ``rows_done`` counts rows of that pass) and every pass after it."""
    stage = state["stages"][name]
    passes = passes_of(state, name)
    passes_left = passes - stage["pass_index"] if name == "correlations" else int(not stage["done"])
    return passes_left * (fresh_rows // passes) - state["rows_done"] if passes_left else 0


def scores(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT m.name, n.layer, n.neuron, round(n.excess_corr, 9), round(n.mean_baseline, 9) "
            "FROM neurons n JOIN models m ON m.id = n.model_id ORDER BY 1, 2, 3"
        ).fetchall()


def test_killed_run_resumes_to_the_same_result(tiny_family, tmp_path, counter):
    models = [str(tiny_family["base"]), str(tiny_family["other"])]
    args = ["precompute", "--tokens", "24000", "--batch-size", "2", "--stages", "correlations", *models]
    reference = tmp_path / "reference.db"
    assert main([*args, "--db", str(reference)]) == 0
    fresh = counter.reset()
    assert fresh["correlations"] > 0

    db = tmp_path / "atlas.db"
    checkpoint = tmp_path / "atlas.db.checkpoints" / "run-1.pt"
    command = [
        str(Path(sys.executable).with_name("universal-neurons")),
        *args,
        "--db",
        str(db),
        "--checkpoint-seconds",
        "0",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(process.pid, signal.SIGKILL)  # no chance to clean up: the worst interruption
    process.wait()
    assert checkpoint.exists(), "the run wrote a checkpoint before it was killed"
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT status FROM runs").fetchall() == [("running",)]
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)

    assert main([*args, "--db", str(db)]) == 0
    resumed = counter.reset()
    # only the rows the checkpoint had left were streamed again, never the whole dataset
    left = rows_left(state, "correlations", fresh["correlations"])
    assert resumed == {**dict.fromkeys(resumed, 0), "correlations": left}
    assert resumed["correlations"] < fresh["correlations"]
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT id, status FROM runs").fetchall() == [(1, "complete")]
    assert scores(db) == scores(reference)
    assert not checkpoint.exists()
    # A third run with the same configuration has nothing left to do.
    assert main([*args, "--db", str(db)]) == 0
    assert counter.reset()["correlations"] == 0
    assert scores(db) == scores(reference)


def stage_tables(db: Path) -> dict[str, list[tuple]]:
    """Every row of every table a stage owns, floats rounded to 9 digits."""
    names = [table.name for stage in STAGES for table in stage.tables]
    with sqlite3.connect(db) as conn:
        return {
            name: sorted(
                tuple(round(v, 9) if isinstance(v, float) else v for v in row)
                for row in conn.execute(f"SELECT * FROM {name}")
            )
            for name in names
        }


def two_correlation_passes(patch: pytest.MonkeyPatch) -> None:
    """Make the memory plan give the correlations two passes and every other stage one, whatever the budget (at
    these shapes the writing phase, not the accumulators, bounds the plan, so no budget would)."""
    from precompute import pipeline
    from precompute.memory import Split

    patch.setattr(pipeline, "fit_split", lambda price, *_: price(Split({"correlations": 2})))


@pytest.fixture
def split_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    two_correlation_passes(monkeypatch)


@pytest.fixture(scope="module")
def all_stages(tiny_family, tmp_path_factory) -> dict[str, Any]:
    """A clean run of every default stage (no --stages: what `make demo` runs): the rows each stage streamed and
    its tables."""
    models = [str(tiny_family["base"]), str(tiny_family["other"])]
    args = ["precompute", "--tokens", "2000", "--batch-size", "4", *models]
    db = tmp_path_factory.mktemp("resume-reference") / "reference.db"
    rows = RowCounter()
    with pytest.MonkeyPatch.context() as patch:
        rows.wrap(patch)
        assert main([*args, "--db", str(db)]) == 0
    with sqlite3.connect(db) as conn:
        assert json.loads(conn.execute("SELECT stages FROM runs").fetchone()[0]) == list(DEFAULT_STAGES)
    assert all(rows.rows.values())
    return {"args": args, "rows": rows.rows, "tables": stage_tables(db)}


@pytest.mark.parametrize("interrupt", ["while-streaming", "while-writing"])
def test_every_stage_resumes_from_its_checkpoint(all_stages, tmp_path, counter, monkeypatch, interrupt):
    """Interrupted half-way through the rows, or after them while the roles stage writes: each streaming stage
    streams exactly the rows it had not folded in when the last checkpoint was written, and the tables are those
    of a clean run."""
    fresh = all_stages["rows"]
    at_checkpoint: list[dict[str, int]] = []  # the rows each stage had folded in when each checkpoint was written
    save = pipeline._save_checkpoint

    def save_and_count(path: Path, state: dict) -> None:
        save(path, state)
        at_checkpoint.append(dict(counter.rows))

    monkeypatch.setattr(pipeline, "_save_checkpoint", save_and_count)
    if interrupt == "while-streaming":
        counter.interrupt_at = ("stats", fresh["stats"] // 2)
    else:
        write = RolesStage.write

        def write_once_then_interrupt(self: RolesStage, context: Any) -> None:
            monkeypatch.setattr(RolesStage, "write", write)
            raise Interrupted

        monkeypatch.setattr(RolesStage, "write", write_once_then_interrupt)
    args = [*all_stages["args"], "--db", str(tmp_path / "atlas.db"), "--checkpoint-seconds", "0"]
    assert main(args) == 130
    counter.reset()
    counter.interrupt_at = None
    covered = at_checkpoint[-1]
    if interrupt == "while-streaming":
        assert 0 < covered["stats"] < fresh["stats"]  # the last checkpoint is inside the pass
    else:
        assert covered == fresh  # every row was folded in before the roles stage wrote

    at_checkpoint.clear()
    assert main(args) == 0
    resumed = counter.reset()
    assert resumed == {name: fresh[name] - covered[name] for name in fresh}
    for name in fresh:
        assert resumed[name] < fresh[name], f"{name} streamed every row again"
    assert stage_tables(tmp_path / "atlas.db") == all_stages["tables"]


def test_db_upgrade_migrates_an_older_file(tmp_path):
    db = tmp_path / "old.db"
    upgrade(db, "0001")
    assert current_revision(db) == "0001"
    assert main(["db", "upgrade", str(db)]) == 0
    from alembic.script import ScriptDirectory

    from precompute.store import ALEMBIC_DIR

    assert current_revision(db) == ScriptDirectory(str(ALEMBIC_DIR)).get_current_head()  # the newest revision
    assert current_revision(db) >= "0003"  # 0003: activation_stats.frequency_paper
    assert main(["db", "upgrade", str(tmp_path / "missing.db")]) == 2
