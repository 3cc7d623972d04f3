"""An interrupted precompute leaves no file that looks complete, and re-running resumes from its checkpoint."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from precompute.cli import main
from precompute.store import current_revision, upgrade


def scores(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT m.name, n.layer, n.neuron, round(n.excess_corr, 9), round(n.mean_baseline, 9) "
            "FROM neurons n JOIN models m ON m.id = n.model_id ORDER BY 1, 2, 3"
        ).fetchall()


def test_killed_run_resumes_to_the_same_result(tiny_family, tmp_path):
    models = [str(tiny_family["base"]), str(tiny_family["other"])]
    args = ["precompute", "--tokens", "24000", "--batch-size", "2", "--stages", "correlations", *models]
    reference = tmp_path / "reference.db"
    assert main([*args, "--db", str(reference)]) == 0

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

    assert main([*args, "--db", str(db)]) == 0
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT id, status FROM runs").fetchall() == [(1, "complete")]
    assert scores(db) == scores(reference)
    assert not checkpoint.exists()
    # A third run with the same configuration has nothing left to do.
    assert main([*args, "--db", str(db)]) == 0
    assert scores(db) == scores(reference)


def test_db_upgrade_migrates_an_older_file(tmp_path):
    db = tmp_path / "old.db"
    upgrade(db, "0001")
    assert current_revision(db) == "0001"
    assert main(["db", "upgrade", str(db)]) == 0
    assert current_revision(db) == "0002"
    assert main(["db", "upgrade", str(tmp_path / "missing.db")]) == 2
