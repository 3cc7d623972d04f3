"""Run the precompute: validate, stream the dataset through every stage, write the SQLite file, resume.

Order of work, so that bad input costs nothing and loses nothing:
1. resolve and load every model, check they share a tokenizer, build the dataset (all errors surface here,
   before any file is created);
2. open the store (Alembic ``upgrade head``) and find the run with the same configuration hash, or create one;
3. stream batches: every stage that needs activations sees the same forward passes (one per model and batch);
   a stage that needs more passes over the rows (the correlation engine under a memory budget) gets them alone;
   the state of every stage is checkpointed next to the DB so a killed run resumes at the last checkpoint;
4. each stage writes its tables (the pipeline first deletes the rows its declared tables hold for the run's
   models, so a re-run is idempotent), then the run is marked complete. Until that moment the run's status says
   it is not.

The stages are the classes of `precompute.stages.STAGES`. Between steps 1 and 2 the pipeline plans the run's
memory (`plan_memory`, issue 11): the models, one batch, and what every stage declares it holds at each moment
(`Stage.memory_bytes`), fitted under ``--memory-budget-gb`` by splitting what can be split (more passes over the
rows for the correlation accumulators, the token tables and the feature sums; smaller batches). A run that does
not fit however it is split is refused before the DB exists; the plan is logged as a table and kept in the run
record (``runs.environment["memory_plan"]``, outside the hashed configuration, with the measured peak).

Under torchrun (`precompute.distributed`, docs/distributed.md) every rank plans, loads and validates the same way;
rank 0 opens the store, finds or creates the run and tells the others its id and split. The batches are dealt out
in turn (rank 0 reads the first: the stages' pilot), each rank folds its own into its stages, and before each pass
closes the stages combine their state across the ranks (`Stage.reduce`). The correlation passes of a run split into
several are split between the ranks instead: each rank makes its own over every row, while the other stages go on
reading their share, and the ranks' results are merged when all are done (`Stage.reads_every_row`, `Stage.gather`,
docs/distributed.md). Checkpoints are per rank, written together, and a run resumes only from a set written at one
moment by as many ranks. Rank 0 alone writes the tables; the other ranks end when the streaming does.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import platform
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from precompute.activations import ActivationBatch, HookKind, batch_bytes, stream_batches
from precompute.correlation import CorrelationConfig, model_pairs
from precompute.data import DatasetConfig, TokenDataset, build_dataset
from precompute.distributed import Distributed
from precompute.memory import (
    DEFAULT_SHARE,
    GIB,
    MemoryPlan,
    Split,
    available_bytes,
    fit_split,
    map_large_allocations,
    resident_bytes,
    size_text,
    trim_heap,
)
from precompute.models import LoadedModel, decoded_vocab, load_family
from precompute.presets import PRESETS
from precompute.stage_config import ConfigError, stage_config
from precompute.stages import DEFAULT_STAGES, STAGES_BY_NAME, CorrelationStage, RunContext, RunInputs, Stage
from precompute.store import AtlasStore, config_hash

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrecomputeConfig:
    """Everything one precompute run needs; all of it except `db`, `stages` and checkpointing is recorded."""

    db: Path
    models: tuple[str, ...]
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    correlation: CorrelationConfig = field(default_factory=CorrelationConfig)
    threshold: float = 0.5
    device: str = "cpu"
    dtype: str = "float32"
    stages: tuple[str, ...] = DEFAULT_STAGES
    checkpoint_seconds: float = 300.0
    analysis: dict[str, Any] = field(default_factory=dict)
    preset: str | None = None  # the name of the `precompute.presets` preset the values came from, recorded

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; presets are {', '.join(PRESETS)}")
        unknown = [s for s in self.stages if s not in STAGES_BY_NAME]
        if unknown:
            raise ConfigError(f"unknown stage {unknown[0]!r}; stages are {', '.join(STAGES_BY_NAME)}")
        if not self.stages:
            raise ConfigError("give at least one stage")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ConfigError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r} asked for, but torch sees no CUDA device")
        if not -1.0 <= self.threshold <= 2.0:
            raise ConfigError(f"threshold {self.threshold} is outside the range of an excess correlation")
        check_analysis_settings(self.stages, self.analysis)

    def record(self) -> dict[str, Any]:
        """The configuration that identifies a run (a re-run with the same record resumes it)."""
        return {
            "models": list(self.models),
            "dataset": asdict(self.dataset),
            "correlation": asdict(self.correlation),
            "threshold": self.threshold,
            "device": self.device,
            "dtype": self.dtype,
            "analysis": self.analysis,
            "preset": self.preset,
        }


def check_analysis_settings(stages: tuple[str, ...], analysis: dict[str, Any]) -> None:
    """Refuse unknown or mistyped stage settings before any work (each stage's ``config_class``)."""
    unknown = sorted(set(analysis) - set(STAGES_BY_NAME))
    if unknown:
        raise ConfigError(f"settings for unknown stage {unknown[0]!r}; stages are {', '.join(STAGES_BY_NAME)}")
    for name in stages:
        config_class = STAGES_BY_NAME[name].config_class
        if config_class is not None:
            stage_config(config_class, analysis.get(name), name)
        elif analysis.get(name):
            raise ConfigError(f"stage {name!r} takes no settings")


def environment_record(device: str) -> dict[str, Any]:
    """Versions and hardware that produced the run."""
    versions = {}
    for package in ("universal-neuron-atlas", "torch", "transformers", "transformer-lens", "tokenizers", "numpy"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    record: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "packages": versions,
        "device": device,
    }
    if device.startswith("cuda"):
        record["gpu"] = torch.cuda.get_device_name(torch.device(device))
    commit = _git_commit()
    if commit:
        record["git_commit"] = commit
    return record


def _git_commit() -> str | None:
    head = Path(__file__).resolve().parent.parent / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            return (head.parent / ref[5:]).read_text().strip()[:12]
        return ref[:12]
    except OSError:
        return None


def checkpoint_path(db: Path, run_id: int, rank: int = 0) -> Path:
    """Where a run's streaming state is kept: ``run-<id>.pt``, and ``run-<id>.rank-<r>.pt`` for the other ranks
    of a distributed run.

    >>> checkpoint_path(Path("atlas.db"), 1, rank=1).as_posix()
    'atlas.db.checkpoints/run-1.rank-1.pt'
    """
    name = f"run-{run_id}.pt" if rank == 0 else f"run-{run_id}.rank-{rank}.pt"
    return db.with_name(db.name + ".checkpoints") / name


def _save_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)  # atomic: a kill mid-write leaves the previous checkpoint intact


