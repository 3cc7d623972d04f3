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
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import platform
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from precompute.activations import HookKind, batch_bytes, stream_batches
from precompute.correlation import CorrelationConfig, model_pairs
from precompute.data import DatasetConfig, TokenDataset, build_dataset
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
from precompute.stages import DEFAULT_STAGES, STAGES_BY_NAME, RunContext, RunInputs, Stage
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


def checkpoint_path(db: Path, run_id: int) -> Path:
    return db.with_name(db.name + ".checkpoints") / f"run-{run_id}.pt"


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
) -> Callable[[Split], MemoryPlan]:
    """The plan of any split of this run: the models (``held`` bytes), one batch, and every stage's declaration."""
    classes = [STAGES_BY_NAME[name] for name in config.stages]
    kinds = frozenset[HookKind]().union(*(c.hooks for c in classes))

    def price(candidate: Split) -> MemoryPlan:
        inputs = RunInputs(config=config, models=models, dataset=dataset, split=candidate)
        rows = min(candidate.batch_rows or dataset.config.batch_size, dataset.n_rows)
        batch = batch_bytes(models, len(kinds), rows, dataset.ctx, "hook_pre" in kinds) if kinds else 0
        stages = {c.name: c.memory_bytes(inputs) for c in classes}
        return MemoryPlan(budget, held, batch, stages, candidate, runtime)

    return price


#: The most passes over the rows a plan considers for the neuron-block splits (more are possible, but each pass
#: runs every model over the whole dataset again).
MAX_PASSES = 64


def fit_plan(
    price: Callable[[Split], MemoryPlan],
    config: PrecomputeConfig,
    models: Sequence[LoadedModel],
    max_passes: int = MAX_PASSES,
) -> MemoryPlan:
    """The cheapest split of the run that fits its budget (`precompute.memory.fit_split`)."""
    pairs = model_pairs(len(models), config.correlation.reference_only)
    layer_blocks = sum(models[a].n_layers for a, _ in pairs)  # the most passes the correlations can use
    splittable = [name for name in config.stages if STAGES_BY_NAME[name].splittable]
    return fit_split(price, splittable, config.dataset.batch_size, max(max_passes, layer_blocks))


def plan_memory(
    config: PrecomputeConfig, models: list[LoadedModel], dataset: TokenDataset, split: Split | None = None
) -> MemoryPlan:
    """The run's memory plan under its budget: the given split, or the cheapest that fits.

    Raises:
        MemoryBudgetError: nothing fits; the message gives the least budget that would.
    """
    held = models_bytes(models)
    if config.correlation.memory_budget_gb is not None:  # the run's budget (a correlation option before issue 11)
        budget = int(config.correlation.memory_budget_gb * GIB)
    else:  # the models are loaded already: a share of what is left, plus them
        budget = held + int(DEFAULT_SHARE * available_bytes(config.device))
    runtime = max(0, resident_bytes() - held) if not config.device.startswith("cuda") else 0
    price = memory_pricer(config, models, dataset, budget, held, runtime)
    return price(split) if split is not None else fit_plan(price, config, models)


def run_precompute(config: PrecomputeConfig) -> int:
    """Run (or resume) a precompute and return its run id."""
    map_large_allocations()  # so that freed temporaries leave the process, as the memory plan assumes
    models, dataset = prepare(config)
    trim_heap()  # what loading freed, before the plan measures the runtime
    plan = plan_memory(config, models, dataset)  # a run that cannot fit is refused here, before the DB exists
    logger.info("memory plan (budget %s):\n%s", size_text(plan.budget), plan.table())
    store = AtlasStore(config.db)
    try:
        return _run(config, store, models, dataset, plan)
    finally:
        store.close()


def _run(
    config: PrecomputeConfig, store: AtlasStore, models: list[LoadedModel], dataset: TokenDataset, plan: MemoryPlan
) -> int:
    record = config.record()
    digest = config_hash(record)
    existing = store.find_run(digest)
    if existing and existing["status"] == "complete" and set(config.stages) <= set(existing["stages"] or []):
        logger.info("run %s with this configuration is already complete in %s", existing["id"], config.db)
        return int(existing["id"])
    if existing:
        run_id = int(existing["id"])
        logger.info("resuming run %s (status %s)", run_id, existing["status"])
        store.update_run(run_id, status="running", error=None)
    else:
        run_id = store.create_run(record, environment_record(config.device), dataset.description)
    store.update_run(run_id, tokens_seen=dataset.tokens_seen, tokens_counted=dataset.tokens_counted)
    model_ids = {
        m.name: store.add_model(run_id, position=i, is_reference=(i == 0), **m.record()) for i, m in enumerate(models)
    }
    store.write_vocab(run_id, decoded_vocab(models[0].tokenizer, models[0].d_vocab))
    plan = _resumable_plan(config, models, dataset, plan, checkpoint_path(config.db, run_id))
    _record_plan(store, run_id, plan)
    context = RunContext(
        config=config, models=models, dataset=dataset, store=store, run_id=run_id, model_ids=model_ids, split=plan.split
    )
    try:
        _run_stages(context, config)
        _record_plan(store, run_id, plan, measured_peak=_peak_resident_bytes())
    except BaseException as exc:
        reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"
        store.fail_run(run_id, reason)
        raise
    store.finish_run(run_id)
    checkpoint = checkpoint_path(config.db, run_id)
    checkpoint.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        checkpoint.parent.rmdir()
    logger.info("run %s complete: %s", run_id, config.db)
    return run_id


