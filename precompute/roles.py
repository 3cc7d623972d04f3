"""The ``roles`` stage: functional roles of neurons from their weights, with the paper's causal checks (§5).

For every model it writes four tables (paper-spec §5; definitions and deviations in docs/roles.md):

- ``roles``: per neuron, the vocabulary role (prediction: vocab_kurt > 10 and vocab_skew > 0; suppression:
  kurt > 10 and skew < 0; partition: otherwise, vocab_var above a multiple of a random direction's), the rank of
  its entropy score ‖w_out‖ · null_space_fraction among the last layers' neurons, and its strongest head;
- ``attention_scores``: for every neuron the top heads of later layers by |h|, with the BOS heuristic
  h = ŵ_outᵀ W_Q k_BOS / √d_head (k_BOS from running the model on the BOS token alone);
- ``entropy_interventions``: for the top entropy candidates and random last-two-layer neurons, the mean final-LN
  scale, entropy, loss and reciprocal rank with the activation fixed at each value at every position;
- ``path_ablations``: for the strongest (neuron, head) pairs, the change in attention to BOS and in ‖z‖ when the
  neuron's direct contribution is removed from the head's queries only (keys and values patched back to clean).

The stage needs no streamed activations: it runs its own few forward passes on the first dataset rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

import numpy as np
import scipy.stats
import torch
from tqdm.auto import tqdm

from precompute.stage_config import ConfigError, stage_config
from precompute.weights import (
    bos_attention_scores,
    bos_query_directions,
    bos_score_sigma,
    processed_weights,
    random_direction_vocab_var,
    weight_statistics,
)

logger = logging.getLogger(__name__)

#: The activations the paper fixes an entropy neuron at; −0.17 is about GELU's minimum (paper-spec §5.2).
PAPER_INTERVENTION_VALUES: tuple[float, ...] = (-0.17, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0)


_AT_LEAST_ONE = ("null_space_dim", "entropy_layers", "intervention_rows", "batch_rows", "top_heads", "ablation_rows")


@dataclass(frozen=True)
class RolesConfig:
    """Settings of the ``roles`` stage (``analysis.roles`` in the run configuration).

    Args:
        models: ``all`` models of the run or only the ``reference`` model.
        prediction_kurtosis: vocab_kurt above which a neuron is a prediction or suppression neuron (paper: 10).
        partition_var: absolute vocab_var threshold for partition neurons; None: `partition_factor` times the
            expected vocab_var of a random direction (5 × reproduces the notebook's 0.005 for GPT2-medium).
        partition_factor: see `partition_var`.
        null_space_dim: dimension of W_U's near-null space; None: d_model / 64 (`precompute.weights`).
        entropy_layers: the last layers whose neurons are entropy candidates and baseline neurons (paper: 2).
        n_entropy_candidates: candidates, by entropy score, that get the intervention curve.
        n_random_baseline: random last-layer neurons with the same curve (paper: 20).
        intervention_values: activations to fix (paper: −0.17, 0, 1, …, 6).
        intervention_rows: dataset rows the curves average over (paper: 24 rows of 512 tokens).
        batch_rows: rows per forward pass.
        top_heads: heads kept per neuron in ``attention_scores``.
        attention_sigma: |h| in units of a random direction's standard deviation for the head above which
            the neuron gets an attention role.
        n_path_ablation_pairs: strongest (neuron, head) pairs by |h| that get the path ablation.
        ablation_rows: dataset rows of the path ablation.
        ablation_after_pos: first ablated query position; None: a quarter of the row (the paper's 64 of 256).
        seed: seed of the random baseline neurons.
    """

    models: Literal["all", "reference"] = "all"
    prediction_kurtosis: float = 10.0
    partition_var: float | None = None
    partition_factor: float = 5.0
    null_space_dim: int | None = None
    entropy_layers: int = 2
    n_entropy_candidates: int = 2
    n_random_baseline: int = 20
    intervention_values: tuple[float, ...] = PAPER_INTERVENTION_VALUES
    intervention_rows: int = 2
    batch_rows: int = 16
    top_heads: int = 5
    attention_sigma: float = 4.0
    n_path_ablation_pairs: int = 3
    ablation_rows: int = 4
    ablation_after_pos: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.models not in ("all", "reference"):
            raise ConfigError(f"roles.models must be one of all, reference; got {self.models!r}")
        for f in fields(self):
            value, kind = getattr(self, f.name), str(f.type)
            numeric = (int,) if kind.startswith("int") else (int, float)
            if kind.startswith(("int", "float")) and not (value is None and "None" in kind):
                if isinstance(value, bool) or not isinstance(value, numeric):
                    raise ConfigError(f"roles.{f.name} must be {'an integer' if numeric == (int,) else 'a number'}")
                if (f.name in _AT_LEAST_ONE and value < 1) or value < 0:
                    raise ConfigError(f"roles.{f.name} must be at least {int(f.name in _AT_LEAST_ONE)}, got {value}")
        if not self.intervention_values or not all(isinstance(v, int | float) for v in self.intervention_values):
            raise ConfigError(
                f"roles.intervention_values must be a non-empty list of numbers, got {self.intervention_values!r}"
            )

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> RolesConfig:
        """Build from the run configuration; unknown keys are errors that list the valid ones.

        >>> RolesConfig.from_mapping({"intervention_values": [0, 1]}).intervention_values
        (0.0, 1.0)
        >>> RolesConfig.from_mapping({"rows": 3})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        precompute.stage_config.ConfigError: unknown roles setting 'rows'; settings are models, ...
        """
        return stage_config(cls, mapping, "roles")


# --- roles from weights ---------------------------------------------------------------------------------


def vocab_roles(stats: Mapping[str, np.ndarray], kurtosis: float, partition_var: float) -> np.ndarray:
    """prediction / suppression / partition / None per neuron (object array [n_layers, d_mlp]).

    >>> s = {"vocab_kurt": np.array([[12.0, 12.0, 3.0, 3.0]]), "vocab_skew": np.array([[2.0, -2.0, 0.0, 0.0]]),
    ...      "vocab_var": np.array([[0.0, 0.0, 0.01, 0.0]])}
    >>> vocab_roles(s, kurtosis=10, partition_var=0.005).tolist()
    [['prediction', 'suppression', 'partition', None]]
    """
    kurt, skew, var = stats["vocab_kurt"], stats["vocab_skew"], stats["vocab_var"]
    roles = np.full(kurt.shape, None, dtype=object)
    roles[var > partition_var] = "partition"
    roles[(kurt > kurtosis) & (skew < 0)] = "suppression"  # the kurtosis rule wins over the partition rule
    roles[(kurt > kurtosis) & (skew > 0)] = "prediction"
    return roles


def ranked_neurons(scores: np.ndarray, layers: range) -> list[tuple[int, int]]:
    """(layer, neuron) of the given layers by descending score.

    >>> ranked_neurons(np.array([[9.0, 0.0], [1.0, 3.0]]), range(1, 2))
    [(1, 1), (1, 0)]
    """
    part = scores[layers.start : layers.stop]
    order = np.argsort(-part, axis=None, kind="stable")
    return [(layers.start + int(i // part.shape[1]), int(i % part.shape[1])) for i in order]


def baseline_neurons(
    stats: Mapping[str, np.ndarray], layers: range, exclude: set[tuple[int, int]], n: int, seed: int
) -> list[tuple[int, int]]:
    """The paper's random comparison neurons: in `layers`, l2_penalty ≤ its 90th and vocab_var ≥ its 10th percentile."""
    l2 = stats["l2_penalty"][layers.start : layers.stop]
    var = stats["vocab_var"][layers.start : layers.stop]
    keep = (l2 <= np.quantile(l2, 0.9)) & (var >= np.quantile(var, 0.1))
    pool = [(layers.start + int(a), int(b)) for a, b in zip(*np.nonzero(keep), strict=True)]
    pool = [p for p in pool if p not in exclude]
    chosen = np.random.default_rng(seed).choice(len(pool), size=min(n, len(pool)), replace=False)
    return sorted(pool[int(i)] for i in chosen)


# --- causal checks ----------------------------------------------------------------------------------------


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
def clean_run(model: Any, tokens: torch.Tensor) -> CleanRun:
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
    model: Any,
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

            def fix(act: torch.Tensor, hook: Any, chunk_values: torch.Tensor = chunk_values) -> torch.Tensor:
                act[:, :, neuron] = chunk_values[:, None].to(act.dtype)
                return act

            def keep(act: torch.Tensor, hook: Any, kept: dict = kept) -> torch.Tensor:
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
    model: Any, tokens: torch.Tensor, layer: int, neuron: int, attn_layer: int, head: int, after_pos: int
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

    def subtract(resid: torch.Tensor, hook: Any) -> torch.Tensor:
        resid[:, after_pos:] -= activation[:, after_pos:, None] * w_out
        return resid

    def keep(act: torch.Tensor, hook: Any) -> torch.Tensor:
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


# --- the stage --------------------------------------------------------------------------------------------


class RolesStage:
    """The ``roles`` stage: weight-based roles plus the entropy and attention checks, for each model."""

    config_class = RolesConfig

    name = "roles"
    hooks: frozenset = frozenset()

    def __init__(self, context: Any) -> None:
        self.config = RolesConfig.from_mapping(context.config.analysis.get("roles", {}))
        ctx = context.dataset.ctx
        if self.config.ablation_after_pos is None:
            self.config = dataclasses.replace(self.config, ablation_after_pos=ctx // 4)
        elif self.config.n_path_ablation_pairs and self.config.ablation_after_pos >= ctx:
            raise ConfigError(f"roles.ablation_after_pos must be below the row length {ctx}")

    @property
    def done_streaming(self) -> bool:
        return True

    def update(self, batch: Any) -> None:
        """No streamed activations are needed."""

    def finish_pass(self) -> None:
        """Nothing to finish."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """All the work happens in `write`; nothing to resume."""

    def write(self, context: Any) -> None:
        from precompute.store import STAGE_TABLES

        chosen = context.models if self.config.models == "all" else context.models[:1]
        ids = [context.model_ids[m.name] for m in chosen]
        context.store.clear_model_tables(ids, STAGE_TABLES["roles"])
        rows = torch.from_numpy(context.dataset.rows)
        for model, model_id in zip(chosen, ids, strict=True):
            for table_name, table_rows in analyse_model(model, rows, self.config).items():
                table = next(t for t in STAGE_TABLES["roles"] if t.name == table_name)
                context.store.insert_rows(table, ({"model_id": model_id, **row} for row in table_rows))
            logger.info("roles: %s written", model.name)


def analyse_model(model: Any, rows: torch.Tensor, config: RolesConfig) -> dict[str, list[dict[str, Any]]]:
    """Everything the stage writes for one model: table name -> rows without ``model_id``."""
    weights = processed_weights(model)
    stats = weight_statistics(weights, null_space_dim=config.null_space_dim)
    partition = config.partition_var
    if partition is None:
        partition = config.partition_factor * random_direction_vocab_var(weights.W_U)
    vocab = vocab_roles(stats, config.prediction_kurtosis, partition)
    last = range(max(0, weights.n_layers - config.entropy_layers), weights.n_layers)
    entropy_order = ranked_neurons(stats["w_out_norm"] * stats["null_space_fraction"], last)
    entropy_rank = {neuron: rank for rank, neuron in enumerate(entropy_order)}
    directions = bos_query_directions(model)
    scores = bos_attention_scores(weights, directions)  # [L, d_mlp, L, H], NaN for heads not after the neuron
    significant = np.abs(scores) >= config.attention_sigma * bos_score_sigma(directions)[None, None]
    n_heads = scores.shape[3]
    top = np.argsort(-np.nan_to_num(np.abs(scores), nan=-1.0).reshape(*scores.shape[:2], -1), axis=-1, kind="stable")
    role_rows, score_rows = [], []
    for layer, n in np.ndindex(weights.n_layers, weights.d_mlp):
        row = dict.fromkeys(("attention_role", "attention_layer", "attention_head", "attention_score"))
        row |= {
            "layer": layer,
            "neuron": n,
            "vocab_role": vocab[layer, n],
            "entropy_rank": entropy_rank.get((layer, n)),
        }
        heads = [divmod(int(i), n_heads) for i in top[layer, n, : config.top_heads]]
        heads = [(a, h) for a, h in heads if np.isfinite(scores[layer, n, a, h])]
        if heads:  # the strongest head; positive h = more attention to BOS = the head is switched off
            (a, h), score = heads[0], float(scores[layer, n, heads[0][0], heads[0][1]])
            role = ("deactivation" if score > 0 else "activation") if significant[layer, n, a, h] else None
            row |= {"attention_role": role, "attention_layer": a, "attention_head": h, "attention_score": score}
        role_rows.append(row)
        for rank, (a, h) in enumerate(heads):
            score_rows.append({"layer": layer, "neuron": n, "rank": rank, "attention_layer": a, "head": h})
            score_rows[-1]["score"] = float(scores[layer, n, a, h])
    candidates = entropy_order[: config.n_entropy_candidates]
    baseline = baseline_neurons(stats, last, set(candidates), config.n_random_baseline, config.seed)
    return {
        "roles": role_rows,
        "attention_scores": score_rows,
        "entropy_interventions": list(_curve_rows(model, rows, config, candidates, baseline)),
        "path_ablations": list(_ablation_rows(model, rows, config, scores)),
    }


@torch.inference_mode()
def nominal_metrics(model: Any, tokens: torch.Tensor, valid: torch.Tensor, clean: CleanRun) -> dict[str, float]:
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


def _curve_rows(
    model: Any, rows: torch.Tensor, config: RolesConfig, candidates: list, baseline: list
) -> Iterator[dict]:
    tokens = rows[: config.intervention_rows]
    tokenizer = model.tokenizer
    specials = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    valid = valid_positions(tokens, specials)
    clean = clean_run(model, tokens)
    nominal = nominal_metrics(model, tokens, valid, clean)
    neurons = [(n, False) for n in candidates] + [(n, True) for n in baseline]
    for (layer, neuron), is_baseline in tqdm(neurons, desc=f"entropy {model.name}", leave=False):
        curve = entropy_intervention(
            model, tokens, valid, layer, neuron, config.intervention_values, config.batch_rows, clean
        )
        for i, value in enumerate(curve.values):
            metrics = {
                name: float(getattr(curve, name)[i]) for name in ("ln_scale", "entropy", "loss", "reciprocal_rank")
            }
            key = {"layer": layer, "neuron": neuron, "value": float(value), "is_baseline": is_baseline}
            yield key | metrics | nominal | {"n_tokens": curve.n_tokens}


def _ablation_rows(model: Any, rows: torch.Tensor, config: RolesConfig, scores: np.ndarray) -> Iterator[dict]:
    from precompute.store import blob

    magnitude = np.nan_to_num(np.abs(scores), nan=-1.0)
    order = np.argsort(-magnitude, axis=None, kind="stable")[: config.n_path_ablation_pairs]
    pairs = [tuple(int(i) for i in np.unravel_index(index, scores.shape)) for index in order]
    for layer, neuron, attn_layer, head in tqdm(pairs, desc=f"path ablation {model.name}", leave=False):
        if magnitude[layer, neuron, attn_layer, head] < 0:
            break  # a one-layer model: no head after any neuron
        points = path_ablation(
            model,
            rows[: config.ablation_rows],
            layer,
            neuron,
            attn_layer,
            head,
            config.ablation_after_pos if config.ablation_after_pos is not None else rows.shape[1] // 4,
        )
        key = {"layer": layer, "neuron": neuron, "attention_layer": attn_layer, "head": head}
        yield (
            key
            | correlations(points)
            | {"n_points": int(points.shape[0]), "points": blob(np.ascontiguousarray(points))}
        )