def _torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def prepare(config: PrecomputeConfig) -> tuple[list[LoadedModel], TokenDataset]:
    """Load the family and build the dataset: every input error is raised here, before the DB exists."""
    models = load_family(config.models, device=config.device, dtype=_torch_dtype(config.dtype))
    n_ctx = min(m.n_ctx for m in models)
    dataset = build_dataset(config.dataset, models[0].tokenizer, n_ctx)
    return models, dataset


def models_bytes(models: list[LoadedModel]) -> int:
    """The memory of the loaded models: every distinct storage of their parameters and buffers."""
    seen: dict[int, int] = {}
    for model in models:
        for tensor in [*model.bridge.parameters(), *model.bridge.buffers()]:
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def memory_pricer(
    config: PrecomputeConfig,
    models: Sequence[LoadedModel],
    dataset: TokenDataset,
    budget: int,
    held: int,
    runtime: int = 0,
    world_size: int = 1,
) -> Callable[[Split], MemoryPlan]:
    """The plan of any split of this run: the models (``held`` bytes), one batch, and every stage's declaration
    (per rank: in a run of ``world_size`` ranks, what the rank that holds the most holds)."""
    classes = [STAGES_BY_NAME[name] for name in config.stages]
    kinds = frozenset[HookKind]().union(*(c.hooks for c in classes))

    def price(candidate: Split) -> MemoryPlan:
        inputs = RunInputs(config=config, models=models, dataset=dataset, split=candidate, world_size=world_size)
        rows = min(candidate.batch_rows or dataset.config.batch_size, dataset.n_rows)
        batch = batch_bytes(models, len(kinds), rows, dataset.ctx, "hook_pre" in kinds) if kinds else 0
        stages = {c.name: c.memory_bytes(inputs) for c in classes}
        return MemoryPlan(budget, held, batch, stages, candidate, runtime)

    return price


