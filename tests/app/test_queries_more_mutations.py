"""The dashboard's other queries (app/queries/*.py) on a hand-written atlas, with answers worked out by hand.

Written for mutation round 7 (docs/testing.md, "Seventh round"): `tests/app/test_queries_mutations.py` checked the
search's ranking, the explorer's filters and pages and the threshold counts; this file checks every other query:
one neuron's rows (scores, partners, matches, analyses and their decoded BLOBs), the neighbours, the random
neuron, the scatter and the CSV export, the models' and runs' rows, the vocabulary, twins and best matches.

The atlas is the other file's (`build`) plus the rows of `more` below, which give model B (id 3) every analysis
table with values that differ column by column, and model A3 (id 4, run 3) a full universality row per neuron.
Every expected value follows from the rows inserted here (or in `build`), never from a query's output.
"""

from __future__ import annotations

import json
import sqlite3
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.queries import analyses as qa
from app.queries import firing as qf
from app.queries import models as qm
from app.queries import neurons as qn
from app.queries import runs as qr
from app.queries import search as qs
from app.queries import vocab as qv
from app.queries.neurons import NeuronFilter, Range
from precompute.store import encode_array, encode_counts, encode_u8, example_columns, token_kind_code
from tests.app.test_queries_mutations import A3, D_MLP, NEWER, RUN, RUNNING, A, B, C, build, insert

#: A run that failed, with empty or broken JSON everywhere, and its model "A" (newer than run 3's).
FAILED, F = 5, 5

#: Model A3's neurons: (layer, neuron) -> (dead, max, mean, min corr, max, mean, min baseline, excess, universal).
A3_NEURONS: dict[tuple[int, int], tuple[Any, ...]] = {
    (0, 0): (1, None, None, None, None, None, None, None, None),
    (0, 1): (0, 0.91, 0.71, 0.51, 0.31, 0.21, 0.11, 0.5, 1),
    (0, 2): (0, 0.42, 0.32, 0.22, 0.12, 0.12, 0.02, 0.2, 0),
    (0, 3): (0, 0.99, 0.9, 0.8, 0.2, 0.1, 0.0, 0.8, 1),
    (1, 0): (0, 0.8, 0.7, 0.6, 0.2, 0.1, 0.05, 0.6, 1),
    (1, 1): (0, 0.6, 0.5, 0.4, 0.2, 0.1, 0.0, 0.4, 0),
    (1, 2): (0, 0.95, 0.85, 0.75, 0.25, 0.15, 0.05, 0.7, 1),
    (1, 3): (0, None, 0.3, None, None, None, None, None, None),  # alive but not correlated: no flag
}
A3_FAMILIES = {(0, 1): "token", (1, 2): "token", (0, 2): "position"}
#: A3's roles: (layer, neuron) -> (vocab_role, entropy_rank, attention_role, attention_score)
A3_ROLES: dict[tuple[int, int], tuple[Any, ...]] = {
    (0, 1): ("prediction", None, None, None),
    (0, 2): ("suppression", None, "activation", 0.4),
    (1, 2): (None, 2, None, 0.9),
}
#: A3's weight_stats rows (their w_in_norm; the other columns 0); the other neurons have no row.
A3_W_IN = {(0, 1): 1.0, (0, 2): 2.0, (0, 3): 3.0, (1, 2): 4.0}

