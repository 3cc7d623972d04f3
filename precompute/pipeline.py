"""Run the precompute: validate, stream the dataset through every stage, write the SQLite file, resume.

Order of work, so that bad input costs nothing and loses nothing:
1. resolve and load every model, check they share a tokenizer, build the dataset (all errors surface here,
   before any file is created);
2. open the store (Alembic ``upgrade head``) and find the run with the same configuration hash, or create one;
3. stream batches: every stage that needs activations sees the same forward passes (one per model and batch);
   a stage that needs more passes over the rows (the correlation engine under a memory budget) gets them alone;
   the state of every stage is checkpointed next to the DB so a killed run resumes at the last checkpoint;
4. each stage writes its tables (deleting its earlier rows first, so a re-run is idempotent), then the run is
   marked complete. Until that moment the run's status says it is not.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from precompute.activations import ActivationBatch, HookKind, stream_batches
from precompute.correlation import CorrelationConfig
from precompute.data import DatasetConfig, TokenDataset, build_dataset
from precompute.models import LoadedModel, decoded_vocab, load_family
from precompute.stage_config import ConfigError, stage_config
from precompute.store import AtlasStore, config_hash

logger = logging.getLogger(__name__)

#: The stages a run does unless told otherwise, in order.
DEFAULT_STAGES: tuple[str, ...] = ("correlations", "stats", "examples", "families", "roles")


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

    def __post_init__(self) -> None:
        unknown = [s for s in self.stages if s not in STAGE_FACTORIES]
        if unknown:
            raise ConfigError(f"unknown stage {unknown[0]!r}; stages are {', '.join(STAGE_FACTORIES)}")
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
        }


@dataclass
class RunContext:
    """What a stage needs to do its work and write its tables."""

    config: PrecomputeConfig
    store: AtlasStore
    run_id: int
    models: list[LoadedModel]
    model_ids: dict[str, int]
    dataset: TokenDataset


class Stage(Protocol):
    """A unit of precompute work. Stages with `hooks` see batches; all write their tables at the end."""

    name: str
    hooks: frozenset[HookKind]

    @property
    def done_streaming(self) -> bool: ...

    def update(self, batch: ActivationBatch) -> None: ...

    def finish_pass(self) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def write(self, context: RunContext) -> None: ...


#: Stage name -> "module:Class"; a stage class is built with the `RunContext`. Imported only when run.
STAGE_FACTORIES: dict[str, str] = {
    "correlations": "precompute.universality:CorrelationStage",
    "stats": "precompute.stats:StatsStage",
    "examples": "precompute.examples:ExamplesStage",
    "families": "precompute.families:FamiliesStage",
    "roles": "precompute.roles:RolesStage",
}


def stage_class(name: str) -> Any:
    module_name, class_name = STAGE_FACTORIES[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def build_stage(name: str, context: RunContext) -> Stage:
    return stage_class(name)(context)


def check_analysis_settings(stages: tuple[str, ...], analysis: dict[str, Any]) -> None:
    """Refuse unknown or mistyped stage settings before any work (each stage's ``config_class``)."""
    unknown = sorted(set(analysis) - set(STAGE_FACTORIES))
    if unknown:
        raise ConfigError(f"settings for unknown stage {unknown[0]!r}; stages are {', '.join(STAGE_FACTORIES)}")
    for name in stages:
        config_class = getattr(stage_class(name), "config_class", None)
        if config_class is not None:
            stage_config(config_class, analysis.get(name), name)
        elif analysis.get(name):
            raise ConfigError(f"stage {name!r} takes no settings")


def environment_record(device: str) -> dict[str, Any]:
    """Versions and hardware that produced the run."""
    import importlib.metadata as metadata

    versions = {}
    for package in ("universal-neuron-atlas", "torch", "transformers", "transformer-lens", "tokenizers", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
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


def run_precompute(config: PrecomputeConfig) -> int:
    """Run (or resume) a precompute and return its run id."""
    models, dataset = prepare(config)
    store = AtlasStore(config.db)
    try:
        return _run(config, store, models, dataset)
    finally:
        store.close()


def _run(config: PrecomputeConfig, store: AtlasStore, models: list[LoadedModel], dataset: TokenDataset) -> int:
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
    context = RunContext(config, store, run_id, models, model_ids, dataset)
    try:
        _run_stages(context)
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


def _run_stages(context: RunContext) -> None:
    config = context.config
    stages = [build_stage(name, context) for name in config.stages]
    checkpoint = checkpoint_path(config.db, context.run_id)
    rows_done = 0
    seconds: dict[str, float] = {stage.name: 0.0 for stage in stages}
    seconds["forward"] = 0.0
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        if state["stages"].keys() == {s.name for s in stages} and state["dataset"] == context.dataset.fingerprint():
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
        kinds: list[HookKind] = sorted(set().union(*(s.hooks for s in active)))  # type: ignore[arg-type]
        started = time.perf_counter()
        for batch in stream_batches(
            context.models,
            context.dataset,
            kinds,
            rows_done,
            config.device,
            description="+".join(s.name for s in active),
        ):
            seconds["forward"] += time.perf_counter() - started
            for stage in active:
                stage_started = time.perf_counter()
                stage.update(batch)
                seconds[stage.name] += time.perf_counter() - stage_started
            rows_done = batch.row_start + batch.tokens.shape[0]
            if time.monotonic() - last_save > interval:
                interval = save()
                last_save = time.monotonic()
            started = time.perf_counter()
        for stage in active:
            stage_started = time.perf_counter()
            stage.finish_pass()
            seconds[stage.name] += time.perf_counter() - stage_started
        rows_done = 0
        interval = save()
        last_save = time.monotonic()
    for stage in stages:
        stage_started = time.perf_counter()
        stage.write(context)
        written = time.perf_counter() - stage_started
        context.store.mark_stage_done(context.run_id, stage.name, seconds[stage.name])
        context.store.record_timing(context.run_id, f"{stage.name}_write", written)
    context.store.record_timing(context.run_id, "forward", seconds["forward"])