#: The most passes over the rows a plan considers for the neuron-block splits (more are possible, but each pass
#: runs one model or more over the whole dataset again).
MAX_PASSES = 64


def fit_plan(
    price: Callable[[Split], MemoryPlan],
    config: PrecomputeConfig,
    models: Sequence[LoadedModel],
    max_passes: int = MAX_PASSES,
) -> MemoryPlan:
    """The cheapest split of the run that fits its budget (`precompute.memory.fit_split`)."""
    pairs = model_pairs(len(models), config.correlation.reference_only)
    tiles = sum(models[a].n_layers * models[b].n_layers for a, b in pairs)  # the most passes the correlations use
    splittable = [name for name in config.stages if STAGES_BY_NAME[name].splittable]
    return fit_split(price, splittable, config.dataset.batch_size, max(max_passes, tiles))


def plan_memory(
    config: PrecomputeConfig,
    models: list[LoadedModel],
    dataset: TokenDataset,
    split: Split | None = None,
    world_size: int = 1,
) -> MemoryPlan:
    """The run's memory plan under its budget (a rank's, in a run of ``world_size`` ranks): the given split, or
    the cheapest that fits.

    Raises:
        MemoryBudgetError: nothing fits; the message gives the least budget that would.
    """
    held = models_bytes(models)
    # The budget is for the run's work: the models are loaded already, outside it, like the runtime (the plan's
    # total, which the measured peak is held against, still counts them). --memory-budget-gb, or a share of what
    # is left after loading.
    if config.correlation.memory_budget_gb is not None:  # the run's budget (a correlation option before issue 11)
        budget = held + int(config.correlation.memory_budget_gb * GIB)
    else:
        budget = held + int(DEFAULT_SHARE * available_bytes(config.device))
    runtime = max(0, resident_bytes() - held) if not config.device.startswith("cuda") else 0
    price = memory_pricer(config, models, dataset, budget, held, runtime, world_size)
    return price(split) if split is not None else fit_plan(price, config, models)


def run_precompute(config: PrecomputeConfig, group: Distributed | None = None) -> int:
    """Run (or resume) a precompute and return its run id.

    Args:
        group: the ranks of a distributed run (`precompute.distributed.process_group`); None: this process alone.
            Every rank streams its share of the batches; rank 0 alone opens the store and writes the tables.
    """
    group = group or Distributed()
    map_large_allocations()  # so that freed temporaries leave the process, as the memory plan assumes
    models, dataset = prepare(config)
    trim_heap()  # what loading freed, before the plan measures the runtime
    if not group.is_main:
        return _follow(config, group, models, dataset)
    # a run that cannot fit is refused here, before the DB exists
    plan = plan_memory(config, models, dataset, world_size=group.world_size)
    logger.info("memory plan (budget %s):\n%s", size_text(plan.budget), plan.table())
    forwards = planned_forwards(config, models, dataset, plan.split)
    if len(forwards) > 1:
        logger.info(
            "%d passes over the rows run %d models' forward passes in all (%s)",
            len(forwards),
            sum(map(len, forwards)),
            ", ".join(str(len(names)) for names in forwards),
        )
    store = AtlasStore(config.db)
    try:
        return _run(config, store, models, dataset, plan, group)
    finally:
        store.close()