ACTIVATION_NAMES = (
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
#: B(0, 2)'s activation statistics: 0.25, 1.25, 2.25, ... in the column order above.
B_ACTIVATION: dict[str, float | None] = {name: i + 0.25 for i, name in enumerate(ACTIVATION_NAMES)}
B_WEIGHTS = {
    "w_in_norm": 1.0,
    "w_out_norm": 2.0,
    "input_bias": -3.0,
    "in_out_sim": 0.5,
    "l2_penalty": 5.0,
    "null_space_fraction": 0.0625,
    "vocab_mean": -0.125,
    "vocab_var": 0.75,
    "vocab_skew": -1.5,
    "vocab_kurt": 4.5,
}
#: B's examples rows: dataset row -> (itemsize, token ids); model A has rows 0..3 with other tokens.
B_ROWS = {0: (4, [100000, 5, 6, 7]), 2: (2, [10, 11, 12, 13, 14])}


def example(rank: int, bin_: int, row: int, start: int, values: list[float], **bounds: float) -> dict[str, Any]:
    snippet = encode_u8(np.array(values)) if values else struct.pack("<ff", 0.0, 0.0)  # an empty snippet
    return {
        "model_id": B,
        "layer": 0,
        "neuron": 2,
        "kind": "quantile",
        "rank": rank,
        "bin": bin_,
        "dataset_row": row,
        "start": start,
        "peak": start + rank,
        "activation": 0.5 + rank + 10 * bin_,
        "activations": snippet,
        **bounds,
    }


#: B(0, 2)'s "quantile" examples (values a u8 step of 1 or 0.5 decodes exactly). Bin 0 has a range, bin 1 none.
B_EXAMPLES = [
    example(0, 0, 2, 1, [0.0, 127.0, 254.0], bin_low=0.0, bin_high=0.5, bin_fraction=0.25),
    example(1, 0, 0, 0, [254.0, 0.0], bin_low=0.0, bin_high=0.5, bin_fraction=0.25),
    example(2, 0, 2, 3, [127.0, 254.0], bin_low=0.0, bin_high=0.5, bin_fraction=0.25),
    example(0, 1, 7, 0, [1.0, 2.0]),  # dataset row 7 is not stored: skipped
    example(1, 1, 0, 3, [0.0, 127.0, 254.0]),  # the row ends after one token: skipped
    example(2, 1, 2, 0, [3.0]),  # one token
    example(3, 1, 9, 0, [4.0]),  # one token, dataset row 9 not stored: skipped
    example(0, 2, 0, 1, [0.0, 254.0, 127.0], bin_low=0.5, bin_fraction=0.125),  # no upper bound
    example(0, 3, 2, 0, []),  # an empty snippet: skipped
]


def more(db: Path) -> None:
    """The rows this file adds to `build`'s atlas."""
    conn = sqlite3.connect(db)
    conn.execute("UPDATE runs SET timings = ? WHERE id = ?", ('{"correlations": 1.5}', RUNNING))
    insert(
        conn,
        "runs",
        id=FAILED,
        created_at="2026-01-05",
        status="failed",
        config_hash="5",
        config="",
        environment="",
        dataset="not json",
        stages="",
        error="boom",
    )
    insert(
        conn,
        "models",
        id=F,
        run_id=FAILED,
        name="A",
        source="seed-5",
        position=0,
        is_reference=True,
        n_layers=3,
        d_model=6,
        d_mlp=5,
        d_vocab=30,
        n_ctx=12,
        n_heads=3,
        act_fn="relu",
        processing="",
        tokenizer_hash="published",
    )
    insert(conn, "roles", model_id=F, layer=0, neuron=0)  # a roles row without any role
    for (layer, neuron), values in A3_NEURONS.items():
        names = ("dead", "max_corr", "mean_corr", "min_corr", "max_baseline", "mean_baseline", "min_baseline")
        columns = dict(zip((*names, "excess_corr", "universal"), values, strict=True))
        insert(conn, "neurons", model_id=A3, layer=layer, neuron=neuron, **columns)
    for (layer, neuron), family in A3_FAMILIES.items():
        insert(conn, "families", model_id=A3, layer=layer, neuron=neuron, family=family)
    for (layer, neuron), (vocab_role, entropy_rank, attention_role, score) in A3_ROLES.items():
        insert(
            conn,
            "roles",
            model_id=A3,
            layer=layer,
            neuron=neuron,
            vocab_role=vocab_role,
            entropy_rank=entropy_rank,
            attention_role=attention_role,
            attention_score=score,
        )
    for (layer, neuron), w_in in A3_W_IN.items():
        zeros = dict.fromkeys(B_WEIGHTS, 0.0)
        insert(conn, "weight_stats", model_id=A3, layer=layer, neuron=neuron, **{**zeros, "w_in_norm": w_in})
    insert(conn, "activation_stats", model_id=A3, layer=0, neuron=1, n_tokens=7, pre_mean=0.5)

    # A3(1, 2)'s partners (inserted C first: family order puts B first) and matches in both directions
    for partner, values in ((C, (0.75, 1, 1, 0.35, 0, 2)), (B, (0.85, 0, 2, 0.45, 1, 3))):
        max_corr, max_layer, max_neuron, baseline_corr, baseline_layer, baseline_unit = values
        insert(
            conn,
            "partner_scores",
            model_id=A3,
            layer=1,
            neuron=2,
            partner_model_id=partner,
            max_corr=max_corr,
            max_layer=max_layer,
            max_neuron=max_neuron,
            baseline_corr=baseline_corr,
            baseline_layer=baseline_layer,
            baseline_unit=baseline_unit,
        )
    insert(
        conn,
        "partner_scores",
        model_id=A3,
        layer=0,
        neuron=1,
        partner_model_id=B,
        max_corr=0.4,
        max_layer=0,
        max_neuron=1,
        baseline_corr=0.2,
        baseline_layer=1,
        baseline_unit=0,
    )
    # (model, layer, neuron) -> [(partner, rank, partner layer, partner neuron, corr)]
    matches = {
        (A3, 1, 2): [(C, 1, 0, 0, 0.6), (C, 0, 1, 1, 0.75), (B, 0, 0, 2, 0.85)],
        (A3, 0, 1): [(B, 0, 0, 1, 0.4)],
        (B, 0, 0): [(A3, 1, 1, 2, 0.3)],
        (C, 1, 1): [(A3, 0, 1, 2, 0.2)],
        (B, 1, 0): [(A3, 0, 1, 2, 0.6)],
        (C, 0, 3): [(A3, 1, 1, 2, 0.5), (A3, 0, 1, 3, 0.99)],  # the second: another neuron of A3
    }
    for (model_id, layer, neuron), rows in matches.items():
        for partner, rank, p_layer, p_neuron, corr in rows:
            insert(
                conn,
                "matches",
                model_id=model_id,
                layer=layer,
                neuron=neuron,
                partner_model_id=partner,
                rank=rank,
                partner_layer=p_layer,
                partner_neuron=p_neuron,
                corr=corr,
            )

    # model B's aggregates (layer 1 first) and distributions
    insert(conn, "layer_summaries", model_id=B, layer=1, n_neurons=4, n_dead=1, n_universal=1, mean_excess=0.15)
    conn.execute("UPDATE layer_summaries SET max_excess = 0.6 WHERE model_id = ? AND layer = 1", (B,))
    insert(conn, "layer_summaries", model_id=B, layer=0, n_neurons=4, n_dead=0, n_universal=3, mean_excess=0.5)
    conn.execute("UPDATE layer_summaries SET max_excess = 0.7 WHERE model_id = ? AND layer = 0", (B,))
    insert(
        conn,
        "distributions",
        model_id=B,
        quantity="excess_corr",
        bin_edges="[-1.0, 0.0, 1.0]",
        counts="[1, 6]",
        quantiles='{"0.1": -0.5, "0.9": 0.75}',
    )
    insert(conn, "distributions", model_id=B, quantity="max_corr", bin_edges="[0.0, 0.5]", counts="[2]", quantiles="{}")

    # one neuron's analyses: B(0, 2)
    insert(conn, "activation_stats", model_id=B, layer=0, neuron=2, n_tokens=250, **B_ACTIVATION)
    insert(conn, "weight_stats", model_id=B, layer=0, neuron=2, **B_WEIGHTS)
    for hook, low, high, n_bins, counts in (
        ("pre", -2.0, 3.0, 2, [0, 1, 2, 3]),
        ("post", 0.0, 0.5, 1, [4, 5, 6]),
        ("mid", 0.0, 1.0, 2, [1, 1, 1, 1, 1]),  # one count too many: skipped
    ):
        insert(
            conn,
            "histograms",
            model_id=B,
            layer=0,
            neuron=2,
            hook=hook,
            low=low,
            high=high,
            n_bins=n_bins,
            counts=encode_counts(np.array(counts)),
        )
    insert(conn, "position_counts", model_id=B, count=np.array([3, 1, 4, 1], dtype="<i8").tobytes())
    for hook, mean, std in (
        ("pre", [0.0, 127.0, 254.0, 127.0], [1.0, 1.0, 1.0, 1.0]),
        ("post", [2.0] * 4, [0, 2, 1, 0]),
    ):
        insert(
            conn,
            "position_profiles",
            model_id=B,
            layer=0,
            neuron=2,
            hook=hook,
            mean=encode_u8(np.array(mean)),
            std=encode_u8(np.array(std, dtype=float)),
        )
    for position, statistic in ((0, "z_last"), (1, "a_first"), (2, "m_mid"), (3, "nan_one"), (5, "beyond")):
        insert(conn, "percentile_statistics", model_id=B, position=position, statistic=statistic)
    percentiles = [0.25, 0.5, 0.75, np.nan, 0.125]  # position 4 has no name, "beyond" (5) no value
    insert(conn, "percentiles", model_id=B, layer=0, neuron=2, percentiles=encode_array(percentiles, "<f4"))
    # B(1, 2)'s token tables: mean_activation with counts, unembed_top without, two codes of no kind
    tables: tuple[tuple[str, list[int], list[float], list[int] | None], ...] = (
        ("mean_activation", [4, 5, 6], [3.0, 2.0, 1.0], [10, 20, 30]),
        ("unembed_top", [9, 8], [0.5, 0.25], None),
    )
    for kind, ids, token_values, occurrences in tables:
        insert(
            conn,
            "token_tables",
            model_id=B,
            layer=1,
            neuron=2,
            kind=token_kind_code(kind),
            token_ids=encode_array(ids, "<u2"),
            token_values=encode_array(token_values, "<f8"),
            counts=None if occurrences is None else encode_array(occurrences, "<u4"),
        )
    # B(1, 1): a malformed max_activation row, one count short (cut to the shortest array, not an error)
    insert(
        conn,
        "token_tables",
        model_id=B,
        layer=1,
        neuron=1,
        kind=token_kind_code("max_activation"),
        token_ids=encode_array([1, 2, 3], "<u2"),
        token_values=encode_array([0.75, 0.5, 0.25], "<f8"),
        counts=encode_array([7, 8], "<u4"),
    )
    for code in (-1, 5):
        insert(
            conn,
            "token_tables",
            model_id=B,
            layer=1,
            neuron=2,
            kind=code,
            token_ids=encode_array([1], "<u2"),
            token_values=encode_array([1.0], "<f8"),
        )
    for dataset_row, (itemsize, ids) in B_ROWS.items():
        blob = encode_array(ids, f"<u{itemsize}")[1:]
        insert(conn, "example_rows", model_id=B, dataset_row=dataset_row, itemsize=itemsize, token_ids=blob)
    insert(conn, "examples", **example_columns(B_EXAMPLES))
    top = {**example(0, 0, 2, 2, [5.0, 6.0]), "kind": "top"}
    insert(conn, "examples", **example_columns([top]))
    # families, features and roles of B
    families = (
        ((0, 2), "token", "token: x", 0.3, 0.05, '[1, "two"]'),
        ((1, 0), "alpha", None, 0.9, None, "oops{"),
        ((1, 1), "token", None, None, None, None),
        ((0, 0), "token", None, 0.7, None, None),
    )
    for (layer, neuron), family, best_feature, best_vr, position_mi, evidence in families:
        insert(
            conn,
            "families",
            model_id=B,
            layer=layer,
            neuron=neuron,
            family=family,
            best_feature=best_feature,
            best_vr=best_vr,
            position_mi=position_mi,
            evidence=evidence,
        )
    for feature_id, feature, feature_set, fraction in ((0, "token: x", "tok", 0.1), (1, "bigram", "ngram", 0.2)):
        insert(conn, "feature_names", model_id=B, feature_id=feature_id, feature=feature, feature_set=feature_set)
        conn.execute(
            "UPDATE feature_names SET fraction = ? WHERE model_id = ? AND feature_id = ?", (fraction, B, feature_id)
        )
    insert(conn, "feature_names", model_id=B, feature_id=2, feature="suffix", feature_set="morph", fraction=0.3)
    for rank, feature_id, vr in ((2, 0, 0.1), (0, 2, 0.5), (1, 1, 0.3)):
        insert(
            conn,
            "feature_scores",
            model_id=B,
            layer=0,
            neuron=2,
            rank=rank,
            feature_id=feature_id,
            variance_reduction=vr,
        )
    insert(
        conn,
        "roles",
        model_id=B,
        layer=0,
        neuron=2,
        vocab_role="prediction",
        entropy_rank=4,
        attention_role="deactivation",
        attention_layer=1,
        attention_head=0,
        attention_score=0.35,
    )
    # entropy interventions: B(0, 2) fixed at three values (not a baseline), B(1, 0) and B(1, 1) baselines
    interventions = (
        ((0, 2), 2.0, 0, (9.0, 9.0, 9.0, 0.875, 1)),
        ((0, 2), -1.0, 0, (1.5, 2.5, 3.5, 0.125, 40)),
        ((0, 2), 0.5, 0, (9.0, 9.0, 9.0, 0.875, 1)),
        ((1, 0), 0.5, 1, (1.0, 2.0, 3.0, 0.5, 20)),
        ((1, 0), 2.0, 1, (2.0, 4.0, 6.0, 0.25, 30)),
        ((1, 1), 0.5, 1, (3.0, 4.0, 5.0, 0.25, 25)),
        ((1, 1), 2.0, 1, (4.0, 8.0, 2.0, 0.75, 12)),
    )
    for (layer, neuron), value, baseline, (ln_scale, entropy, loss, reciprocal_rank, n_tokens) in interventions:
        insert(
            conn,
            "entropy_interventions",
            model_id=B,
            layer=layer,
            neuron=neuron,
            value=value,
            is_baseline=baseline,
            ln_scale=ln_scale,
            entropy=entropy,
            loss=loss,
            reciprocal_rank=reciprocal_rank,
            n_tokens=n_tokens,
        )
    for rank, attention_layer, head, score in ((2, 1, 1, 0.125), (0, 0, 1, 0.875), (1, 1, 0, 0.25)):
        insert(
            conn,
            "attention_scores",
            model_id=B,
            layer=0,
            neuron=2,
            rank=rank,
            attention_layer=attention_layer,
            head=head,
            score=score,
        )
    ablations = (
        (1, 0, (0.1, 0.2, 0.3, 0.4), 1, [1.0, 2.0, 3.0, 99.0]),  # one whole point and a stray float
        (0, 1, (-0.1, -0.2, -0.3, -0.4), 2, [0.5, 1.5, 2.5, 3.5, 4.5, 5.5]),
    )
    for attention_layer, head, (pearson_bos, spearman_bos, pearson_norm, spearman_norm), n_points, points in ablations:
        insert(
            conn,
            "path_ablations",
            model_id=B,
            layer=0,
            neuron=2,
            attention_layer=attention_layer,
            head=head,
            pearson_bos=pearson_bos,
            spearman_bos=spearman_bos,
            pearson_norm=pearson_norm,
            spearman_norm=spearman_norm,
            n_points=n_points,
            points=np.array(points, dtype="<f4").tobytes(),
        )
    for token_id, text in ((2, "two"), (0, "zero")):
        insert(conn, "vocab", run_id=NEWER, token_id=token_id, text=text)
    conn.commit()
    conn.close()


@pytest.fixture(scope="module")
def atlas(tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("more-queries") / "atlas.db"
    build(db)
    more(db)
    return db


@pytest.fixture
def conn(atlas: Path) -> Iterator[sqlite3.Connection]:
    connection = sqlite3.connect(f"file:{atlas}?mode=ro", uri=True)
    connection.row_factory = sqlite3.Row
    yield connection
    connection.close()


# --- one neuron: universality row, partners, matches -----------------------------------------------------------


def test_get_neuron_returns_every_column_of_the_row(conn: sqlite3.Connection) -> None:
    for (layer, neuron), (dead, *scores, flag) in A3_NEURONS.items():
        row = qn.get_neuron(conn, A3, layer, neuron)
        max_corr, mean_corr, min_corr, max_baseline, mean_baseline, min_baseline, excess = scores
        expected = (max_corr, mean_corr, min_corr, max_baseline, mean_baseline, min_baseline, excess)
        assert row == qn.NeuronScores(bool(dead), *expected, None if flag is None else bool(flag))
        assert row is not None and row.dead is bool(dead) and row.universal is (None if flag is None else bool(flag))
    # another threshold: excess_corr > threshold (0.5 is not above 0.5), NULL where there is no excess
    at = {key: qn.get_neuron(conn, A3, *key, threshold=0.5) for key in A3_NEURONS}
    assert {key: row.universal for key, row in at.items() if row} == {
        (0, 0): None,
        (0, 1): False,
        (0, 2): False,
        (0, 3): True,
        (1, 0): True,
        (1, 1): False,
        (1, 2): True,
        (1, 3): None,
    }
    row = qn.get_neuron(conn, A3, 0, 1, threshold=0.45)
    assert row is not None and row.universal is True and row.max_corr == 0.91
    assert qn.get_neuron(conn, A3, 2, 0) is None and qn.get_neuron(conn, 99, 0, 1) is None


def test_nullable_flag() -> None:
    assert qn.nullable_flag(None) is None
    assert qn.nullable_flag(0) is False
    assert qn.nullable_flag(1) is True


def test_partner_scores_in_family_order_with_every_column(conn: sqlite3.Connection) -> None:
    assert qn.partner_scores(conn, A3, 1, 2) == [
        qn.PartnerRow("B", 0.85, 0, 2, 0.45, 1, 3),
        qn.PartnerRow("C", 0.75, 1, 1, 0.35, 0, 2),
    ]
    assert qn.partner_scores(conn, A3, 0, 1) == [qn.PartnerRow("B", 0.4, 0, 1, 0.2, 1, 0)]
    assert qn.partner_scores(conn, A3, 1, 0) == []


def test_matches_per_partner_best_first(conn: sqlite3.Connection) -> None:
    assert qn.matches(conn, A3, 1, 2) == [
        qn.MatchRow("B", 0, 2, 0, 0.85),
        qn.MatchRow("C", 1, 1, 0, 0.75),
        qn.MatchRow("C", 0, 0, 1, 0.6),
    ]
    assert qn.matches(conn, A3, 1, 3) == []


def test_matched_by_orders_by_rank_then_correlation_and_stops_at_the_limit(conn: sqlite3.Connection) -> None:
    everything = [
        qn.MatchRow("B", 1, 0, 0, 0.6),
        qn.MatchRow("C", 1, 1, 0, 0.2),
        qn.MatchRow("C", 0, 3, 1, 0.5),
        qn.MatchRow("B", 0, 0, 1, 0.3),
    ]
    assert qn.matched_by(conn, A3, 1, 2, 10) == everything
    assert qn.matched_by(conn, A3, 1, 2, 3) == everything[:3]
    assert qn.matched_by(conn, A3, 1, 3, 5) == [qn.MatchRow("C", 0, 3, 0, 0.99)]
    assert qn.matched_by(conn, A3, 0, 0, 5) == []


@pytest.mark.parametrize(
    ("start", "direction", "threshold", "expected"),
    [
        ((0, 1), "next", None, (0, 3)),
        ((0, 3), "next", None, (1, 0)),
        ((1, 0), "next", None, (1, 2)),
        ((1, 2), "next", None, None),
        ((0, 0), "next", None, (0, 1)),
        ((1, 2), "prev", None, (1, 0)),
        ((1, 0), "prev", None, (0, 3)),
        ((0, 2), "prev", None, (0, 1)),
        ((0, 1), "prev", None, None),
        ((1, 3), "prev", None, (1, 2)),
        ((0, 0), "next", 0.65, (0, 3)),
        ((0, 3), "next", 0.65, (1, 2)),
        ((1, 3), "prev", 0.65, (1, 2)),
        ((1, 2), "prev", 0.65, (0, 3)),
        ((1, 0), "next", 0.3, (1, 1)),
        ((1, 2), "prev", 0.3, (1, 1)),
        ((1, 2), "next", 0.3, None),
    ],
)
def test_universal_neighbours(
    conn: sqlite3.Connection, start: tuple[int, int], direction: Any, threshold: float | None, expected: Any
) -> None:
    assert qn.neighbour_universal(conn, A3, *start, direction, threshold) == expected


def test_random_neuron_takes_the_drawn_offset_in_layer_neuron_order(
    conn: sqlite3.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    drawn: list[int] = []
    pick = {"index": 0}

    def randrange(n: int) -> int:
        drawn.append(n)
        return pick["index"]

    monkeypatch.setattr(qn.random, "randrange", randrange)
    universal = [(0, 1), (0, 3), (1, 0), (1, 2)]  # A3's flags, in (layer, neuron) order
    for index, key in enumerate(universal):
        pick["index"] = index
        assert qn.random_neuron(conn, A3, NeuronFilter(universal=True)) == key
    assert drawn == [4, 4, 4, 4]
    drawn.clear()
    pick["index"] = 1
    assert qn.random_neuron(conn, A3, NeuronFilter(family="token")) == (1, 2)  # a joined filter
    pick["index"] = 0
    assert qn.random_neuron(conn, A3, NeuronFilter(role="suppression")) == (0, 2)  # exactly one match
    assert qn.random_neuron(conn, A3, NeuronFilter(layer=0, dead=True)) == (0, 0)
    assert drawn == [2, 1, 1]
    assert qn.random_neuron(conn, A3, NeuronFilter(layer=5)) is None
    assert qn.random_neuron(conn, A3, NeuronFilter(ranges=(Range("w_in_norm", 9.0, None),))) is None
    assert drawn == [2, 1, 1]  # nothing drawn when nothing matches


# --- lists, export, scatter -------------------------------------------------------------------------------


def a3_row(key: tuple[int, int], labels: bool, threshold: float | None = None) -> qn.NeuronListRow:
    dead, max_corr, mean_corr, min_corr, _, mean_baseline, _, excess, flag = A3_NEURONS[key]
    if threshold is not None:
        flag = None if excess is None else int(excess > threshold)
    vocab, _, attention, score = A3_ROLES.get(key, (None, None, None, None))
    return qn.NeuronListRow(
        key[0],
        key[1],
        bool(dead),
        excess,
        mean_corr,
        max_corr,
        min_corr,
        mean_baseline,
        None if flag is None else bool(flag),
        A3_FAMILIES.get(key) if labels else None,
        vocab if labels else None,
        attention if labels else None,
        values={"w_in_norm": A3_W_IN.get(key), "attention_score": score},
    )


def test_list_rows_carry_the_summary_the_labels_and_the_extra_statistics(conn: sqlite3.Connection) -> None:
    extra = ("w_in_norm", "attention_score")
    by_excess = [(0, 3), (1, 2), (1, 0), (0, 1), (1, 1), (0, 2), (0, 0), (1, 3)]
    rows = qn.list_neurons(conn, A3, NeuronFilter(), "excess_corr", "desc", 3, 1, extra, ("f", "r"))
    assert rows == [a3_row(key, True) for key in by_excess[1:4]]
    every = qn.list_neurons(conn, A3, NeuronFilter(), "layer", "asc", 10, 0, extra)
    assert every == [a3_row(key, False) for key in sorted(A3_NEURONS)]
    assert [(r.dead, r.universal) for r in every[:2]] == [(True, None), (False, True)]
    assert all(type(r.dead) is bool for r in every)
    at = qn.list_neurons(conn, A3, NeuronFilter(threshold=0.65), "layer", "asc", 10, 0, extra, ("f", "r"))
    assert at == [a3_row(key, True, 0.65) for key in sorted(A3_NEURONS)]


def test_counts_with_joined_filters(conn: sqlite3.Connection) -> None:
    assert qn.count_neurons(conn, A3, NeuronFilter(ranges=(Range("pre_mean", 0.0, None),))) == 1
    assert qn.count_neurons(conn, A3, NeuronFilter(ranges=(Range("w_in_norm", 2.0, 3.0),))) == 2
    assert qn.count_neurons(conn, A3, NeuronFilter(family="token", role="prediction")) == 1
    assert qn.count_neurons(conn, A3, NeuronFilter(ranges=(Range("attention_score", 0.5, None),))) == 1


EXPORT_ASC = [
    (0, 1, 0, 1, "token", "prediction", 0.5, 1.0),
    (0, 2, 0, 0, "position", "suppression", 0.2, 2.0),
    (0, 3, 0, 1, None, None, 0.8, 3.0),
    (1, 2, 0, 1, "token", None, 0.7, 4.0),
    (0, 0, 1, None, None, None, None, None),  # NULL w_in_norm last, by (layer, neuron)
    (1, 0, 0, 1, None, None, 0.6, None),
    (1, 1, 0, 0, None, None, 0.4, None),
    (1, 3, 0, None, None, None, None, None),
]


def test_export_rows_every_column_nulls_last_in_either_order(conn: sqlite3.Connection) -> None:
    columns = ("neuron", "excess_corr", "w_in_norm")  # "neuron" is a leading column already
    asc = qn.export_rows(conn, A3, NeuronFilter(), "w_in_norm", "asc", columns, 10)
    assert asc.rows == EXPORT_ASC and not asc.truncated
    desc = qn.export_rows(conn, A3, NeuronFilter(), "w_in_norm", "desc", columns, 10)
    assert desc.rows == EXPORT_ASC[3::-1] + EXPORT_ASC[4:]
    capped = qn.export_rows(conn, A3, NeuronFilter(), "w_in_norm", "desc", columns, 3)
    assert capped.rows == EXPORT_ASC[3:0:-1] and capped.truncated
    exact = qn.export_rows(conn, A3, NeuronFilter(), "w_in_norm", "asc", columns, 8)
    assert exact.rows == EXPORT_ASC and not exact.truncated
    # another threshold for the universal column; a filter on a joined table; a sort key from another table
    at = qn.export_rows(conn, A3, NeuronFilter(threshold=0.65), "w_in_norm", "asc", columns, 10)
    assert [r[3] for r in at.rows] == [0, 0, 1, 1, None, 0, 0, None]
    token = qn.export_rows(conn, A3, NeuronFilter(family="token"), "attention_score", "desc", ("excess_corr",), 10)
    assert token.rows == [(1, 2, 0, 1, "token", None, 0.7), (0, 1, 0, 1, "token", "prediction", 0.5)]
    joined = NeuronFilter(family="token", ranges=(Range("w_in_norm", 2.0, None),))  # two conditions, a third join
    assert qn.export_rows(conn, A3, joined, "excess_corr", "asc", ("excess_corr",), 10).rows == [
        (1, 2, 0, 1, "token", None, 0.7)
    ]
    universal = qn.export_rows(conn, A3, NeuronFilter(universal=False), "excess_corr", "asc", ("pre_mean",), 10)
    assert universal.rows == [(0, 2, 0, 0, "position", "suppression", None), (1, 1, 0, 0, None, None, None)]


def test_export_statistics_leave_out_the_leading_columns() -> None:
    leading = ("layer", "neuron", "dead", "universal", "family", "vocab_role")
    assert qn.export_statistics((*leading, "pre_mean", "w_in_norm")) == ("pre_mean", "w_in_norm")
    assert qn.export_statistics(("excess_corr",)) == ("excess_corr",)


def test_scatter_points_with_their_colours(conn: sqlite3.Connection) -> None:
    both = [(0, 1), (0, 2), (0, 3), (1, 2)]  # excess and w_in_norm both present

    def points(where: NeuronFilter, color: str, cap: int = 10) -> qn.ScatterRows:
        return qn.scatter_rows(conn, A3, where, "excess_corr", "w_in_norm", color, cap)

    def expected(keys: list[tuple[int, int]], color: Any) -> list[qn.ScatterPoint]:
        return [qn.ScatterPoint(*k, A3_NEURONS[k][7], A3_W_IN[k], color(k)) for k in keys]

    full = points(NeuronFilter(), "family")
    assert (full.total, full.sampled) == (4, False)
    assert sorted(full.rows) == expected(both, A3_FAMILIES.get)
    assert sorted(points(NeuronFilter(), "vocab_role").rows) == expected(
        both, lambda k: A3_ROLES[k][0] if k in A3_ROLES else None
    )
    assert sorted(points(NeuronFilter(), "layer").rows) == expected(both, lambda k: k[0])
    assert sorted(points(NeuronFilter(), "universal").rows) == expected(both, lambda k: A3_NEURONS[k][8])
    at = points(NeuronFilter(threshold=0.65), "universal")
    assert sorted(at.rows) == expected(both, lambda k: int(A3_NEURONS[k][7] > 0.65))
    layer0 = points(NeuronFilter(layer=0), "layer")
    assert (layer0.total, sorted(layer0.rows)) == (3, expected(both[:3], lambda k: k[0]))
    exact = points(NeuronFilter(), "layer", cap=4)
    assert (exact.total, exact.sampled, sorted(exact.rows)) == (4, False, expected(both, lambda k: k[0]))

    def hashed(key: tuple[int, int]) -> int:
        return ((key[0] * 1000003 + key[1]) * 2654435761) % 4294967291

    sample = points(NeuronFilter(), "layer", cap=3)
    assert (sample.total, sample.sampled) == (4, True)
    assert sample.rows == expected(sorted(both, key=hashed)[:3], lambda k: k[0])
    token = qn.scatter_rows(conn, A3, NeuronFilter(family="token"), "excess_corr", "w_in_norm", "layer", 10)
    assert sorted(token.rows) == expected([(0, 1), (1, 2)], lambda k: k[0])  # a filter's join besides the axes'
    swapped = qn.scatter_rows(conn, A3, NeuronFilter(), "w_in_norm", "max_corr", "layer", 10)
    assert sorted(swapped.rows) == [qn.ScatterPoint(*k, A3_W_IN[k], A3_NEURONS[k][1], k[0]) for k in both]


# --- search: best matches, indexes, features, token evidence --------------------------------------------------


def test_best_matches_with_the_partners_labels(conn: sqlite3.Connection) -> None:
    keys = [(A3, 1, 2), (A3, 0, 1), (A3, 0, 0)]
    b02 = qs.Labels(True, 0.6, "token", ("prediction", "deactivation", "entropy"))
    b01 = qs.Labels(False, 0.1, None, ("suppression", "entropy"))
    c11 = qs.Labels(None, None, None, ())
    found = qs.best_matches(conn, keys, [B, C], None)
    assert {key: sorted(rows, key=lambda m: m.partner_model_id) for key, rows in found.items()} == {
        (A3, 1, 2): [qs.BestMatch(C, 1, 1, 0.75, c11), qs.BestMatch(B, 0, 2, 0.85, b02)],
        (A3, 0, 1): [qs.BestMatch(B, 0, 1, 0.4, b01)],
    }
    at = qs.best_matches(conn, keys, [B], 0.05)  # B(0, 1)'s excess 0.1 is above 0.05
    assert at == {
        (A3, 1, 2): [qs.BestMatch(B, 0, 2, 0.85, b02)],
        (A3, 0, 1): [qs.BestMatch(B, 0, 1, 0.4, qs.Labels(True, 0.1, None, ("suppression", "entropy")))],
    }
    assert qs.best_matches(conn, keys, [C], 0.9) == {(A3, 1, 2): [qs.BestMatch(C, 1, 1, 0.75, c11)]}
    assert qs.best_matches(conn, [], [B], None) == {} and qs.best_matches(conn, keys, [], None) == {}
    statement = qs.best_matches_statement([(A3, 1, 2)], [B, C], 0.3)
    assert statement.params == (0.3, json.dumps([[A3, 1, 2]]), B, C)


def test_present_indexes_names_only_the_search_indexes_the_file_has(conn: sqlite3.Connection) -> None:
    assert qs.present_indexes(conn) == frozenset(qs.INDEXES.values())
    assert set(qs.INDEXES.values()) == {
        "ix_feature_scores_feature",
        "ix_families_family",
        "ix_roles_vocab_role",
        "ix_roles_attention_role",
        "ix_roles_entropy_rank",
    }
    other = sqlite3.connect(":memory:")
    other.execute("CREATE TABLE t (a, b)")
    other.execute("CREATE INDEX ix_families_family ON t (a)")
    other.execute("CREATE INDEX ix_something_else ON t (b)")
    other.execute("CREATE TABLE ix_roles_vocab_role (x)")  # a table, not an index
    assert qs.present_indexes(other) == frozenset({"ix_families_family"})
    other.close()


def test_table_names_its_index_only_when_present() -> None:
    assert qs._table("roles", "entropy", frozenset({"ix_roles_entropy_rank"}), "r") == (
        "roles r INDEXED BY ix_roles_entropy_rank"
    )
    assert qs._table("roles", "vocab_role", frozenset({"ix_roles_entropy_rank"}), "r") == "roles r"
    assert qs._table("families", "families", frozenset({"ix_families_family"})) == (
        "families INDEXED BY ix_families_family"
    )
    assert qs._marks([1, 2, 3]) == "?,?,?" and qs._marks([]) == ""


def test_feature_exists_in_the_models_named(conn: sqlite3.Connection) -> None:
    assert qs.feature_exists(conn, [A], "is_digit")
    assert qs.feature_exists(conn, [B, C], "suffix")
    assert not qs.feature_exists(conn, [A], "suffix")
    assert not qs.feature_exists(conn, [A, B], "nothing")


def test_token_table_evidence_lists_the_postings_as_rows(conn: sqlite3.Connection) -> None:
    statement = qs.token_table_evidence(conn, [A, B], [7])
    rows = [tuple(row) for row in conn.execute(statement.sql, statement.params)]
    # every entry of token 7 in A's and B's tables (`build`'s TOKEN_TABLES), strength 1 / (1 + rank)
    assert sorted(rows) == sorted(
        [
            (A, 0, 1, "mean_activation", 1.0, 0, None, 7, None),
            (A, 1, 0, "unembed_top", 0.25, 3, None, 7, None),
            (A, 1, 2, "max_activation", 0.5, 1, None, 7, None),
            (B, 0, 0, "mean_activation", 1.0, 0, None, 7, None),
            (B, 0, 1, "embed_top", 1.0, 0, None, 7, None),
        ]
    )
    assert len(statement.params) == 1
    empty = qs.token_table_evidence(conn, [A], [19])
    assert list(conn.execute(empty.sql, empty.params)) == []


# --- one neuron's analyses ---------------------------------------------------------------------------------

KEY = (B, 0, 2)


def test_activation_and_weight_statistics_by_name(conn: sqlite3.Connection) -> None:
    stats = qa.activation_stats(conn, KEY)
    assert stats == qa.ActivationStats(250, B_ACTIVATION)
    assert stats is not None and list(stats.values) == list(ACTIVATION_NAMES) and stats.post_max == 12.25
    assert qa.activation_stats(conn, (B, 0, 3)) is None
    weights = qa.weight_stats(conn, KEY)
    assert weights == B_WEIGHTS and weights is not None and list(weights) == list(B_WEIGHTS)
    assert qa.weight_stats(conn, (B, 1, 3)) is None


def test_histograms_sorted_by_hook_with_their_range_and_counts(conn: sqlite3.Connection) -> None:
    found = qa.histograms(conn, KEY)
    assert [(h.hook, h.low, h.high, h.counts.tolist()) for h in found] == [
        ("post", 0.0, 0.5, [4, 5, 6]),
        ("pre", -2.0, 3.0, [0, 1, 2, 3]),
    ]
    assert all(h.counts.dtype == np.int64 for h in found)
    assert qa.histograms(conn, (B, 1, 2)) == []


def test_position_profiles_decode_with_the_models_counts(conn: sqlite3.Connection) -> None:
    found = qa.position_profiles(conn, KEY)
    assert [p.hook for p in found] == ["post", "pre"]
    assert found[0].mean.tolist() == [2.0] * 4 and found[0].std.tolist() == [0.0, 2.0, 1.0, 0.0]
    assert found[1].mean.tolist() == [0.0, 127.0, 254.0, 127.0] and found[1].std.tolist() == [1.0] * 4
    assert all(p.count.tolist() == [3, 1, 4, 1] and p.count.dtype == np.int64 for p in found)
    assert found[1].mean.dtype == np.float32
    assert qa.position_profiles(conn, (B, 0, 3)) == []


def test_percentiles_named_by_position_finite_only_sorted(conn: sqlite3.Connection) -> None:
    found = qa.percentiles(conn, KEY)
    assert list(found.items()) == [("a_first", 0.5), ("m_mid", 0.75), ("z_last", 0.25)]
    assert all(type(v) is float for v in found.values())
    assert qa.percentiles(conn, (B, 0, 0)) == {}
    assert list(qa.percentiles(conn, (A, 0, 0)).items()) == [("excess_corr", 0.75), ("w_in_norm", 0.25)]


def test_token_tables_by_kind_with_counts_and_cut_at_the_limit(conn: sqlite3.Connection) -> None:
    found = qa.token_tables(conn, (B, 1, 2), 2)
    assert list(found) == ["mean_activation", "unembed_top"]  # the codes -1 and 5 are no kind
    assert found["mean_activation"] == [qa.TokenRow(4, 3.0, 10), qa.TokenRow(5, 2.0, 20)]
    assert found["unembed_top"] == [qa.TokenRow(9, 0.5, None), qa.TokenRow(8, 0.25, None)]
    everything = qa.token_tables(conn, (B, 1, 2), 10)
    assert everything["mean_activation"] == [qa.TokenRow(4, 3.0, 10), qa.TokenRow(5, 2.0, 20), qa.TokenRow(6, 1.0, 30)]
    assert all(type(r.token_id) is int and type(r.value) is float for r in everything["mean_activation"])
    assert qa.token_tables(conn, (B, 1, 2), 0) == {"mean_activation": [], "unembed_top": []}
    assert qa.token_tables(conn, (B, 1, 1), 5) == {"max_activation": [qa.TokenRow(1, 0.75, 7), qa.TokenRow(2, 0.5, 8)]}
    assert qa.token_tables(conn, (B, 1, 3), 5) == {}


def test_examples_by_bin_and_rank_each_cut_from_its_dataset_row(conn: sqlite3.Connection) -> None:
    def scalars(r: qa.ExampleRow) -> tuple[Any, ...]:
        return (
            r.kind,
            r.rank,
            r.bin,
            r.bin_low,
            r.bin_high,
            r.bin_fraction,
            r.dataset_row,
            r.start,
            r.peak,
            r.activation,
        )

    def got(limit: int) -> list[tuple[Any, ...]]:
        rows = qa.examples(conn, KEY, "quantile", limit)
        assert all(r.token_ids.dtype == np.int64 and r.activations.dtype == np.float32 for r in rows)
        return [(*scalars(r), r.token_ids.tolist(), r.activations.tolist()) for r in rows]

    b0 = ("quantile", 0, 0.0, 0.5, 0.25)
    everything = [
        (*b0[:2], 0, *b0[2:], 2, 1, 1, 0.5, [11, 12, 13], [0.0, 127.0, 254.0]),
        ("quantile", 1, 0, *b0[2:], 0, 0, 1, 1.5, [100000, 5], [254.0, 0.0]),
        ("quantile", 2, 0, *b0[2:], 2, 3, 5, 2.5, [13, 14], [127.0, 254.0]),
        # bin 1: rank 0 (no dataset row) and rank 1 (past the row's end) skipped
        ("quantile", 2, 1, None, None, None, 2, 0, 2, 12.5, [10], [3.0]),
        ("quantile", 0, 2, 0.5, None, 0.125, 0, 1, 1, 20.5, [5, 6, 7], [0.0, 254.0, 127.0]),
        # bin 3: an empty snippet skipped
    ]
    assert got(3) == everything
    assert got(4) == everything  # bin 1's rank 3 has no dataset row
    assert got(2) == [everything[0], everything[1], everything[4]]
    assert got(1) == [everything[0], everything[4]]
    assert got(0) == []
    top = qa.examples(conn, KEY, "top", 5)
    assert [(e.kind, e.rank, e.token_ids.tolist(), e.activations.tolist()) for e in top] == [
        ("top", 0, [12, 13], [5.0, 6.0])
    ]
    assert qa.examples(conn, KEY, "random", 5) == [] and qa.examples(conn, (B, 1, 1), "top", 5) == []
    assert qa.example_kinds(conn, KEY) == {"quantile": len(B_EXAMPLES), "top": 1}
    assert qa.example_kinds(conn, (B, 1, 1)) == {}


def test_family_feature_scores_and_roles_of_one_neuron(conn: sqlite3.Connection) -> None:
    assert qa.family(conn, KEY) == qa.FamilyRow("token", "token: x", 0.3, 0.05, [1, "two"])
    assert qa.family(conn, (B, 1, 0)) == qa.FamilyRow("alpha", None, 0.9, None, "oops{")
    assert qa.family(conn, (B, 1, 1)) == qa.FamilyRow("token", None, None, None, None)
    assert qa.family(conn, (B, 0, 1)) is None
    assert qa.parse_json('[1, {"a": null}]') == [1, {"a": None}]
    assert qa.parse_json("{") == "{" and qa.parse_json(None) is None and qa.parse_json("2.5") == 2.5
    everything = [
        qa.FeatureRow(0, "suffix", "morph", 0.5, 0.3),
        qa.FeatureRow(1, "bigram", "ngram", 0.3, 0.2),
        qa.FeatureRow(2, "token: x", "tok", 0.1, 0.1),
    ]
    assert qa.feature_scores(conn, KEY, 5) == everything
    assert qa.feature_scores(conn, KEY, 2) == everything[:2]
    assert qa.feature_scores(conn, (B, 0, 1), 5) == []
    assert qa.roles(conn, KEY) == qa.RolesRow("prediction", 4, "deactivation", 1, 0, 0.35)
    assert qa.roles(conn, (B, 0, 1)) == qa.RolesRow("suppression", 3, None, None, None, None)
    assert qa.roles(conn, (B, 1, 2)) is None


def test_entropy_interventions_and_the_baseline_mean(conn: sqlite3.Connection) -> None:
    assert qa.entropy_interventions(conn, KEY) == [
        qa.EntropyRow(-1.0, False, 1.5, 2.5, 3.5, 0.125, 40),
        qa.EntropyRow(0.5, False, 9.0, 9.0, 9.0, 0.875, 1),
        qa.EntropyRow(2.0, False, 9.0, 9.0, 9.0, 0.875, 1),
    ]
    assert all(r.is_baseline is False for r in qa.entropy_interventions(conn, KEY))
    assert qa.entropy_interventions(conn, (B, 1, 1)) == [
        qa.EntropyRow(0.5, True, 3.0, 4.0, 5.0, 0.25, 25),
        qa.EntropyRow(2.0, True, 4.0, 8.0, 2.0, 0.75, 12),
    ]
    assert qa.entropy_interventions(conn, (B, 1, 2)) == []
    # the mean of B(1, 0) and B(1, 1) per value (B(0, 2)'s rows are no baseline), the fewest tokens
    assert qa.entropy_baseline(conn, B) == [
        qa.EntropyRow(0.5, True, 2.0, 3.0, 4.0, 0.375, 20),
        qa.EntropyRow(2.0, True, 3.0, 6.0, 4.0, 0.5, 12),
    ]
    assert qa.entropy_baseline(conn, C) == []


def test_attention_scores_and_path_ablations(conn: sqlite3.Connection) -> None:
    everything = [qa.AttentionRow(0, 0, 1, 0.875), qa.AttentionRow(1, 1, 0, 0.25), qa.AttentionRow(2, 1, 1, 0.125)]
    assert qa.attention_scores(conn, KEY, 5) == everything
    assert qa.attention_scores(conn, KEY, 2) == everything[:2]
    assert qa.attention_scores(conn, (B, 1, 2), 5) == []
    found = qa.path_ablations(conn, KEY)
    assert [
        (p.attention_layer, p.head, p.pearson_bos, p.spearman_bos, p.pearson_norm, p.spearman_norm, p.n_points)
        for p in found
    ] == [(0, 1, -0.1, -0.2, -0.3, -0.4, 2), (1, 0, 0.1, 0.2, 0.3, 0.4, 1)]
    assert found[0].points.tolist() == [[0.5, 1.5, 2.5], [3.5, 4.5, 5.5]]
    assert found[1].points.tolist() == [[1.0, 2.0, 3.0]]  # the stray float dropped
    assert found[1].points.dtype == np.float32
    assert qa.path_ablations(conn, (B, 1, 2)) == []


def test_family_and_role_labels_and_members(conn: sqlite3.Connection) -> None:
    assert qa.family_labels(conn, B) == ["alpha", "token"]
    assert qa.family_labels(conn, C) == []
    assert qa.role_labels(conn, B) == ["deactivation", "entropy", "prediction", "suppression"]
    assert qa.role_labels(conn, A3) == ["activation", "entropy", "prediction", "suppression"]
    assert qa.role_labels(conn, F) == []  # a roles row without any role
    assert qa.role_labels(conn, C) == []
    members = [
        qa.FamilyMember(0, 0, None, 0.7),
        qa.FamilyMember(0, 2, "token: x", 0.3),
        qa.FamilyMember(1, 1, None, None),  # no variance reduction: last
    ]
    assert qa.family_members(conn, B, "token", 5) == members
    assert qa.family_members(conn, B, "token", 2) == members[:2]
    assert qa.family_members(conn, B, "alpha", 5) == [qa.FamilyMember(1, 0, None, 0.9)]
    assert qa.family_members(conn, B, "position", 5) == []


# --- models, runs, vocabulary, twins ----------------------------------------------------------------------------


def test_models_rows_with_every_field(conn: sqlite3.Connection) -> None:
    assert qm.models_of_run(conn, FAILED) == [
        qm.Model(F, FAILED, "A", "seed-5", 0, True, 3, 6, 5, 30, 12, 3, "relu", "published", processing={})
    ]
    (model,) = qm.models_of_run(conn, FAILED)
    assert model.is_reference is True and model.published and model.n_neurons == 15
    shape = (2, 8, D_MLP, 20, 16, 2, "gelu_new", "t")
    assert qm.models_of_run(conn, NEWER) == [
        qm.Model(A3, NEWER, "A", "/srv/A", 0, True, *shape, processing={"fold_ln": True})
    ]
    family = qm.models_of_run(conn, RUN)
    assert [(m.id, m.position, m.is_reference) for m in family] == [(A, 0, True), (B, 1, False), (C, 2, False)]
    assert family[2] == qm.Model(C, RUN, "C", "/srv/C", 2, False, *shape, processing={"fold_ln": True})
    assert qm.models_of_run(conn, RUNNING) == []


def test_analysis_tables_present_per_model(conn: sqlite3.Connection) -> None:
    assert qm.analysis_tables(conn, F) == frozenset({"roles"})
    assert qm.analysis_tables(conn, C) == frozenset({"token_tables"})
    assert qm.analysis_tables(conn, A3) == frozenset({"activation_stats", "weight_stats", "families", "roles"})
    assert qm.analysis_tables(conn, B) == frozenset(qm.ANALYSIS_TABLES)
    assert qm.analysis_tables(conn, 99) == frozenset()


def test_layer_summaries_and_distributions(conn: sqlite3.Connection) -> None:
    assert qm.layer_summaries(conn, B) == [
        qm.LayerSummary(0, 4, 0, 3, 0.5, 0.7),
        qm.LayerSummary(1, 4, 1, 1, 0.15, 0.6),
    ]
    assert qm.layer_summaries(conn, C) == [qm.LayerSummary(layer, 4, 0, None, None, None) for layer in (0, 1)]
    assert qm.layer_summaries(conn, A3) == []
    assert qm.distributions(conn, B) == {
        "excess_corr": qm.Distribution("excess_corr", [-1.0, 0.0, 1.0], [1, 6], {"0.1": -0.5, "0.9": 0.75}),
        "max_corr": qm.Distribution("max_corr", [0.0, 0.5], [2], {}),
    }
    assert qm.distributions(conn, C) == {}


@pytest.mark.parametrize(
    ("source", "shown"),
    [
        ("/srv/models/seed-1", "seed-1"),
        ("/srv/x\\y", "x\\y"),  # a POSIX path keeps a backslash in its name
        ("C:\\models\\seed-2", "seed-2"),
        ("C:\\", "C:"),  # a drive root: no name, the source without its slashes
        ("X:\\", "X:"),
        ("C:relative\\x", "C:relative\\x"),  # a drive without a root is not an absolute path
        ("\\\\server\\share\\f", "f"),
        ("~/corpus.txt", "corpus.txt"),
        ("./here/x", "x"),
        ("../up/y", "y"),
        (".hidden/z", ".hidden/z"),
        ("stanford-crfm/alias-gpt2-small-x21", "stanford-crfm/alias-gpt2-small-x21"),
        ("gpt2", "gpt2"),
        ("/", "?"),
        ("//", "?"),
    ],
)
def test_public_source(source: str, shown: str) -> None:
    assert qm.public_source(source) == shown


def run_tuple(run: qr.Run) -> tuple[Any, ...]:
    return (
        run.id,
        run.created_at,
        run.finished_at,
        run.status,
        run.content_hash,
        run.stages,
        run.tokens_seen,
        run.tokens_counted,
        run.config,
        run.dataset,
        run.environment,
        run.timings,
        run.error,
    )


RUN_ROWS = {
    FAILED: (FAILED, "2026-01-05", None, "failed", None, [], None, None, {}, {}, {}, {}, "boom"),
    NEWER: (
        NEWER,
        "2026-01-03",
        "2026-02-03",
        "complete",
        "h3",
        ["correlations"],
        3000,
        2700,
        {},
        {"source": "x"},
        {"python": "3.11"},
        {},
        None,
    ),
    RUNNING: (
        RUNNING,
        "2026-01-02",
        "2026-02-02",
        "running",
        "h2",
        ["correlations"],
        2000,
        1800,
        {"threshold": 0.1},
        {},
        {"python": "3.11"},
        {"correlations": 1.5},
        None,
    ),
    RUN: (
        RUN,
        "2026-01-01",
        "2026-02-01",
        "complete",
        "h1",
        ["correlations"],
        1000,
        900,
        {"threshold": 0.5},
        {"bos_id": 0},
        {"python": "3.11"},
        {},
        "none",
    ),
}


def test_runs_with_every_field_newest_first(conn: sqlite3.Connection) -> None:
    assert [run_tuple(r) for r in qr.list_runs(conn)] == list(RUN_ROWS.values())
    for run_id, row in RUN_ROWS.items():
        run = qr.get_run(conn, run_id)
        assert run is not None and run_tuple(run) == row
    assert qr.get_run(conn, 99) is None
    assert qr.run_states(conn) == [
        qr.RunState(FAILED, "failed", None),
        qr.RunState(NEWER, "complete", "h3"),
        qr.RunState(RUNNING, "running", "h2"),
        qr.RunState(RUN, "complete", "h1"),
    ]
    newest = qr.newest_complete_run(conn)
    assert newest is not None and run_tuple(newest) == RUN_ROWS[NEWER]
    # the failed run 5 has a model "A" too: only complete runs count
    assert qr.newest_runs_by_model(conn) == {"A": NEWER, "B": RUN, "C": RUN}
    assert qr._json("", [1]) == [1] and qr._json(None, {}) == {} and qr._json("[2]", None) == [2]
    assert qr._json("{", "d") == "d"


def test_no_complete_run_and_no_runs(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "runs.db")
    db.row_factory = sqlite3.Row
    db.execute(
        "CREATE TABLE runs (id, created_at, finished_at, status, content_hash, stages, tokens_seen, "
        "tokens_counted, config, dataset, environment, timings, error)"
    )
    db.execute("CREATE TABLE models (run_id, name)")
    assert qr.newest_complete_run(db) is None and qr.list_runs(db) == [] and qr.run_states(db) == []
    db.execute("INSERT INTO runs (id, created_at, status) VALUES (1, 'x', 'running')")
    db.execute("INSERT INTO models VALUES (1, 'A')")
    assert qr.newest_complete_run(db) is None and qr.newest_runs_by_model(db) == {}
    db.close()


def test_vocab_texts_by_token_id(conn: sqlite3.Connection) -> None:
    assert qv.load_vocab(conn, RUN) == ["<s>", " a", "", " c"]
    assert qv.load_vocab(conn, NEWER) == ["zero", "", "two"]
    assert qv.load_vocab(conn, RUNNING) == []


def test_twins_of_several_neurons_and_the_post_mean(conn: sqlite3.Connection) -> None:
    twins = qf.twins_of(conn, A3, [(1, 2), (0, 1), (2, 2)])
    assert twins == [
        qf.TwinRow(0, 1, "B", 0, 1, 0.4),
        qf.TwinRow(1, 2, "B", 0, 2, 0.85),
        qf.TwinRow(1, 2, "C", 1, 1, 0.75),
    ]
    assert qf.twins_of(conn, A3, [(1, 2)]) == twins[1:]
    assert qf.twins_of(conn, A3, [(2, 1), (1, 0)]) == []
    assert qf.twins_of(conn, A3, []) == []
    mean = qf.post_mean(conn, B, 0, 2)
    assert mean == B_ACTIVATION["post_mean"] and type(mean) is float
    assert qf.post_mean(conn, A3, 0, 1) is None  # a row without post_mean
    assert qf.post_mean(conn, B, 0, 3) is None and qf.post_mean(conn, C, 0, 2) is None


def test_every_statistic_is_a_column_of_the_table_it_names(conn: sqlite3.Connection) -> None:
    aliases = {"n": "neurons", "a": "activation_stats", "w": "weight_stats", "f": "families", "r": "roles"}
    assert len(qn.STATISTICS) == 30
    for name, stat in qn.STATISTICS.items():
        alias, column = stat.column.split(".")
        assert (stat.name, column) == (name, name) and stat.table == aliases[alias]
        assert column in {row[1] for row in conn.execute(f"PRAGMA table_info({stat.table})")}
        assert isinstance(stat.label, str) and stat.label and isinstance(stat.description, str) and stat.description
    assert (qn.STATISTICS["pre_kurt"].label, qn.STATISTICS["vocab_kurt"].table) == ("pre-act kurtosis", "weight_stats")
