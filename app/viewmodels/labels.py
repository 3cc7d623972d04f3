"""The neuron page's labels with their evidence: the family (paper §4.3) and the functional roles (paper §5),
and the one-line explanation that sums them up.

The wording and the cut-offs (which entropy ranks are called out) are decided here; the template only shows them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from app.queries import analyses as q
from app.viewmodels.common import ViewModel, number
from app.viewmodels.context import NeuronViewContext

#: Feature scores shown per neuron.
FEATURE_ROWS = 10
#: Attention heads shown per neuron.
ATTENTION_ROWS = 10
#: Points of a path-ablation scatter kept in the page and its JSON.
PATH_POINTS = 400
#: Path-ablation scatters drawn on the page (the JSON twin has them all).
PATH_PLOTS = 2
#: Entropy ranks below this are called out as entropy-neuron candidates (every neuron of the last layers has a
#: rank: by |w_out| × null-space fraction, paper §5.2).
ENTROPY_TOP = 10
#: The weight statistics the vocabulary-role rule reads (paper §5.1), shown as the roles' evidence.
ROLE_EVIDENCE = ("vocab_kurt", "vocab_skew", "vocab_var", "null_space_fraction", "w_out_norm")
#: The family of a neuron no feature explains.
NO_FAMILY = "none"


def head_label(layer: int | None, head: int | None) -> str:
    """The display id of an attention head.

    >>> head_label(3, 7)
    'L3H7'
    """
    return f"L{layer}H{head}"


class FeatureScore(ViewModel):
    rank: int
    feature: str = Field(description="e.g. token:def, prev_token:(, syntax:keyword")
    feature_set: str = Field(
        description="unigram | first_letter | token_class | previous_token | position | syntax | spacy"
    )
    variance_reduction: float | None = Field(description="Paper eq. 4")
    fraction: float | None = Field(description="Share of counted tokens where the feature holds")


class FamilyPanel(ViewModel):
    """The neuron family (paper §4.3) and the evidence for it."""

    family: str = Field(description="unigram | alphabet | previous_token | position | syntax | semantic | none")
    best_feature: str | None = Field(description="The feature that explains the activation best")
    best_vr: float | None = Field(description="Its variance reduction")
    position_mi: float | None = Field(description="Mutual information of firing with position")
    evidence: Any = Field(description="How the label was reached (stage-defined JSON)")
    features: list[FeatureScore] = Field(description="The best features by variance reduction")

    @property
    def labelled(self) -> bool:
        """Some family explains the neuron."""
        return self.family != NO_FAMILY


class EntropyPoint(ViewModel):
    value: float = Field(description="The fixed activation")
    is_baseline: bool = Field(description="A random last-two-layer neuron, for comparison")
    ln_scale: float | None
    entropy: float | None
    loss: float | None
    reciprocal_rank: float | None
    n_tokens: int


class AttentionScore(ViewModel):
    rank: int
    attention_layer: int
    head: int
    score: float | None

    @property
    def head_id(self) -> str:
        return head_label(self.attention_layer, self.head)


class PathAblationData(ViewModel):
    attention_layer: int
    head: int
    pearson_bos: float | None
    spearman_bos: float | None
    pearson_norm: float | None
    spearman_norm: float | None
    n_points: int
    points: list[list[float]] = Field(description=f"Up to {PATH_POINTS} (activation, Δ BOS attention, Δ |z|)")


class RolesPanel(ViewModel):
    """Functional roles (paper §5) with their evidence."""

    vocab_role: str | None = Field(description="prediction | suppression | partition")
    entropy_rank: int | None = Field(description="Rank among entropy-neuron candidates")
    attention_role: str | None = Field(description="deactivation | activation")
    attention_layer: int | None
    attention_head: int | None
    attention_score: float | None
    evidence: dict[str, float | None] = Field(description="The weight statistics the vocab role rule reads")
    entropy_interventions: list[EntropyPoint] = Field(description="This neuron's curve, when it has one")
    entropy_baseline: list[EntropyPoint] = Field(description="Mean curve of the model's random baseline neurons")
    attention_scores: list[AttentionScore]
    path_ablations: list[PathAblationData]

    @property
    def entropy_position(self) -> int | None:
        """The entropy rank counted from 1, as shown."""
        return None if self.entropy_rank is None else self.entropy_rank + 1

    @property
    def entropy_candidate(self) -> bool:
        """Called out as an entropy-neuron candidate: among the `ENTROPY_TOP` best entropy scores."""
        return self.entropy_rank is not None and self.entropy_rank < ENTROPY_TOP

    @property
    def attention_head_id(self) -> str | None:
        """The head of the attention role."""
        return head_label(self.attention_layer, self.attention_head) if self.attention_role else None

    @property
    def is_baseline_neuron(self) -> bool:
        """The neuron is one of the random baseline neurons of the entropy interventions."""
        return bool(self.entropy_interventions) and self.entropy_interventions[0].is_baseline

    @property
    def shown_path_ablations(self) -> list[PathAblationData]:
        return self.path_ablations[:PATH_PLOTS]


def build_family_panel(view: NeuronViewContext) -> FamilyPanel | None:
    row = q.family(view.conn, view.key)
    features = q.feature_scores(view.conn, view.key, FEATURE_ROWS)
    if row is None and not features:
        return None
    return FamilyPanel(
        family=row.family if row else NO_FAMILY,
        best_feature=row.best_feature if row else None,
        best_vr=number(row.best_vr) if row else None,
        position_mi=number(row.position_mi) if row else None,
        evidence=row.evidence if row else None,
        features=[
            FeatureScore(
                rank=f.rank,
                feature=f.feature,
                feature_set=f.feature_set,
                variance_reduction=number(f.variance_reduction),
                fraction=number(f.fraction),
            )
            for f in features
        ],
    )


def _entropy_point(e: q.EntropyRow) -> EntropyPoint:
    return EntropyPoint(
        value=e.value,
        is_baseline=e.is_baseline,
        ln_scale=number(e.ln_scale),
        entropy=number(e.entropy),
        loss=number(e.loss),
        reciprocal_rank=number(e.reciprocal_rank),
        n_tokens=e.n_tokens,
    )


def build_roles_panel(view: NeuronViewContext) -> RolesPanel | None:
    row = q.roles(view.conn, view.key)
    entropy = q.entropy_interventions(view.conn, view.key)
    attention = q.attention_scores(view.conn, view.key, ATTENTION_ROWS)
    paths = q.path_ablations(view.conn, view.key)
    if row is None and not entropy and not attention and not paths:
        return None
    baseline = q.entropy_baseline(view.conn, view.model.id) if entropy else []
    weights = view.weight_stats
    return RolesPanel(
        vocab_role=row.vocab_role if row else None,
        entropy_rank=row.entropy_rank if row else None,
        attention_role=row.attention_role if row else None,
        attention_layer=row.attention_layer if row else None,
        attention_head=row.attention_head if row else None,
        attention_score=number(row.attention_score) if row else None,
        evidence={k: number(weights[k]) for k in ROLE_EVIDENCE} if weights else {},
        entropy_interventions=[_entropy_point(e) for e in entropy],
        entropy_baseline=[_entropy_point(e) for e in baseline],
        attention_scores=[
            AttentionScore(rank=a.rank, attention_layer=a.attention_layer, head=a.head, score=number(a.score))
            for a in attention
        ],
        path_ablations=[
            PathAblationData(
                attention_layer=p.attention_layer,
                head=p.head,
                pearson_bos=number(p.pearson_bos),
                spearman_bos=number(p.spearman_bos),
                pearson_norm=number(p.pearson_norm),
                spearman_norm=number(p.spearman_norm),
                n_points=p.n_points,
                points=np.round(p.points[:PATH_POINTS].astype(np.float64), 4).tolist(),
            )
            for p in paths
        ],
    )


def family_phrase(family: FamilyPanel) -> str:
    """What the family says about the neuron, with its best feature.

    >>> family_phrase(FamilyPanel(family="previous_token", best_feature="prev_token:(", best_vr=0.61,
    ...     position_mi=None, evidence=None, features=[]))
    'previous token neuron: best explained by prev_token:( (variance reduction 0.61)'
    """
    text = f"{family.family.replace('_', ' ')} neuron"
    if family.best_feature:
        text += f": best explained by {family.best_feature}"
        if family.best_vr is not None:
            text += f" (variance reduction {family.best_vr:.2f})"
    if family.position_mi is not None and family.family == "position":
        text += f", position MI {family.position_mi:.2f}"
    return text


def role_phrases(roles: RolesPanel) -> list[str]:
    """What the roles say about the neuron, vocabulary role first."""
    parts = []
    if roles.vocab_role:
        parts.append(f"{roles.vocab_role} neuron")
    if roles.entropy_candidate:
        parts.append(f"entropy-neuron candidate #{roles.entropy_position}")
    if roles.attention_role:
        parts.append(f"attention {roles.attention_role} neuron ({roles.attention_head_id})")
    return parts


def explanation_text(family: FamilyPanel | None, roles: RolesPanel | None) -> str | None:
    """A one-line summary of what is known about the neuron's function.

    >>> explanation_text(None, None) is None
    True
    """
    parts = [family_phrase(family)] if family is not None and family.labelled else []
    if roles is not None:
        parts += role_phrases(roles)
    return "; ".join(parts) if parts else None