def _follow(config: PrecomputeConfig, group: Distributed, models: list[LoadedModel], dataset: TokenDataset) -> int:
    """A rank other than 0: stream its share of the batches of rank 0's run, with rank 0's split (the plan is per
    rank, but every rank must cut the work alike), then end: rank 0 writes the tables."""
    message: dict[str, Any] = group.broadcast_object({})  # rank 0's
    run_id = int(message["run_id"])
    if message["split"] is None:  # the run is complete already
        return run_id
    split = Split(message["split"]["passes"], message["split"]["batch_rows"])
    plan = plan_memory(config, models, dataset, split, world_size=group.world_size)
    if not plan.fits:
        logger.warning("rank 0's split needs %s here, over this rank's budget", size_text(plan.total))
    inputs = RunInputs(
        config=config, models=models, dataset=dataset, split=split, rank=group.rank, world_size=group.world_size
    )
    _stream_stages(inputs, config, checkpoint_path(config.db, run_id, group.rank), group)
    logger.info("streaming done: rank 0 writes the tables of run %s", run_id)
    return run_id


def _run(
    config: PrecomputeConfig,
    store: AtlasStore,
    models: list[LoadedModel],
    dataset: TokenDataset,
    plan: MemoryPlan,
    group: Distributed,
) -> int:
    record = config.record()
    digest = config_hash(record)
    existing = store.find_run(digest)
    if existing and existing["status"] == "complete" and set(config.stages) <= set(existing["stages"] or []):
        logger.info("run %s with this configuration is already complete in %s", existing["id"], config.db)
        group.broadcast_object({"run_id": int(existing["id"]), "split": None})
        return int(existing["id"])
    if existing:
        run_id = int(existing["id"])
        logger.info("resuming run %s (status %s)", run_id, existing["status"])
        store.update_run(run_id, status="running", error=None)
    else:
        environment = environment_record(config.device)
        if group.world_size > 1:
            environment["world_size"] = group.world_size
        run_id = store.create_run(record, environment, dataset.description)
    store.update_run(run_id, tokens_seen=dataset.tokens_seen, tokens_counted=dataset.tokens_counted)
    model_ids = {
        m.name: store.add_model(run_id, position=i, is_reference=(i == 0), **m.record()) for i, m in enumerate(models)
    }
    store.write_vocab(run_id, decoded_vocab(models[0].tokenizer, models[0].d_vocab))
    plan = _resumable_plan(config, models, dataset, plan, checkpoint_path(config.db, run_id), group.world_size)
    group.broadcast_object({"run_id": run_id, "split": plan.split.record()})
    _record_plan(store, run_id, plan)
    context = RunContext(
        config=config,
        models=models,
        dataset=dataset,
        store=store,
        run_id=run_id,
        model_ids=model_ids,
        split=plan.split,
        world_size=group.world_size,
    )
    try:
        _run_stages(context, config, group)
        _record_plan(store, run_id, plan, measured_peak=_peak_resident_bytes())
    except BaseException as exc:
        reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"
        store.fail_run(run_id, reason)
        raise
    store.finish_run(run_id)
    store.compact()  # VACUUM: rewritten tables leave free pages (issue 11)
    checkpoint = checkpoint_path(config.db, run_id)
    checkpoint.unlink(missing_ok=True)
    for rank in range(1, group.world_size):  # the other ranks' (on a shared file system)
        checkpoint_path(config.db, run_id, rank).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        checkpoint.parent.rmdir()
    logger.info("run %s complete: %s", run_id, config.db)
    return run_id


def _resumable_plan(
    config: PrecomputeConfig,
    models: list[LoadedModel],
    dataset: TokenDataset,
    plan: MemoryPlan,
    checkpoint: Path,
    world_size: int = 1,
) -> MemoryPlan:
    """The split of an interrupted run's checkpoint when it still fits the budget (the stages' state in it is cut
    that way), else this plan: the checkpoint is then of no use and the run starts over."""
    if not checkpoint.exists():
        return plan
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True).get("split")
    if saved is None or saved == plan.split.record():
        return plan
    resumed = plan_memory(config, models, dataset, Split(saved["passes"], saved["batch_rows"]), world_size)
    if resumed.fits:
        logger.info("resuming with the checkpoint's split: %s", saved)
        return resumed
    logger.warning("the checkpoint's split %s no longer fits the budget: starting the streaming over", saved)
    checkpoint.unlink()
    return plan


