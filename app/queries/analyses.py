"""One neuron's analysis rows (schema revision 0002): statistics, histograms, examples, families, roles.

Each function returns nothing (None or an empty list) when the stage that fills its table has not run.
BLOB columns are decoded with NumPy as the schema's comments specify (the compact arrays of revision 0005 by
`precompute.store`'s decoders).
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

import numpy as np

from precompute.store import TOKEN_TABLE_KINDS, decode_array, decode_counts, decode_examples, decode_u8

Key = tuple[int, int, int]  # model_id, layer, neuron

_WHERE = "WHERE model_id = ? AND layer = ? AND neuron = ?"


#: Columns of ``activation_stats`` besides ``n_tokens``: moments of mlp.hook_pre and hook_post, firing frequency.
ACTIVATION_STATS = (
    "pre_mean",
    "pre_var",
    "pre_skew",
    "pre_kurt",
    "pre_min",
    "pre_max",
    "frequency",
    "post_mean",
    "post_var",
    "post_skew",
    "post_kurt",
    "post_min",
    "post_max",
)
#: Columns of ``weight_stats``: norms and geometry of the processed weights, then the vocabulary moments.
WEIGHT_STATS = ("w_in_norm", "w_out_norm", "input_bias", "in_out_sim", "l2_penalty", "null_space_fraction")
VOCAB_MOMENTS = ("vocab_mean", "vocab_var", "vocab_skew", "vocab_kurt")


@dataclass(frozen=True, slots=True)
class ActivationStats:
    n_tokens: int  # counted tokens the moments cover
    values: dict[str, float | None]  # by `ACTIVATION_STATS` name

    @property
    def post_max(self) -> float | None:
        """The largest hook_post activation: the examples' colour scale starts from it."""
        return self.values["post_max"]


def activation_stats(conn: sqlite3.Connection, key: Key) -> ActivationStats | None:
    row = conn.execute(f"SELECT n_tokens, {', '.join(ACTIVATION_STATS)} FROM activation_stats {_WHERE}", key).fetchone()
    return None if row is None else ActivationStats(row[0], dict(zip(ACTIVATION_STATS, row[1:], strict=True)))


@dataclass(frozen=True, slots=True)
class Histogram:
    hook: str
    low: float
    high: float
    counts: np.ndarray  # int64[n_bins + 2]: underflow, bins..., overflow


def histograms(conn: sqlite3.Connection, key: Key) -> list[Histogram]:
    rows = conn.execute(f"SELECT hook, low, high, n_bins, counts FROM histograms {_WHERE} ORDER BY hook", key)
    out = []
    for hook, low, high, n_bins, counts in rows:
        array = decode_counts(counts)
        if array.size == n_bins + 2:
            out.append(Histogram(hook, low, high, array))
    return out


@dataclass(frozen=True, slots=True)
class PositionProfile:
    hook: str
    mean: np.ndarray  # float32[ctx]
    std: np.ndarray
    count: np.ndarray  # int64[ctx]


def position_profiles(conn: sqlite3.Connection, key: Key) -> list[PositionProfile]:
    """Both hooks' profiles; the counts per position are the model's (``position_counts``, one row a model)."""
    rows = conn.execute(
        'SELECT p.hook, p.mean, p.std, c."count" FROM position_profiles p '
        "JOIN position_counts c ON c.model_id = p.model_id "
        "WHERE p.model_id = ? AND p.layer = ? AND p.neuron = ? ORDER BY p.hook",
        key,
    )
    return [
        PositionProfile(hook, decode_u8(mean), decode_u8(std), np.frombuffer(count, dtype="<i8"))
        for hook, mean, std, count in rows
    ]


