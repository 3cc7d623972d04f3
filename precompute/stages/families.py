"""The ``families`` stage: streaming variance reduction of binary features, and each neuron's family label.

For a neuron's activation v (``mlp.hook_post``, as the paper's `explain.py`) and a binary feature y holding on a
share β of the stage's tokens (the counted ones by default, every token with ``tokens: all`` as the paper), the
variance reduction (paper eq. 4) is

    VR = 1 − [(1 − β)·Var(v | y = 0) + β·Var(v | y = 1)] / Var(v),

with population variances: exactly the R² of predicting v by its two group means, so VR ∈ [0, 1] (the paper's
pandas code uses ddof = 1; the difference is O(1/n)). Every feature is a union of the categories of one variable
of `precompute.features` (token, previous token, position, Python syntax, spaCy), so one streaming pass keeps,
per neuron, the count and the sum of v in every category plus Σv and Σv² overall (float64); at the end, for a
feature with n1 tokens of mean m1 (and n0 of mean m0), VR = n1·n0/n · (m1 − m0)² / Σ(v − v̄)².

Labels (paper §4.4; thresholds in `FamiliesConfig`), first rule that holds:
``alphabet`` (the paper's rule: for each letter, the neuron of the model with the largest VR of that letter's
single-letter unigram feature ``token:<letter>``, when that VR > 0.35; first-letter features are not it),
``unigram`` (the best current-token feature, unigram, first letter or token class, VR > 0.5),
``previous_token`` (VR > 0.5),
``position`` (pre-activation kurtosis < 2, non-excess, and binary mutual information between firing (pre > 0) and
position above ``position_mi``), ``syntax`` (best syntax/spaCy feature VR > 0.35), else ``none``. ``semantic`` is
reserved: no feature set here (no topics, no corpus subsets) can reach it.

Memory (issue 11): only the token categories that occur get a sum (a 50,257-token vocabulary as categories was
27.6 GiB a GPT2-small model), and the sums are the stage's splittable state: with a split of P passes each pass
sums one block of neurons and closes it into its best features; the last block stays for `FamiliesStage.write`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from precompute import features as feats
from precompute.activations import ActivationBatch
from precompute.data import TokenSet
from precompute.distributed import Distributed
from precompute.memory import StageMemory, chunk_bytes, chunk_rows
from precompute.models import decoded_vocab
from precompute.moments import StreamingMoments, load_per_model_state, per_model_state_dict
from precompute.rows import Row, neuron_key, neuron_key_columns
from precompute.stage_config import ConfigError, stage_config
from precompute.stages.base import (
    ModelChoice,
    RunContext,
    RunInputs,
    Stage,
    batch_tokens,
    block_widths,
    chosen_models,
    family_blocks,
    in_block_order,
    models_with_neurons,
    selected_batch,
    selection_bytes,
    split_of,
    vocab_size,
)
from precompute.store import WRITE_CHUNK_BYTES, families, feature_columns, feature_names, feature_scores

logger = logging.getLogger(__name__)

CURRENT_SETS = ("unigram", "first_letter", "token_class")
#: Every feature set a run can have (`precompute.features`): each neuron keeps its best feature of each.
N_SETS = len(("unigram", "first_letter", "token_class", "previous_token", "position", "syntax", "spacy"))
#: The letters of the alphabet family: each has the single-letter unigram feature ``token:<letter>``.
LETTERS = "abcdefghijklmnopqrstuvwxyz"
#: An allowance for the buckets that pool the ids beyond ``max_vocab`` by (first letter, token classes) signature.
POOLED_BUCKETS = 1024


@dataclass(frozen=True)
class FamiliesConfig:
    """Settings of the ``families`` stage (``analysis["families"]``).

    Args:
        models: ``all`` models or only the ``reference``.
        syntax: Python ``tokenize`` features: ``auto`` (when most documents parse as Python), ``python``, ``off``.
        spacy: ``auto`` uses an installed spaCy pipeline when the corpus is not Python; ``off`` never does.
        unigram_min_count: least occurrences of a normalised token string for it to be a unigram feature.
        max_vocab: own categories for only this many of the most frequent token ids (memory: 2 × max_vocab ×
            n_neurons × 8 bytes per model, split over the run's passes); the rest are pooled by alphabet/class
            signature. None: every id that occurs.
        top_features: features kept per neuron in ``feature_scores``.
        unigram_vr, alphabet_vr, previous_token_vr, syntax_vr: VR a label needs (paper: 0.5 and 0.35).
        position_kurtosis: a position neuron's pre-activation kurtosis is below this (paper: 2).
        position_mi: and its firing/position mutual information (nats) is above this.
        tokens: which tokens the variance reductions (and the position rule) cover: ``counted`` (default: the
            correlations' tokens) or ``all`` (every token, BOS included, as the paper's `explain.py`).
        max_tokens: use only the first this many of those tokens (in row order) and stop updating after them
            (the paper: its 10M-token dataset); None: all of them.
    """

    models: ModelChoice = "all"
    syntax: Literal["auto", "python", "off"] = "auto"
    spacy: Literal["auto", "off"] = "auto"
    unigram_min_count: int = 20
    max_vocab: int | None = None
    top_features: int = 10
    unigram_vr: float = 0.5
    alphabet_vr: float = 0.35
    previous_token_vr: float = 0.5
    syntax_vr: float = 0.35
    position_kurtosis: float = 2.0
    position_mi: float = 0.05
    tokens: TokenSet = "counted"
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.unigram_min_count < 1 or self.top_features < 1:
            raise ConfigError("families.unigram_min_count and families.top_features must be at least 1")
        for key in ("max_vocab", "max_tokens"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"families.{key} must be at least 1 or null, got {getattr(self, key)}")


def variance_reduction(v: np.ndarray, y: np.ndarray) -> float:
    """Paper eq. 4 on raw arrays (population variances): the reference the streaming version must equal.

    Computed as β(1 − β)(m1 − m0)² / Var(v), equal to eq. 4 in exact arithmetic and never outside [0, 1].

    >>> variance_reduction(np.array([1.0, 1.0, 3.0, 3.0]), np.array([0, 0, 1, 1]))
    1.0
    >>> variance_reduction(np.array([1.0, 3.0, 1.0, 3.0]), np.array([0, 0, 1, 1]))
    0.0
    """
    y = y.astype(bool)
    beta, total = y.mean(), v.var()
    if total <= 0 or beta in (0.0, 1.0):
        return 0.0
    return float(min(1.0, beta * (1 - beta) * (v[y].mean() - v[~y].mean()) ** 2 / total))


def grouped_variance_reduction(n1: np.ndarray, s1: np.ndarray, n: float, s: np.ndarray, sst: np.ndarray) -> np.ndarray:
    """VR from group sums: ``n1`` [features] tokens and ``s1`` [features, neurons] sums where the feature holds,
    ``n``/``s`` [neurons] over all tokens, ``sst`` [neurons] the total sum of squared deviations."""
    n1 = n1[:, None]
    n0 = n - n1
    with np.errstate(divide="ignore", invalid="ignore"):
        between = n1 * n0 / n * (s1 / n1 - (s - s1) / n0) ** 2
        vr = between / sst
    return np.clip(np.where((n1 > 0) & (n0 > 0) & (sst > 0), vr, 0.0), 0.0, 1.0)


def position_mutual_information(fire: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Binary MI (nats) between firing and position: Σ_p P(p)·KL(Bernoulli(r_p) ‖ Bernoulli(r)) (paper §4.4,
    positions weighted by their counted tokens; equal weights 1/T when every position counts alike).

    Args:
        fire: [ctx, neurons] tokens with pre > 0 at each position; count: [ctx] counted tokens per position.

    >>> round(float(position_mutual_information(np.array([[10.0], [0.0]]), np.array([10, 10]))[0]), 4)  # log 2
    0.6931
    """
    counted = count > 0  # positions without a counted token (BOS's, always) have no weight: left out, since
    # their rate 0 against a neuron firing on every token would give 0 × log(1/0) = NaN instead of nothing
    count = count[counted].astype(np.float64)[:, None]
    fire = np.asarray(fire)[counted]
    total = count.sum()
    r_p = fire / count
    r = fire.sum(0) / max(total, 1)

    def term(p: np.ndarray, q: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(p > 0, p * np.log(p / q), 0.0)

    return ((count / max(total, 1)) * (term(r_p, r) + term(1 - r_p, 1 - r))).sum(0)


def alphabet_neurons(letter_vr: np.ndarray, threshold: float) -> dict[int, tuple[str, float]]:
    """The paper's alphabet family (paper-spec §4.4): for each letter, the neuron with the largest VR of the
    letter's single-letter unigram feature ``token:<letter>``, kept when that VR > ``threshold``. A neuron that wins
    several letters keeps its largest VR.

    Args:
        letter_vr: [26, neurons] VR of ``token:a`` ... ``token:z`` (0 where a letter has no feature).

    Returns:
        neuron (flat index) -> (feature, VR).

    >>> vr = np.zeros((26, 3)); vr[0] = [0.2, 0.9, 0.5]; vr[1] = [0.3, 0.1, 0.34]
    >>> alphabet_neurons(vr, 0.35)
    {1: ('token:a', 0.9)}
    """
    winners = np.argmax(letter_vr, axis=1)  # [26]: the first of tied neurons
    found: dict[int, tuple[str, float]] = {}
    for i, (letter, neuron) in enumerate(zip(LETTERS, winners.tolist(), strict=True)):
        vr = float(letter_vr[i, neuron])
        if vr > threshold and (neuron not in found or vr > found[neuron][1]):
            found[neuron] = (f"token:{letter}", vr)
    return found


def label_neuron(
    best: dict[str, tuple[str, float]],
    pre_kurt: float,
    position_mi: float,
    cfg: FamiliesConfig,
    alphabet: tuple[str, float] | None = None,
) -> tuple[str, str | None, float | None, str]:
    """The family of one neuron from its best feature per set: (family, feature, VR, rule).

    Args:
        alphabet: the letter feature and VR when the neuron is its model's best for a letter (`alphabet_neurons`).
    """
    if alphabet is not None:
        return "alphabet", *alphabet, f"the model's best neuron for {alphabet[0]}, VR > {cfg.alphabet_vr}"
    current = max((best[s] for s in CURRENT_SETS if s in best), key=lambda t: t[1], default=None)
    if current and current[1] > cfg.unigram_vr:
        return "unigram", current[0], current[1], f"best current-token feature VR > {cfg.unigram_vr}"
    if "previous_token" in best and best["previous_token"][1] > cfg.previous_token_vr:
        return "previous_token", *best["previous_token"], f"previous-token VR > {cfg.previous_token_vr}"
    if pre_kurt < cfg.position_kurtosis and position_mi > cfg.position_mi:
        feature, vr = best.get("position", (None, None))
        return "position", feature, vr, f"kurtosis < {cfg.position_kurtosis} and position MI > {cfg.position_mi}"
    syntax = max((best[s] for s in ("syntax", "spacy") if s in best), key=lambda t: t[1], default=None)
    if syntax and syntax[1] > cfg.syntax_vr:
        return "syntax", syntax[0], syntax[1], f"syntax VR > {cfg.syntax_vr}"
    overall = max(best.values(), key=lambda t: t[1], default=(None, None))
    return "none", overall[0], overall[1], "no rule holds"


class FamiliesStage(Stage):
    """The ``families`` stage (a pass over ``hook_pre`` and ``hook_post``; the per-category sums split over the
    run's passes when the memory plan asks)."""

    name = "families"
    tables = (families, feature_names, feature_scores)
    config_class = FamiliesConfig
    hooks = frozenset({"hook_pre", "hook_post"})
    splittable = True

    def __init__(self, inputs: RunInputs) -> None:
        super().__init__(inputs)
        self.config = cfg = stage_config(FamiliesConfig, inputs.config.analysis.get(self.name), self.name)
        self.device = torch.device(inputs.config.device)
        self.shapes = {m.name: m.n_neurons for m in chosen_models(inputs.models, cfg.models)}
        dataset, tokenizer = inputs.dataset, inputs.models[0].tokenizer
        self.selection = dataset.selection(cfg.tokens, cfg.max_tokens)
        self.rows, self.ctx = dataset.rows, dataset.ctx
        self.strings = decoded_vocab(tokenizer, vocab_size(inputs))  # more entries if the tokenizer has more
        d_vocab = len(self.strings)
        self.special = sorted(
            {i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None}
        )
        self.eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else self.special[0]
        current = _padded(self.selection.token_counts, d_vocab)
        previous = _padded(self.selection.previous_token_counts, d_vocab)
        self.buckets = feats.vocab_buckets(self.strings, current + previous, cfg.max_vocab, self.special)
        token = feats.token_features("token", self.strings, self.buckets, current, cfg.unigram_min_count, self.special)
        prev_token = feats.token_features(
            "prev_token", self.strings, self.buckets, previous, cfg.unigram_min_count, self.special, extra_categories=1
        )
        # Only the buckets that occur get a category (a vocabulary of 50,257 tokens and a few thousand seen): the
        # others would hold zero counts and sums, which no feature's variance reduction notices.
        seen = np.bincount(self.buckets.bucket_of, weights=current, minlength=self.buckets.n_buckets) > 0
        seen_before = np.bincount(self.buckets.bucket_of, weights=previous, minlength=self.buckets.n_buckets) > 0
        self.token_category = torch.from_numpy(token.observed_categories(seen)[self.buckets.bucket_of]).to(self.device)
        slots = prev_token.observed_categories(np.append(seen_before, True))  # and "no previous token"
        self.previous_category = torch.from_numpy(slots[self.buckets.bucket_of]).to(self.device)
        self.no_previous = int(slots[-1])
        self.features: dict[str, feats.FeatureMatrix] = {
            "token": token.restricted(seen),
            "prev_token": prev_token.restricted(np.append(seen_before, True)),
            "position": feats.position_features(self.ctx),
        }
        self.context_labels: dict[str, np.ndarray] | None = None  # syntax/spaCy ids [n_rows, ctx], built lazily
        self.counts = {
            var: torch.zeros(f.n_categories, dtype=torch.float64, device=self.device)
            for var, f in self.features.items()
        }
        self.passes = split_of(inputs).passes_for(self.name)
        self.pass_index = 0
        self.blocks = family_blocks(in_block_order(inputs, self.shapes), self.passes)
        self.state = {name: self._empty(name, n) for name, n in self.shapes.items()}

    @classmethod
    def memory_bytes(cls, inputs: RunInputs) -> StageMemory:
        cfg = stage_config(FamiliesConfig, inputs.config.analysis.get(cls.name), cls.name)
        dataset = inputs.dataset
        selection = dataset.selection(cfg.tokens, cfg.max_tokens)
        d_vocab = max(vocab_size(inputs), len(inputs.models[0].tokenizer))  # the decoded vocabulary's length
        seen = int((selection.token_counts > 0).sum())
        seen_before = int((selection.previous_token_counts > 0).sum())
        if cfg.max_vocab is not None:  # the kept ids plus the pooled (letter, class) signatures
            seen = min(seen, cfg.max_vocab + POOLED_BUCKETS)
            seen_before = min(seen_before, cfg.max_vocab + POOLED_BUCKETS)
        categories = seen + seen_before + 1 + dataset.ctx  # token, previous token (or none), position
        if cfg.syntax != "off" or cfg.spacy == "auto":
            categories += feats.syntax_features().n_categories  # spaCy's (POS, dependency) pairs: the same order
        models = chosen_models(inputs.models, cfg.models)
        passes = split_of(inputs).passes_for(cls.name)
        n_all = sum(m.n_neurons for m in models)
        # one pass's blocks of neurons, every model's together, and the widest of one model (`family_blocks`)
        widths, widest = block_widths(in_block_order(inputs, {m.name: m.n_neurons for m in models}), passes)
        block = widths * categories * 8  # one block's category sums
        # per neuron: firing per position, hook_pre and hook_post power sums, the best features' indices and VR,
        # the VR of each letter's unigram feature
        per_neuron = 8 * dataset.ctx + 2 * StreamingMoments.bytes_for(1) + (cfg.top_features + N_SETS) * 16
        per_neuron += len(LETTERS) * 8
        # the counts per category, each dataset token's context label and the token -> category maps
        shared = 8 * categories + 4 * dataset.rows.size + 2 * 8 * d_vocab
        n_features = categories  # at most one feature per category and variable (an allowance: fewer in practice)
        top = cfg.top_features * max(m.n_neurons for m in models) * 8 * 4  # the feature_scores columns
        return StageMemory(
            state=n_all * per_neuron + shared + block,
            update=chunk_bytes(batch_tokens(inputs), widest, 8) + selection_bytes(inputs, selection, firing=True),
            finish=chunk_bytes(widest, n_features, 8 * 8),  # variance reductions of a chunk of neurons
            write=chunk_bytes(widest, n_features, 8 * 8) + top + WRITE_CHUNK_BYTES,
        )

    def _empty(self, name: str, n: int) -> dict[str, Any]:
        cfg = self.config
        state: dict[str, Any] = {
            "fire": torch.zeros(self.ctx, n, dtype=torch.float64, device=self.device),
            "pre_moments": StreamingMoments(n, self.device),
            "post_moments": StreamingMoments(n, self.device),  # Σv and Σv² give Var(v)
            "top_index": np.zeros((cfg.top_features, n), dtype=np.int64),  # best features first
            "top_vr": np.zeros((cfg.top_features, n)),
            "best_index": np.zeros((N_SETS, n), dtype=np.int64),  # per feature set: the best feature
            "best_vr": np.zeros((N_SETS, n)),
            "letter_vr": np.zeros((len(LETTERS), n)),  # VR of token:a ... token:z (0: no such feature)
        }
        return state | self._empty_sums(n, self.blocks[name][self.pass_index])

    def _empty_sums(self, n: int, block: slice) -> dict[str, torch.Tensor]:
        """The activation sums of this pass's block of neurons in every category of every variable (float64)."""
        width = block.stop - block.start
        return {
            f"{var}_sum": torch.zeros(f.n_categories, width, dtype=torch.float64, device=self.device)
            for var, f in self.features.items()
        }

    def _build_context_labels(self) -> None:
        """Syntax (or spaCy) labels of every dataset token, once; adds their variable to every accumulator."""
        if self.context_labels is not None:
            return
        cfg, labels = self.config, None
        if cfg.syntax != "off":
            probe = feats.python_syntax_labels(self.rows[:64], self.strings, self.eos_id)
            if cfg.syntax == "python" or probe.error_rate <= 0.5:
                labels = feats.python_syntax_labels(self.rows, self.strings, self.eos_id)
            else:
                logger.info("families: %.0f%% of documents are not Python: no syntax features", 100 * probe.error_rate)
        if labels is None and cfg.spacy == "auto":
            labels = feats.spacy_labels(self.rows, self.strings, self.eos_id)
        self.context_labels = {}
        if labels is not None:
            var = labels.features.variable
            self.context_labels[var] = labels.ids.astype(np.int32)  # few categories: half the memory of int64
            self.features[var] = labels.features
            self.counts.setdefault(
                var, torch.zeros(labels.features.n_categories, dtype=torch.float64, device=self.device)
            )
            for name, state in self.state.items():
                width = self.blocks[name][self.pass_index].stop - self.blocks[name][self.pass_index].start
                state.setdefault(
                    f"{var}_sum",
                    torch.zeros(labels.features.n_categories, width, dtype=torch.float64, device=self.device),
                )

    def categories(self, batch: ActivationBatch) -> dict[str, torch.Tensor]:
        """The category of every counted token of a batch, per variable: [tokens] int64."""
        tokens, index = batch.tokens, batch.counted_index
        previous = torch.cat([torch.full_like(tokens[:, :1], -1), tokens[:, :-1]], dim=1).reshape(-1)[index]
        cats = {
            "token": self.token_category[tokens.reshape(-1)[index]],
            "prev_token": torch.where(previous >= 0, self.previous_category[previous.clamp_min(0)], self.no_previous),
            "position": batch.counted_positions,
        }
        rows = slice(batch.row_start, batch.row_start + tokens.shape[0])
        for var, ids in (self.context_labels or {}).items():
            cats[var] = torch.from_numpy(ids[rows].reshape(-1)).to(self.device)[index].long()
        return cats

    def update(self, batch: ActivationBatch) -> None:
        self._build_context_labels()
        batch = selected_batch(batch, self.selection)  # this stage's tokens (`FamiliesConfig.tokens`, max_tokens)
        if batch.n_counted == 0:
            return
        cats = self.categories(batch)
        if self.pass_index == 0:
            for var, ids in cats.items():
                self.counts[var] += torch.bincount(ids, minlength=self.features[var].n_categories)
        for name, state in self.state.items():
            if self.pass_index == 0:
                state["pre_moments"].update(batch.n_counted, batch.power_sums(name, "hook_pre"))
                state["post_moments"].update(batch.n_counted, batch.power_sums(name, "hook_post"))
                state["fire"] += batch.firing_by_position(name)
            block = self.blocks[name][self.pass_index]
            if block.stop <= block.start:  # none of this model's neurons in this pass: it may not have run
                continue
            for rows, x in batch.counted_chunks(name, "hook_post", columns=block):
                x64 = x.double()
                for var, ids in cats.items():
                    state[f"{var}_sum"].index_add_(0, ids[rows], x64)

    @classmethod
    def models_by_pass(cls, inputs: RunInputs) -> list[frozenset[str] | None]:
        """The chosen models in the first pass (moments, firing), then those of each pass's block (`family_blocks`)."""
        cfg = stage_config(FamiliesConfig, inputs.config.analysis.get(cls.name), cls.name)
        sizes = {m.name: m.n_neurons for m in chosen_models(inputs.models, cfg.models)}
        passes = max(1, split_of(inputs).passes_for(cls.name))
        blocks = family_blocks(in_block_order(inputs, sizes), passes)
        return [frozenset(sizes), *(models_with_neurons(blocks, index) for index in range(1, passes))]

    def models_in_pass(self) -> frozenset[str] | None:
        if self._done:
            return frozenset()
        if self.pass_index == 0:
            return frozenset(self.shapes)
        return models_with_neurons(self.blocks, self.pass_index)

    def reduce(self, group: Distributed) -> None:
        """Add up the ranks' sums: in pass 0 the category counts, power sums and firing counts; in every pass
        this pass's block of category sums. (A rank that read no batch builds its context labels here, so every
        rank holds the same variables.)"""
        self._build_context_labels()
        if self.pass_index == 0:
            for counts in self.counts.values():
                group.all_reduce(counts)
        for state in self.state.values():
            if self.pass_index == 0:
                state["pre_moments"].reduce(group)
                state["post_moments"].reduce(group)
                group.all_reduce(state["fire"])
            for key in sorted(key for key in state if key.endswith("_sum")):  # one order on every rank
                group.all_reduce(state[key])

    def finish_pass(self) -> None:
        """Close a pass: with more passes to come, this block's sums become its neurons' best features; the last
        block's sums stay for `write` (and `scores`)."""
        if self.pass_index + 1 >= self.passes:
            self._done = True
            return
        for name in self.state:
            self._reduce(name, self.blocks[name][self.pass_index])
        self.pass_index += 1
        for name, state in self.state.items():
            state.update({key: None for key in state if key.endswith("_sum")})  # free this block first
            state.update(self._empty_sums(self.shapes[name], self.blocks[name][self.pass_index]))

    def state_dict(self) -> dict[str, Any]:
        return {
            "models": per_model_state_dict(self.state),
            "counts": self.counts,
            "pass_index": self.pass_index,
            "done": self._done,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._build_context_labels()
        self.pass_index = state.get("pass_index", 0)
        for values in self.state.values():  # free this run's empty block before the checkpoint's arrive
            values.update({key: None for key in values if key.endswith("_sum")})
        load_per_model_state(self.state, state["models"], self.device)
        self.counts = {k: v.to(self.device) for k, v in state["counts"].items()}
        self._done = state["done"]

    # --- results ------------------------------------------------------------------------------------------

    def scores(self, name: str, neurons: slice) -> tuple[np.ndarray, list[str], list[str], np.ndarray]:
        """VR [features, neurons in the slice] of every feature, with feature names, sets and shares; the neurons
        are in the block of the current pass."""
        state, block = self.state[name], self.blocks[name][self.pass_index]
        local = slice(neurons.start - block.start, neurons.stop - block.start)
        n = float(self.counts["position"].sum())
        s = state["post_moments"].sums[0, neurons].cpu().numpy()
        sst = n * state["post_moments"].variance()[neurons].cpu().numpy()
        blocks, shares = [], []
        names: list[str] = []
        sets: list[str] = []
        for var, f in self.features.items():
            n1 = f.membership @ self.counts[var].cpu().numpy()
            s1 = f.membership @ state[f"{var}_sum"][:, local].cpu().numpy()
            blocks.append(grouped_variance_reduction(n1, s1, n, s, sst))
            names += f.names
            sets += f.sets
            shares.append(n1 / max(n, 1))
        return np.concatenate(blocks), names, sets, np.concatenate(shares)

    def feature_sets(self) -> list[str]:
        """The feature sets of this run, in order of their first feature."""
        return list(dict.fromkeys(s for f in self.features.values() for s in f.sets))

    def _reduce(self, name: str, block: slice) -> None:
        """Each neuron of a block: its ``top_features`` best features and its best feature of every set, from the
        block's sums, a chunk of neurons at a time."""
        state, k = self.state[name], self.config.top_features
        n_features = sum(len(f.names) for f in self.features.values())
        feature_sets = self.feature_sets()
        step = chunk_rows(n_features, 8 * 8)  # VR and its temporaries, the ranks
        for start in range(block.start, block.stop, step):
            part = slice(start, min(start + step, block.stop))
            vr, names, sets, _shares = self.scores(name, part)
            row_of = {feature: row for row, feature in enumerate(names) if sets[row] == "unigram"}
            for i, letter in enumerate(LETTERS):  # the paper's <letter>_unigram, for the alphabet family
                if f"token:{letter}" in row_of:
                    state["letter_vr"][i, part] = vr[row_of[f"token:{letter}"]]
            top = top_rows(vr, k)  # [k, neurons]
            state["top_index"][: len(top), part] = top
            state["top_vr"][: len(top), part] = np.take_along_axis(vr, top, axis=0)
            set_array = np.asarray(sets)
            for s, feature_set in enumerate(feature_sets):
                rows = np.flatnonzero(set_array == feature_set)
                best = rows[np.argmax(vr[rows], axis=0)]
                state["best_index"][s, part] = best
                state["best_vr"][s, part] = vr[best, np.arange(vr.shape[1])]

    def write(self, context: RunContext) -> None:
        self._build_context_labels()
        names = np.asarray([name for f in self.features.values() for name in f.names], dtype=object)
        sets = np.asarray([s for f in self.features.values() for s in f.sets], dtype=object)
        for model in context.models:
            if model.name not in self.state:
                continue
            state, model_id = self.state[model.name], context.model_ids[model.name]
            self._reduce(model.name, self.blocks[model.name][self.pass_index])
            n1 = np.concatenate([f.membership @ self.counts[var].cpu().numpy() for var, f in self.features.items()])
            shares = n1 / max(float(self.counts["position"].sum()), 1)
            k = min(self.config.top_features, len(names))
            top, top_vr = state["top_index"][:k], state["top_vr"][:k]  # [k, n]
            flat = np.repeat(np.arange(model.n_neurons)[None], k, axis=0)
            rank = np.repeat(np.arange(k)[:, None], model.n_neurons, axis=1)
            # the features once per model, each score naming its feature by id (issue 11)
            chosen = top.T.reshape(-1)
            dictionary, ids = feature_columns(model_id, list(names[chosen]), list(sets[chosen]), shares[chosen])
            context.store.insert_columns(feature_names, dictionary)
            context.store.insert_columns(
                feature_scores,
                neuron_key_columns(model_id, model.d_mlp, flat.T.reshape(-1))
                | {"rank": rank.T.reshape(-1), "feature_id": ids, "variance_reduction": top_vr.T.reshape(-1)},
            )
            context.store.insert_rows(families, self._label_rows(model.name, model_id, model.d_mlp, names))

    def _label_rows(self, name: str, model_id: int, d_mlp: int, names: np.ndarray) -> Iterator[Row]:
        cfg, state = self.config, self.state[name]
        found: Counter[str] = Counter()
        kurtosis = state["pre_moments"].kurtosis().cpu().numpy()
        count = self.counts["position"].cpu().numpy()
        alphabet = alphabet_neurons(state["letter_vr"], cfg.alphabet_vr)
        feature_sets = self.feature_sets()  # once: a pass over every feature (thousands at a GPU run's vocabulary)
        step = chunk_rows(self.ctx, 8 * 6)  # firing rates and the terms of the mutual information
        for start in range(0, self.shapes[name], step):
            part = slice(start, min(start + step, self.shapes[name]))
            mi = position_mutual_information(state["fire"][:, part].cpu().numpy(), count)
            for j, flat in enumerate(range(part.start, part.stop)):
                best = {
                    s: (str(names[state["best_index"][i, flat]]), float(state["best_vr"][i, flat]))
                    for i, s in enumerate(feature_sets)
                }
                kurt = float(kurtosis[flat])
                finite_kurt = kurt if np.isfinite(kurt) else float("inf")
                family, feature, value, rule = label_neuron(best, finite_kurt, float(mi[j]), cfg, alphabet.get(flat))
                found[family] += 1
                evidence = {
                    "rule": rule,
                    "pre_kurt": round(kurt, 4) if np.isfinite(kurt) else None,
                    "best": {s: [f, round(v, 4)] for s, (f, v) in best.items()},
                }
                yield neuron_key(model_id, d_mlp, flat) | dict(
                    family=family, best_feature=feature, best_vr=value, position_mi=float(mi[j]), evidence=evidence
                )
        logger.info("families: %s: %s", name, dict(sorted(found.items())))


def top_rows(values: np.ndarray, k: int) -> np.ndarray:
    """The rows of each column's ``k`` largest values, largest first, ties by the lower row: [min(k, rows),
    columns], exactly ``np.argsort(-values, axis=0, kind="stable")[:k]``.

    A GPU run's vocabulary gives thousands of features a neuron (5,863 at 1M stdlib tokens), and a full stable
    sort of them along the strided axis took 2.2 s for 5,000 features × 4,096 neurons on the 2-vCPU build machine
    (this: 0.86 s): it selects the k-th largest by a partition along the contiguous axis, keeps the ties at it in
    row order, and sorts only the k.

    >>> top_rows(np.array([[1.0, 5.0], [3.0, 5.0], [3.0, 2.0]]), 2).tolist()
    [[1, 0], [2, 1]]
    """
    n_rows, n_columns = values.shape
    if k >= n_rows or np.isnan(values).any():  # NaN sorts last in argsort: kept exact by sorting
        return np.argsort(-values, axis=0, kind="stable")[:k]
    columns = np.ascontiguousarray(values.T)  # [columns, rows]
    kth = -np.partition(-columns, k - 1, axis=1)[:, k - 1 : k]  # each column's k-th largest
    above = columns > kth
    tie = columns == kth
    room = k - above.sum(axis=1, keepdims=True)  # how many ties at the k-th value make the cut, first rows first
    keep = above | (tie & (np.cumsum(tie, axis=1) <= room))
    chosen = np.nonzero(keep)[1].reshape(n_columns, k)  # k rows a column, in row order
    order = np.argsort(-np.take_along_axis(columns, chosen, axis=1), axis=1, kind="stable")
    return np.take_along_axis(chosen, order, axis=1).T


def _padded(counts: np.ndarray, length: int) -> np.ndarray:
    """Counts per token id, cut or padded with zeros to ``length`` ids."""
    out = np.zeros(length, dtype=np.int64)
    out[: min(length, len(counts))] = counts[:length]
    return out


__all__ = [
    "LETTERS",
    "FamiliesConfig",
    "FamiliesStage",
    "alphabet_neurons",
    "grouped_variance_reduction",
    "label_neuron",
    "position_mutual_information",
    "top_rows",
    "variance_reduction",
]