class _Clock:
    """Wall and CPU seconds of this process from a start, added under a name and under ``NAME_cpu``: the CPU time
    holds on a machine shared with other work, where the wall clock moved 2-3x between two runs (bench/scale.py
    fits its cost model on it)."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def add(self, seconds: dict[str, float], name: str) -> float:
        """Add the time since the start to ``seconds``; the wall seconds."""
        wall = time.perf_counter() - self.wall
        seconds[name] = seconds.get(name, 0.0) + wall
        seconds[f"{name}_cpu"] = seconds.get(f"{name}_cpu", 0.0) + time.process_time() - self.cpu
        return wall


def _synchronize(device: str) -> None:
    """Wait for the GPU's queued work, so that a stage's clock holds its own kernels (CUDA runs asynchronously: the
    time would otherwise land on whichever stage next reads a result). One wait a batch and stage costs little."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _peak_resident_bytes() -> int:
    """The process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _record_plan(store: AtlasStore, run_id: int, plan: MemoryPlan, measured_peak: int | None = None) -> None:
    """Keep the memory plan in the run's environment record (not in the hashed configuration)."""
    environment = dict(store.get_run(run_id)["environment"] or {})
    measured = {"measured_peak_rss": measured_peak} if measured_peak else {}
    if measured_peak and torch.cuda.is_available() and torch.cuda.is_initialized():
        measured["measured_peak_cuda_allocated"] = torch.cuda.max_memory_allocated()
    environment["memory_plan"] = plan.record() | measured
    store.update_run(run_id, environment=environment)


def _record_streaming(
    context: RunContext, stages: Sequence[Stage], group: Distributed, forwards: list[list[str]]
) -> None:
    """Keep in the run's environment record the models each pass over the rows ran (rank 0's:
    ``forward_models_by_pass``), how many ranks streamed it and, when the ranks split a stage's passes between
    them (`CorrelationStage.passes_by_rank`), which passes each rank made."""
    environment = dict(context.store.get_run(context.run_id)["environment"] or {})
    environment.pop("passes_by_rank", None)
    environment["forward_models_by_pass"] = forwards
    if group.world_size > 1:
        environment["world_size"] = group.world_size
        by_rank = {
            stage.name: passes
            for stage in stages
            if isinstance(stage, CorrelationStage) and (passes := stage.passes_by_rank(group.world_size))
        }
        if by_rank:
            environment["passes_by_rank"] = by_rank
    else:
        environment.pop("world_size", None)
    context.store.update_run(context.run_id, environment=environment)


def write_stage(stage: Stage, context: RunContext) -> None:
    """Delete the rows the stage's tables hold for the run's models, then let the stage write them again."""
    context.store.clear_model_tables(context.model_ids.values(), stage.tables)
    stage.write(context)


def _run_stages(context: RunContext, config: PrecomputeConfig, group: Distributed | None = None) -> None:
    group = group or Distributed()
    stages, seconds, forwards = _stream_stages(context, config, checkpoint_path(config.db, context.run_id), group)
    _record_streaming(context, stages, group, forwards)
    while stages:  # each stage is dropped once written: the plan's writing phase counts only the rest
        stage = stages.pop(0)
        clock = _Clock()
        write_stage(stage, context)
        clock.add(seconds, f"{stage.name}_write")
        context.store.mark_stage_done(context.run_id, stage.name, seconds[stage.name])
        for name in (f"{stage.name}_cpu", f"{stage.name}_close", f"{stage.name}_write", f"{stage.name}_write_cpu"):
            context.store.record_timing(context.run_id, name, seconds.get(name, 0.0))
        del stage
        trim_heap()
    for name in ("forward", "forward_cpu"):
        context.store.record_timing(context.run_id, name, seconds.get(name, 0.0))


