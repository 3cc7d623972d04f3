"""Search: jump to a neuron id, find neurons by token (token tables, example peaks) or by family.

Accepted neuron ids (dashboard-anchors §5): ``L5N1234``, ``L5.1234``, ``5:1234``, ``5/1234``, optionally with a
model in front (``seed-1/L5N1234``, ``seed-1:L5N1234``). ``family:NAME`` lists a family; ``token:TEXT`` forces
a token search; any other text is searched as a token (exact text first, then ignoring case and spaces).
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Sequence
from typing import Literal

from pydantic import Field

from app.queries import vocab as vq
from app.queries.models import Model
from app.urls import Scope, neuron_label
from app.viewmodels.common import NeuronRef, ViewModel, number
from app.viewmodels.neuron import token_text

SearchKind = Literal["empty", "neuron", "token", "family"]
MAX_TOKENS = 50
EXAMPLE_RANKS = 5
#: The example-peak scan reads every top example of the searched models (no index can serve it), so it is done
#: only when they hold at most this many neurons; larger models are searched through their token tables.
EXAMPLE_SCAN_MAX_NEURONS = 20_000

_NEURON = re.compile(
    r"^(?:(?P<model>[^\s/:@]+)[/:@])?l?(?P<layer>\d{1,6})(?:n|[.:/])n?(?P<neuron>\d{1,9})$", re.IGNORECASE
)


def parse_neuron_id(text: str) -> tuple[str | None, int, int] | None:
    """(model or None, layer, neuron) for a neuron id, else None.

    >>> parse_neuron_id("L5N1234"), parse_neuron_id("seed-1/L0.7"), parse_neuron_id("3:4"), parse_neuron_id("the")
    ((None, 5, 1234), ('seed-1', 0, 7), (None, 3, 4), None)
    """
    match = _NEURON.match(text.strip())
    if not match:
        return None
    return match["model"], int(match["layer"]), int(match["neuron"])


class SearchHit(ViewModel):
    neuron: NeuronRef
    source: str = Field(description="Where the token was found: a token-table kind, example_peak, or family")
    rank: int = Field(description="Rank of the token in that table, or of the example")
    value: float | None = Field(description="The table's value, the example's activation, or the best VR")
    token: str | None = Field(description="The matched token, or the family's best feature")


class MatchedToken(ViewModel):
    token_id: int
    token: str


class SearchPage(ViewModel):
    q: str = Field(description="The query")
    kind: SearchKind = Field(description="How the query was read")
    model: str | None = Field(description="Model searched (None: every model of the run)")
    redirect: str | None = Field(description="For a neuron id: the neuron's page")
    message: str | None = Field(description="Why nothing was found, when nothing was")
    tokens: list[MatchedToken] = Field(description="Vocabulary tokens the query matched")
    hits: list[SearchHit]
    truncated: bool = Field(description="More hits exist than were returned")
    examples_complete: bool = Field(
        description="Example peaks were scanned completely (not for models above 20,000 neurons)"
    )
    families: list[str] = Field(description="Family labels present in the searched models")


def match_tokens(vocab: Sequence[str], text: str) -> list[int]:
    """Token ids whose text equals `text`, else equals it ignoring case and surrounding spaces.

    >>> match_tokens([" the", "The", "cat", "the"], "the")
    [3]
    >>> match_tokens([" the", "The", "cat"], "the")
    [0, 1]
    """
    exact = [i for i, t in enumerate(vocab) if t == text]
    if exact:
        return exact[:MAX_TOKENS]
    folded = text.strip().casefold()
    if not folded:
        return [i for i, t in enumerate(vocab) if t == text][:MAX_TOKENS]
    return [i for i, t in enumerate(vocab) if t.strip().casefold() == folded][:MAX_TOKENS]


def _families(conn: sqlite3.Connection, models: Sequence[Model]) -> list[str]:
    found: set[str] = set()
    for m in models:
        found |= {r[0] for r in conn.execute("SELECT DISTINCT family FROM families WHERE model_id = ?", (m.id,))}
    return sorted(found)


def build_search(
    conn: sqlite3.Connection,
    scope: Scope,
    vocab: Sequence[str],
    q: str,
    model: Model | None,
    limit: int,
    example_scan: bool = True,
) -> SearchPage:
    models = [model] if model else list(scope.models)
    text = q.strip() if not q.startswith("token:") else q[len("token:") :]
    families = _families(conn, models)
    empty = {"tokens": [], "hits": [], "truncated": False, "examples_complete": True, "families": families}
    if not q.strip():
        return SearchPage(q=q, kind="empty", model=model.name if model else None, redirect=None, message=None, **empty)
    parsed = parse_neuron_id(q) if not q.startswith("token:") else None
    if parsed is not None:
        name, layer, neuron = parsed
        target = scope.model(name) if name else (model or scope.models[0])
        if target is None:
            message = f"no model {name!r} in run {scope.run.id}"
        elif not (layer < target.n_layers and neuron < target.d_mlp):
            message = f"{target.name} has {target.n_layers} layers of {target.d_mlp} neurons"
        else:
            return SearchPage(
                q=q,
                kind="neuron",
                model=target.name,
                redirect=scope.neuron_url(target.name, layer, neuron),
                message=None,
                **empty,
            )
        return SearchPage(
            q=q, kind="neuron", model=model.name if model else None, redirect=None, message=message, **empty
        )
    family = q[len("family:") :].strip() if q.startswith("family:") else (q.strip() if q.strip() in families else None)
    if family is not None:
        hits = []
        for m in models:
            rows = conn.execute(
                "SELECT layer, neuron, best_feature, best_vr FROM families WHERE model_id = ? AND family = ? "
                "ORDER BY best_vr IS NULL, best_vr DESC LIMIT ?",
                (m.id, family, limit + 1),
            ).fetchall()
            hits += [
                SearchHit(
                    neuron=NeuronRef.build(scope, m.name, r[0], r[1]),
                    source="family",
                    rank=i,
                    value=number(r[3]),
                    token=r[2],
                )
                for i, r in enumerate(rows)
            ]
        return SearchPage(
            q=q,
            kind="family",
            model=model.name if model else None,
            redirect=None,
            message=None if hits else f"no neuron of family {family!r}",
            tokens=[],
            hits=hits[:limit],
            truncated=len(hits) > limit,
            examples_complete=True,
            families=families,
        )
    token_ids = match_tokens(vocab, text)
    model_ids = [m.id for m in models]
    hits_raw, truncated = vq.neurons_by_token_tables(conn, model_ids, token_ids, limit)
    examples_complete = True
    if sum(m.n_neurons for m in models) > EXAMPLE_SCAN_MAX_NEURONS:
        example_scan, examples_complete = False, False
    if example_scan and len(hits_raw) < limit:
        try:
            peak_hits, more = vq.neurons_by_example_peak(
                conn, model_ids, token_ids, EXAMPLE_RANKS, limit - len(hits_raw)
            )
            hits_raw += peak_hits
            truncated = truncated or more
        except sqlite3.OperationalError:  # interrupted by the deadline: report what the token tables gave
            examples_complete = False
    by_id = {m.id: m for m in models}
    hits = [
        SearchHit(
            neuron=NeuronRef.build(scope, by_id[h.model_id].name, h.layer, h.neuron),
            source=h.source,
            rank=h.rank,
            value=number(h.value),
            token=token_text(vocab, h.token_id),
        )
        for h in hits_raw
    ]
    message = None
    if not token_ids:
        message = f"no token of the vocabulary matches {text!r}"
    elif not hits:
        message = "no neuron lists these tokens among its top tokens or top examples"
    return SearchPage(
        q=q,
        kind="token",
        model=model.name if model else None,
        redirect=None,
        message=message,
        tokens=[MatchedToken(token_id=t, token=token_text(vocab, t)) for t in token_ids],
        hits=hits,
        truncated=truncated,
        examples_complete=examples_complete,
        families=families,
    )


__all__ = ["SearchPage", "build_search", "neuron_label", "parse_neuron_id"]
