"""`bench/correlation.py`'s profile of the engine (the GPU session's ``profile`` step reads it): it runs on the CPU
and names the operators that take the engine's time, the most expensive first."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def bench_module():
    """`bench/correlation.py`: bench/ is a folder of scripts, not a package."""
    spec = importlib.util.spec_from_file_location("bench_correlation", ROOT / "bench" / "correlation.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_profile_lists_the_engines_operators_by_their_own_time():
    bench = bench_module()
    calls = []

    def update() -> None:
        calls.append(1)
        left, right = torch.randn(256, 256), torch.randn(256, 256)
        for _ in range(3):
            left @ right
        left.exp()

    profiled = bench.profile_engine(update, torch.device("cpu"), n_updates=2)
    assert len(calls) == 3  # one warm-up, two profiled
    assert profiled["kernels"] == []  # a CPU runs no kernels of its own
    rows = profiled["operators"]
    ops = [row["op"] for row in rows]
    assert "aten::mm" in ops and "aten::exp" in ops
    mm = rows[ops.index("aten::mm")]
    assert mm["calls_per_update"] == 3 and mm["ms_per_update"] > 0
    assert [row["ms_per_update"] for row in rows] == sorted((row["ms_per_update"] for row in rows), reverse=True)
    # each share rounded to 4 places: their sum is 1 at most, give or take half a unit of the last place each
    assert 0 < sum(row["share"] for row in rows) <= 1 + len(rows) * 5e-5 and len(rows) <= bench.PROFILE_TOP
