"""The memory plan of a precompute run: what every part will hold, fitted under a budget before any work (issue 11).

A run holds its models, one batch of activations at a time, and each stage's state; each stage also needs
temporaries while it folds in a batch, closes a pass and writes its tables. Every stage declares all of these
from the models' shapes, the dataset and its settings (`StageMemory`, from ``Stage.memory_bytes``), for a given
`Split`: how many passes over the rows the run makes (state that can be cut into blocks, such as the correlation
accumulators and the per-token tables, is cut into that many) and how many rows each forward pass takes.

The pipeline prices candidate splits, picks the cheapest that fits the budget (the fewest passes, then the
largest batches), and refuses a run whose smallest split does not fit, before the database is created. The plan
is a pure function of the inputs and the budget, so a resumed run finds the same one. The Python runtime
(interpreter, libraries, the tokenised dataset) is measured and shown, but is outside the budget; so are the
models, loaded before the plan is made: ``budget`` here is --memory-budget-gb plus the models, and the plan's
total (what the measured peak is held against) counts them.

>>> plan = MemoryPlan(budget=2**31, models=2**29, batch=2**28, runtime=0,
...                   stages={"stats": StageMemory(state=2**28, update=2**20)}, split=Split())
>>> plan.total == 2**29 + 2**28 + 2**28 + 2**20
True
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from precompute.stage_config import ConfigError

GIB = 2**30

#: Temporaries that scale with a batch (float64 copies, histogram indices, GEMM outputs) are worked in chunks of
#: at most this many bytes, so they stay small next to the state whatever the batch size.
CHUNK_BYTES = 64 * 2**20

#: Without --memory-budget-gb a run may plan this share of the memory available when it starts (host
#: MemAvailable on the CPU, free device memory on CUDA), plus the models it has already loaded. A third: machines
#: like the project's (23 GB, several people at once) change under a run, and what is free now is not free for
#: the next hour; a dedicated machine can say --memory-budget-gb.
DEFAULT_SHARE = 0.3


class MemoryBudgetError(ConfigError):
    """The run cannot fit its memory budget however it is split: refused before any work."""


def size_text(n_bytes: float) -> str:
    """Bytes as text: GiB from 1 GiB on, MiB below.

    >>> size_text(3 * 2**29), size_text(5 * 2**20)
    ('1.50 GiB', '5.0 MiB')
    """
    return f"{n_bytes / GIB:.2f} GiB" if n_bytes >= GIB else f"{n_bytes / 2**20:.1f} MiB"


def chunk_rows(n_columns: int, itemsize: int = 8, budget: int = CHUNK_BYTES) -> int:
    """How many rows of ``n_columns`` values of ``itemsize`` bytes make one chunk (at least one).

    >>> chunk_rows(1024, 8, budget=2**20)
    128
    """
    return max(1, budget // max(1, n_columns * itemsize))


def even_slices(n: int, most: int) -> list[slice]:
    """[0, n) in the fewest slices of at most ``most`` items each, as even as they go (sizes differ by one at most).

    A batch a little over one chunk becomes two halves, not a whole chunk and a short tail: on a GPU each chunk of
    the correlation engine costs a pass over the pair's accumulator whatever its tokens (24,576 tokens a batch with
    fp8 operands were chunks of 23,301 and 1,275 tokens, and ran at 0.75 of 12,288-token batches on an H200).

    >>> [(s.start, s.stop) for s in even_slices(10, 4)], [(s.start, s.stop) for s in even_slices(8, 8)]
    ([(0, 3), (3, 6), (6, 10)], [(0, 8)])
    """
    count = -(-n // max(1, most))
    bounds = [n * i // count for i in range(count + 1)] if count else [0]
    return [slice(a, b) for a, b in itertools.pairwise(bounds)]


def chunk_bytes(rows: int, n_columns: int, itemsize: int = 8, budget: int = CHUNK_BYTES) -> int:
    """The bytes of one chunk of a [rows, n_columns] table read `chunk_rows` at a time: small tables are one chunk.

    >>> chunk_bytes(10, 1024, 8, budget=2**20), chunk_bytes(1000, 1024, 8, budget=2**20)
    (81920, 1048576)
    """
    return min(rows, chunk_rows(n_columns, itemsize, budget)) * n_columns * itemsize


@dataclass(frozen=True)
class Split:
    """How the run cuts its work to fit: passes over the rows per stage, and rows per forward pass.

    Args:
        passes: stage name -> passes over the rows that stage makes (1 when absent); a stage whose state can be
            split (correlation accumulators, per-token tables, feature sums) cuts it into that many blocks.
        batch_rows: rows per forward pass; None keeps the dataset's batch size.
    """

    passes: Mapping[str, int] = field(default_factory=dict)
    batch_rows: int | None = None

    def passes_for(self, stage: str) -> int:
        """Passes a stage makes (1 unless the split says otherwise).

        >>> Split({"stats": 3}).passes_for("stats"), Split().passes_for("stats")
        (3, 1)
        """
        return int(self.passes.get(stage, 1))

    def record(self) -> dict[str, Any]:
        return {"passes": dict(self.passes), "batch_rows": self.batch_rows}


@dataclass(frozen=True)
class StageMemory:
    """What one stage holds, in bytes, at each moment of a run.

    Args:
        state: held between batches while the stage streams (from its construction to its last pass).
        update: temporaries above ``state`` while it folds in one batch.
        finish: above ``state`` while it closes a pass.
        written: held from the end of streaming until its tables are written (None: ``state``).
        write: above ``written`` while it writes its tables.
    """

    state: int
    update: int = 0
    finish: int = 0
    written: int | None = None
    write: int = 0

    @property
    def rest(self) -> int:
        """What the stage holds once it has streamed, until it writes."""
        return self.state if self.written is None else self.written

    @property
    def peak(self) -> int:
        return max(self.state + max(self.update, self.finish), self.rest + self.write)

    def record(self) -> dict[str, int]:
        return {"state": self.state, "update": self.update, "finish": self.finish, "written": self.rest,
                "write": self.write, "peak": self.peak}  # fmt: skip


@dataclass(frozen=True)
class MemoryPlan:
    """The run's memory, phase by phase, under its budget.

    The phases: streaming (models, one batch, every stage's state and the largest update temporaries), closing a
    pass (the batch is gone; the largest ``finish``), and writing (stages write in order and are dropped once
    written, so stage i writes next to the rest of the stages after it).
    """

    budget: int  # --memory-budget-gb (or the default share) plus the models
    models: int
    batch: int
    stages: Mapping[str, StageMemory]
    split: Split
    runtime: int = 0  # measured: resident memory at plan time less the models (outside the budget)

    @property
    def phases(self) -> dict[str, int]:
        memories = list(self.stages.values())
        states = sum(m.state for m in memories)
        writing = [sum(m.rest for m in memories[i:]) + memories[i].write for i in range(len(memories))]
        return {
            "streaming": self.models + self.batch + states + max((m.update for m in memories), default=0),
            "closing a pass": self.models + states + max((m.finish for m in memories), default=0),
            "writing": self.models + max(writing, default=0),
        }

    @property
    def total(self) -> int:
        """The most the run holds at once (outside the runtime): what the budget bounds."""
        return max(self.phases.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    def table(self) -> str:
        """The plan as a text table for the log: one line per part, then the phases, the total and the budget."""
        lines = [f"{'part':<16}{'held':>12}{'peak':>12}  split"]
        lines.append(f"{'models':<16}{size_text(self.models):>12}{size_text(self.models):>12}")
        rows = f"{self.split.batch_rows} rows" if self.split.batch_rows else "dataset batch"
        lines.append(f"{'one batch':<16}{size_text(self.batch):>12}{size_text(self.batch):>12}  {rows}")
        for name, memory in self.stages.items():
            passes = self.split.passes_for(name)
            note = f"{passes} passes" if passes > 1 else ""
            lines.append(f"{name:<16}{size_text(memory.state):>12}{size_text(memory.peak):>12}  {note}")
        for phase, size in self.phases.items():
            lines.append(f"{'= ' + phase:<16}{'':>12}{size_text(size):>12}")
        budget = f"budget {size_text(self.budget - self.models)} + the models"
        lines.append(f"{'total':<16}{'':>12}{size_text(self.total):>12}  {budget}")
        runtime = size_text(self.runtime)
        lines.append(f"{'(runtime)':<16}{runtime:>12}{'':>12}  interpreter, libraries, dataset: outside the plan")
        return "\n".join(lines)

    def record(self) -> dict[str, Any]:
        """The plan for the run record (bytes)."""
        return {
            "budget": self.budget,
            "total": self.total,
            "models": self.models,
            "batch": self.batch,
            "runtime": self.runtime,
            "phases": self.phases,
            "stages": {name: memory.record() for name, memory in self.stages.items()},
            "split": self.split.record(),
        }


def fit_split(
    price: Callable[[Split], MemoryPlan],
    splittable: Iterable[str],
    batch_rows: int,
    max_passes: int,
) -> MemoryPlan:
    """The cheapest split whose plan fits its budget: the fewest passes, then the largest batches, then each
    splittable stage back to as few passes as still fit (a stage whose state is small needs no blocks).

    Raises:
        MemoryBudgetError: not even every stage at ``max_passes`` passes and one row per batch fits; the message
            gives the smallest budget that would.
    """
    names = list(splittable)
    rows_options = sorted({max(1, batch_rows >> k) for k in range(batch_rows.bit_length())}, reverse=True)

    def uniform(passes: int, rows: int) -> Split:
        return Split({name: passes for name in names}, None if rows == batch_rows else rows)

    smallest = price(uniform(max_passes, 1))
    if not smallest.fits:
        raise MemoryBudgetError(
            f"the run needs at least {size_text(smallest.total - smallest.models)} of memory beyond its models "
            f"({size_text(smallest.models)}, loaded) when split as far as it goes (one row per batch, up to "
            f"{max_passes} passes over the rows), but the budget is {size_text(smallest.budget - smallest.models)}: "
            "raise --memory-budget-gb, or use fewer models or stages"
        )

    def fewest(fits: Callable[[int], bool], high: int) -> int:
        """The least n in [1, high] with fits(n), given fits(high) and that more passes never need more memory."""
        low = 1
        while low < high:
            middle = (low + high) // 2
            if fits(middle):
                high = middle
            else:
                low = middle + 1
        return low

    passes = fewest(lambda p: price(uniform(p, 1)).fits, max_passes)
    rows = next(r for r in rows_options if price(uniform(passes, r)).fits)  # one row always fits
    split = uniform(passes, rows)
    for name in names:  # each stage back to as few passes as still fit: a small state needs no blocks

        def fits(p: int, name: str = name, current: Split = split) -> bool:
            return price(replace(current, passes={**current.passes, name: p})).fits

        split = replace(split, passes={**split.passes, name: fewest(fits, split.passes_for(name))})
    return price(split)


def map_large_allocations() -> None:
    """Serve every allocation of 1 MiB or more from its own mapping, returned to the system when freed.

    glibc raises its mmap threshold each time such a block is freed (up to 32 MiB); the batch's chunk temporaries
    then come from the heap and the space they free stays resident: 0.37 GB over the plan (+77%) on the memory
    test's shapes, 0.04 GB with a fixed threshold (issue 11). glibc only (``mallopt``); elsewhere nothing.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 2**20)  # M_MMAP_THRESHOLD; setting it stops the dynamic raising


def trim_heap() -> None:
    """Give the heap memory freed so far back to the system (glibc's ``malloc_trim``; elsewhere nothing): loading
    models leaves hundreds of MB of freed heap that would otherwise count in the run's resident memory."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _meminfo(field_name: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def available_bytes(device: str) -> int:
    """Memory available now: free device memory on CUDA, host MemAvailable elsewhere (free pages as a fallback)."""
    if device.startswith("cuda"):
        import torch  # lazy: this module stays importable without torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    available = _meminfo("MemAvailable")
    if available is not None:
        return available
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    """This process's resident memory (0 where ``/proc`` is missing)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


__all__ = [
    "CHUNK_BYTES",
    "DEFAULT_SHARE",
    "GIB",
    "MemoryBudgetError",
    "MemoryPlan",
    "Split",
    "StageMemory",
    "available_bytes",
    "chunk_bytes",
    "chunk_rows",
    "even_slices",
    "fit_split",
    "map_large_allocations",
    "resident_bytes",
    "size_text",
    "trim_heap",
]
