"""Read-only SQLite connections with a time limit and a row cap (Datasette's `sqlite_timelimit` lesson).

The web app never writes: every connection is opened with ``mode=ro`` (plus ``immutable=1`` when configured)
and ``PRAGMA query_only=ON``. Each request borrows a connection from a small pool and gets a deadline through
SQLite's progress handler; work past the deadline is interrupted and surfaces as `QueryTimeout` (a 503).
List queries fetch one row past their cap so they can say ``truncated`` instead of silently cutting.
"""

from __future__ import annotations

import contextlib
import queue
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import quote

from app.errors import QueryTimeout

#: SQLite calls the progress handler every this many virtual-machine instructions.
PROGRESS_STEPS = 1000


Row = TypeVar("Row")


@dataclass
class Capped(Generic[Row]):
    """Rows of a capped query and whether more existed."""

    rows: list[Row]
    truncated: bool


class Database:
    """A pool of read-only connections to one atlas file."""

    def __init__(self, path: Path, time_limit_ms: int, immutable: bool = False, pool_size: int = 16) -> None:
        self.path = Path(path)
        self.time_limit_ms = time_limit_ms
        self.immutable = immutable
        self._pool: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._pool_size = pool_size
        self._opened = 0

    @property
    def uri(self) -> str:
        flags = "mode=ro&immutable=1" if self.immutable else "mode=ro"
        return f"file:{quote(str(self.path))}?{flags}"

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.uri, uri=True, check_same_thread=False, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA query_only=ON")
        return conn

    @contextlib.contextmanager
    def connect(self, time_limit_ms: int | None = None) -> Iterator[sqlite3.Connection]:
        """Borrow a connection whose statements stop after the deadline (`QueryTimeout`)."""
        try:
            conn = self._pool.get_nowait()
        except queue.Empty:
            conn = self._open()
            self._opened += 1
        limit = (time_limit_ms or self.time_limit_ms) / 1000
        deadline = time.monotonic() + limit
        timed_out = False

        def handler() -> int:
            nonlocal timed_out
            if time.monotonic() > deadline:
                timed_out = True
                return 1  # non-zero interrupts the statement
            return 0

        conn.set_progress_handler(handler, PROGRESS_STEPS)
        try:
            yield conn
        except sqlite3.OperationalError as exc:
            if timed_out or "interrupted" in str(exc):
                raise QueryTimeout(f"the query took longer than {limit * 1000:.0f} ms") from exc
            raise
        finally:
            conn.set_progress_handler(None, 0)
            if self._pool.qsize() < self._pool_size:
                self._pool.put(conn)
            else:
                conn.close()

    def close(self) -> None:
        while True:
            try:
                self._pool.get_nowait().close()
            except queue.Empty:
                return


def fetch_capped(conn: sqlite3.Connection, sql: str, params: Sequence[Any], cap: int) -> Capped[tuple[Any, ...]]:
    """Run a query with ``LIMIT cap + 1`` appended and report whether rows were left out (rows as tuples)."""
    rows = [tuple(row) for row in conn.execute(f"{sql} LIMIT ?", (*params, cap + 1)).fetchmany(cap + 1)]
    return Capped(rows[:cap], len(rows) > cap)
