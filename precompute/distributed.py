"""Several processes, one atlas: the process group a precompute runs in under ``torchrun`` (issue 11).

``torchrun --nproc-per-node N $(command -v universal-neurons) precompute ...`` starts N processes with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` in their environment. Each process (a rank) loads the models on its own device
(``cuda:LOCAL_RANK``, one rank per GPU, NCCL; gloo on CPUs) and streams only its share of the batches; every
streaming stage's state is a sum, an extreme or a mergeable top-k, so the ranks combine it with the collectives
here before each pass closes (`precompute.stages.base.Stage.reduce`), and rank 0 alone writes the SQLite file.
When the correlation accumulators are split into several passes, the ranks split those passes instead of the rows
(each makes its own over every row) and merge their per-neuron results at the end (`Stage.gather`).

`Distributed` is one process: every collective is the identity, so a run without torchrun takes the same code
path it always took. `ProcessGroup` is the torch.distributed implementation. Reductions work in place on the
stages' own tensors (no second copy of an accumulator); only gathering a top-k holds every rank's copy at once.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

ReduceOp = Literal["sum", "min", "max"]
T = TypeVar("T")

#: How long a collective waits for the slowest rank. Ranks meet only between passes and at checkpoints, so the
#: wait covers one rank closing a pass or saving a checkpoint of tens of GB while the others are done (NCCL's
#: default, 10 minutes, is too short for GPT-2-sized accumulators).
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)

_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


class Distributed:
    """A run of one process: rank 0 of a world of one, where every collective returns its input.

    >>> group = Distributed()
    >>> group.broadcast_object({"run_id": 3}), group.all_gather_object(1), group.all_reduce_int(5)
    ({'run_id': 3}, [1], 5)
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that opens the store, writes the tables and shows progress."""
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp = "sum") -> None:
        """Combine ``tensor`` over the ranks in place (sum, min or max); every rank ends with the result."""

    def all_reduce_int(self, value: int, op: ReduceOp = "sum") -> int:
        """`all_reduce` of a Python integer (token counts)."""
        return value

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (all of one shape), in rank order."""
        return [tensor]

    def broadcast_object(self, value: T) -> T:
        """Rank 0's ``value`` on every rank (picklable; the others pass anything, e.g. None)."""
        return value

    def all_gather_object(self, value: T) -> list[T]:
        """Every rank's picklable ``value``, in rank order."""
        return [value]

    def agree(self, flag: bool) -> bool:
        """Rank 0's decision on every rank (when to checkpoint: the ranks save together or not at all)."""
        return flag

    def barrier(self) -> None:
        """Wait until every rank is here."""


class ProcessGroup(Distributed):
    """The torch.distributed default group: NCCL when the ranks run on GPUs, gloo on CPUs."""

    def __init__(self, rank: int, world_size: int, local_rank: int, device: torch.device) -> None:
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device = device  # where the collectives' tensors must be (NCCL: this rank's GPU)

    def _on_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if tensor.device.type == self.device.type else tensor.to(self.device)

    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp = "sum") -> None:
        work = self._on_device(tensor)
        dist.all_reduce(work, op=_OPS[op])
        if work is not tensor:  # NCCL reduces only GPU tensors: a host tensor goes there and back
            tensor.copy_(work)

    def all_reduce_int(self, value: int, op: ReduceOp = "sum") -> int:
        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(tensor, op=_OPS[op])
        return int(tensor.item())

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        work = self._on_device(tensor.contiguous())
        parts = [torch.empty_like(work) for _ in range(self.world_size)]
        dist.all_gather(parts, work)
        return [part.to(tensor.device) for part in parts]

    def broadcast_object(self, value: T) -> T:
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]  # type: ignore[return-value]  # rank 0's value, of rank 0's type

    def all_gather_object(self, value: T) -> list[T]:
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def agree(self, flag: bool) -> bool:
        tensor = torch.tensor([int(flag)], dtype=torch.int64, device=self.device)
        dist.broadcast(tensor, src=0)
        return bool(tensor.item())

    def barrier(self) -> None:
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index or 0])
        else:
            dist.barrier()


def launched_by_torchrun() -> bool:
    """True when this process is one rank of several (torchrun, or SLURM's srun setting the same variables).

    >>> launched_by_torchrun() == (int(os.environ.get("WORLD_SIZE", "1")) > 1)
    True
    """
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def rank_device(device: str) -> str:
    """The device of this rank: ``cuda:LOCAL_RANK`` (one rank per GPU) when the run asks for CUDA, else as asked.

    >>> rank_device("cpu")
    'cpu'
    """
    if device.startswith("cuda") and launched_by_torchrun():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def log_prefix() -> str:
    """What each log line of a rank starts with ("" in a run of one process)."""
    if not launched_by_torchrun():
        return ""
    return f"[rank {os.environ['RANK']}/{os.environ['WORLD_SIZE']}] "


@contextlib.contextmanager
def process_group(device: str) -> Iterator[Distributed]:
    """The run's group: a `ProcessGroup` from torchrun's environment (``env://``), torn down at the end, or the
    single-process `Distributed` when not launched by torchrun.

    Args:
        device: the run's device as `rank_device` gives it: NCCL for CUDA, gloo otherwise.
    """
    if not launched_by_torchrun():
        yield Distributed()
        return
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = torch.device(device)
    if target.type == "cuda":
        torch.cuda.set_device(target)
        dist.init_process_group("nccl", timeout=COLLECTIVE_TIMEOUT, device_id=target)
    else:
        dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    logger.info(
        "rank %d of %d (local rank %d) on %s, backend %s", rank, world_size, local_rank, device, dist.get_backend()
    )
    try:
        yield ProcessGroup(rank, world_size, local_rank, target if target.type == "cuda" else torch.device("cpu"))
    finally:
        dist.destroy_process_group()


__all__ = [
    "COLLECTIVE_TIMEOUT",
    "Distributed",
    "ProcessGroup",
    "ReduceOp",
    "launched_by_torchrun",
    "log_prefix",
    "process_group",
    "rank_device",
]
