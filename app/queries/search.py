"""Search: neurons ranked by how strongly each is tied to a token, a feature, a family or a role (issue 10).

Every kind of evidence is one SELECT over an index range (`Evidence*` below build them); `rank_neurons` merges
them into one row per neuron inside SQLite (its score is the strongest evidence, see docs/api.md "Search"),
joins the labels, filters, orders and cuts at a cap, so no request reads more than the index entries of what it
looks for plus one primary-key lookup per matched neuron. `best_matches` then reads each result's twins.

Strengths are normalised to [0, 1]:

- a token table (mean/max activation, unembedding top/bottom, embedding): ``1 / (1 + rank)`` of the token;
- the top examples: the share of the neuron's top examples whose peak (max) token is the query;
- a feature (``feature_scores``) or a family (``families.best_vr``): the variance reduction, clipped to [0, 1];
- a role: 1 for a vocabulary or attention role, ``1 / (1 + entropy_rank)`` for an entropy-neuron candidate.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from app.queries.neurons import NeuronFilter, universal_column
from precompute.store import TOKEN_TABLE_KINDS as STORED_KINDS
from precompute.store import decode_array, decode_postings, token_kind_code

Key = tuple[int, int, int]  # model_id, layer, neuron

#: Token-table kinds searched by token, in the order evidence is listed.
TOKEN_TABLE_KINDS = ("mean_activation", "max_activation", "unembed_top", "unembed_bottom", "embed_top")
#: The index each kind of evidence reads. A statement names it (``INDEXED BY``) when the file has it: without
#: statistics (``ANALYZE``) SQLite would otherwise prefer a primary-key range when a filter fixes the layer.
INDEXES = {
    "feature_scores": "ix_feature_scores_feature",
    "families": "ix_families_family",
    "vocab_role": "ix_roles_vocab_role",
    "attention_role": "ix_roles_attention_role",
    "entropy": "ix_roles_entropy_rank",
}
#: Roles stored in ``roles.vocab_role`` and ``roles.attention_role``; ``entropy`` is a non-NULL entropy_rank.
VOCAB_ROLES = ("prediction", "suppression", "partition")
ATTENTION_ROLES = ("deactivation", "activation")
ROLES = (*VOCAB_ROLES, *ATTENTION_ROLES, "entropy")


@dataclass(frozen=True, slots=True)
class Statement:
    """One SQL statement and its parameters (tests run ``EXPLAIN QUERY PLAN`` on the very same)."""

    sql: str
    params: tuple[object, ...]


def _marks(values: Sequence[object]) -> str:
    return ",".join("?" * len(values))


def _table(table: str, use: str, indexes: frozenset[str], alias: str = "") -> str:
    """``table [alias] INDEXED BY ix`` when the file has the index `use` names, else the bare table.

    >>> _table("families", "families", frozenset({"ix_families_family"})), _table("roles", "entropy", frozenset())
    ('families INDEXED BY ix_families_family', 'roles')
    """
    name = f"{table} {alias}".strip()
    return f"{name} INDEXED BY {INDEXES[use]}" if INDEXES[use] in indexes else name


# --- evidence: each a SELECT of (model_id, layer, neuron, kind, strength, rank, value, token_id, label) ---------


def token_postings(
    conn: sqlite3.Connection, model_ids: Sequence[int], token_ids: Sequence[int]
) -> list[tuple[int, int, int, str, float, int, None, int, None]]:
    """The token tables' entries that list one of the tokens, as evidence rows: one primary-key range of
    ``token_postings`` per model, kind and token (revision 0005), its records decoded here."""
    if not model_ids or not token_ids:
        return []
    d_mlp = dict(conn.execute(f"SELECT id, d_mlp FROM models WHERE id IN ({_marks(model_ids)})", tuple(model_ids)))
    codes = [token_kind_code(kind) for kind in TOKEN_TABLE_KINDS]
    rows = conn.execute(
        f"SELECT model_id, kind, token_id, postings FROM token_postings WHERE model_id IN ({_marks(model_ids)}) "
        f"AND kind IN ({_marks(codes)}) AND token_id IN ({_marks(token_ids)})",
        (*model_ids, *codes, *token_ids),
    )
    out = []
    for model_id, code, token_id, postings in rows:
        kind, width = STORED_KINDS[code], d_mlp[model_id]
        for flat, rank in decode_postings(postings).tolist():
            out.append((model_id, flat // width, flat % width, kind, 1.0 / (1 + rank), rank, None, token_id, None))
    return out


def token_values(conn: sqlite3.Connection, ranked: list[RankedNeuron]) -> list[RankedNeuron]:
    """The ranked neurons with the value of each token-table evidence row, read from the neuron's table
    (``token_postings`` lists where a token is, not its value: one primary-key lookup per neuron and kind)."""
    tables: dict[tuple[int, int, int, str], np.ndarray] = {}
    out = []
    for hit in ranked:
        rows = []
        for e in hit.evidence:
            if e.kind in TOKEN_TABLE_KINDS and e.value is None and e.rank is not None:
                key = (*hit.key, e.kind)
                if key not in tables:
                    row = conn.execute(
                        "SELECT token_values FROM token_tables WHERE model_id = ? AND layer = ? AND neuron = ? "
                        "AND kind = ?",
                        (*hit.key, token_kind_code(e.kind)),
                    ).fetchone()
                    tables[key] = decode_array(row[0]) if row else np.zeros(0)
                values = tables[key]
                e = replace(e, value=float(values[e.rank]) if e.rank < values.size else None)
            rows.append(e)
        out.append(replace(hit, evidence=tuple(rows)))
    return out


def token_table_evidence(conn: sqlite3.Connection, model_ids: Sequence[int], token_ids: Sequence[int]) -> Statement:
    """Rows of the token tables that list one of the tokens (`token_postings`, read before the statement runs;
    the statement lists them: ``json_each`` of one parameter)."""
    rows = json.dumps(token_postings(conn, model_ids, token_ids))
    columns = ", ".join(f"json_extract(value, '$[{i}]')" for i in range(9))
    return Statement(f"SELECT {columns} FROM json_each(?)", (rows,))


def example_evidence(model_ids: Sequence[int], token_ids: Sequence[int]) -> Statement:
    """Per neuron, the share of its top examples that peak on one of the tokens (``example_peaks``, whose primary
    key is the table; the denominator is the neuron's ``examples`` row). ``rank`` is the best such example's,
    ``value`` its activation."""
    return Statement(
        "SELECT e.model_id, e.layer, e.neuron, 'top_examples', count(*) * 1.0 / (SELECT t.n_examples FROM examples t "
        "WHERE t.model_id = e.model_id AND t.layer = e.layer AND t.neuron = e.neuron AND t.kind = 'top'), "
        "min(e.rank), max(e.activation), NULL, NULL FROM example_peaks e "
        f"WHERE e.model_id IN ({_marks(model_ids)}) AND e.peak_token IN ({_marks(token_ids)}) "
        "GROUP BY e.model_id, e.layer, e.neuron",
        (*model_ids, *token_ids),
    )


def feature_evidence(
    model_ids: Sequence[int], features: Sequence[str], indexes: frozenset[str] = frozenset()
) -> Statement:
    """Neurons that list one of the features among their best: the features' ids (``feature_names``, index
    ``ix_feature_names_feature``), then their neurons (index ``ix_feature_scores_feature``)."""
    return Statement(
        "SELECT feature_scores.model_id, layer, neuron, 'feature', max(0.0, min(1.0, variance_reduction)), rank, "
        "variance_reduction, NULL, f.feature FROM feature_names f "
        f"CROSS JOIN {_table('feature_scores', 'feature_scores', indexes)} "
        "ON feature_scores.model_id = f.model_id AND feature_scores.feature_id = f.feature_id "
        f"WHERE f.model_id IN ({_marks(model_ids)}) AND f.feature IN ({_marks(features)})",
        (*model_ids, *features),
    )


def family_evidence(model_ids: Sequence[int], family: str, indexes: frozenset[str] = frozenset()) -> Statement:
    """The family's neurons; strength: the best feature's variance reduction (index ``ix_families_family``)."""
    return Statement(
        "SELECT model_id, layer, neuron, 'family', max(0.0, min(1.0, coalesce(best_vr, 0.0))), NULL, best_vr, "
        f"NULL, family FROM {_table('families', 'families', indexes)} "
        f"WHERE model_id IN ({_marks(model_ids)}) AND family = ?",
        (*model_ids, family),
    )


def role_evidence(model_ids: Sequence[int], role: str, indexes: frozenset[str] = frozenset()) -> Statement:
    """The role's neurons (indexes ``ix_roles_vocab_role``, ``ix_roles_attention_role``, ``ix_roles_entropy_rank``).

    >>> role_evidence([1], "nonsense")
    Traceback (most recent call last):
    ValueError: unknown role 'nonsense'; roles: prediction, suppression, partition, deactivation, activation, entropy
    """
    marks = _marks(model_ids)
    if role == "entropy":
        return Statement(
            "SELECT model_id, layer, neuron, 'role', 1.0 / (1 + entropy_rank), entropy_rank, NULL, NULL, 'entropy' "
            f"FROM {_table('roles', 'entropy', indexes)} WHERE model_id IN ({marks}) AND entropy_rank IS NOT NULL",
            tuple(model_ids),
        )
    if role in VOCAB_ROLES:
        column, value = "vocab_role", "NULL"
    elif role in ATTENTION_ROLES:
        column, value = "attention_role", "attention_score"
    else:
        raise ValueError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
    return Statement(
        f"SELECT model_id, layer, neuron, 'role', 1.0, NULL, {value}, NULL, {column} "
        f"FROM {_table('roles', column, indexes)} "
        f"WHERE model_id IN ({marks}) AND {column} = ?",
        (*model_ids, role),
    )


# --- ranking ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EvidenceRow:
    kind: str  # a token-table kind, top_examples, feature, family or role
    strength: float
    rank: int | None
    value: float | None
    token_id: int | None
    label: str | None  # the feature, family or role


@dataclass(frozen=True, slots=True)
class Labels:
    """What a result row shows about a neuron besides its evidence."""

    universal: bool | None
    excess_corr: float | None
    family: str | None
    roles: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RankedNeuron:
    model_id: int
    layer: int
    neuron: int
    score: float
    labels: Labels
    evidence: tuple[EvidenceRow, ...]  # strongest first

    @property
    def key(self) -> Key:
        return self.model_id, self.layer, self.neuron


@dataclass(frozen=True, slots=True)
class Ranking:
    neurons: list[RankedNeuron]  # best first, at most the cap
    total: int  # every neuron that matched (beyond the cap too)


_JOINS = (
    "LEFT JOIN neurons n ON n.model_id = {t}.model_id AND n.layer = {t}.layer AND n.neuron = {t}.neuron "
    "LEFT JOIN families f ON f.model_id = {t}.model_id AND f.layer = {t}.layer AND f.neuron = {t}.neuron "
    "LEFT JOIN roles r ON r.model_id = {t}.model_id AND r.layer = {t}.layer AND r.neuron = {t}.neuron"
)
_LABELS = "n.excess_corr, f.family, r.vocab_role, r.attention_role, r.entropy_rank"


def _labels(universal: int | None, excess: float | None, family: str | None, *roles: object) -> Labels:
    vocab_role, attention_role, entropy_rank = roles
    names = [str(r) for r in (vocab_role, attention_role) if r is not None]
    if entropy_rank is not None:
        names.append("entropy")
    return Labels(None if universal is None else bool(universal), excess, family, tuple(names))


def ranking_statement(parts: Sequence[Statement], where: NeuronFilter, cap: int) -> Statement:
    """The one statement that merges the evidence per neuron, filters, orders and cuts at `cap`.

    Order: score (the strongest evidence) descending, then universal neurons first, then the excess correlation
    descending (missing last), then model, layer and neuron, so that the order is total and pages are stable.
    """
    union = " UNION ALL ".join(p.sql for p in parts)
    conditions, filter_params, _ = where.where()
    universal, universal_params = universal_column(where.threshold)
    sql = (
        f"WITH ev(model_id, layer, neuron, kind, strength, rank, value, token_id, label) AS ({union}), "
        "hits AS (SELECT model_id, layer, neuron, max(strength) AS score, "
        "json_group_array(json_array(kind, strength, rank, value, token_id, label)) AS evidence "
        "FROM ev GROUP BY model_id, layer, neuron) "
        f"SELECT h.model_id, h.layer, h.neuron, h.score, h.evidence, {universal} AS is_universal, {_LABELS}, "
        f"count(*) OVER () FROM hits h {_JOINS.format(t='h')} "
        + (f"WHERE {' AND '.join(conditions)} " if conditions else "")
        + "ORDER BY h.score DESC, coalesce(is_universal, 0) DESC, n.excess_corr IS NULL, n.excess_corr DESC, "
        "h.model_id, h.layer, h.neuron LIMIT ?"
    )
    params = tuple(p for part in parts for p in part.params)
    return Statement(sql, (*params, *universal_params, *filter_params, cap))


def rank_neurons(conn: sqlite3.Connection, parts: Sequence[Statement], where: NeuronFilter, cap: int) -> Ranking:
    """The matched neurons, strongest first (at most `cap`), each with its evidence, and how many matched."""
    if not parts:
        return Ranking([], 0)
    statement = ranking_statement(parts, where, cap)
    neurons = []
    total = 0
    for model_id, layer, neuron, score, evidence, universal, *labels, count in conn.execute(
        statement.sql, statement.params
    ):
        rows = sorted(
            (EvidenceRow(*row) for row in json.loads(evidence)),
            key=lambda e: (-e.strength, e.kind, e.rank if e.rank is not None else 0),
        )
        neurons.append(RankedNeuron(model_id, layer, neuron, score, _labels(universal, *labels), tuple(rows)))
        total = count
    return Ranking(token_values(conn, neurons), total)


# --- twins, existence checks --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BestMatch:
    """A neuron's best match (rank 0 of ``matches``) in one partner model, with the partner's labels."""

    partner_model_id: int
    layer: int
    neuron: int
    corr: float
    labels: Labels


def best_matches_statement(keys: Sequence[Key], partner_ids: Sequence[int], threshold: float | None) -> Statement:
    """The neurons' best matches in the partner models, with the partners' labels."""
    universal, universal_params = universal_column(threshold)
    return Statement(
        f"SELECT m.model_id, m.layer, m.neuron, m.partner_model_id, m.partner_layer, m.partner_neuron, m.corr, "
        f"{universal}, {_LABELS} FROM json_each(?) c "
        # CROSS JOIN: SQLite keeps this order, one primary-key lookup per neuron (not a partner model's range)
        "CROSS JOIN matches m ON m.model_id = json_extract(c.value, '$[0]') "
        "AND m.layer = json_extract(c.value, '$[1]') AND m.neuron = json_extract(c.value, '$[2]') AND m.rank = 0 "
        f"AND m.partner_model_id IN ({_marks(partner_ids)}) "
        "LEFT JOIN neurons n ON n.model_id = m.partner_model_id AND n.layer = m.partner_layer "
        "AND n.neuron = m.partner_neuron "
        "LEFT JOIN families f ON f.model_id = m.partner_model_id AND f.layer = m.partner_layer "
        "AND f.neuron = m.partner_neuron "
        "LEFT JOIN roles r ON r.model_id = m.partner_model_id AND r.layer = m.partner_layer "
        "AND r.neuron = m.partner_neuron",
        (*universal_params, json.dumps([list(k) for k in keys]), *partner_ids),
    )


def best_matches(
    conn: sqlite3.Connection, keys: Sequence[Key], partner_ids: Sequence[int], threshold: float | None
) -> dict[Key, list[BestMatch]]:
    """For each neuron, its best match in each partner model (primary-key lookups, one per neuron and partner)."""
    if not keys or not partner_ids:
        return {}
    statement = best_matches_statement(keys, partner_ids, threshold)
    found: dict[Key, list[BestMatch]] = {}
    for model_id, layer, neuron, partner, p_layer, p_neuron, corr, flag, *labels in conn.execute(
        statement.sql, statement.params
    ):
        found.setdefault((model_id, layer, neuron), []).append(
            BestMatch(partner, p_layer, p_neuron, corr, _labels(flag, *labels))
        )
    return found


def present_indexes(conn: sqlite3.Connection) -> frozenset[str]:
    """The search indexes the file has (files written before revision 0004 lack some)."""
    wanted = sorted(set(INDEXES.values()))
    rows = conn.execute(f"SELECT name FROM sqlite_master WHERE type = 'index' AND name IN ({_marks(wanted)})", wanted)
    return frozenset(name for (name,) in rows)


def feature_exists(conn: sqlite3.Connection, model_ids: Sequence[int], feature: str) -> bool:
    """Whether any of the models scores this feature (one probe of ``ix_feature_names_feature``)."""
    return (
        conn.execute(
            f"SELECT 1 FROM feature_names WHERE model_id IN ({_marks(model_ids)}) AND feature = ? LIMIT 1",
            (*model_ids, feature),
        ).fetchone()
        is not None
    )
