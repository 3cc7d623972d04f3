"""The neuron page's statistics panels: activation, weights, vocabulary projection, token tables, and the
histogram of the direct logit effect (from the model's weights, loaded live).

Each builder takes the neuron's `NeuronViewContext` and returns None when the stage that fills its tables has
not run for this model (the panel is then hidden, and ``null`` in the JSON twin).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import Field

from app.queries import analyses as q
from app.viewmodels.common import TokenValue, ViewModel, number, rounded, token_text
from app.viewmodels.context import NeuronViewContext

#: The columns of the activation table: one moment of hook_pre / hook_post each.
MOMENTS = ("mean", "var", "skew", "kurt", "min", "max")
HOOKS = ("pre", "post")


class HistogramData(ViewModel):
    """Counts of one hook's activation over fixed bins."""

    hook: str = Field(description="hook_pre or hook_post")
    low: float = Field(description="Left edge of the first regular bin")
    high: float = Field(description="Right edge of the last regular bin")
    counts: list[int] = Field(description="Counts of the regular bins")
    underflow: int = Field(description="Count below `low`")
    overflow: int = Field(description="Count above `high`")


class PositionProfileData(ViewModel):
    hook: str = Field(description="hook_pre or hook_post")
    mean: list[float] = Field(description="Mean activation at each position")
    std: list[float] = Field(description="Standard deviation at each position")
    count: list[int] = Field(description="Counted tokens at each position")


class ActivationPanel(ViewModel):
    """Activation moments (of mlp.hook_pre and hook_post), histograms and the position profile."""

    n_tokens: int | None = Field(description="Counted tokens the moments cover")
    stats: dict[str, float | None] = Field(description="pre_/post_ mean, var, skew, kurt, min, max; frequency")
    percentiles: dict[str, float] = Field(description="Within-layer percentile (0-100) of each statistic")
    histograms: list[HistogramData] = Field(description="Activation histograms per hook")
    position_profiles: list[PositionProfileData] = Field(description="Mean ± std by position per hook")

    @property
    def moment_rows(self) -> list[tuple[str, list[float | None]]]:
        """The table of moments: per hook with any, its `MOMENTS` in order (the paper's tables have hook_pre's only)."""
        rows = [(f"hook_{hook}", [self.stats.get(f"{hook}_{m}") for m in MOMENTS]) for hook in HOOKS]
        return [(hook, values) for hook, values in rows if any(v is not None for v in values)]


class WeightsPanel(ViewModel):
    """Weight statistics of the processed weights (paper-spec §3.2)."""

    stats: dict[str, float | None] = Field(description="w_in_norm, w_out_norm, input_bias, in_out_sim, l2_penalty, ...")
    percentiles: dict[str, float] = Field(description="Within-layer percentile (0-100) of each statistic (Fig. 3)")


class VocabPanel(ViewModel):
    """The neuron's direct effect on the vocabulary (W_U w_out) and its input tokens (W_E w_in)."""

    unembed_top: list[TokenValue] = Field(description="Tokens w_out promotes most")
    unembed_bottom: list[TokenValue] = Field(description="Tokens w_out suppresses most")
    embed_top: list[TokenValue] = Field(description="Input tokens that excite w_in most")
    moments: dict[str, float | None] = Field(description="vocab_mean/var/skew/kurt of cos(W_U, w_out)")


class VocabHistogram(ViewModel):
    """The distribution of the neuron's direct logit effect ``W_U·w_out`` over the whole vocabulary (paper Fig. 5),
    computed from the model's weights."""

    bin_edges: list[float] = Field(description="Edges of the histogram bins")
    counts: list[int] = Field(description="Tokens per bin")
    top: list[TokenValue] = Field(description="Tokens with the largest effect")
    bottom: list[TokenValue] = Field(description="Tokens with the smallest (most negative) effect")
    moments: dict[str, float | None] = Field(description="mean, var, skew, kurt of the effect")


class TokenTablesPanel(ViewModel):
    mean_activation: list[TokenValue] = Field(description="Tokens with the highest mean activation")
    max_activation: list[TokenValue] = Field(description="Tokens with the highest max activation")


def _percentiles(view: NeuronViewContext, names: Sequence[str]) -> dict[str, float]:
    return {k: round(v, 2) for k, v in view.percentiles.items() if k in names}