#: How the split stats and families stages cut their neurons into passes (`precompute.stages.base.family_blocks`),
#: kept in the checkpoint: before it every pass held a block of every model ("per-model"), and such a checkpoint's
#: blocks are not this code's.
BLOCK_LAYOUT = "family-order"


def _same_blocks(state: dict, split: Split) -> bool:
    """The checkpoint's stats and families blocks are this code's: the same layout, or one pass (no blocks)."""
    if state.get("blocks", "per-model") == BLOCK_LAYOUT:
        return True
    if split.passes_for("stats") <= 1 and split.passes_for("families") <= 1:
        return True
    logger.warning("the checkpoint's neuron blocks were cut by an older version: streaming from the start")
    return False


def _resume_point(path: Path, inputs: RunInputs, stages: Sequence[Stage], group: Distributed) -> dict | None:
    """The checkpoint to resume from, or None: it must be of these stages, dataset and split, and in a
    distributed run every rank's must be from the same save by as many ranks (the files are replaced together,
    but a kill can fall between two replacements: then the streaming starts over)."""
    state = None
    if path.exists():
        # mapped, not read: each stage's state is replaced by the checkpoint's without holding both in memory
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        usable = (
            state["stages"].keys() == {s.name for s in stages}
            and state["dataset"] == inputs.dataset.fingerprint()
            and state.get("split", inputs.split.record()) == inputs.split.record()
            and state.get("world_size", 1) == group.world_size
            and _same_blocks(state, inputs.split)
        )
        state = state if usable else None
    moment = None if state is None else (state["rows_done"], state.get("saves", 0))
    moments = group.all_gather_object(moment)
    if moment is not None and all(m == moment for m in moments):
        return state
    if group.world_size > 1 and any(m is not None for m in moments):
        logger.warning("the ranks' checkpoints are not of one moment (%s): streaming from the start", moments)
    return None


def _batches_after(held: list[ActivationBatch], rest: Iterator[ActivationBatch]) -> Iterator[ActivationBatch]:
    """The held batch (popped, so nothing else keeps it once it is folded in), then the rest."""
    while held:
        yield held.pop()
    yield from rest


def planned_forwards(
    config: PrecomputeConfig, models: Sequence[LoadedModel], dataset: TokenDataset, split: Split
) -> list[list[str]]:
    """The models each pass over the rows will run, in the run's order (`Stage.models_by_pass`: a pass runs the
    models its stages read), for one process: what the forward passes cost is the tokens times the sum of their
    lengths, not times the passes and the models.

    A stage's passes are the run's first ones (every streaming stage starts in the first pass)."""
    inputs = RunInputs(config=config, models=models, dataset=dataset, split=split)
    by_stage = [STAGES_BY_NAME[name].models_by_pass(inputs) for name in config.stages]
    return [
        [m.name for m in _read_by_any(models, [passes[index] for passes in by_stage if index < len(passes)])]
        for index in range(max(map(len, by_stage), default=0))
    ]


def pass_models(models: Sequence[LoadedModel], active: Sequence[Stage]) -> list[LoadedModel]:
    """The models whose forward passes a pass over the rows runs: those some active stage reads in its current pass
    (`Stage.models_in_pass`), in the run's order. A split stage reads one or two models in each pass after its
    first, so a run split into many passes by its memory budget does not run every model in each of them."""
    return _read_by_any(models, [stage.models_in_pass() for stage in active])


def _read_by_any(models: Sequence[LoadedModel], wanted: Sequence[frozenset[str] | None]) -> list[LoadedModel]:
    """The models, in the run's order, that any of ``wanted`` names (None names every model)."""
    if any(names is None for names in wanted):
        return list(models)
    names = frozenset[str]().union(*(names for names in wanted if names is not None))
    return [model for model in models if model.name in names]


