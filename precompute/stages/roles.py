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

The causal checks themselves are in `precompute.causal`; the weight statistics in `precompute.weights`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from precompute.causal import (
    LOGIT_BUDGET,
    clean_run,
    correlations,
    entropy_intervention,
    nominal_metrics,
    path_ablation,
    valid_positions,
)
from precompute.memory import StageMemory
from precompute.models import LoadedModel
from precompute.rows import Row
from precompute.stage_config import ConfigError, stage_config
from precompute.stages.base import ModelChoice, RunContext, RunInputs, Stage, chosen_models
from precompute.store import attention_scores, blob, entropy_interventions, path_ablations, roles, weight_stats
from precompute.weights import (
    WEIGHT_STAT_COLUMNS,
    bos_attention_scores,
    bos_query_directions,
    bos_score_sigma,
    processed_weights,
    random_direction_vocab_var,
    weight_statistics,
    weights_bytes,
)

logger = logging.getLogger(__name__)

#: Memory of one row kept as a Python dict before it is written (keys are shared; values, the dict itself).
ROW_BYTES = 640

#: The activations the paper fixes an entropy neuron at; −0.17 is about GELU's minimum (paper-spec §5.2).
PAPER_INTERVENTION_VALUES: tuple[float, ...] = (-0.17, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0)

#: The least value of each numeric setting, in field order (`stage_config` has already checked the types).
_LOWER_BOUNDS = {
    "prediction_kurtosis": 0,
    "partition_var": 0,
    "partition_factor": 0,
    "null_space_dim": 1,
    "entropy_layers": 1,
    "n_entropy_candidates": 0,
    "n_random_baseline": 0,
    "intervention_rows": 1,
    "batch_rows": 1,
    "top_heads": 1,
    "attention_sigma": 0,
    "n_path_ablation_pairs": 0,
    "ablation_rows": 1,
    "ablation_after_pos": 0,
    "seed": 0,
}


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

    models: ModelChoice = "all"
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
        for name, least in _LOWER_BOUNDS.items():
            value = getattr(self, name)
            if value is not None and value < least:
                raise ConfigError(f"roles.{name} must be at least {least}, got {value}")
        if not self.intervention_values:
            raise ConfigError(
                f"roles.intervention_values must be a non-empty list of numbers, got {self.intervention_values!r}"
            )

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, object]) -> RolesConfig:
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


class RolesStage(Stage):
    """The ``roles`` stage: weight-based roles plus the entropy and attention checks, for each model."""

    name = "roles"
    tables = (roles, entropy_interventions, attention_scores, path_ablations)
    config_class = RolesConfig

    def __init__(self, inputs: RunInputs) -> None:
        super().__init__(inputs)
        self.config = settings(inputs)

    @classmethod
    def memory_bytes(cls, inputs: RunInputs) -> StageMemory:
        """Nothing while the others stream; while it writes, the largest model's analysis: the stacked W_in and
        W_out, W_U's unit columns and chunks of vocabulary cosines (weight statistics), the unit w_out and the
        head scores with their order, the rows of ``roles`` and ``attention_scores`` as dicts, and the clean run's
        logits over the intervention rows with their log-softmax."""
        config, ctx = settings(inputs), inputs.dataset.ctx
        largest = 0
        for m in chosen_models(inputs.models, config.models):
            weights = weights_bytes(m)
            unit_out = m.n_layers * m.d_mlp * m.d_model * 4
            heads = m.n_neurons * m.n_layers * m.n_heads * (4 + 1 + 8 + 4 + 4)  # scores, significance, order, |h|
            rows = m.n_neurons * (1 + config.top_heads) * ROW_BYTES
            tokens = min(config.intervention_rows, inputs.dataset.n_rows) * ctx
            clean = tokens * (m.d_model + m.d_mlp) * 4 + 2 * tokens * m.d_vocab * 4
            largest = max(largest, weights + unit_out + heads + rows + clean + 4 * LOGIT_BUDGET * 4)
        return StageMemory(state=0, write=largest)

    def write(self, context: RunContext) -> None:
        rows = torch.from_numpy(context.dataset.rows)
        for model in chosen_models(context.models, self.config.models):
            model_id = context.model_ids[model.name]
            for table_name, table_rows in analyse_model(
                model, rows, self.config, written_stats(context, model)
            ).items():
                table = next(t for t in self.tables if t.name == table_name)
                context.store.insert_rows(table, ({"model_id": model_id, **row} for row in table_rows))
            logger.info("roles: %s written", model.name)


def settings(inputs: RunInputs) -> RolesConfig:
    """The stage's settings for this run, with ``ablation_after_pos`` resolved against the row length."""
    config = RolesConfig.from_mapping(inputs.config.analysis.get("roles", {}))
    ctx = inputs.dataset.ctx
    if config.ablation_after_pos is None:
        return dataclasses.replace(config, ablation_after_pos=ctx // 4)
    if config.n_path_ablation_pairs and config.ablation_after_pos >= ctx:
        raise ConfigError(f"roles.ablation_after_pos must be below the row length {ctx}")
    return config


def written_stats(context: RunContext, model: LoadedModel) -> dict[str, np.ndarray] | None:
    """The model's ``weight_stats`` when the stats stage has written them (W_U·w_out over the vocabulary for every
    neuron: minutes at GPT2-small's shapes, not worth doing twice), else None."""
    found = context.store.model_columns(weight_stats, context.model_ids[model.name], WEIGHT_STAT_COLUMNS)
    if len(found["w_out_norm"]) != model.n_neurons:
        return None
    return {name: values.reshape(model.n_layers, model.d_mlp) for name, values in found.items()}


def analyse_model(
    model: LoadedModel, rows: torch.Tensor, config: RolesConfig, stats: Mapping[str, np.ndarray] | None = None
) -> dict[str, list[Row]]:
    """Everything the stage writes for one model: table name -> rows without ``model_id``.

    Args:
        stats: the model's weight statistics if already computed (the stats stage's table); they are used only
            with the default near-null space, the one the stats stage uses.
    """
    weights = processed_weights(model)
    if stats is None or config.null_space_dim is not None:
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
    role_rows: list[Row] = []
    score_rows: list[Row] = []
    for layer, n in np.ndindex(weights.n_layers, weights.d_mlp):
        row: Row = dict.fromkeys(("attention_role", "attention_layer", "attention_head", "attention_score"))
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


def _curve_rows(
    model: LoadedModel,
    rows: torch.Tensor,
    config: RolesConfig,
    candidates: list[tuple[int, int]],
    baseline: list[tuple[int, int]],
) -> Iterator[Row]:
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


def _ablation_rows(model: LoadedModel, rows: torch.Tensor, config: RolesConfig, scores: np.ndarray) -> Iterator[Row]:
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
