"""One neuron's analysis rows (schema revision 0002): statistics, histograms, examples, families, roles.

Each function returns nothing (None or an empty list) when the stage that fills its table has not run.
BLOB columns are decoded with NumPy as the schema's comments specify.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

import numpy as np

Key = tuple[int, int, int]  # model_id, layer, neuron

_WHERE = "WHERE model_id = ? AND layer = ? AND neuron = ?"


def activation_stats(conn: sqlite3.Connection, key: Key) -> sqlite3.Row | None:
    return conn.execute(
        "SELECT n_tokens, pre_mean, pre_var, pre_skew, pre_kurt, pre_min, pre_max, frequency, post_mean, post_var, "
        f"post_skew, post_kurt, post_min, post_max FROM activation_stats {_WHERE}",
        key,
    ).fetchone()


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
        array = np.frombuffer(counts, dtype="<i8")
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
    rows = conn.execute(f'SELECT hook, mean, std, "count" FROM position_profiles {_WHERE} ORDER BY hook', key)
    return [
        PositionProfile(
            hook, np.frombuffer(mean, dtype="<f4"), np.frombuffer(std, dtype="<f4"), np.frombuffer(count, dtype="<i8")
        )
        for hook, mean, std, count in rows
    ]


def weight_stats(conn: sqlite3.Connection, key: Key) -> sqlite3.Row | None:
    return conn.execute(
        "SELECT w_in_norm, w_out_norm, input_bias, in_out_sim, l2_penalty, vocab_mean, vocab_var, vocab_skew, "
        f"vocab_kurt, null_space_fraction FROM weight_stats {_WHERE}",
        key,
    ).fetchone()


def percentiles(conn: sqlite3.Connection, key: Key) -> dict[str, float]:
    rows = conn.execute(f"SELECT statistic, percentile FROM percentiles {_WHERE}", key)
    return {statistic: percentile for statistic, percentile in rows}


def token_tables(conn: sqlite3.Connection, key: Key, limit: int) -> dict[str, list[sqlite3.Row]]:
    """Rows per kind (unembed_top, unembed_bottom, embed_top, mean_activation, max_activation), by rank."""
    rows = conn.execute(
        f'SELECT kind, rank, token_id, value, "count" FROM token_tables {_WHERE} AND rank < ? ORDER BY kind, rank',
        (*key, limit),
    )
    out: dict[str, list[sqlite3.Row]] = {}
    for row in rows:
        out.setdefault(row["kind"], []).append(row)
    return out


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
    token_ids: np.ndarray  # int32[snippet]
    activations: np.ndarray  # float32[snippet] (stored as float16)


def examples(conn: sqlite3.Connection, key: Key, kind: str, limit: int) -> list[ExampleRow]:
    """Examples of one kind ordered by (bin, rank); `limit` caps the rank within each bin."""
    rows = conn.execute(
        "SELECT kind, rank, bin, bin_low, bin_high, bin_fraction, dataset_row, start, peak, activation, token_ids, "
        f"activations FROM examples {_WHERE} AND kind = ? AND rank < ? ORDER BY bin, rank",
        (*key, kind, limit),
    )
    out = []
    for row in rows:
        token_ids = np.frombuffer(row[10], dtype="<i4")
        activations = np.frombuffer(row[11], dtype="<f2").astype(np.float32)
        if token_ids.size != activations.size or token_ids.size == 0:
            continue  # a malformed row is skipped rather than breaking the page
        out.append(ExampleRow(*row[:10], token_ids, activations))
    return out


def example_kinds(conn: sqlite3.Connection, key: Key) -> dict[str, int]:
    rows = conn.execute(f"SELECT kind, count(*) FROM examples {_WHERE} GROUP BY kind", key)
    return {kind: count for kind, count in rows}


def family(conn: sqlite3.Connection, key: Key) -> sqlite3.Row | None:
    return conn.execute(
        f"SELECT family, best_feature, best_vr, position_mi, evidence FROM families {_WHERE}", key
    ).fetchone()


def parse_json(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def feature_scores(conn: sqlite3.Connection, key: Key, limit: int) -> list[sqlite3.Row]:
    return conn.execute(
        f"SELECT rank, feature, feature_set, variance_reduction, fraction FROM feature_scores {_WHERE} "
        "ORDER BY rank LIMIT ?",
        (*key, limit),
    ).fetchall()


def roles(conn: sqlite3.Connection, key: Key) -> sqlite3.Row | None:
    return conn.execute(
        "SELECT vocab_role, entropy_rank, attention_role, attention_layer, attention_head, attention_score "
        f"FROM roles {_WHERE}",
        key,
    ).fetchone()


def entropy_interventions(conn: sqlite3.Connection, key: Key) -> list[sqlite3.Row]:
    return conn.execute(
        "SELECT value, is_baseline, ln_scale, entropy, loss, reciprocal_rank, n_tokens FROM entropy_interventions "
        f"{_WHERE} ORDER BY value",
        key,
    ).fetchall()


def entropy_baseline(conn: sqlite3.Connection, model_id: int) -> list[sqlite3.Row]:
    """The mean curve of the model's random baseline neurons (paper Fig. 7), one row per fixed value."""
    return conn.execute(
        "SELECT value, 1 AS is_baseline, avg(ln_scale) AS ln_scale, avg(entropy) AS entropy, avg(loss) AS loss, "
        "avg(reciprocal_rank) AS reciprocal_rank, min(n_tokens) AS n_tokens FROM entropy_interventions "
        "WHERE model_id = ? AND is_baseline = 1 GROUP BY value ORDER BY value",
        (model_id,),
    ).fetchall()


def attention_scores(conn: sqlite3.Connection, key: Key, limit: int) -> list[sqlite3.Row]:
    return conn.execute(
        f"SELECT rank, attention_layer, head, score FROM attention_scores {_WHERE} ORDER BY rank LIMIT ?",
        (*key, limit),
    ).fetchall()


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
    for row in rows:
        points = np.frombuffer(row[7], dtype="<f4")
        points = points[: points.size - points.size % 3].reshape(-1, 3)
        out.append(PathAblation(*row[:7], points))
    return out
