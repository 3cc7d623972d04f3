"""The model work behind interventions and "which neurons fire on my text?": clamp one neuron, or find the top ones.

Clamping (paper §5.2's intervention): a forward hook on ``blocks.{layer}.mlp.hook_post`` sets one neuron's
activation to a value at chosen positions of the second row of a batch of two, whose first row runs clean, so one
forward pass gives both. The hook is added with ``bridge.hooks(...)``, a context manager that removes it when the
block ends, error or not. Per position it reads the next-token distribution before and after: the top
predictions, the entropy, the loss of the true next token and KL(clean ‖ patched), in nats.

Top neurons: one forward pass up to the last block stacks ``hook_post`` as [pos, n_layers * d_mlp] on the model's
device; the per-token and whole-text top-k are taken there with ``torch.topk`` (universal-only: a boolean mask of
the neuron axis), and only k values per token travel to the host.

Every function takes a loaded model (`precompute.models.LoadedModel`) and runs inside `app.live.LiveRunner.compute`
(its slot, time limit and the model's run lock). torch is imported by the caller's first run, never by the app's
start: these functions import it when they are called.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

#: Tokens listed per model in the "moved most" summary (and per model in the agreement's token set).
MOVED_TOKENS = 10


@dataclass(frozen=True)
class Clamp:
    """Set neuron `neuron` of layer `layer` to `value` at `positions` of the row (BOS = 0; None: every one)."""

    layer: int
    neuron: int
    value: float
    positions: tuple[int, ...] | None


@dataclass(frozen=True)
class NextToken:
    """One run's next-token distribution at every shown position (the text's tokens, BOS left out)."""

    top_ids: np.ndarray  # [pos, k] int64, most probable first
    top_probs: np.ndarray  # [pos, k] float32
    entropy: np.ndarray  # [pos] float32, nats
    loss: np.ndarray  # [pos] float32, nats: -log p(the next token); NaN at the last position (no next token)


@dataclass(frozen=True)
class Intervention:
    """One model, clean and with the clamp."""

    clean: NextToken
    patched: NextToken
    kl: np.ndarray  # [pos] float32: KL(clean ‖ patched), nats
    moved_ids: np.ndarray  # [MOVED_TOKENS] the tokens whose mean probability over `affected` moved most
    moved_clean: np.ndarray  # their mean probability, clean
    moved_patched: np.ndarray  # and patched
    affected: int  # first shown position the clamp can change (causal: the first clamped one)


@dataclass(frozen=True)
class Firing:
    """The neurons that fire most on a text. Neuron ids are flat: ``layer * d_mlp + neuron``."""

    top: np.ndarray  # [k] int64: the largest activations over the whole text, largest first
    top_max: np.ndarray  # [k] float32: each one's largest activation
    top_peak: np.ndarray  # [k] int64: the shown position where it is reached
    top_acts: np.ndarray  # [k, pos] float32: their activations at every shown position
    token_top: np.ndarray  # [pos, per_token] int64: per position, the neurons with the largest activations
    token_values: np.ndarray  # [pos, per_token] float32


def _device(loaded: Any) -> Any:
    return loaded.bridge.cfg.device


def _row(loaded: Any, row: Sequence[int], copies: int) -> torch.Tensor:
    import torch

    return torch.tensor([list(row)] * copies, dtype=torch.long, device=_device(loaded))  # [copies, pos]


def _next_token(logprobs: torch.Tensor, row: torch.Tensor, skip: int, top_k: int) -> NextToken:
    """From log-probabilities [pos, vocab] of one row: top-k, entropy, next-token loss, at positions skip.."""
    import torch

    shown = logprobs[skip:]  # [pos, vocab]
    probs = shown.exp()
    top = torch.topk(probs, min(top_k, probs.shape[-1]), dim=-1)
    entropy = -(probs * shown).sum(-1)
    loss = torch.full((shown.shape[0],), float("nan"), device=shown.device)
    targets = row[skip + 1 :]  # the token after each shown position
    if targets.numel():
        loss[: targets.numel()] = -shown[: targets.numel()].gather(-1, targets[:, None]).squeeze(-1)
    return NextToken(
        top_ids=top.indices.cpu().numpy().astype(np.int64),
        top_probs=top.values.float().cpu().numpy(),
        entropy=entropy.float().cpu().numpy(),
        loss=loss.float().cpu().numpy(),
    )


def intervene(
    loaded: Any, row: Sequence[int], skip: int, clamp: Clamp, top_k: int
) -> tuple[Intervention, torch.Tensor]:
    """Run `row` (token ids, BOS first) clean and with `clamp` in one batch of two.

    Args:
        skip: how many leading positions (the BOS) the answer leaves out.
        top_k: predictions listed per position.

    Returns:
        The intervention at the shown positions, and the change of log-probability, patched − clean, at the
        positions the clamp can change ([pos − affected, vocab] on the model's device), for `agreement`.
    """
    import torch

    from precompute.activations import hook_name

    tokens = _row(loaded, row, 2)
    where = slice(None) if clamp.positions is None else torch.tensor(clamp.positions, device=tokens.device)

    def set_neuron(value: torch.Tensor, hook: object) -> torch.Tensor:  # [batch, pos, d_mlp]
        value[1, where, clamp.neuron] = clamp.value  # row 0 stays clean
        return value

    with torch.inference_mode(), loaded.bridge.hooks(fwd_hooks=[(hook_name(clamp.layer), set_neuron)]):
        logits = loaded.bridge(tokens)  # [2, pos, vocab]
    with torch.inference_mode():
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        clean, patched = logprobs[0], logprobs[1]
        kl = (clean.exp() * (clean - patched)).sum(-1)[skip:]
        first = 0 if clamp.positions is None else min(clamp.positions)
        affected = max(first - skip, 0)
        start = skip + affected
        delta = patched[start:] - clean[start:]  # [pos - affected, vocab]
        mean_clean = clean[start:].exp().mean(0)
        mean_patched = patched[start:].exp().mean(0)
        moved = torch.topk((mean_patched - mean_clean).abs(), min(MOVED_TOKENS, mean_clean.shape[0])).indices
        outcome = Intervention(
            clean=_next_token(clean, tokens[0], skip, top_k),
            patched=_next_token(patched, tokens[1], skip, top_k),
            kl=kl.clamp_min(0).cpu().numpy(),
            moved_ids=moved.cpu().numpy().astype(np.int64),
            moved_clean=mean_clean[moved].cpu().numpy(),
            moved_patched=mean_patched[moved].cpu().numpy(),
            affected=affected,
        )
    return outcome, delta


def agreement(first: torch.Tensor, second: torch.Tensor, tokens: np.ndarray) -> float | None:
    """Pearson's r of two models' log-probability changes over positions × `tokens`; None where undefined.

    Both are [pos, vocab] changes (patched − clean) at the same positions of the same text, so the two models'
    rows line up. r is undefined (None) when either change is constant there, e.g. a clamp that changes nothing.

    >>> import torch
    >>> a = torch.tensor([[0.0, 1.0, -2.0], [0.5, 0.0, 1.0]])
    >>> round(agreement(a, 3 * a + 1, np.array([0, 2])), 12), agreement(a, -a, np.array([0, 1, 2]))
    (1.0, -1.0)
    >>> agreement(a, torch.zeros_like(a), np.array([0])) is None
    True
    """
    import torch

    index = torch.as_tensor(tokens, dtype=torch.long, device=first.device)
    x = first[:, index].double().flatten()
    y = second.to(first.device)[:, index].double().flatten()
    if x.numel() < 2:
        return None
    x, y = x - x.mean(), y - y.mean()
    norm = float(x.norm() * y.norm())
    if norm == 0.0 or not np.isfinite(norm):
        return None
    return max(-1.0, min(1.0, float((x * y).sum()) / norm))


def firing(loaded: Any, row: Sequence[int], skip: int, k: int, per_token: int, allowed: Any | None) -> Firing:
    """The neurons with the largest activations on `row`, over the whole text and per position.

    Args:
        skip: leading positions (the BOS) left out of every ranking.
        k: neurons over the whole text, ranked by their largest activation.
        per_token: neurons per position.
        allowed: None, or a boolean array [n_layers * d_mlp] of the neurons that may be listed (universal ones).
    """
    import torch

    from precompute.activations import run_mlp_hooks

    tokens = _row(loaded, row, 1)
    with torch.inference_mode():
        post = run_mlp_hooks(loaded, tokens, ("hook_post",))["hook_post"][0, skip:]  # [pos, n_layers, d_mlp]
        acts = post.reshape(post.shape[0], -1)  # [pos, n_neurons], stays on the device
        n_allowed = acts.shape[1]
        if allowed is not None:
            mask = torch.as_tensor(allowed, dtype=torch.bool, device=acts.device)
            n_allowed = int(mask.sum())
            acts = acts.masked_fill(~mask, float("-inf"))
        best, peak = acts.max(0)  # [n_neurons]: each neuron's largest activation and where
        top = torch.topk(best, min(k, n_allowed))
        per = torch.topk(acts, min(per_token, n_allowed), dim=1)  # [pos, per_token]
        top_acts = acts[:, top.indices].T  # [k, pos]
        return Firing(
            top=top.indices.cpu().numpy().astype(np.int64),
            top_max=top.values.float().cpu().numpy(),
            top_peak=peak[top.indices].cpu().numpy().astype(np.int64),
            top_acts=top_acts.float().cpu().numpy(),
            token_top=per.indices.cpu().numpy().astype(np.int64),
            token_values=per.values.float().cpu().numpy(),
        )
