"""Train the embedded model family: tiny GPT-2s that differ only in their initialisation seed.

The paper compares GPT-2s trained from different random seeds on one data order (Gurnee et al. 2024, §3).
This module makes such a family on any machine, offline: a byte-level BPE tokenizer and the training rows come
from the standard library's train split (:mod:`precompute.training.corpus`), every seed reads the same rows in the
same order, and each model is a plain Hugging Face GPT-2 folder that ``GPT2LMHeadModel.from_pretrained`` and
TransformerLens' ``TransformerBridge.boot_transformers`` load. In the spirit of nanoGPT's ``train.py``.

Layout of ``out_dir``::

    data/                   tokenizer, packed train/validation rows (.npy) and their cache key
    seed-{k}/               config.json, model.safetensors, tokenizer files, manifest.json
    seed-{k}/checkpoint.pt  only while seed k is unfinished: a killed run resumes from it
    family.json             the seeds' folders and the command that made them
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tokenizers
import torch
import torch.nn.functional as F
import transformers
from tqdm import tqdm
from transformers import GPT2Config, GPT2LMHeadModel

from precompute.training.corpus import PackedCorpus, packed_corpus
from precompute.training.tokenizer import MIN_VOCAB_SIZE, save_tokenizer

logger = logging.getLogger(__name__)

SaveDtype = Literal["float32", "float16", "bfloat16"]
SAVE_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
#: Fields that change how a run executes, not what it computes; a resume may change them. (A bit-identical
#: resume needs the same thread count: float sums are reduced in per-thread chunks.)
RUN_ONLY_FIELDS = frozenset({"out_dir", "seeds", "threads", "checkpoint_every_steps"})
_POSITIVE_FIELDS = ("n_layers", "d_model", "d_mlp", "n_heads", "batch_size", "checkpoint_every_steps")


class TrainConfigError(ValueError):
    """A training configuration that cannot run, or that disagrees with what ``out_dir`` already holds."""


@dataclass(frozen=True)
class TrainConfig:
    """One family of tiny GPT-2s (gelu_new, tied embeddings, no dropout); each field's comment is its help."""

    out_dir: Path  # the family's folder (layout in the module docstring)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # initialisation seeds, one model each
    n_layers: int = 2
    d_model: int = 128
    d_mlp: int = 512
    n_heads: int = 4
    ctx: int = 256  # tokens per row, BOS included
    vocab_size: int = 4096  # BPE vocabulary, <|endoftext|> and the 256 bytes included
    batch_size: int = 32  # rows per optimizer step
    # Training tokens per model, rounded up to whole steps. 6M is 0.7 epoch of the stdlib train split (8.5M
    # tokens at vocab 4096: no row repeats), about 4.5 min per seed at 23K tokens/s on 2 CPU cores.
    tokens_per_seed: int = 6_000_000
    lr: float = 3e-3  # peak learning rate, reached after linear warmup
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio on the last step
    warmup_fraction: float = 0.05  # fraction of the steps spent warming up
    weight_decay: float = 0.1  # AdamW decay of matrices and embeddings (not biases or LayerNorm gains)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm
    data_seed: int = 0  # orders the rows: one data order for every model seed
    bf16: bool = True  # autocast matmuls to bfloat16 (1.4x faster with avx512_bf16); weights stay float32
    device: str = "cpu"  # a torch device string
    checkpoint_every_steps: int = 100  # how often an unfinished seed writes checkpoint.pt
    eval_tokens: int = 262_144  # validation tokens for the initial and final validation loss
    threads: int | None = None  # torch intra-op threads; None keeps torch's default
    max_documents: int | None = None  # only the first N files of each split (smoke runs); None: all
    save_dtype: SaveDtype = "float32"  # saved weights; config.json says float32 so loading gives float32

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        object.__setattr__(self, "seeds", tuple(self.seeds))
        distinct_seeds = bool(self.seeds) and len(set(self.seeds)) == len(self.seeds) and min(self.seeds) >= 0
        unit_fractions = (self.warmup_fraction, self.beta1, self.beta2)
        checks = [
            (distinct_seeds, f"seeds must be distinct non-negative integers, got {self.seeds}"),
            *[(getattr(self, name) >= 1, f"{name} must be at least 1") for name in _POSITIVE_FIELDS],
            (self.d_model % self.n_heads == 0, f"d_model {self.d_model} must be a multiple of n_heads"),
            (self.ctx >= 2, f"ctx must be at least 2 (BOS plus one token), got {self.ctx}"),
            (self.vocab_size >= MIN_VOCAB_SIZE, f"vocab_size must be >= {MIN_VOCAB_SIZE}"),
            (self.tokens_per_seed >= self.tokens_per_step, "tokens_per_seed must cover one step"),
            (self.eval_tokens >= self.ctx, f"eval_tokens must cover one row of ctx={self.ctx}"),
            (self.lr > 0 and self.grad_clip > 0, "lr and grad_clip must be positive"),
            (self.weight_decay >= 0, "weight_decay must be non-negative"),
            (0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"),
            (all(0 <= x < 1 for x in unit_fractions), "warmup_fraction, beta1 and beta2 must be in [0, 1)"),
            (self.threads is None or self.threads >= 1, f"threads must be None or >= 1, got {self.threads}"),
            (self.max_documents is None or self.max_documents >= 1, "max_documents must be None or >= 1"),
            (self.save_dtype in SAVE_DTYPES, f"save_dtype must be one of {', '.join(SAVE_DTYPES)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainConfigError(message)
        try:
            torch.device(self.device)
        except RuntimeError as exc:
            raise TrainConfigError(f"unknown device {self.device!r} (use cpu, cuda, cuda:1, mps)") from exc

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.ctx

    @property
    def n_steps(self) -> int:
        return -(-self.tokens_per_seed // self.tokens_per_step)

    def to_json(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return values | {"out_dir": str(self.out_dir), "seeds": list(self.seeds)}

    def result_fields(self) -> dict[str, Any]:
        """The fields that decide the trained weights (all but :data:`RUN_ONLY_FIELDS`)."""
        return {k: v for k, v in self.to_json().items() if k not in RUN_ONLY_FIELDS}


@dataclass(frozen=True)
class StepInfo:
    """Passed to the ``on_step`` callback after every optimizer step (and its checkpoint, if one was due)."""

    seed: int
    step: int  # steps completed
    n_steps: int
    loss: float
    lr: float


OnStep = Callable[[StepInfo], None]


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8"))


def batch_row_indices(step: int, batch_size: int, n_rows: int, data_seed: int) -> np.ndarray:
    """Rows of the batch at `step`: epoch e reads all rows in the permutation seeded by (data_seed, e).

    >>> a = batch_row_indices(0, 3, 5, data_seed=0); b = batch_row_indices(1, 3, 5, data_seed=0)
    >>> sorted(np.concatenate([a, b[:2]]).tolist())  # the first 5 rows read form one epoch
    [0, 1, 2, 3, 4]
    """
    epochs, positions = np.divmod(np.arange(step * batch_size, (step + 1) * batch_size), n_rows)
    indices = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        in_epoch = epochs == epoch
        order = np.random.default_rng([data_seed, int(epoch)]).permutation(n_rows)
        indices[in_epoch] = order[positions[in_epoch]]
    return indices


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, cosine to ``min_lr_ratio * lr``."""
    warmup = round(config.warmup_fraction * config.n_steps)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, config.n_steps - 1 - warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def build_model(config: TrainConfig, seed: int) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2; the init seed is the model seed."""
    torch.manual_seed(seed)
    hf_config = GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.ctx,
        n_embd=config.d_model,
        n_layer=config.n_layers,
        n_head=config.n_heads,
        n_inner=config.d_mlp,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(hf_config)
    return model.to(config.device)  # type: ignore[arg-type]  # transformers wraps `to` with functools.wraps


def _loss(model: GPT2LMHeadModel, rows: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    device_type = torch.device(config.device).type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=config.bf16):
        logits = model(rows, use_cache=False).logits  # [batch, pos, d_vocab]
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), rows[:, 1:].flatten())


@torch.no_grad()
def evaluate(model: GPT2LMHeadModel, rows: np.ndarray, config: TrainConfig) -> float:
    """Mean next-token loss over `rows` (all positions after BOS)."""
    model.eval()
    total = 0.0
    for start in range(0, len(rows), config.batch_size):
        batch = torch.from_numpy(rows[start : start + config.batch_size].astype(np.int64)).to(config.device)
        total += _loss(model, batch, config).item() * len(batch)
    model.train()
    return total / len(rows)


def _optimizer(model: GPT2LMHeadModel, config: TrainConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2))


def _save_model(model: GPT2LMHeadModel, folder: Path, dtype: SaveDtype) -> None:
    # Cast a copy of the state dict, not the model: config.json then keeps dtype float32, so transformers 5's
    # default from_pretrained(dtype="auto") loads float32 even from float16 weights. The tied lm_head is left
    # out (from_pretrained re-ties it) so the embedding is stored once.
    cast = getattr(torch, dtype)
    state = {k: v.detach().to(cast).cpu() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    model.save_pretrained(str(folder), state_dict=state)


def _versions() -> dict[str, str]:
    modules = (torch, np, transformers, tokenizers)
    return {"python": platform.python_version()} | {m.__name__: m.__version__ for m in modules}


def train_seed(config: TrainConfig, seed: int, data: PackedCorpus, command: str, on_step: OnStep | None = None) -> Path:
    """Train (or resume, or skip if finished) the model of one seed; returns its folder."""
    folder = config.out_dir / f"seed-{seed}"
    manifest_path, checkpoint_path = folder / "manifest.json", folder / "checkpoint.pt"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("finished"):
            _check_same(manifest["config"], config, manifest_path)
            logger.info("seed %d is finished (%s): skipped", seed, manifest_path)
            return folder
    folder.mkdir(parents=True, exist_ok=True)
    model = build_model(config, seed)
    optimizer = _optimizer(model, config)
    started = time.perf_counter()
    state: dict[str, Any] = {"step": 0, "losses": [], "wall_seconds": 0.0, "train_seconds": 0.0}
    if checkpoint_path.exists():
        checkpoint = torch.load(checkpoint_path, map_location=config.device, weights_only=True)
        _check_same(json.loads(checkpoint["config"]), config, checkpoint_path)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        torch.set_rng_state(checkpoint["rng"])
        state = checkpoint["state"]
        logger.info("seed %d: resuming at step %d from %s", seed, state["step"], checkpoint_path)
    else:
        state["initial_validation_loss"] = evaluate(model, _eval_rows(data, config), config)
    n_steps, tokens_per_step = config.n_steps, config.tokens_per_step
    model.train()
    total, done = n_steps * tokens_per_step, state["step"] * tokens_per_step
    with tqdm(total=total, initial=done, unit="tok", unit_scale=True, desc=f"seed {seed}") as bar:
        while state["step"] < n_steps:
            step = state["step"]
            lr = lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            indices = batch_row_indices(step, config.batch_size, len(data.train_rows), config.data_seed)
            batch = torch.from_numpy(data.train_rows[indices].astype(np.int64)).to(config.device)
            tick = time.perf_counter()
            loss = _loss(model, batch, config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            state["train_seconds"] += time.perf_counter() - tick
            state["step"] += 1
            state["losses"].append(loss.item())
            bar.update(tokens_per_step)
            bar.set_postfix(loss=f"{state['losses'][-1]:.3f}", lr=f"{lr:.2e}", refresh=False)
            if state["step"] % config.checkpoint_every_steps == 0 and state["step"] < n_steps:
                state["wall_seconds"] += time.perf_counter() - started
                started = time.perf_counter()
                checkpoint = {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "rng": torch.get_rng_state(),
                    "state": state,
                    "config": json.dumps(config.to_json()),
                }
                _atomic_write(checkpoint_path, functools.partial(torch.save, checkpoint))
            if on_step is not None:
                on_step(StepInfo(seed, state["step"], n_steps, state["losses"][-1], lr))
    validation_loss = evaluate(model, _eval_rows(data, config), config)
    _save_model(model, folder, config.save_dtype)
    save_tokenizer(data.tokenizer, folder)
    wall = state["wall_seconds"] + time.perf_counter() - started
    losses, window = state["losses"], config.checkpoint_every_steps
    manifest = {
        "finished": True,
        "command": command,
        "seed": seed,
        "data_seed": config.data_seed,
        "steps": n_steps,
        "tokens": n_steps * tokens_per_step,
        "initial_train_loss": losses[0],
        "final_train_loss": float(np.mean(losses[-20:])),
        "initial_validation_loss": state["initial_validation_loss"],
        "final_validation_loss": validation_loss,
        "validation_tokens": int(_eval_rows(data, config).size),
        "wall_seconds": wall,
        "tokens_per_second": n_steps * tokens_per_step / max(state["train_seconds"], 1e-9),
        "train_loss_curve": [
            [end, float(np.mean(losses[max(0, end - window) : end]))]
            for end in [*range(window, n_steps, window), n_steps]
        ],
        "config": config.to_json(),
        "corpus": asdict(data.fingerprint),
        "versions": _versions(),
    }
    _write_json(manifest_path, manifest)
    checkpoint_path.unlink(missing_ok=True)
    logger.info("seed %d finished: validation loss %.3f", seed, validation_loss)
    return folder


def _eval_rows(data: PackedCorpus, config: TrainConfig) -> np.ndarray:
    return data.validation_rows[: max(1, config.eval_tokens // config.ctx)]


def _check_same(recorded: dict[str, Any], config: TrainConfig, where: Path) -> None:
    current = config.result_fields()
    differ = {k: (recorded.get(k), v) for k, v in current.items() if recorded.get(k) != v}
    if differ:
        raise TrainConfigError(
            f"{where} was made with another config ({differ} as (recorded, now)): use another "
            f"out_dir or the recorded values"
        )


def train_family(config: TrainConfig, command: str | None = None, on_step: OnStep | None = None) -> list[Path]:
    """Train every seed of `config` one after the other; finished seeds are skipped, unfinished ones resume.

    Args:
        config: the family.
        command: the command line to record; defaults to this process's argv.
        on_step: called after every optimizer step (progress reporting; an exception stops the run, which the
            next call resumes from the last checkpoint).

    Returns:
        the seeds' folders, in ``config.seeds`` order.
    """
    command = command if command is not None else shlex.join(sys.argv)
    config.out_dir.mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        data = packed_corpus(
            config.out_dir / "data", config.vocab_size, config.ctx, config.data_seed, config.max_documents
        )
        family_path = config.out_dir / "family.json"
        known = json.loads(family_path.read_text(encoding="utf-8"))["seeds"] if family_path.exists() else []
        seeds = sorted({entry["seed"] for entry in known} | set(config.seeds))

        def write_family() -> None:
            done = {s: (config.out_dir / f"seed-{s}" / "manifest.json").exists() for s in seeds}
            entries = [{"seed": s, "folder": f"seed-{s}", "finished": done[s]} for s in seeds]
            family = {"command": command, "config": config.to_json(), "corpus": asdict(data.fingerprint)}
            _write_json(family_path, family | {"seeds": entries})

        write_family()
        folders = []
        for seed in config.seeds:
            folders.append(train_seed(config, seed, data, command, on_step))
            write_family()
        return folders
    finally:
        torch.set_num_threads(previous_threads)
