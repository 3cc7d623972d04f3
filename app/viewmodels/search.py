"""Search: jump to a neuron id, or rank neurons by how strongly they are tied to a token, feature, family or role.

Accepted neuron ids (dashboard-anchors §5): ``L5N1234``, ``L5.1234``, ``5:1234``, ``5/1234``, optionally with a
model in front (``seed-1/L5N1234``, ``seed-1:L5N1234``). ``family:NAME`` (or a family's bare name) lists a
family, ``role:NAME`` a role, ``feature:NAME`` (or a feature's bare name such as ``syntax:newline``) a feature;
``token:TEXT`` forces a token search; any other text is searched as a token (exact text first, then ignoring case
and spaces).

Results are one row per neuron, its evidence merged, ranked by its score (`app.queries.search`, docs/api.md
"Search"); with ``group`` a neuron's best matches in the other searched models sit in its row (``twins``), and the
pages count these groups.
"""

from __future__ import annotations

import math
import re
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from app.queries import search as sq
from app.queries.models import Model
from app.queries.neurons import NeuronFilter
from app.urls import Scope, neuron_label
from app.viewmodels.common import NeuronRef, ViewModel, number, token_text

SearchKind = Literal["empty", "neuron", "token", "feature", "family", "role"]
EvidenceKind = Literal[
    "mean_activation", "max_activation", "unembed_top", "unembed_bottom", "embed_top", "top_examples", "feature",
    "family", "role",
]  # fmt: skip
RoleName = Literal["prediction", "suppression", "partition", "deactivation", "activation", "entropy"]
MAX_TOKENS = 50
#: What an evidence kind is called on the page.
EVIDENCE_LABELS = {
    "mean_activation": "tokens by mean activation",
    "max_activation": "tokens by max activation",
    "unembed_top": "vocab projection (top)",
    "unembed_bottom": "vocab projection (bottom)",
    "embed_top": "input tokens (W_E)",
    "top_examples": "top examples",
    "feature": "feature",
    "family": "family",
    "role": "role",
}

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


# --- the request --------------------------------------------------------------------------------------------


class SearchFilters(ViewModel):
    """Filters applied to every kind of search (None: not filtered)."""

    model: str | None = Field(description="Only this model (None: every model of the run)")
    layer: int | None = Field(description="Only this layer")
    universal: bool | None = Field(description="Only universal (true) or non-universal (false) neurons")
    family: str | None = Field(description="Only this family label")
    role: RoleName | None = Field(description="Only this role")


@dataclass(frozen=True)
class SearchQuery:
    """What the route parsed from the query string."""

    q: str
    filters: SearchFilters
    page: int
    per_page: int
    group: bool

    def params(self, **changes: object) -> dict[str, object]:
        values: dict[str, object] = {
            "q": self.q,
            **self.filters.model_dump(),
            "page": self.page if self.page != 1 else None,
            "per_page": self.per_page if self.per_page != DEFAULT_PER_PAGE else None,
            "group": None if self.group else False,
        }
        values.update(changes)
        return values


DEFAULT_PER_PAGE = 20


# --- the answer ---------------------------------------------------------------------------------------------


class MatchedToken(ViewModel):
    token_id: int
    token: str


class Evidence(ViewModel):
    """One piece of evidence tying a neuron to the query."""

    kind: EvidenceKind = Field(description="Where it was found (a token table, the top examples, a feature, ...)")
    strength: float = Field(
        description="Normalised to [0, 1]: 1/(1+rank) in a token table, the share of top examples peaking on the "
        "token, the variance reduction of a feature or family, 1 for a role (1/(1+rank) for entropy)"
    )
    rank: int | None = Field(description="Rank of the token in the table, of the feature, or of the best example")
    value: float | None = Field(description="The table's value, the best example's activation, or the VR")
    token: str | None = Field(description="The matched token")
    label: str | None = Field(description="The feature, family or role")


