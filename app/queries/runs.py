"""Runs: each precompute run (a model family on one dataset) and its status."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Run:
    id: int
    created_at: str
    finished_at: str | None
    status: str
    content_hash: str | None
    stages: list[str]
    tokens_seen: int | None
    tokens_counted: int | None
    config: dict[str, Any] = field(repr=False)
    dataset: dict[str, Any] = field(repr=False)
    environment: dict[str, Any] = field(repr=False)
    timings: dict[str, Any] = field(repr=False)
    error: str | None = None

    @property
    def threshold(self) -> float:
        return float(self.config.get("threshold", 0.5))

    @property
    def bos_id(self) -> int | None:
        value = self.dataset.get("bos_id")
        return int(value) if value is not None else None

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    @property
    def published(self) -> dict[str, Any] | None:
        """Where a run imported from the paper's tables comes from (``config["published"]``, written by
        `precompute.published`); None for a run computed by a precompute."""
        value = self.config.get("published")
        return value if isinstance(value, dict) else None


_COLUMNS = (
    "id, created_at, finished_at, status, content_hash, stages, tokens_seen, tokens_counted, config, dataset, "
    "environment, timings, error"
)


def _json(text: str | None, default: Any) -> Any:
    if not text:
        return default
    try:
        return json.loads(text)
    except ValueError:
        return default


def _run(row: sqlite3.Row) -> Run:
    return Run(
        id=row["id"],
        created_at=row["created_at"],
        finished_at=row["finished_at"],
        status=row["status"],
        content_hash=row["content_hash"],
        stages=_json(row["stages"], []),
        tokens_seen=row["tokens_seen"],
        tokens_counted=row["tokens_counted"],
        config=_json(row["config"], {}),
        dataset=_json(row["dataset"], {}),
        environment=_json(row["environment"], {}),
        timings=_json(row["timings"], {}),
        error=row["error"],
    )


@dataclass(frozen=True, slots=True)
class RunState:
    id: int
    status: str
    content_hash: str | None


def run_states(conn: sqlite3.Connection) -> list[RunState]:
    """Id, status and content hash of every run, newest first (cheap: read on every request)."""
    return [RunState(*row) for row in conn.execute("SELECT id, status, content_hash FROM runs ORDER BY id DESC")]


def list_runs(conn: sqlite3.Connection) -> list[Run]:
    """Every run, newest first."""
    return [_run(row) for row in conn.execute(f"SELECT {_COLUMNS} FROM runs ORDER BY id DESC")]


def get_run(conn: sqlite3.Connection, run_id: int) -> Run | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM runs WHERE id = ?", (run_id,)).fetchone()
    return _run(row) if row else None


def newest_runs_by_model(conn: sqlite3.Connection) -> dict[str, int]:
    """Each model name of a complete run -> the newest complete run that has it: what a model's URL without
    ``?run=`` means (issue 7: several runs side by side, e.g. our family next to the paper's published tables)."""
    rows = conn.execute(
        "SELECT m.name, max(m.run_id) FROM models m JOIN runs r ON r.id = m.run_id "
        "WHERE r.status = 'complete' GROUP BY m.name"
    )
    return {name: int(run_id) for name, run_id in rows}


def newest_complete_run(conn: sqlite3.Connection) -> Run | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM runs WHERE status = 'complete' ORDER BY id DESC LIMIT 1").fetchone()
    return _run(row) if row else None
