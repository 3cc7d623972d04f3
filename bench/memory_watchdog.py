"""Run a command under a memory watchdog: sample its process tree's resident memory, keep the peak, kill above a cap.

Every experiment at the paper's shapes runs under it, so that a plan that is wrong costs a killed run, not the
shared machine; the scale benchmark and the memory-plan test read its peak. Linux only (it reads ``/proc``).

    python bench/memory_watchdog.py --limit-gb 9 -- universal-neurons precompute ...   # prints one JSON line at the end
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")


def _children(pid: int) -> list[int]:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    found: list[int] = []
    for task in tasks:
        try:
            found += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        except OSError:
            continue
    return found


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (0 once it is gone)."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            total += int(Path(f"/proc/{current}/statm").read_text().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            continue
        stack += _children(current)
    return total


@dataclass
class Watched:
    """What a watched command did: exit code, peak resident bytes of its tree, wall seconds, whether it was killed."""

    returncode: int
    peak_rss: int
    seconds: float
    killed: bool
    stdout: str
    stderr: str


def watch(
    command: Sequence[str],
    limit_bytes: int,
    interval: float = 0.2,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float | None = None,
    trace: Path | None = None,
) -> Watched:
    """Run ``command``; every ``interval`` seconds sum its tree's RSS, and kill the whole tree above ``limit_bytes``.

    Output is captured to temporary files (a pipe that nobody reads would block the child); ``trace`` also gets
    one line per sample: the wall-clock time and the resident bytes (to match a run's log to its memory).
    """
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.monotonic()
        process = subprocess.Popen(
            list(command), stdout=out, stderr=err, env=dict(env) if env else None, cwd=cwd, start_new_session=True
        )
        peak, killed = 0, False
        samples = trace.open("w", buffering=1) if trace else None  # line by line: readable while it runs
        while process.poll() is None:
            rss = tree_rss(process.pid)
            peak = max(peak, rss)
            if samples:
                samples.write(f"{time.strftime('%H:%M:%S')} {rss}\n")
            over_time = timeout is not None and time.monotonic() - started > timeout
            if peak > limit_bytes or over_time:
                killed = True
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                break
            time.sleep(interval)
        seconds = time.monotonic() - started
        if samples:
            samples.close()
        out.seek(0)
        err.seek(0)
        return Watched(process.returncode, peak, seconds, killed, out.read(), err.read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit-gb", type=float, default=9.0, help="kill the command above this resident memory")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between samples")
    parser.add_argument("--trace", type=Path, default=None, help="write each sample (time, bytes) to this file")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    result = watch(command, int(args.limit_gb * 2**30), args.interval, trace=args.trace)
    sys.stderr.write(result.stderr)
    sys.stdout.write(result.stdout)
    summary = {k: v for k, v in asdict(result).items() if k not in ("stdout", "stderr")}
    summary["peak_rss_gib"] = round(result.peak_rss / 2**30, 3)
    print(json.dumps({"bench": "watchdog", "command": command, **summary}))
    sys.exit(result.returncode if not result.killed else 137)


if __name__ == "__main__":
    main()