class SearchTwin(ViewModel):
    """The best match of a result's neuron in another searched model."""

    neuron: NeuronRef
    corr: float | None = Field(description="Correlation of the row's neuron with this best match")
    grouped: bool = Field(
        description="This neuron matched the search and its result is this row's (false: it did not match, or "
        "its result is listed in an earlier row)"
    )
    score: float | None = Field(description="Its score when it matched the search, else None")
    universal: bool | None
    excess_corr: float | None
    family: str | None
    roles: list[str]
    evidence: list[Evidence] = Field(description="Its evidence when it matched (strongest first)")


class SearchItem(ViewModel):
    """One matched neuron (with its twins when grouped)."""

    neuron: NeuronRef
    score: float = Field(description="How strongly the neuron is tied to the query: its strongest evidence")
    best: EvidenceKind = Field(description="The evidence kind that gives the score")
    universal: bool | None = Field(description="excess_corr > threshold (None: no correlations)")
    excess_corr: float | None
    family: str | None
    roles: list[str] = Field(description="Vocabulary role, attention role, 'entropy'")
    evidence: list[Evidence] = Field(description="Every piece of evidence, strongest first")
    twins: list[SearchTwin] = Field(description="Its best match in each other searched model (with group=true)")


class SearchPage(ViewModel):
    q: str = Field(description="The query")
    kind: SearchKind = Field(description="How the query was read")
    model: str | None = Field(description="Model searched (None: every model of the run)")
    redirect: str | None = Field(description="For a neuron id: the neuron's page")
    message: str | None = Field(description="Why nothing was found, when nothing was")
    tokens: list[MatchedToken] = Field(description="Vocabulary tokens the query matched")
    features: list[str] = Field(description="Features searched (a token's unigram feature token:TEXT, or the one)")
    filters: SearchFilters
    group: bool = Field(description="A neuron's best matches in the other searched models share its row")
    total: int = Field(description="Rows (items) over all pages")
    neurons: int = Field(description="Neurons that matched (counting grouped twins, beyond the cap too)")
    page: int = Field(description="This page (1-based)")
    per_page: int = Field(description="Rows per page")
    pages: int = Field(description="Number of pages")
    items: list[SearchItem] = Field(description="This page's rows, best first")
    truncated: bool = Field(description="More neurons matched than the server ranks (max_rows): pages cover the best")
    examples_complete: bool = Field(
        description="Top examples were searched: always true since schema revision 0005, whose example_peaks table "
        "lists the top examples by peak token (before it: false for a file without the peak-token index and "
        "above 20,000 neurons)"
    )
    families: list[str] = Field(description="Family labels present in the searched models")
    roles: list[str] = Field(description="Role labels present in the searched models")
    threshold: float = Field(description="Excess correlation above which a neuron is universal here")
    url: str | None = Field(description="This page")
    api_url: str | None = Field(description="Its JSON twin")
    prev_url: str | None
    next_url: str | None


@dataclass(frozen=True)
class SearchContext:
    """What the route looked up once: vocabulary, labels present, the search indexes the file has, the cap."""

    vocab: Sequence[str]
    labels: Mapping[int, tuple[list[str], list[str]]]  # model id -> (families, roles)
    indexes: frozenset[str]
    cap: int


def _evidence(row: sq.EvidenceRow, vocab: Sequence[str], token_ids: Sequence[int]) -> Evidence:
    token_id = row.token_id
    if token_id is None and row.kind == "top_examples" and len(token_ids) == 1:
        token_id = token_ids[0]
    return Evidence(
        kind=row.kind,  # type: ignore[arg-type]  # the SQL writes only EvidenceKind values
        strength=number(row.strength) or 0.0,
        rank=row.rank,
        value=number(row.value),
        token=None if token_id is None else token_text(vocab, token_id),
        label=row.label,
    )


@dataclass
class _Reading:
    """How the query was read and the evidence statements it needs."""

    kind: SearchKind
    parts: list[sq.Statement]
    tokens: list[int]
    features: list[str]
    message: str | None = None
    examples_complete: bool = True


