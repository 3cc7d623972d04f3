"""The ``families`` stage: streaming variance reduction of binary features, and each neuron's family label.

For a neuron's activation v (``mlp.hook_post``, as the paper's `explain.py`) and a binary feature y holding on a
share β of the counted tokens, the variance reduction (paper eq. 4) is

    VR = 1 − [(1 − β)·Var(v | y = 0) + β·Var(v | y = 1)] / Var(v),

with population variances: exactly the R² of predicting v by its two group means, so VR ∈ [0, 1] (the paper's
pandas code uses ddof = 1; the difference is O(1/n)). Every feature is a union of the categories of one variable
of `precompute.features` (token, previous token, position, Python syntax, spaCy), so one streaming pass keeps,
per neuron, the count and the sum of v in every category plus Σv and Σv² overall (float64); at the end, for a
feature with n1 tokens of mean m1 (and n0 of mean m0), VR = n1·n0/n · (m1 − m0)² / Σ(v − v̄)².

Labels (paper §4.4; thresholds in `FamiliesConfig`), first rule that holds:
``alphabet`` (the best current-token feature is a first-letter feature or a single-letter unigram, VR > 0.35),
``unigram`` (the best current-token feature, unigram or token class, VR > 0.5), ``previous_token`` (VR > 0.5),
``position`` (pre-activation kurtosis < 2, non-excess, and binary mutual information between firing (pre > 0) and
position above ``position_mi``), ``syntax`` (best syntax/spaCy feature VR > 0.35), else ``none``. ``semantic`` is
reserved: no feature set here (no topics, no corpus subsets) can reach it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from precompute import features as feats
from precompute.stage_config import ConfigError, stage_config
from precompute.stats import (
    StreamingMoments,
    counted_activations,
    counted_positions,
    firing_by_position,
    load_per_model_state,
    neuron_key,
    per_model_state_dict,
)

if TYPE_CHECKING:
    from precompute.activations import ActivationBatch
    from precompute.pipeline import RunContext

logger = logging.getLogger(__name__)

CURRENT_SETS = ("unigram", "alphabet", "token_class")


@dataclass(frozen=True)
class FamiliesConfig:
    """Settings of the ``families`` stage (``analysis["families"]``).

    Args:
        models: ``all`` models or only the ``reference``.
        syntax: Python ``tokenize`` features: ``auto`` (when most documents parse as Python), ``python``, ``off``.
        spacy: ``auto`` uses an installed spaCy pipeline when the corpus is not Python; ``off`` never does.
        unigram_min_count: least occurrences of a normalised token string for it to be a unigram feature.
        max_vocab: own categories for only this many of the most frequent token ids (memory: 2 × max_vocab ×
            n_neurons × 8 bytes per model); the rest are pooled by alphabet/class signature. None: every id.
        top_features: features kept per neuron in ``feature_scores``.
        unigram_vr, alphabet_vr, previous_token_vr, syntax_vr: VR a label needs (paper: 0.5 and 0.35).
        position_kurtosis: a position neuron's pre-activation kurtosis is below this (paper: 2).
        position_mi: and its firing/position mutual information (nats) is above this.
    """

    models: Literal["all", "reference"] = "all"
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

    def __post_init__(self) -> None:
        if self.unigram_min_count < 1 or self.top_features < 1:
            raise ConfigError("families.unigram_min_count and families.top_features must be at least 1")
        if self.max_vocab is not None and self.max_vocab < 1:
            raise ConfigError(f"families.max_vocab must be at least 1 or null, got {self.max_vocab}")


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
    count = count.astype(np.float64)[:, None]
    total = count.sum()
    r_p = np.divide(fire, count, out=np.zeros_like(fire, dtype=np.float64), where=count > 0)
    r = fire.sum(0) / max(total, 1)

    def term(p: np.ndarray, q: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(p > 0, p * np.log(p / q), 0.0)

    return ((count / max(total, 1)) * (term(r_p, r) + term(1 - r_p, 1 - r))).sum(0)


def is_alphabet_feature(name: str, feature_set: str) -> bool:
    """A first-letter feature, or the unigram of a single letter (the paper's ``<letter>_unigram``).

    >>> is_alphabet_feature("token:a", "unigram"), is_alphabet_feature("token:an", "unigram")
    (True, False)
    """
    return feature_set == "alphabet" or (feature_set == "unigram" and len(name) == 7 and name[6].isalpha())


def label_neuron(
    best: dict[str, tuple[str, float]], pre_kurt: float, position_mi: float, cfg: FamiliesConfig
) -> tuple[str, str | None, float | None, str]:
    """The family of one neuron from its best feature per set: (family, feature, VR, rule)."""
    current = max((best[s] + (s,) for s in CURRENT_SETS if s in best), key=lambda t: t[1], default=None)
    if current and is_alphabet_feature(current[0], current[2]) and current[1] > cfg.alphabet_vr:
        return "alphabet", current[0], current[1], f"best current-token feature is a letter, VR > {cfg.alphabet_vr}"
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


class FamiliesStage:
    """The ``families`` stage (single pass over ``hook_pre`` and ``hook_post``)."""

    config_class = FamiliesConfig

    name = "families"
    hooks: frozenset = frozenset({"hook_pre", "hook_post"})

    def __init__(self, context: RunContext) -> None:
        from precompute.models import decoded_vocab

        self.config = cfg = stage_config(FamiliesConfig, context.config.analysis.get("families"), "families")
        self.device = torch.device(context.config.device)
        models = context.models if cfg.models == "all" else context.models[:1]
        self.shapes = {m.name: m.n_neurons for m in models}
        dataset, tokenizer = context.dataset, context.models[0].tokenizer
        self.rows, self.ctx = dataset.rows, dataset.ctx
        d_vocab = max(max(m.d_vocab for m in context.models), int(dataset.rows.max()) + 1)
        self.strings = decoded_vocab(tokenizer, d_vocab)  # at least d_vocab entries, more if the tokenizer has more
        d_vocab = len(self.strings)
        self.special = sorted(
            {i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None}
        )
        self.eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else self.special[0]
        current = np.bincount(dataset.rows[dataset.counted], minlength=d_vocab)
        previous = np.bincount(dataset.rows[:, :-1][dataset.counted[:, 1:]], minlength=d_vocab)
        self.buckets = feats.vocab_buckets(self.strings, current + previous, cfg.max_vocab, self.special)
        self.bucket_of = torch.from_numpy(self.buckets.bucket_of).to(self.device)
        self.features: dict[str, feats.FeatureMatrix] = {
            "token": feats.token_features(
                "token", self.strings, self.buckets, current, cfg.unigram_min_count, self.special
            ),
            "prev_token": feats.token_features(
                "prev_token",
                self.strings,
                self.buckets,
                previous,
                cfg.unigram_min_count,
                self.special,
                extra_categories=1,
            ),
            "position": feats.position_features(self.ctx),
        }
        self.context_labels: dict[str, np.ndarray] | None = None  # syntax/spaCy ids [n_rows, ctx], built lazily
        self.counts = {
            var: torch.zeros(f.n_categories, dtype=torch.float64, device=self.device)
            for var, f in self.features.items()
        }
        self.state = {name: self._empty(n) for name, n in self.shapes.items()}
        self._done = False

    def _empty(self, n: int) -> dict[str, Any]:
        state: dict[str, Any] = {
            "fire": torch.zeros(self.ctx, n, dtype=torch.float64, device=self.device),
            "pre_moments": StreamingMoments(n, self.device),
            "post_moments": StreamingMoments(n, self.device),  # Σv and Σv² give Var(v)
        }
        for var, f in self.features.items():
            state[f"{var}_sum"] = torch.zeros(f.n_categories, n, dtype=torch.float64, device=self.device)
        return state

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
            self.context_labels[var] = labels.ids
            self.features[var] = labels.features
            self.counts.setdefault(
                var, torch.zeros(labels.features.n_categories, dtype=torch.float64, device=self.device)
            )
            for name, state in self.state.items():
                state.setdefault(
                    f"{var}_sum",
                    torch.zeros(
                        labels.features.n_categories, self.shapes[name], dtype=torch.float64, device=self.device
                    ),
                )

    @property
    def done_streaming(self) -> bool:
        return self._done

    def categories(self, batch: ActivationBatch) -> dict[str, torch.Tensor]:
        """The category of every counted token of a batch, per variable: [tokens] int64."""
        counted, tokens = batch.counted, batch.tokens
        previous = torch.cat([torch.full_like(tokens[:, :1], -1), tokens[:, :-1]], dim=1)[counted]
        cats = {
            "token": self.bucket_of[tokens[counted]],
            "prev_token": torch.where(previous >= 0, self.bucket_of[previous.clamp_min(0)], self.buckets.n_buckets),
            "position": counted_positions(batch),
        }
        rows = slice(batch.row_start, batch.row_start + tokens.shape[0])
        for var, ids in (self.context_labels or {}).items():
            cats[var] = torch.from_numpy(ids[rows]).to(self.device)[counted]
        return cats

    def update(self, batch: ActivationBatch) -> None:
        self._build_context_labels()
        cats = self.categories(batch)
        if cats["position"].numel() == 0:
            return
        for var, ids in cats.items():
            self.counts[var] += torch.bincount(ids, minlength=self.features[var].n_categories)
        for name, state in self.state.items():
            pre = counted_activations(batch, name, "hook_pre")
            post = counted_activations(batch, name, "hook_post")  # x64: [tokens, n_neurons]
            state["pre_moments"].update(pre.x.shape[0], pre.sums)
            state["post_moments"].update(post.x.shape[0], post.sums)
            for var, ids in cats.items():
                state[f"{var}_sum"].index_add_(0, ids, post.x64)
            state["fire"] += firing_by_position(batch, name, self.ctx)

    def finish_pass(self) -> None:
        self._done = True

    def state_dict(self) -> dict:
        return {"models": per_model_state_dict(self.state), "counts": self.counts, "done": self._done}

    def load_state_dict(self, state: dict) -> None:
        self._build_context_labels()
        load_per_model_state(self.state, state["models"], self.device)
        self.counts = {k: v.to(self.device) for k, v in state["counts"].items()}
        self._done = state["done"]

    # --- results ------------------------------------------------------------------------------------------

    def scores(self, name: str, neurons: slice) -> tuple[np.ndarray, list[str], list[str], np.ndarray]:
        """VR [features, neurons in the slice] of every feature, with feature names, sets and shares."""
        state = self.state[name]
        n = float(self.counts["position"].sum())
        s = state["post_moments"].sums[0, neurons].cpu().numpy()
        sst = n * state["post_moments"].variance()[neurons].cpu().numpy()
        blocks, names, sets, shares = [], [], [], []
        for var, f in self.features.items():
            n1 = f.membership @ self.counts[var].cpu().numpy()
            s1 = f.membership @ state[f"{var}_sum"][:, neurons].cpu().numpy()
            blocks.append(grouped_variance_reduction(n1, s1, n, s, sst))
            names += f.names
            sets += f.sets
            shares.append(n1 / max(n, 1))
        return np.concatenate(blocks), names, sets, np.concatenate(shares)

    def write(self, context: RunContext) -> None:
        from precompute import store as tables

        self._build_context_labels()
        context.store.clear_model_tables(context.model_ids.values(), tables.STAGE_TABLES[self.name])
        for model in context.models:
            if model.name not in self.state:
                continue
            model_id = context.model_ids[model.name]
            labels, scores = [], []
            n_features = sum(len(f.names) for f in self.features.values())
            chunk = max(1, 2**25 // max(n_features, 1))  # VR blocks of at most 256 MB
            for start in range(0, self.shapes[model.name], chunk):
                part = slice(start, min(start + chunk, self.shapes[model.name]))
                for row in self._rows(model.name, model_id, model.d_mlp, part):
                    (labels if "family" in row else scores).append(row)
            context.store.insert_rows(tables.families, labels)
            context.store.insert_rows(tables.feature_scores, scores)
            counts = {f: sum(r["family"] == f for r in labels) for f in {r["family"] for r in labels}}
            logger.info("families: %s: %s", model.name, dict(sorted(counts.items())))

    def _rows(self, name: str, model_id: int, d_mlp: int, part: slice) -> Iterator[dict]:
        cfg, state = self.config, self.state[name]
        vr, names, sets, shares = self.scores(name, part)
        set_array = np.asarray(sets)
        kurt = state["pre_moments"].kurtosis()[part].cpu().numpy()
        mi = position_mutual_information(state["fire"][:, part].cpu().numpy(), self.counts["position"].cpu().numpy())
        top = np.argsort(-vr, axis=0, kind="stable")[: cfg.top_features]  # [k, neurons]
        best_per_set = {s: np.flatnonzero(set_array == s) for s in dict.fromkeys(sets)}
        for j, flat in enumerate(range(part.start, part.stop)):
            key = neuron_key(model_id, d_mlp, flat)
            best = {}
            for s, rows in best_per_set.items():
                i = rows[np.argmax(vr[rows, j])]
                best[s] = (names[i], float(vr[i, j]))
            kurtosis = float(kurt[j]) if np.isfinite(kurt[j]) else float("inf")
            family, feature, value, rule = label_neuron(best, kurtosis, float(mi[j]), cfg)
            evidence = {
                "rule": rule,
                "pre_kurt": round(float(kurt[j]), 4) if np.isfinite(kurt[j]) else None,
                "best": {s: [f, round(v, 4)] for s, (f, v) in best.items()},
            }
            yield key | dict(
                family=family, best_feature=feature, best_vr=value, position_mi=float(mi[j]), evidence=evidence
            )
            for rank, i in enumerate(top[:, j]):
                yield key | dict(
                    rank=rank,
                    feature=names[i],
                    feature_set=sets[i],
                    variance_reduction=float(vr[i, j]),
                    fraction=float(shares[i]),
                )


__all__ = [
    "FamiliesConfig",
    "FamiliesStage",
    "grouped_variance_reduction",
    "is_alphabet_feature",
    "label_neuron",
    "position_mutual_information",
    "variance_reduction",
]