def weight_stats(conn: sqlite3.Connection, key: Key) -> dict[str, float | None] | None:
    """The neuron's `WEIGHT_STATS` and `VOCAB_MOMENTS` by name (None: the stats stage has not run)."""
    names = (*WEIGHT_STATS, *VOCAB_MOMENTS)
    row = conn.execute(f"SELECT {', '.join(names)} FROM weight_stats {_WHERE}", key).fetchone()
    return None if row is None else dict(zip(names, row, strict=True))


def percentiles(conn: sqlite3.Connection, key: Key) -> dict[str, float]:
    """Within-layer percentiles by statistic (by name): the neuron's array, named by ``percentile_statistics``."""
    row = conn.execute(f"SELECT percentiles FROM percentiles {_WHERE}", key).fetchone()
    if row is None:
        return {}
    names = conn.execute(
        "SELECT position, statistic FROM percentile_statistics WHERE model_id = ? ORDER BY position", key[:1]
    ).fetchall()
    values = decode_array(row[0])
    found = {statistic: float(values[i]) for i, statistic in names if i < values.size and np.isfinite(values[i])}
    return {statistic: found[statistic] for statistic in sorted(found)}


@dataclass(frozen=True, slots=True)
class TokenRow:
    token_id: int
    value: float | None
    count: int | None  # occurrences among counted tokens (activation tables only)


def token_tables(conn: sqlite3.Connection, key: Key, limit: int) -> dict[str, list[TokenRow]]:
    """Rows per kind (unembed_top, unembed_bottom, embed_top, mean_activation, max_activation), by rank: each
    kind's arrays (one row per neuron and kind), cut at `limit`."""
    rows = conn.execute(f"SELECT kind, token_ids, token_values, counts FROM token_tables {_WHERE}", key)
    out: dict[str, list[TokenRow]] = {}
    for code, ids, values, counts in rows:  # kind: its index in TOKEN_TABLE_KINDS
        if not 0 <= code < len(TOKEN_TABLE_KINDS):
            continue
        token_ids, token_values = decode_array(ids)[:limit], decode_array(values)[:limit]
        occurrences = decode_array(counts)[:limit].tolist() if counts is not None else [None] * token_ids.size
        out[TOKEN_TABLE_KINDS[code]] = [
            TokenRow(int(t), float(v), c)
            for t, v, c in zip(token_ids.tolist(), token_values.tolist(), occurrences, strict=False)
        ]
    return {kind: out[kind] for kind in sorted(out)}


@dataclass(frozen=True, slots=True)
class ExampleRow:
    kind: str
    rank: int
    bin: int
    bin_low: float | None
    bin_high: float | None
    bin_fraction: float | None
    dataset_row: int
    start: int
    peak: int
    activation: float
    token_ids: np.ndarray  # int64[snippet]
    activations: np.ndarray  # float32[snippet] (stored as uint8 codes with a scale)


def examples(conn: sqlite3.Connection, key: Key, kind: str, limit: int) -> list[ExampleRow]:
    """Examples of one kind ordered by (bin, rank); `limit` caps the rank within each bin. The neuron's examples
    of a kind are one row of arrays (revision 0005); each snippet's token ids are cut from its dataset row
    (``example_rows``, one primary-key lookup per row)."""
    columns = "ranks, bins, bin_ranges, dataset_rows, starts, peaks, activations, lengths, snippets"
    row = conn.execute(f"SELECT {columns} FROM examples {_WHERE} AND kind = ?", (*key, kind)).fetchone()
    if row is None:
        return []
    stored = [e for e in decode_examples(row) if e["rank"] < limit]
    wanted = sorted({e["dataset_row"] for e in stored})
    tokens = {}
    for dataset_row, itemsize, ids in conn.execute(
        "SELECT dataset_row, itemsize, token_ids FROM example_rows WHERE model_id = ? AND dataset_row IN "
        f"({','.join('?' * len(wanted))})",
        (key[0], *wanted),
    ):
        tokens[dataset_row] = np.frombuffer(ids, dtype=f"<u{itemsize}")
    out = []
    for e in stored:
        activations = e["activations"]
        token_ids = tokens.get(e["dataset_row"], np.zeros(0, dtype=np.int64))[
            e["start"] : e["start"] + activations.size
        ]
        if token_ids.size != activations.size or token_ids.size == 0:
            continue  # a malformed row is skipped rather than breaking the page
        scalars = (kind, e["rank"], e["bin"], e["bin_low"], e["bin_high"], e["bin_fraction"], e["dataset_row"])
        out.append(
            ExampleRow(*scalars, e["start"], e["peak"], e["activation"], token_ids.astype(np.int64), activations)
        )
    return out


