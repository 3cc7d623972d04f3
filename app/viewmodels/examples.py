"""A neuron's stored examples (top, quantile, random): the examples panel of the neuron page, its htmx fragment
and its JSON twin (GET /api/v1/models/{model}/neurons/{layer}/{neuron}/examples).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import Field

from app.queries import analyses as q
from app.settings import Settings
from app.viewmodels.common import ViewModel, number, rounded, token_texts
from app.viewmodels.context import NeuronViewContext

Context = Literal["snippet", "full"]
ExampleKind = Literal["top", "quantile", "random"]
#: The kinds loaded on demand below the top examples, in the order their buttons are shown.
MORE_KINDS: tuple[ExampleKind, ...] = ("quantile", "random")


class Example(ViewModel):
    """A stored example: a snippet of a dataset row with every token's activation."""

    kind: str = Field(description="top | quantile | random")
    rank: int
    bin: int = Field(description="Quantile bin (0 for top and random)")
    dataset_row: int
    start: int = Field(description="Position in the row of the snippet's first token")
    peak: int = Field(description="Index in `tokens` of the example's token")
    activation: float | None = Field(description="hook_post at the peak token")
    tokens: list[str] = Field(description="Decoded token texts")
    token_ids: list[int]
    activations: list[float] = Field(description="hook_post of every token")
    window: tuple[int, int] = Field(description="[first, last) token shown in the current context mode")

    @property
    def number(self) -> int:
        """The example's place in its list, from 1."""
        return self.rank + 1


class ExampleGroup(ViewModel):
    bin: int
    bin_low: float | None = Field(description="Activation range of the bin")
    bin_high: float | None
    bin_fraction: float | None = Field(description="Share of counted tokens in the bin")
    examples: list[Example]


class ExamplesPanel(ViewModel):
    """Examples of one kind (the page shows the top ones; quantile and random groups load lazily)."""

    kind: str = Field(description="top | quantile | random")
    context: Context = Field(description="snippet (around the peak) or full (the whole stored snippet)")
    scale: float = Field(description="|activation| that gets full colour (shared by all examples of the neuron)")
    groups: list[ExampleGroup] = Field(description="One group for top/random; one per bin for quantile")
    counts: dict[str, int] = Field(description="Stored examples per kind")

    @property
    def more_kinds(self) -> list[tuple[ExampleKind, int]]:
        """The other kinds this neuron has examples of, with their counts (a button each)."""
        return [(kind, self.counts[kind]) for kind in MORE_KINDS if self.counts.get(kind)]


def example_window(peak: int, n_tokens: int, context: Context, settings: Settings) -> tuple[int, int]:
    """The [first, last) tokens shown: the whole snippet, or the tokens around the peak.

    >>> from types import SimpleNamespace
    >>> example_window(10, 40, "snippet", SimpleNamespace(snippet_before=4, snippet_after=2))
    (6, 13)
    """
    if context == "full":
        return 0, n_tokens
    return max(0, peak - settings.snippet_before), min(n_tokens, peak + settings.snippet_after + 1)


def peak_index(row: q.ExampleRow) -> int:
    """The stored peak, clamped into the snippet (a malformed row still renders)."""
    return min(max(int(row.peak), 0), int(row.token_ids.size) - 1)


def example_view(row: q.ExampleRow, vocab: Sequence[str], context: Context, settings: Settings) -> Example:
    peak = peak_index(row)
    ids = row.token_ids.tolist()
    return Example(
        kind=row.kind,
        rank=row.rank,
        bin=row.bin,
        dataset_row=row.dataset_row,
        start=row.start,
        peak=peak,
        activation=number(row.activation),
        tokens=token_texts(vocab, ids),
        token_ids=ids,
        activations=rounded(row.activations),
        window=example_window(peak, len(ids), context, settings),
    )


def example_scale(rows: Sequence[q.ExampleRow], post_max: float | None = None) -> float:
    """The |activation| that gets full colour: the largest of the neuron's stored max and its shown examples."""
    values = [abs(float(post_max))] if post_max is not None and np.isfinite(post_max) else []
    values += [float(np.abs(r.activations).max()) for r in rows if r.activations.size]
    return max([1e-6, *values])


def build_examples(view: NeuronViewContext, kind: ExampleKind, context: Context, limit: int) -> ExamplesPanel | None:
    """Examples of one kind, `limit` per bin; None when the neuron has no stored examples."""
    counts = q.example_kinds(view.conn, view.key)
    if not counts:
        return None
    rows = q.examples(view.conn, view.key, kind, limit)
    # The best top example joins the scale of the other kinds: every panel of a neuron shares one colour scale.
    scale_rows = rows if kind == "top" else q.examples(view.conn, view.key, "top", 1) + rows
    stats = view.activation_stats
    scale = example_scale(scale_rows, stats.post_max if stats else None)
    groups: dict[int, list[q.ExampleRow]] = {}
    for row in rows:
        groups.setdefault(row.bin, []).append(row)
    return ExamplesPanel(
        kind=kind,
        context=context,
        scale=round(scale, 6),
        counts=counts,
        groups=[
            ExampleGroup(
                bin=bin_,
                bin_low=number(members[0].bin_low),
                bin_high=number(members[0].bin_high),
                bin_fraction=number(members[0].bin_fraction),
                examples=[example_view(r, view.vocab, context, view.settings) for r in members],
            )
            for bin_, members in sorted(groups.items())
        ],
    )