def _resumable_plan(
    config: PrecomputeConfig, models: list[LoadedModel], dataset: TokenDataset, plan: MemoryPlan, checkpoint: Path
) -> MemoryPlan:
    """The split of an interrupted run's checkpoint when it still fits the budget (the stages' state in it is cut
    that way), else this plan: the checkpoint is then of no use and the run starts over."""
    if not checkpoint.exists():
        return plan
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True).get("split")
    if saved is None or saved == plan.split.record():
        return plan
    resumed = plan_memory(config, models, dataset, Split(saved["passes"], saved["batch_rows"]))
    if resumed.fits:
        logger.info("resuming with the checkpoint's split: %s", saved)
        return resumed
    logger.warning("the checkpoint's split %s no longer fits the budget: starting the streaming over", saved)
    checkpoint.unlink()
    return plan


def _peak_resident_bytes() -> int:
    """The process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _record_plan(store: AtlasStore, run_id: int, plan: MemoryPlan, measured_peak: int | None = None) -> None:
    """Keep the memory plan in the run's environment record (not in the hashed configuration)."""
    environment = dict(store.get_run(run_id)["environment"] or {})
    environment["memory_plan"] = plan.record() | ({"measured_peak_rss": measured_peak} if measured_peak else {})
    store.update_run(run_id, environment=environment)


def write_stage(stage: Stage, context: RunContext) -> None:
    """Delete the rows the stage's tables hold for the run's models, then let the stage write them again."""
    context.store.clear_model_tables(context.model_ids.values(), stage.tables)
    stage.write(context)


def _run_stages(context: RunContext, config: PrecomputeConfig) -> None:
    stages: list[Stage] = [STAGES_BY_NAME[name](context) for name in config.stages]
    checkpoint = checkpoint_path(config.db, context.run_id)
    rows_done = 0
    seconds: dict[str, float] = {stage.name: 0.0 for stage in stages}
    seconds["forward"] = 0.0
    if checkpoint.exists():
        # mapped, not read: each stage's state is replaced by the checkpoint's without holding both in memory
        state = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)
        same_split = state.get("split", context.split.record()) == context.split.record()
        if (
            state["stages"].keys() == {s.name for s in stages}
            and state["dataset"] == context.dataset.fingerprint()
            and same_split
        ):
            rows_done = state["rows_done"]
            seconds = state["seconds"]
            for stage in stages:
                stage.load_state_dict(state["stages"][stage.name])
            logger.info("resuming from checkpoint at row %s", rows_done)

    def save() -> float:
        """Write the checkpoint; returns the seconds to wait before the next one.

        Never less than ten times what this save took, so a large state (GPT-2-sized accumulators are tens of
        GB) is not written more than a tenth of the time, whatever --checkpoint-seconds says.
        """
        save_started = time.monotonic()
        _save_checkpoint(
            checkpoint,
            {
                "rows_done": rows_done,
                "seconds": seconds,
                "dataset": context.dataset.fingerprint(),
                "split": context.split.record(),
                "stages": {stage.name: stage.state_dict() for stage in stages},
            },
        )
        return max(config.checkpoint_seconds, 10 * (time.monotonic() - save_started))

    interval = config.checkpoint_seconds
    last_save = time.monotonic()
    while True:
        active = [s for s in stages if s.hooks and not s.done_streaming]
        if not active:
            break
        kinds: list[HookKind] = sorted(frozenset[HookKind]().union(*(s.hooks for s in active)))
        started = time.perf_counter()
        for batch in stream_batches(
            context.models,
            context.dataset,
            kinds,
            rows_done,
            config.device,
            description="+".join(s.name for s in active),
            batch_rows=context.split.batch_rows,
        ):
            seconds["forward"] += time.perf_counter() - started
            for stage in active:
                stage_started = time.perf_counter()
                stage.update(batch)
                seconds[stage.name] += time.perf_counter() - stage_started
            rows_done = batch.row_start + batch.tokens.shape[0]
            del batch  # closing the pass (and the checkpoint) need the batch's memory: its plan has none
            if time.monotonic() - last_save > interval:
                interval = save()
                last_save = time.monotonic()
            started = time.perf_counter()
        for stage in active:
            stage_started = time.perf_counter()
            stage.finish_pass()
            seconds[stage.name] += time.perf_counter() - stage_started
        rows_done = 0
        logger.info("pass over the rows done: %s", ", ".join(s.name for s in active))
        streaming = any(s.hooks and not s.done_streaming for s in stages)
        # the end of the last pass is always kept (writing can then be retried without streaming); between passes
        # the interval rule holds, as within a pass: a split run's state is GBs, written once per pass it cost
        # more than the passes (issue 11)
        if not streaming or time.monotonic() - last_save > interval:
            interval = save()
            last_save = time.monotonic()
    while stages:  # each stage is dropped once written: the plan's writing phase counts only the rest
        stage = stages.pop(0)
        stage_started = time.perf_counter()
        write_stage(stage, context)
        written = time.perf_counter() - stage_started
        context.store.mark_stage_done(context.run_id, stage.name, seconds[stage.name])
        context.store.record_timing(context.run_id, f"{stage.name}_write", written)
        del stage
        trim_heap()
    context.store.record_timing(context.run_id, "forward", seconds["forward"])