def example_kinds(conn: sqlite3.Connection, key: Key) -> dict[str, int]:
    rows = conn.execute(f"SELECT kind, n_examples FROM examples {_WHERE}", key)
    return {kind: count for kind, count in rows}


@dataclass(frozen=True, slots=True)
class FamilyRow:
    family: str
    best_feature: str | None
    best_vr: float | None
    position_mi: float | None
    evidence: Any  # decoded JSON (the raw text when it is not JSON)


def family(conn: sqlite3.Connection, key: Key) -> FamilyRow | None:
    row = conn.execute(
        f"SELECT family, best_feature, best_vr, position_mi, evidence FROM families {_WHERE}", key
    ).fetchone()
    if row is None:
        return None
    family, best_feature, best_vr, position_mi, evidence = row
    return FamilyRow(family, best_feature, best_vr, position_mi, parse_json(evidence))


def parse_json(text: str | None) -> Any:
    """Decoded JSON; text that is not JSON is kept as it is.

    >>> parse_json('{"a": 1}'), parse_json("not json"), parse_json(None)
    ({'a': 1}, 'not json', None)
    """
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


@dataclass(frozen=True, slots=True)
class FeatureRow:
    rank: int
    feature: str
    feature_set: str
    variance_reduction: float | None
    fraction: float | None


def feature_scores(conn: sqlite3.Connection, key: Key, limit: int) -> list[FeatureRow]:
    rows = conn.execute(
        "SELECT s.rank, f.feature, f.feature_set, s.variance_reduction, f.fraction FROM feature_scores s "
        "JOIN feature_names f ON f.model_id = s.model_id AND f.feature_id = s.feature_id "
        "WHERE s.model_id = ? AND s.layer = ? AND s.neuron = ? ORDER BY s.rank LIMIT ?",
        (*key, limit),
    )
    return [FeatureRow(*row) for row in rows]


@dataclass(frozen=True, slots=True)
class RolesRow:
    vocab_role: str | None
    entropy_rank: int | None
    attention_role: str | None
    attention_layer: int | None
    attention_head: int | None
    attention_score: float | None


def roles(conn: sqlite3.Connection, key: Key) -> RolesRow | None:
    row = conn.execute(
        "SELECT vocab_role, entropy_rank, attention_role, attention_layer, attention_head, attention_score "
        f"FROM roles {_WHERE}",
        key,
    ).fetchone()
    return None if row is None else RolesRow(*row)


@dataclass(frozen=True, slots=True)
class EntropyRow:
    """The final-layer effects of fixing the neuron's activation to `value` (paper Fig. 7)."""

    value: float
    is_baseline: bool
    ln_scale: float | None
    entropy: float | None
    loss: float | None
    reciprocal_rank: float | None
    n_tokens: int


def entropy_interventions(conn: sqlite3.Connection, key: Key) -> list[EntropyRow]:
    rows = conn.execute(
        "SELECT value, is_baseline, ln_scale, entropy, loss, reciprocal_rank, n_tokens FROM entropy_interventions "
        f"{_WHERE} ORDER BY value",
        key,
    )
    return [EntropyRow(value, bool(is_baseline), *rest) for value, is_baseline, *rest in rows]