def build_activation_panel(view: NeuronViewContext) -> ActivationPanel | None:
    stats = view.activation_stats
    histograms = q.histograms(view.conn, view.key)
    profiles = q.position_profiles(view.conn, view.key)
    if stats is None and not histograms and not profiles:
        return None
    return ActivationPanel(
        n_tokens=stats.n_tokens if stats else None,
        stats={name: number(value) for name, value in stats.values.items()} if stats else {},
        percentiles=_percentiles(view, q.ACTIVATION_STATS),
        histograms=[
            HistogramData(
                hook=h.hook,
                low=h.low,
                high=h.high,
                counts=h.counts[1:-1].tolist(),
                underflow=int(h.counts[0]),
                overflow=int(h.counts[-1]),
            )
            for h in histograms
        ],
        position_profiles=[
            PositionProfileData(hook=p.hook, mean=rounded(p.mean), std=rounded(p.std), count=p.count.tolist())
            for p in profiles
        ],
    )


def build_weights_panel(view: NeuronViewContext) -> WeightsPanel | None:
    weights = view.weight_stats
    if weights is None:
        return None
    return WeightsPanel(
        stats={k: number(weights[k]) for k in q.WEIGHT_STATS},
        percentiles=_percentiles(view, (*q.WEIGHT_STATS, *q.VOCAB_MOMENTS)),
    )


def _token_values(rows: list[q.TokenRow], vocab: Sequence[str]) -> list[TokenValue]:
    return [
        TokenValue(token_id=r.token_id, token=token_text(vocab, r.token_id), value=number(r.value), count=r.count)
        for r in rows
    ]


def _token_tables(view: NeuronViewContext) -> dict[str, list[TokenValue]]:
    return {kind: _token_values(rows, view.vocab) for kind, rows in view.token_tables.items()}


def build_vocab_panel(view: NeuronViewContext) -> VocabPanel | None:
    """The vocabulary projection: from the token tables, with the weight statistics' vocabulary moments."""
    tables = _token_tables(view)
    weights = view.weight_stats
    if weights is None and not tables.keys() & {"unembed_top", "unembed_bottom", "embed_top"}:
        return None
    return VocabPanel(
        unembed_top=tables.get("unembed_top", []),
        unembed_bottom=tables.get("unembed_bottom", []),
        embed_top=tables.get("embed_top", []),
        moments={k: number(weights[k]) for k in q.VOCAB_MOMENTS} if weights else {},
    )


def build_token_tables_panel(view: NeuronViewContext) -> TokenTablesPanel | None:
    tables = _token_tables(view)
    if not tables.keys() & {"mean_activation", "max_activation"}:
        return None
    return TokenTablesPanel(
        mean_activation=tables.get("mean_activation", []), max_activation=tables.get("max_activation", [])
    )


def build_vocab_histogram(view: NeuronViewContext, bins: int = 60, k: int = 10) -> VocabHistogram:
    """The histogram of ``W_U·w_out`` from the loaded model (the SQL work, reading the vocabulary, came first)."""
    return vocab_histogram(view.live.vocab_effect(view.model, view.layer, view.neuron), view.vocab, bins, k)


def vocab_histogram(effect: np.ndarray, vocab: Sequence[str], bins: int = 60, k: int = 10) -> VocabHistogram:
    """Histogram, moments and extreme tokens of a direct logit effect (float [d_vocab])."""
    values = effect.astype(np.float64)
    counts, edges = np.histogram(values, bins=bins)
    order = np.argsort(values)
    mean, var = float(values.mean()), float(values.var())
    centred = values - mean
    skew = float((centred**3).mean() / var**1.5) if var > 0 else None
    kurt = float((centred**4).mean() / var**2) if var > 0 else None

    def tokens(ids: np.ndarray) -> list[TokenValue]:
        return [
            TokenValue(token_id=int(t), token=token_text(vocab, int(t)), value=number(values[t]), count=None)
            for t in ids
        ]

    return VocabHistogram(
        bin_edges=np.round(edges, 6).tolist(),
        counts=counts.tolist(),
        top=tokens(order[::-1][:k]),
        bottom=tokens(order[:k]),
        moments={"mean": number(mean), "var": number(var), "skew": number(skew), "kurt": number(kurt)},
    )
