"""The paper's causal checks of neuron roles (§5): entropy interventions and attention path ablations.

- `entropy_intervention`: fix a neuron's ``mlp.hook_post`` at each value at every position and average the final
  LayerNorm scale, next-token entropy, loss and reciprocal rank over the valid positions (paper-spec §5.2); for a
  last-layer neuron the final residual is patched directly, which saves the forward pass;
- `path_ablation`: remove a neuron's direct contribution from one head's queries only (keys and values patched
  back to clean) and measure the change in attention to BOS and in ‖z‖ (paper-spec §5.3).

The ``roles`` stage (`precompute.stages.roles`) runs them on the first rows of the dataset.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import scipy.stats
import torch

from precompute.models import LoadedModel


class HookPoint(Protocol):
    """The part of a TransformerLens hook point that the hook functions here read."""

    name: str


def valid_positions(tokens: torch.Tensor, special_ids: set[int]) -> torch.Tensor:
    """Positions the intervention curves average: not the last (no next token) and not a BOS/EOS/pad token.

    >>> valid_positions(torch.tensor([[0, 5, 0, 6, 7]]), {0}).tolist()
    [[False, True, False, True, False]]
    """
    valid = ~torch.isin(tokens, torch.tensor(sorted(special_ids), dtype=tokens.dtype))
    valid[:, -1] = False
    return valid


@dataclass
class InterventionCurve:
    """Means over valid tokens, one entry per fixed value."""

    values: tuple[float, ...]
    ln_scale: np.ndarray
    entropy: np.ndarray
    loss: np.ndarray
    reciprocal_rank: np.ndarray
    n_tokens: int


@dataclass
class CleanRun:
    """The unablated final state that the direct-path shortcut for last-layer neurons starts from."""

    resid_final: torch.Tensor  # [rows, pos, d_model]: the input of ln_final
    post: torch.Tensor  # [rows, pos, d_mlp]: the last layer's hook_post


@torch.inference_mode()
def clean_run(model: LoadedModel, tokens: torch.Tensor) -> CleanRun:
    last = model.n_layers - 1
    names = [f"blocks.{last}.hook_resid_post", f"blocks.{last}.mlp.hook_post"]
    _, cache = model.bridge.run_with_cache(tokens.to(model.bridge.W_U.device), names_filter=names)
    return CleanRun(cache[names[0]], cache[names[1]])


def next_token_metrics(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per position [..., 3]: entropy (nats), loss and reciprocal rank 1/(rank + 1) of the target token.

    On CPU it works through cache-sized blocks of logits, one thread: fresh 100 MB temporaries cost more in page
    faults than the arithmetic (4,096 × 4,096 logits: 3× faster in 32-token blocks).

    >>> next_token_metrics(torch.tensor([[0.0, 0.0], [5.0, 0.0]]), torch.tensor([0, 1]))[:, 2].tolist()
    [1.0, 0.5]
    """
    flat_logits, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1, 1)
    out = torch.empty(flat_targets.shape[0], 3, device=logits.device)
    block = max(1, METRIC_BLOCK // logits.shape[-1]) if logits.device.type == "cpu" else flat_targets.shape[0]
    with _one_cpu_thread():
        for start in range(0, flat_targets.shape[0], block):
            _block_metrics(
                flat_logits[start : start + block], flat_targets[start : start + block], out[start : start + block]
            )
    return out.reshape(*targets.shape, 3)


def _block_metrics(logits: torch.Tensor, target: torch.Tensor, out: torch.Tensor) -> None:
    log_probs = logits.float().log_softmax(dim=-1)
    out[:, 0] = -torch.linalg.vecdot(log_probs.exp(), log_probs)
    out[:, 1] = -log_probs.gather(-1, target)[:, 0]
    out[:, 2] = 1.0 / ((logits > logits.gather(-1, target)).sum(dim=-1, dtype=torch.int32) + 1.0)  # ties: better rank


@contextlib.contextmanager
def _one_cpu_thread() -> Iterator[None]:
    """Cache-sized blocks gain nothing from a second thread, and on a busy machine OpenMP's spin-waiting made each
    small op up to 100× slower with two threads (measured on the project's shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


#: Logits per forward chunk of the intervention (16 MB of float32, whatever batch_rows says) and per metric
#: block (512 kB, which stays in cache: the fastest block size measured on this CPU).
LOGIT_BUDGET = 2**22
METRIC_BLOCK = 2**17


def final_logits(
    resid: torch.Tensor, W_U: torch.Tensor, b_U: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The final LN scale [..., 1] and the logits [..., d_vocab] of a final residual stream [..., d_model], for the
    processed weights (LN folded into W_U: only centring and scaling remain)."""
    centred = resid - resid.mean(dim=-1, keepdim=True)
    scale = (centred.pow(2).mean(dim=-1, keepdim=True) + eps).sqrt()
    logits = torch.addmm(b_U, (centred / scale).reshape(-1, centred.shape[-1]), W_U)
    return scale, logits.reshape(*centred.shape[:-1], -1)


@torch.inference_mode()
def entropy_intervention(
    model: LoadedModel,
    tokens: torch.Tensor,
    valid: torch.Tensor,
    layer: int,
    neuron: int,
    values: tuple[float, ...],
    batch_rows: int,
    clean: CleanRun | None = None,
) -> InterventionCurve:
    """Fix ``blocks.{layer}.mlp.hook_post[..., neuron]`` at each value at every position (BOS included, as the
    paper does: §7.3 item 15) and average the final-LN scale and next-token metrics over the valid positions.

    For a last-layer neuron with `clean` given, the final residual is clean + (value − activation)·w_out (exact:
    nothing reads the last MLP's output but ln_final), which saves the forward pass; otherwise a hooked forward.
    """
    bridge = model.bridge
    device = bridge.W_U.device
    n_rows, n_pos = tokens.shape
    value_index = torch.arange(len(values)).repeat_interleave(n_rows)  # item i: value i // n_rows, row i % n_rows
    row_index = torch.arange(n_rows).repeat(len(values))
    fixed = torch.tensor(values, dtype=torch.float32, device=device)[value_index]
    targets = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1).to(device)  # the last position is never valid
    tokens, valid = tokens.to(device), valid.to(device)
    shortcut = clean is not None and layer == model.n_layers - 1
    w_out, W_U, b_U = bridge.W_out[layer, neuron].float(), bridge.W_U.float(), bridge.b_U.float()  # float16/bf16 runs
    step = max(1, min(batch_rows, LOGIT_BUDGET // (n_pos * int(bridge.W_U.shape[1]))))
    sums = torch.zeros(len(values), 4, dtype=torch.float64)  # ln_scale, entropy, loss, reciprocal rank
    for start in range(0, len(value_index), step):
        rows, chunk_values = row_index[start : start + step], fixed[start : start + step]
        if shortcut:
            delta = chunk_values[:, None] - clean.post[rows, :, neuron]  # type: ignore[union-attr]
            resid = clean.resid_final[rows].float() + delta[..., None] * w_out  # type: ignore[union-attr]
            scale, logits = final_logits(resid, W_U, b_U, bridge.cfg.eps)
        else:
            kept: dict[str, torch.Tensor] = {}

            def fix(act: torch.Tensor, hook: HookPoint, chunk_values: torch.Tensor = chunk_values) -> torch.Tensor:
                act[:, :, neuron] = chunk_values[:, None].to(act.dtype)
                return act

            def keep(act: torch.Tensor, hook: HookPoint, kept: dict = kept) -> torch.Tensor:
                kept["scale"] = act
                return act

            hooks = [(f"blocks.{layer}.mlp.hook_post", fix), ("ln_final.hook_scale", keep)]
            logits = bridge.run_with_hooks(tokens[rows], fwd_hooks=hooks)
            scale = kept["scale"]
        per_token = torch.cat([scale.float(), next_token_metrics(logits, targets[rows])], dim=-1)[valid[rows]]
        item_value = value_index[start : start + step].to(device)[:, None].expand(-1, n_pos)[valid[rows]]
        sums.index_add_(0, item_value.cpu(), per_token.double().cpu())
    n_tokens = int(valid.sum())
    means = (sums / max(n_tokens, 1)).numpy()
    return InterventionCurve(values, means[:, 0], means[:, 1], means[:, 2], means[:, 3], n_tokens)


@torch.inference_mode()
def path_ablation(
    model: LoadedModel, tokens: torch.Tensor, layer: int, neuron: int, attn_layer: int, head: int, after_pos: int
) -> np.ndarray:
    """float32[n, 3]: the neuron's clean activation, Δ attention to BOS and Δ‖z‖ (ablated − clean) of the head,
    at every query position ≥ after_pos of every row (paper-spec §5.3). Only the queries change: the neuron's
    direct contribution a·w_out is removed from ``blocks.{attn_layer}.hook_resid_pre`` and the layer's keys and
    values are patched back to their clean values."""
    bridge = model.bridge
    tokens = tokens.to(bridge.W_out.device)
    prefix = f"blocks.{attn_layer}.attn"
    names = [f"blocks.{layer}.mlp.hook_post", f"{prefix}.hook_k", f"{prefix}.hook_v", f"{prefix}.hook_pattern"]
    _, clean = bridge.run_with_cache(tokens, names_filter=[*names, f"{prefix}.hook_z"], stop_at_layer=attn_layer + 1)
    activation = clean[names[0]][:, :, neuron]  # [rows, pos]
    w_out = bridge.W_out[layer, neuron]
    ablated: dict[str, torch.Tensor] = {}

    def subtract(resid: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        resid[:, after_pos:] -= activation[:, after_pos:, None] * w_out
        return resid

    def keep(act: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        ablated[hook.name] = act
        return act

    hooks = [
        (f"blocks.{attn_layer}.hook_resid_pre", subtract),
        (f"{prefix}.hook_k", lambda act, hook: clean[f"{prefix}.hook_k"]),
        (f"{prefix}.hook_v", lambda act, hook: clean[f"{prefix}.hook_v"]),
        (f"{prefix}.hook_pattern", keep),
        (f"{prefix}.hook_z", keep),
    ]
    bridge.run_with_hooks(tokens, fwd_hooks=hooks, stop_at_layer=attn_layer + 1)
    bos_clean = clean[f"{prefix}.hook_pattern"][:, head, after_pos:, 0]
    bos_ablated = ablated[f"{prefix}.hook_pattern"][:, head, after_pos:, 0]
    norm_clean = clean[f"{prefix}.hook_z"][:, after_pos:, head].norm(dim=-1)
    norm_ablated = ablated[f"{prefix}.hook_z"][:, after_pos:, head].norm(dim=-1)
    points = torch.stack(
        [activation[:, after_pos:], bos_ablated - bos_clean, norm_ablated - norm_clean], dim=-1
    ).reshape(-1, 3)
    return points.float().cpu().numpy()


def correlations(points: np.ndarray) -> dict[str, float | None]:
    """Pearson and Spearman of the activation with each change, over all points (not one batch: §7.3 item 8)."""
    out: dict[str, float | None] = {}
    for column, name in ((1, "bos"), (2, "norm")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a constant column gives NaN, stored as NULL
            out[f"pearson_{name}"] = float(scipy.stats.pearsonr(points[:, 0], points[:, column])[0])
            out[f"spearman_{name}"] = float(scipy.stats.spearmanr(points[:, 0], points[:, column])[0])
    return out


@torch.inference_mode()
def nominal_metrics(model: LoadedModel, tokens: torch.Tensor, valid: torch.Tensor, clean: CleanRun) -> dict[str, float]:
    """The un-intervened means over the valid positions (the dashed reference lines of the paper's Fig. 7), from
    the clean run's final residual: no further forward pass."""
    bridge = model.bridge
    device = bridge.W_U.device
    tokens, valid = tokens.to(device), valid.to(device)
    scale, logits = final_logits(clean.resid_final.float(), bridge.W_U.float(), bridge.b_U.float(), bridge.cfg.eps)
    targets = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1)
    per_token = torch.cat([scale, next_token_metrics(logits, targets)], dim=-1)[valid]
    means = per_token.double().mean(dim=0).cpu().tolist()
    names = ("nominal_ln_scale", "nominal_entropy", "nominal_loss", "nominal_reciprocal_rank")
    return dict(zip(names, means, strict=True))


__all__ = [
    "LOGIT_BUDGET",
    "METRIC_BLOCK",
    "CleanRun",
    "InterventionCurve",
    "clean_run",
    "correlations",
    "entropy_intervention",
    "final_logits",
    "next_token_metrics",
    "nominal_metrics",
    "path_ablation",
    "valid_positions",
]