def _read(
    conn: sqlite3.Connection, query: str, models: Sequence[Model], families: Sequence[str], ctx: SearchContext
) -> _Reading:
    ids = [m.id for m in models]
    text = query.strip()
    if query.startswith("family:") or (text in families and not query.startswith("token:")):
        family = query[len("family:") :].strip() if query.startswith("family:") else text
        missing = None if family in families else f"no neuron of family {family!r}"
        return _Reading("family", [sq.family_evidence(ids, family, ctx.indexes)], [], [], missing)
    if query.startswith("role:"):
        role = query[len("role:") :].strip()
        if role not in sq.ROLES:
            return _Reading("role", [], [], [], f"unknown role {role!r}; roles: {', '.join(sq.ROLES)}")
        return _Reading("role", [sq.role_evidence(ids, role, ctx.indexes)], [], [])
    if query.startswith("feature:") or (
        ":" in text and not query.startswith("token:") and sq.feature_exists(conn, ids, text)
    ):
        feature = query[len("feature:") :].strip() if query.startswith("feature:") else text
        return _Reading("feature", [sq.feature_evidence(ids, [feature], ctx.indexes)], [], [feature])
    token_text_ = query[len("token:") :] if query.startswith("token:") else text
    token_ids = match_tokens(ctx.vocab, token_text_)
    if not token_ids:
        return _Reading("token", [], [], [], f"no token of the vocabulary matches {token_text_!r}")
    features = list(dict.fromkeys(f"token:{ctx.vocab[t]}" for t in token_ids))
    parts = [sq.token_table_evidence(conn, ids, token_ids), sq.feature_evidence(ids, features, ctx.indexes)]
    parts.append(sq.example_evidence(ids, token_ids))  # the top examples' peaks (``example_peaks``)
    return _Reading("token", parts, token_ids, features)


@dataclass(frozen=True)
class _Twin:
    match: sq.BestMatch
    hit: sq.RankedNeuron | None  # its result when it matched the search
    grouped: bool  # its result is this row's


@dataclass
class _Group:
    leader: sq.RankedNeuron
    twins: list[_Twin]


def _group(
    ranked: Sequence[sq.RankedNeuron], matches: Mapping[sq.Key, list[sq.BestMatch]], order: Mapping[int, int]
) -> list[_Group]:
    """Rows in rank order: each neuron not yet placed starts one and takes its best matches that matched and are
    not placed yet, so every matched neuron is in exactly one row."""
    by_key = {r.key: r for r in ranked}
    placed: set[sq.Key] = set()
    groups = []
    for result in ranked:
        if result.key in placed:
            continue
        placed.add(result.key)
        twins = []
        for match in sorted(matches.get(result.key, []), key=lambda m: order.get(m.partner_model_id, 0)):
            key = (match.partner_model_id, match.layer, match.neuron)
            hit = by_key.get(key)
            grouped = hit is not None and key not in placed
            if grouped:
                placed.add(key)
            twins.append(_Twin(match, hit, grouped))
        groups.append(_Group(result, twins))
    return groups


