"""Benchmark a whole precompute run: wall time, forward passes and every stage, from the run record.

The analyses must share the correlation stage's forward passes: ``analyses_over_forward`` = (stats + examples +
families streaming seconds) / forward seconds, which the issue caps at 1.5. Prints one JSON line.

    python bench/stages.py                                   # the shipped family, the demo's settings
    python bench/stages.py --tokens 100000 zoo/stdlib-tiny/seed-0 zoo/stdlib-tiny/seed-1
"""

from __future__ import annotations

import argparse
import json
import platform
import sqlite3
import tempfile
import time
from pathlib import Path

import torch

from cli.main import main as cli_main

SHIPPED = sorted(str(p) for p in Path("zoo/stdlib-tiny").glob("seed-*"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=SHIPPED)
    parser.add_argument("--tokens", type=int, default=400_000)
    parser.add_argument("--stages", default=None, help="comma-separated stages (default: all)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        db = Path(folder) / "bench.db"
        command = ["precompute", "--db", str(db), "--tokens", str(args.tokens), *args.models]
        if args.stages:
            command += ["--stages", args.stages]
        started = time.perf_counter()
        code = cli_main(command)
        wall = time.perf_counter() - started
        if code != 0:
            raise SystemExit(code)
        with sqlite3.connect(db) as conn:
            timings, counted = conn.execute("SELECT timings, tokens_counted FROM runs").fetchone()
        timings = json.loads(timings)
    forward = timings.get("forward", 0.0)
    analyses = sum(timings.get(stage, 0.0) for stage in ("stats", "examples", "families"))
    print(
        json.dumps(
            {
                "bench": "precompute",
                "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
                "models": len(args.models),
                "tokens": args.tokens,
                "tokens_counted": counted,
                "wall_seconds": round(wall, 1),
                "timings": timings,
                "analyses_over_forward": round(analyses / forward, 3) if forward else None,
            }
        )
    )


if __name__ == "__main__":
    main()