def _rank_batches(
    inputs: RunInputs,
    config: PrecomputeConfig,
    active: Sequence[Stage],
    running: Sequence[LoadedModel],
    rows_done: int,
    group: Distributed,
    every_row: bool,
    own_rows: bool,
) -> Iterator[ActivationBatch]:
    """This rank's batches of a pass from ``rows_done`` on, for the ``active`` stages (none: no batches), with the
    activations of the ``running`` models (`pass_models`).

    Args:
        every_row: every batch (a pass of this rank's own), as one process reads them.
        own_rows: the pass is one in which some rank reads every row (the steps are of one batch): without
            ``every_row``, this rank reads the batches of index r, r + N, ... (counted from the dataset's first),
            as in a pass whose rows are dealt out. Otherwise the batches are dealt out from ``rows_done`` on.
    """
    if not active:
        return iter(())
    rows_per_batch = inputs.split.batch_rows or inputs.dataset.config.batch_size
    rank, world_size, start = group.rank, group.world_size, rows_done
    if every_row:
        rank, world_size = 0, 1
    elif own_rows:  # the dealing must not shift with the row a resumed pass starts at
        first = -(-rows_done // rows_per_batch)
        first += (group.rank - first) % group.world_size  # this rank's first batch from rows_done on
        start = (first - group.rank) * rows_per_batch
    kinds: list[HookKind] = sorted(frozenset[HookKind]().union(*(s.hooks for s in active)))
    return stream_batches(
        running,
        inputs.dataset,
        kinds,
        start,
        config.device,
        description="+".join(s.name for s in active),
        batch_rows=inputs.split.batch_rows,
        rank=rank,
        world_size=world_size,
    )


def _stream_stages(
    inputs: RunInputs, config: PrecomputeConfig, checkpoint: Path, group: Distributed
) -> tuple[list[Stage], dict[str, float], list[list[str]]]:
    """Build the stages and stream this rank's batches through them until every stage is done, checkpointing
    (resumed from the checkpoint when it is usable); returns the stages, the seconds each took and the models
    each pass over the rows ran.

    Several ranks take the same steps of every pass: a step of one batch per rank when the rows are dealt out,
    or of one batch when some rank makes a pass of its own over every row (`Stage.reads_every_row`). Once no
    rank streams, the stages merge what the ranks made apart (`Stage.gather`) before the last checkpoint."""
    stages: list[Stage] = [STAGES_BY_NAME[name](inputs) for name in config.stages]
    rows_done, saves = 0, 0  # rows_done: the first row of the next step (every rank's next batch follows it)
    seconds: dict[str, float] = {stage.name: 0.0 for stage in stages}
    seconds["forward"] = 0.0
    forwards: list[list[str]] = []  # the models each pass ran (`pass_models`), this rank's
    state = _resume_point(checkpoint, inputs, stages, group)
    if state is not None:
        rows_done, saves = state["rows_done"], state.get("saves", 0)
        seconds = state["seconds"]
        forwards = state.get("forwards", [])
        for stage in stages:
            stage.load_state_dict(state["stages"][stage.name])
        logger.info("resuming from checkpoint at row %s", rows_done)
    del state
    needs_pilot = group.world_size > 1 and rows_done == 0 and saves == 0  # a fresh start of several ranks

    def save() -> float:
        """Write the checkpoint; returns the seconds to wait before the next one.

        Never less than ten times what this save took, so a large state (GPT-2-sized accumulators are tens of
        GB) is not written more than a tenth of the time, whatever --checkpoint-seconds says.
        """
        nonlocal saves
        saves += 1
        save_started = time.monotonic()
        payload = {
            "rows_done": rows_done,
            "seconds": seconds,
            "dataset": inputs.dataset.fingerprint(),
            "split": inputs.split.record(),
            "world_size": group.world_size,
            "saves": saves,
            "forwards": forwards,
            "blocks": BLOCK_LAYOUT,
            "stages": {stage.name: stage.state_dict() for stage in stages},
        }
        if group.world_size == 1:
            _save_checkpoint(checkpoint, payload)
        else:  # every rank writes its file aside, then all replace theirs: the files on disk are of one moment
            staged = checkpoint.with_name(checkpoint.name + ".staged")
            _save_checkpoint(staged, payload)
            group.barrier()
            os.replace(staged, checkpoint)
        return max(config.checkpoint_seconds, 10 * (time.monotonic() - save_started))

    rows_per_batch = inputs.split.batch_rows or inputs.dataset.config.batch_size
    interval = config.checkpoint_seconds
    last_save = time.monotonic()
    while True:
        active = [s for s in stages if s.hooks and not s.done_streaming]
        whole = [s for s in active if s.reads_every_row]  # passes of this rank's own: every batch
        # the ranks agree on the pass: none streams (done), the rows are dealt out, or some rank makes passes of
        # its own over every row (the correlations when the ranks split its passes). In such a pass every rank
        # takes a step per batch and the other stages still read only the rank's share (batch index % N == r).
        mode = group.all_reduce_int(2 if whole else int(bool(active)), "max")
        if mode == 0:
            break
        own_rows = mode == 2
        step = rows_per_batch if own_rows else rows_per_batch * group.world_size  # every rank's batches of a step
        started = _Clock()
        running = pass_models(inputs.models, active) if active else []
        if rows_done == 0:  # a new pass (a resumed one is on the list already)
            forwards.append([model.name for model in running])
        batches = _rank_batches(
            inputs, config, active, running, rows_done, group, every_row=bool(whole), own_rows=own_rows
        )
        if needs_pilot:  # rank 0's first batch is the dataset's first: every rank's pilot (a shift, bin edges)
            held = [first] if group.is_main and (first := next(batches, None)) is not None else []
            for stage in (s for s in stages if s.hooks):  # a rank without a pass of its own still takes part
                stage.share_pilot(group, held[0] if held else None)
            batches, needs_pilot = _batches_after(held, batches), False
            del held
        # every rank takes the same steps (in the last, some may have no batch), so they checkpoint together
        for step_start in range(rows_done, inputs.dataset.n_rows, step):
            # a step of one batch: is it this rank's share (for the stages that split the rows)?
            mine = not own_rows or (step_start // rows_per_batch) % group.world_size == group.rank
            batch = next(batches, None) if (whole or mine) and active else None
            if batch is not None:
                _synchronize(config.device)
                started.add(seconds, "forward")
                for stage in active:
                    if not mine and not stage.reads_every_row:
                        continue
                    clock = _Clock()
                    stage.update(batch)
                    _synchronize(config.device)
                    clock.add(seconds, stage.name)
            rows_done = min(step_start + step, inputs.dataset.n_rows)
            del batch  # closing the pass (and the checkpoint) need the batch's memory: its plan has none
            if group.agree(time.monotonic() - last_save > interval):
                interval = save()
                last_save = time.monotonic()
            started = _Clock()
        next(batches, None)  # the end of the batches: their progress bar closes
        for stage in active:
            clock = _Clock()
            if group.world_size > 1:
                stage.reduce(group)  # every rank's share of the pass, combined before the pass closes
            stage.finish_pass()
            closing = clock.add(seconds, stage.name)  # in the stage's own time, and apart: it does not grow with tokens
            seconds[f"{stage.name}_close"] = seconds.get(f"{stage.name}_close", 0.0) + closing
        rows_done = 0
        logger.info("pass over the rows done: %s", ", ".join(s.name for s in active) or "(none on this rank)")
        streaming = bool(group.all_reduce_int(int(any(s.hooks and not s.done_streaming for s in stages)), "max"))
        if not streaming and group.world_size > 1:  # every rank's passes made: merge what they made apart
            for stage in stages:
                stage.gather(group)
        # the end of the last pass is always kept (writing can then be retried without streaming); between passes
        # the interval rule holds, as within a pass: a split run's state is GBs, written once per pass it cost
        # more than the passes (issue 11)
        if group.agree(not streaming or time.monotonic() - last_save > interval):
            interval = save()
            last_save = time.monotonic()
    return stages, seconds, forwards