def build_search(
    conn: sqlite3.Connection,
    scope: Scope,
    query: SearchQuery,
    model: Model | None,
    ctx: SearchContext,
) -> SearchPage:
    models = [model] if model else list(scope.models)
    families = sorted({f for m in models for f in ctx.labels.get(m.id, ([], []))[0]})
    roles = sorted({r for m in models for r in ctx.labels.get(m.id, ([], []))[1]})
    q = query.q
    filters = query.filters

    def answer(
        kind: SearchKind,
        redirect: str | None = None,
        message: str | None = None,
        reading: _Reading | None = None,
        groups: Sequence[_Group] = (),
        neurons: int = 0,
    ) -> SearchPage:
        total = len(groups)
        pages = max(1, math.ceil(total / query.per_page))
        start = (query.page - 1) * query.per_page
        shown = groups[start : start + query.per_page]
        by_id = {m.id: m for m in scope.models}
        tokens = reading.tokens if reading else []

        def ref(model_id: int, layer: int, neuron: int) -> NeuronRef:
            return NeuronRef.build(scope, by_id[model_id].name, layer, neuron)

        def twin(t: _Twin) -> SearchTwin:
            match, hit, grouped = t.match, t.hit, t.grouped
            labels = hit.labels if hit else match.labels
            return SearchTwin(
                neuron=ref(match.partner_model_id, match.layer, match.neuron),
                corr=number(match.corr),
                grouped=grouped,
                score=number(hit.score) if hit else None,
                universal=labels.universal,
                excess_corr=number(labels.excess_corr),
                family=labels.family,
                roles=list(labels.roles),
                evidence=[_evidence(e, ctx.vocab, tokens) for e in hit.evidence] if hit else [],
            )

        items = [
            SearchItem(
                neuron=ref(*g.leader.key),
                score=number(g.leader.score) or 0.0,
                best=g.leader.evidence[0].kind,  # type: ignore[arg-type]
                universal=g.leader.labels.universal,
                excess_corr=number(g.leader.labels.excess_corr),
                family=g.leader.labels.family,
                roles=list(g.leader.labels.roles),
                evidence=[_evidence(e, ctx.vocab, tokens) for e in g.leader.evidence],
                twins=[twin(t) for t in g.twins],
            )
            for g in shown
        ]
        has_page = kind not in ("empty", "neuron")
        return SearchPage(
            q=q,
            kind=kind,
            model=filters.model,
            redirect=redirect,
            message=message,
            tokens=[MatchedToken(token_id=t, token=token_text(ctx.vocab, t)) for t in tokens],
            features=reading.features if reading else [],
            filters=filters,
            group=query.group,
            total=total,
            neurons=neurons,
            page=query.page,
            per_page=query.per_page,
            pages=pages,
            items=items,
            truncated=neurons > ctx.cap,
            examples_complete=reading.examples_complete if reading else True,
            families=families,
            roles=roles,
            threshold=scope.threshold,
            url=scope.search_url(query.params()) if has_page else None,
            api_url=scope.api_url("/search", query.params()) if has_page else None,
            prev_url=scope.search_url(query.params(page=query.page - 1 if query.page > 2 else None))
            if has_page and query.page > 1
            else None,
            next_url=scope.search_url(query.params(page=query.page + 1)) if has_page and query.page < pages else None,
        )

    if not q.strip():
        return answer("empty")
    parsed = parse_neuron_id(q) if not q.startswith("token:") else None
    if parsed is not None:
        name, layer, neuron = parsed
        target = scope.model(name) if name else (model or scope.models[0])
        if target is None:
            problem = f"no model {name!r} in run {scope.run.id}"
        elif not (layer < target.n_layers and neuron < target.d_mlp):
            problem = f"{target.name} has {target.n_layers} layers of {target.d_mlp} neurons"
        else:
            return answer("neuron", redirect=scope.neuron_url(target.name, layer, neuron))
        return answer("neuron", message=problem)

    reading = _read(conn, q, models, families, ctx)
    where = NeuronFilter(
        layer=filters.layer,
        universal=filters.universal,
        family=filters.family,
        role=filters.role,
        threshold=scope.custom_threshold,
    )
    ranking = sq.rank_neurons(conn, reading.parts, where, ctx.cap)
    matches: dict[sq.Key, list[sq.BestMatch]] = {}
    if query.group and len(models) > 1 and ranking.neurons:
        matches = sq.best_matches(
            conn, [r.key for r in ranking.neurons], [m.id for m in models], scope.custom_threshold
        )
    order = {m.id: i for i, m in enumerate(scope.models)}
    groups = _group(ranking.neurons, matches, order)
    message = reading.message
    if message is None and not groups:
        message = {
            "token": "no neuron lists these tokens in its token tables, top examples or features",
            "feature": "no neuron lists this feature among its best",
            "family": "no neuron of this family matches the filters",
            "role": "no neuron has this role",
        }[reading.kind]
        if where.where()[0]:
            message += " (with these filters)"
    return answer(reading.kind, message=message, reading=reading, groups=groups, neurons=ranking.total)


__all__ = ["SearchPage", "SearchQuery", "build_search", "neuron_label", "parse_neuron_id"]