def entropy_baseline(conn: sqlite3.Connection, model_id: int) -> list[EntropyRow]:
    """The mean curve of the model's random baseline neurons (paper Fig. 7), one row per fixed value."""
    rows = conn.execute(
        "SELECT value, avg(ln_scale), avg(entropy), avg(loss), avg(reciprocal_rank), min(n_tokens) "
        "FROM entropy_interventions WHERE model_id = ? AND is_baseline = 1 GROUP BY value ORDER BY value",
        (model_id,),
    )
    return [EntropyRow(value, True, *rest) for value, *rest in rows]


@dataclass(frozen=True, slots=True)
class AttentionRow:
    rank: int
    attention_layer: int
    head: int
    score: float | None


def attention_scores(conn: sqlite3.Connection, key: Key, limit: int) -> list[AttentionRow]:
    rows = conn.execute(
        f"SELECT rank, attention_layer, head, score FROM attention_scores {_WHERE} ORDER BY rank LIMIT ?",
        (*key, limit),
    )
    return [AttentionRow(*row) for row in rows]


@dataclass(frozen=True, slots=True)
class PathAblation:
    attention_layer: int
    head: int
    pearson_bos: float | None
    spearman_bos: float | None
    pearson_norm: float | None
    spearman_norm: float | None
    n_points: int
    points: np.ndarray  # float32[n, 3]: activation, d_bos_attention, d_norm


def path_ablations(conn: sqlite3.Connection, key: Key) -> list[PathAblation]:
    rows = conn.execute(
        "SELECT attention_layer, head, pearson_bos, spearman_bos, pearson_norm, spearman_norm, n_points, points "
        f"FROM path_ablations {_WHERE} ORDER BY attention_layer, head",
        key,
    )
    out = []
    for attention_layer, head, pearson_bos, spearman_bos, pearson_norm, spearman_norm, n_points, blob in rows:
        points = np.frombuffer(blob, dtype="<f4")
        points = points[: points.size - points.size % 3].reshape(-1, 3)
        out.append(
            PathAblation(
                attention_layer, head, pearson_bos, spearman_bos, pearson_norm, spearman_norm, n_points, points
            )
        )
    return out


# --- labels of a model's neurons (explorer filters, search) -----------------------------------------------


def family_labels(conn: sqlite3.Connection, model_id: int) -> list[str]:
    """The family labels the model's neurons carry, sorted."""
    rows = conn.execute("SELECT DISTINCT family FROM families WHERE model_id = ? ORDER BY family", (model_id,))
    return [family for (family,) in rows]


def role_labels(conn: sqlite3.Connection, model_id: int) -> list[str]:
    """The role labels the model's neurons carry, sorted; ``entropy`` when any neuron has an entropy rank."""
    rows = conn.execute(
        "SELECT DISTINCT vocab_role FROM roles WHERE model_id = ? AND vocab_role IS NOT NULL UNION "
        "SELECT DISTINCT attention_role FROM roles WHERE model_id = ? AND attention_role IS NOT NULL",
        (model_id, model_id),
    )
    roles = [role for (role,) in rows]
    if conn.execute(
        "SELECT 1 FROM roles WHERE model_id = ? AND entropy_rank IS NOT NULL LIMIT 1", (model_id,)
    ).fetchone():
        roles.append("entropy")
    return sorted(roles)


@dataclass(frozen=True, slots=True)
class FamilyMember:
    layer: int
    neuron: int
    best_feature: str | None
    best_vr: float | None


def family_members(conn: sqlite3.Connection, model_id: int, family: str, limit: int) -> list[FamilyMember]:
    """Neurons of one family, best explained (highest variance reduction) first."""
    rows = conn.execute(
        "SELECT layer, neuron, best_feature, best_vr FROM families WHERE model_id = ? AND family = ? "
        "ORDER BY best_vr IS NULL, best_vr DESC LIMIT ?",
        (model_id, family, limit),
    )
    return [FamilyMember(*row) for row in rows]
