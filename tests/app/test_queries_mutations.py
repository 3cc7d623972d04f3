"""The dashboard's queries (app/queries/*.py) on a small atlas file written by hand, with answers worked out by hand.

Written for the mutation round "queries" (docs/testing.md, "Third round"): the app tests run on a precomputed
family whose numbers nobody chose, so ties, thresholds met exactly, NULLs and pages that end mid-way are rare
there. Here every number is chosen: the expected rankings, pages and counts below follow from the rows inserted in
`atlas` (see the comments there), not from the queries' output. The file is built once per module (about a
second) and only read.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

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
from precompute.store import (
    AtlasStore,
    encode_array,
    encode_counts,
    encode_u8,
    example_columns,
    posting_columns,
    token_kind_code,
)

D_MLP = 4
#: Model ids and names: ids and family positions disagree on purpose (A, B, C by position).
A, C, B, A3 = 1, 2, 3, 4
RUN, RUNNING, NEWER = 1, 2, 3

#: Model A's neurons: (layer, neuron) -> (dead, excess_corr, universal at the run's threshold 0.5, mean_corr).
A_NEURONS = {
    (0, 0): (0, 0.9, 1, 0.95),
    (0, 1): (0, 0.6, 1, 0.7),
    (0, 2): (0, 0.2, 0, 0.4),
    (0, 3): (1, None, None, None),
    (1, 0): (0, 0.6, 1, 0.65),
    (1, 1): (0, 0.5, 0, 0.55),  # exactly the threshold: not universal (>)
    (1, 2): (0, -0.1, 0, 0.1),
    (1, 3): (0, 0.3, 0, 0.45),
}
B_NEURONS = {
    (0, 0): (0, 0.7, 1, 0.8),
    (0, 1): (0, 0.1, 0, 0.3),
    (0, 2): (0, 0.6, 1, 0.7),
    (0, 3): (0, 0.6, 1, 0.7),
    (1, 0): (0, 0.6, 1, 0.7),
    (1, 1): (0, 0.0, 0, 0.2),
    (1, 2): (0, 0.0, 0, 0.2),
    (1, 3): (1, None, None, None),
}

#: Token-table entries: (model, layer, neuron, kind) -> ranked token ids; each value is 10 * rank + token / 100.
TOKEN_TABLES = {
    (A, 0, 1, "mean_activation"): [7, 3, 5],
    (A, 0, 1, "max_activation"): [3, 5, 9],
    (A, 1, 0, "unembed_top"): [1, 2, 4, 7],
    (A, 1, 2, "max_activation"): [5, 7],
    (A, 1, 3, "mean_activation"): [1, 2, 3, 4, 9],
    (B, 0, 0, "mean_activation"): [7, 1],
    (B, 0, 1, "embed_top"): [7],
    (B, 0, 2, "mean_activation"): [11],
    (B, 0, 3, "mean_activation"): [11],
    (B, 1, 0, "mean_activation"): [11],
    (C, 0, 0, "mean_activation"): [7],  # a model not searched
}


WEIGHTS = {
    "w_in_norm": 1.5,
    "w_out_norm": 2.5,
    "input_bias": -0.5,
    "in_out_sim": 0.25,
    "l2_penalty": 8.5,
    "null_space_fraction": 0.125,
    "vocab_mean": 0.0,
    "vocab_var": 1.0,
    "vocab_skew": 0.5,
    "vocab_kurt": 3.0,
}


def token_value(rank: int, token: int) -> float:
    return 10.0 * rank + token / 100


def insert(conn: sqlite3.Connection, table: str, **values: object) -> None:
    names = ", ".join(f'"{n}"' for n in values)
    conn.execute(f'INSERT INTO "{table}" ({names}) VALUES ({", ".join("?" * len(values))})', tuple(values.values()))


def build(db: Path) -> None:
    with AtlasStore(db):
        pass  # the schema and indexes, by the migrations
    conn = sqlite3.connect(db)
    runs = {
        RUN: ("complete", {"threshold": 0.5}, {"bos_id": 0}),
        RUNNING: ("running", {"threshold": 0.1}, {}),
        NEWER: ("complete", {}, {"source": "x"}),
    }
    for run_id, (status, config, dataset) in runs.items():
        insert(
            conn,
            "runs",
            id=run_id,
            created_at=f"2026-01-0{run_id}",
            status=status,
            config_hash=str(run_id),
            config=json.dumps(config),
            environment=json.dumps({"python": "3.11"}),
            dataset=json.dumps(dataset),
            finished_at=f"2026-02-0{run_id}",
            tokens_seen=1000 * run_id,
            tokens_counted=900 * run_id,
            error="none" if run_id == RUN else None,
            stages=json.dumps(["correlations"]),
            timings="not json",
            content_hash=f"h{run_id}",
        )
    shape = {"n_layers": 2, "d_model": 8, "d_mlp": D_MLP, "d_vocab": 20, "n_ctx": 16, "n_heads": 2}
    for model_id, run_id, name, position in ((A, RUN, "A", 0), (C, RUN, "C", 2), (B, RUN, "B", 1), (A3, NEWER, "A", 0)):
        insert(
            conn,
            "models",
            id=model_id,
            run_id=run_id,
            name=name,
            source=f"/srv/{name}",
            position=position,
            is_reference=position == 0,
            act_fn="gelu_new",
            processing='{"fold_ln": true}',
            tokenizer_hash="t",
            **shape,
        )
    for model_id, table in ((A, A_NEURONS), (B, B_NEURONS)):
        for (layer, neuron), (dead, excess, universal, mean_corr) in table.items():
            insert(
                conn,
                "neurons",
                model_id=model_id,
                layer=layer,
                neuron=neuron,
                dead=dead,
                excess_corr=excess,
                universal=universal,
                mean_corr=mean_corr,
                mean_baseline=None if excess is None else mean_corr - excess,
            )
    for layer in (0, 1):
        for neuron in range(D_MLP):
            insert(conn, "neurons", model_id=C, layer=layer, neuron=neuron, dead=0)  # no aggregates
    for layer, n_universal in ((0, 2), (1, 1)):
        insert(conn, "layer_summaries", model_id=A, layer=layer, n_neurons=4, n_dead=1 - layer, n_universal=n_universal)
        insert(conn, "layer_summaries", model_id=C, layer=layer, n_neurons=4, n_dead=0)

    # token tables and their postings
    for (model_id, layer, neuron, kind), tokens in TOKEN_TABLES.items():
        insert(
            conn,
            "token_tables",
            model_id=model_id,
            layer=layer,
            neuron=neuron,
            kind=token_kind_code(kind),
            token_ids=encode_array(tokens, "<u2"),
            token_values=encode_array([token_value(r, t) for r, t in enumerate(tokens)], "<f8"),
        )
    for model_id in (A, B, C):
        entries = [
            (token_kind_code(kind), token, layer * D_MLP + neuron, rank)
            for (m, layer, neuron, kind), tokens in TOKEN_TABLES.items()
            if m == model_id
            for rank, token in enumerate(tokens)
        ]
        kind, token, flat, rank = (np.array(column) for column in zip(*entries, strict=True))
        columns = posting_columns(model_id, kind, token, flat, rank)
        for i, postings in enumerate(columns["postings"]):
            insert(
                conn,
                "token_postings",
                model_id=model_id,
                kind=int(columns["kind"][i]),
                token_id=int(columns["token_id"][i]),
                postings=postings,
            )

    # the top examples of A(0, 0): 4 examples, those of rank 1 and 3 peak on token 7 (activations 2.0, 1.5)
    snippets = {0: [3, 4, 5], 1: [6, 7, 8], 2: [9, 10, 11], 3: [12, 7, 13]}
    examples = []
    for rank, peak_token in enumerate((4, 7, 10, 7)):
        examples.append(
            {
                "model_id": A,
                "layer": 0,
                "neuron": 0,
                "kind": "top",
                "rank": rank,
                "bin": 0,
                "dataset_row": rank,
                "start": 1,
                "peak": 1,
                "activation": 2.5 - 0.5 * rank,
                "activations": encode_u8(np.array([0.0, 2.5 - 0.5 * rank, 0.0])),
            }
        )
        insert(
            conn,
            "example_peaks",
            model_id=A,
            peak_token=peak_token,
            layer=0,
            neuron=0,
            rank=rank,
            activation=2.5 - 0.5 * rank,
        )
        row = [0, *snippets[rank], 0]  # the snippet starts at position 1
        insert(conn, "example_rows", model_id=A, dataset_row=rank, itemsize=2, token_ids=encode_array(row, "<u2")[1:])
    insert(conn, "examples", **example_columns(examples))

    # features: "token: the" (id 0) and "is_digit" (id 1) of model A
    for feature_id, feature in enumerate(("token: the", "is_digit")):
        insert(conn, "feature_names", model_id=A, feature_id=feature_id, feature=feature, feature_set="s", fraction=0.5)
    # A(1,2): two features whose variance reductions both clip to 1, "token: the" at rank 0, "is_digit" at rank 1
    # (SQLite reads them in the order of the features' names: "is_digit" first)
    scores = ((0, 2, 0, 0, 1.3), (1, 1, 1, 0, 0.4), (0, 0, 0, 1, -0.2), (1, 2, 0, 0, 1.1), (1, 2, 1, 1, 1.2))
    for layer, neuron, rank, feature_id, vr in scores:
        insert(
            conn,
            "feature_scores",
            model_id=A,
            layer=layer,
            neuron=neuron,
            rank=rank,
            feature_id=feature_id,
            variance_reduction=vr,
        )
    families = (
        (0, 0, "position", 0.8, '{"rule": "x"}'),
        (1, 1, "position", None, None),
        (0, 2, "token", 0.6, "not json"),
    )
    for layer, neuron, family, best_vr, evidence in families:
        insert(
            conn, "families", model_id=A, layer=layer, neuron=neuron, family=family, best_vr=best_vr, evidence=evidence
        )
    for rank, attention_layer, head, score in ((0, 0, 1, 0.5), (1, 1, 0, 0.25)):
        insert(
            conn,
            "attention_scores",
            model_id=A,
            layer=0,
            neuron=0,
            rank=rank,
            attention_layer=attention_layer,
            head=head,
            score=score,
        )
    insert(conn, "position_counts", model_id=A, count=np.array([5, 0, 7], dtype="<i8").tobytes())
    for hook, mean in (("pre", [254.0, 0.0, 127.0]), ("post", [0.0, 127.0, 254.0])):
        std = encode_u8(np.array([0.0, 254.0, np.nan]))
        insert(
            conn, "position_profiles", model_id=A, layer=0, neuron=0, hook=hook, mean=encode_u8(np.array(mean)), std=std
        )
    insert(conn, "weight_stats", model_id=A, layer=0, neuron=0, **WEIGHTS)
    distribution = {"bin_edges": "[0.0, 0.5, 1.0]", "counts": "[3, 4]", "quantiles": '{"0.5": 0.25}'}
    insert(conn, "distributions", model_id=A, quantity="excess_corr", **distribution)
    insert(conn, "roles", model_id=A, layer=0, neuron=0, vocab_role="prediction")
    insert(conn, "roles", model_id=A, layer=1, neuron=3, attention_role="activation", attention_score=0.7)
    insert(conn, "roles", model_id=A, layer=1, neuron=2, entropy_rank=0)
    insert(conn, "roles", model_id=B, layer=0, neuron=1, entropy_rank=3, vocab_role="suppression")

    # twins: matches and partner scores of A(0, 0)
    for partner, (p_layer, p_neuron, corr) in ((B, (0, 0, 0.9)), (C, (1, 1, 0.8))):
        insert(
            conn,
            "matches",
            model_id=A,
            layer=0,
            neuron=0,
            partner_model_id=partner,
            rank=0,
            partner_layer=p_layer,
            partner_neuron=p_neuron,
            corr=corr,
        )
        insert(
            conn,
            "partner_scores",
            model_id=A,
            layer=0,
            neuron=0,
            partner_model_id=partner,
            max_corr=corr,
            max_layer=p_layer,
            max_neuron=p_neuron,
            baseline_corr=0.1,
            baseline_layer=0,
            baseline_unit=3,
        )
    insert(
        conn,
        "matches",
        model_id=A,
        layer=0,
        neuron=0,
        partner_model_id=B,
        rank=1,
        partner_layer=0,
        partner_neuron=2,
        corr=0.5,
    )
    insert(
        conn,
        "matches",
        model_id=B,
        layer=0,
        neuron=2,
        partner_model_id=A,
        rank=1,
        partner_layer=0,
        partner_neuron=0,
        corr=0.4,
    )
    insert(
        conn,
        "matches",
        model_id=C,
        layer=1,
        neuron=1,
        partner_model_id=A,
        rank=0,
        partner_layer=0,
        partner_neuron=0,
        corr=0.3,
    )

    # analyses of A(0, 0)
    insert(conn, "activation_stats", model_id=A, layer=0, neuron=0, n_tokens=100, pre_mean=0.25, post_mean=0.125)
    insert(conn, "activation_stats", model_id=A, layer=0, neuron=1, n_tokens=100, pre_mean=-1.0)
    for position, statistic in enumerate(("w_in_norm", "pre_kurt", "excess_corr")):
        insert(conn, "percentile_statistics", model_id=A, position=position, statistic=statistic)
    insert(conn, "percentiles", model_id=A, layer=0, neuron=0, percentiles=encode_array([0.25, np.nan, 0.75], "<f4"))
    for hook, n_bins, counts in (("post", 3, [1, 2, 3, 4, 5]), ("pre", 3, [1, 2, 3])):  # "pre": malformed
        insert(
            conn,
            "histograms",
            model_id=A,
            layer=0,
            neuron=0,
            hook=hook,
            low=-1.0,
            high=1.0,
            n_bins=n_bins,
            counts=encode_counts(np.array(counts)),
        )
    for value, baseline, layer, neuron, entropy in ((1.0, 1, 1, 0, 2.0), (1.0, 1, 1, 1, 4.0), (0.0, 1, 1, 0, 1.0)):
        insert(
            conn,
            "entropy_interventions",
            model_id=A,
            layer=layer,
            neuron=neuron,
            value=value,
            is_baseline=baseline,
            ln_scale=1.0,
            entropy=entropy,
            loss=entropy / 2,
            reciprocal_rank=0.5,
            n_tokens=10 + neuron,
        )
    points = np.arange(7, dtype="<f4")  # 7 floats: two whole points, a stray one
    insert(
        conn,
        "path_ablations",
        model_id=A,
        layer=0,
        neuron=0,
        attention_layer=0,
        head=1,
        n_points=2,
        points=points.tobytes(),
    )
    for token_id, text in ((0, "<s>"), (1, " a"), (3, " c")):
        insert(conn, "vocab", run_id=RUN, token_id=token_id, text=text)
    conn.commit()
    conn.close()


@pytest.fixture(scope="module")
def atlas(tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("queries") / "atlas.db"
    build(db)
    return db


@pytest.fixture
def conn(atlas: Path) -> Iterator[sqlite3.Connection]:
    connection = sqlite3.connect(f"file:{atlas}?mode=ro", uri=True)
    connection.row_factory = sqlite3.Row
    yield connection
    connection.close()


# --- search -------------------------------------------------------------------------------------------------


def ranked(conn, parts, where=NeuronFilter(), cap=50):
    ranking = qs.rank_neurons(conn, parts, where, cap)
    return [(n.model_id, n.layer, n.neuron, n.score) for n in ranking.neurons], ranking.total


def test_token_postings_decode_to_layer_neuron_and_strength(conn):
    rows = qs.token_postings(conn, [A, B], [7])
    # every entry of token 7 in A's and B's tables (not C's): strength 1 / (1 + rank), no value yet
    assert sorted(rows) == sorted(
        [
            (A, 0, 1, "mean_activation", 1.0, 0, None, 7, None),
            (A, 1, 0, "unembed_top", 0.25, 3, None, 7, None),
            (A, 1, 2, "max_activation", 0.5, 1, None, 7, None),
            (B, 0, 0, "mean_activation", 1.0, 0, None, 7, None),
            (B, 0, 1, "embed_top", 1.0, 0, None, 7, None),
        ]
    )
    assert qs.token_postings(conn, [], [7]) == [] and qs.token_postings(conn, [A], []) == []


def test_the_ranking_orders_by_score_then_universal_then_excess_then_key(conn):
    parts = [qs.token_table_evidence(conn, [A, B], [7]), qs.example_evidence([A, B], [7])]
    order, total = ranked(conn, parts)
    # score 1.0: B(0,0) universal 0.7, A(0,1) universal 0.6, B(0,1) not universal; score 0.5: A(0,0) (top examples
    # 2 of 4, universal) before A(1,2) (max_activation rank 1, not universal); score 0.25: A(1,0) (rank 3)
    assert order == [
        (B, 0, 0, 1.0),
        (A, 0, 1, 1.0),
        (B, 0, 1, 1.0),
        (A, 0, 0, 0.5),
        (A, 1, 2, 0.5),
        (A, 1, 0, 0.25),
    ]
    assert total == 6
    capped, total = ranked(conn, parts, cap=2)
    assert capped == order[:2] and total == 6


def test_the_ranking_at_another_threshold_and_the_last_tie_breakers(conn):
    parts = [qs.token_table_evidence(conn, [A, B], [7, 11])]
    # at 0.65 only B(0,0) (0.7) is universal among the score-1 neurons; A(0,1), B(0,2), B(0,3) and B(1,0) (all 0.6)
    # tie on score, flag and excess: model, then layer, then neuron
    order, _ = ranked(conn, parts, NeuronFilter(threshold=0.65))
    expected = [(B, 0, 0), (A, 0, 1), (B, 0, 2), (B, 0, 3), (B, 1, 0), (B, 0, 1), (A, 1, 2), (A, 1, 0)]
    assert [key[:3] for key in order] == expected
    ranking = qs.rank_neurons(conn, parts, NeuronFilter(threshold=0.65), 50)
    assert [n.labels.universal for n in ranking.neurons] == [True] + [False] * 7
    # at the run's threshold the stored flags: the four 0.6 neurons are universal, B(0,1) is not
    ranking = qs.rank_neurons(conn, parts, NeuronFilter(), 50)
    assert [n.labels.universal for n in ranking.neurons][:6] == [True] * 5 + [False]


def test_the_ranking_filters(conn):
    parts = [qs.token_table_evidence(conn, [A, B], [7]), qs.example_evidence([A, B], [7])]
    order, total = ranked(conn, parts, NeuronFilter(universal=True))
    assert [k[:3] for k in order] == [(B, 0, 0), (A, 0, 1), (A, 0, 0), (A, 1, 0)] and total == 4
    order, total = ranked(conn, parts, NeuronFilter(layer=1, universal=False))
    assert [k[:3] for k in order] == [(A, 1, 2)] and total == 1
    assert qs.rank_neurons(conn, [], NeuronFilter(), 10) == qs.Ranking([], 0)


def test_evidence_is_sorted_strongest_first_with_its_values_and_labels(conn):
    ranking = qs.rank_neurons(conn, [qs.token_table_evidence(conn, [A], [7, 9])], NeuronFilter(), 50)
    by_key = {n.key: n for n in ranking.neurons}
    a01 = by_key[A, 0, 1]
    # mean_activation rank 0 (strength 1) before max_activation rank 2 (strength 1/3); values from the tables
    assert [(e.kind, e.strength, e.rank, e.token_id) for e in a01.evidence] == [
        ("mean_activation", 1.0, 0, 7),
        ("max_activation", pytest.approx(1 / 3), 2, 9),
    ]
    assert [e.value for e in a01.evidence] == [token_value(0, 7), token_value(2, 9)]
    assert by_key[A, 1, 3].evidence[0].value == token_value(4, 9)
    assert by_key[A, 1, 0].evidence[0].value == token_value(3, 7)
    assert a01.labels == qs.Labels(True, 0.6, None, ())
    assert by_key[A, 1, 3].labels == qs.Labels(False, 0.3, None, ("activation",))
    assert by_key[A, 1, 2].labels == qs.Labels(False, -0.1, None, ("entropy",))


def test_evidence_of_one_strength_sorts_by_kind_then_rank(conn):
    # A(0,1) lists token 3 at rank 1 of mean_activation and rank 0 of max_activation, token 5 at rank 2 and 1
    ranking = qs.rank_neurons(conn, [qs.token_table_evidence(conn, [A], [3, 5])], NeuronFilter(), 50)
    hit = next(n for n in ranking.neurons if n.key == (A, 0, 1))
    assert [(e.kind, e.rank, e.token_id) for e in hit.evidence] == [
        ("max_activation", 0, 3),
        ("max_activation", 1, 5),
        ("mean_activation", 1, 3),
        ("mean_activation", 2, 5),
    ]
    assert hit.score == 1.0


def test_feature_family_and_role_evidence_strengths(conn):
    order, total = ranked(conn, [qs.feature_evidence([A], ["token: the", "is_digit"])])
    # variance reductions 1.3, 1.2 and 1.1, 0.4, -0.2 clipped to [0, 1]; A(0,2) has the larger excess of the two at 1
    assert order == [(A, 0, 2, 1.0), (A, 1, 2, 1.0), (A, 1, 1, 0.4), (A, 0, 0, 0.0)] and total == 4
    ranking = qs.rank_neurons(conn, [qs.feature_evidence([A], ["token: the", "is_digit"])], NeuronFilter(), 5)
    # equal strengths of one kind: the neuron's better-ranked feature first
    assert [(e.label, e.rank) for e in ranking.neurons[1].evidence] == [("token: the", 0), ("is_digit", 1)]
    nothing = qs.rank_neurons(conn, [qs.token_table_evidence(conn, [A], [19])], NeuronFilter(), 5)
    assert nothing == qs.Ranking([], 0)
    order, _ = ranked(conn, [qs.family_evidence([A], "position")])
    assert order == [(A, 0, 0, 0.8), (A, 1, 1, 0.0)]  # best_vr NULL counts 0
    order, _ = ranked(conn, [qs.role_evidence([A, B], "entropy")])
    assert order == [(A, 1, 2, 1.0), (B, 0, 1, 0.25)]  # 1 / (1 + entropy_rank)
    kinds = [
        (qs.feature_evidence([A], ["is_digit"]), ("feature", "is_digit", 1)),
        (qs.family_evidence([A], "token"), ("family", "token", None)),
        (qs.role_evidence([A, B], "entropy"), ("role", "entropy", 0)),
        (qs.role_evidence([A, B], "prediction"), ("role", "prediction", None)),
    ]
    for part, expected in kinds:
        first = qs.rank_neurons(conn, [part], NeuronFilter(), 5).neurons[0].evidence[0]
        assert (first.kind, first.label, first.rank) == expected
    order, _ = ranked(conn, [qs.role_evidence([A, B], "activation")])
    assert order == [(A, 1, 3, 1.0)]
    ranking = qs.rank_neurons(conn, [qs.role_evidence([A, B], "activation")], NeuronFilter(), 5)
    assert ranking.neurons[0].evidence[0].value == 0.7 and ranking.neurons[0].evidence[0].label == "activation"
    order, _ = ranked(conn, [qs.role_evidence([A, B], "suppression")])
    assert order == [(B, 0, 1, 1.0)]
    with pytest.raises(ValueError, match="unknown role"):
        qs.role_evidence([A], "nonsense")


def test_example_evidence_is_the_share_of_top_examples_peaking_on_the_token(conn):
    ranking = qs.rank_neurons(conn, [qs.example_evidence([A], [7])], NeuronFilter(), 5)
    (hit,) = ranking.neurons
    (evidence,) = hit.evidence
    assert hit.key == (A, 0, 0)
    assert (evidence.kind, evidence.strength, evidence.rank, evidence.value) == ("top_examples", 0.5, 1, 2.0)
    assert hit.labels == qs.Labels(True, 0.9, "position", ("prediction",))


def test_search_statements_with_and_without_indexes_agree(conn):
    indexes = qs.present_indexes(conn)
    assert indexes == frozenset(qs.INDEXES.values())
    for role in qs.ROLES:
        assert ranked(conn, [qs.role_evidence([A, B], role, indexes)]) == ranked(conn, [qs.role_evidence([A, B], role)])
    assert "INDEXED BY ix_families_family" in qs.family_evidence([A], "token", indexes).sql
    assert "INDEXED BY" not in qs.family_evidence([A], "token").sql
    assert qs.feature_exists(conn, [A], "is_digit") and not qs.feature_exists(conn, [B], "is_digit")
    assert not qs.feature_exists(conn, [A], "is_alpha")


def test_best_matches_are_rank_0_in_the_partners_asked_for(conn):
    found = qs.best_matches(conn, [(A, 0, 0), (A, 0, 1)], [B, C], None)
    assert list(found) == [(A, 0, 0)]
    by_partner = {m.partner_model_id: m for m in found[A, 0, 0]}
    assert set(by_partner) == {B, C}
    assert (by_partner[B].layer, by_partner[B].neuron, by_partner[B].corr) == (0, 0, 0.9)
    assert by_partner[B].labels.universal is True and by_partner[C].labels.universal is None
    at = qs.best_matches(conn, [(A, 0, 0)], [B], 0.75)
    assert [m.labels.universal for m in at[A, 0, 0]] == [False]  # B(0,0): 0.7 <= 0.75
    assert qs.best_matches(conn, [], [B], None) == {} and qs.best_matches(conn, [(A, 0, 0)], [], None) == {}


# --- neuron lists, pages and counts ---------------------------------------------------------------------------

BY_EXCESS_DESC = [(0, 0), (0, 1), (1, 0), (1, 1), (1, 3), (0, 2), (1, 2), (0, 3)]
BY_EXCESS_ASC = [(1, 2), (0, 2), (1, 3), (1, 1), (0, 1), (1, 0), (0, 0), (0, 3)]


def page(conn, where=NeuronFilter(), sort="excess_corr", order="desc", limit=50, offset=0, **kw):
    rows = qn.list_neurons(conn, A, where, sort, order, limit, offset, **kw)
    return [(r.layer, r.neuron) for r in rows]


def test_pages_sort_with_nulls_last_and_ties_by_layer_and_neuron(conn):
    assert page(conn) == BY_EXCESS_DESC
    assert page(conn, order="asc") == BY_EXCESS_ASC
    pages = [page(conn, limit=3, offset=o) for o in (0, 3, 6, 9)]
    assert pages == [BY_EXCESS_DESC[:3], BY_EXCESS_DESC[3:6], BY_EXCESS_DESC[6:], []]
    assert page(conn, sort="layer", order="desc", limit=3) == [(1, 0), (1, 1), (1, 2)]


def test_list_rows_carry_the_summary_labels_and_extra_statistics(conn):
    rows = qn.list_neurons(
        conn, A, NeuronFilter(), "pre_mean", "asc", 3, 0, extra=("pre_mean",), with_labels=("f", "r")
    )
    assert [(r.layer, r.neuron, r.values) for r in rows] == [
        (0, 1, {"pre_mean": -1.0}),
        (0, 0, {"pre_mean": 0.25}),
        (0, 2, {"pre_mean": None}),
    ]
    first = rows[1]
    assert (first.dead, first.excess_corr, first.mean_corr, first.universal) == (False, 0.9, 0.95, True)
    assert first.mean_baseline == 0.95 - 0.9
    assert (first.family, first.vocab_role, first.attention_role) == ("position", "prediction", None)
    (dead,) = qn.list_neurons(conn, A, NeuronFilter(dead=True), "excess_corr", "desc", 5, 0)
    assert (dead.layer, dead.neuron, dead.dead, dead.universal, dead.family) == (0, 3, True, None, None)
    at = qn.list_neurons(conn, A, NeuronFilter(threshold=0.55), "excess_corr", "desc", 4, 0)
    assert [r.universal for r in at] == [True, True, True, False]
    at = qn.list_neurons(conn, A, NeuronFilter(threshold=0.45), "excess_corr", "desc", 5, 0)
    assert [r.universal for r in at] == [True, True, True, True, False]  # 0.5: above 0.45, not the run's 0.5


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        (NeuronFilter(), 8),
        (NeuronFilter(universal=True), 3),
        (NeuronFilter(universal=False), 4),  # the dead neuron's flag is NULL: neither
        (NeuronFilter(universal=True, threshold=0.4), 4),  # 0.9, 0.6, 0.6, 0.5
        (NeuronFilter(universal=False, threshold=0.4), 3),  # 0.2, -0.1, 0.3
        (NeuronFilter(universal=True, threshold=0.5), 3),  # 0.5 is not above 0.5
        (NeuronFilter(dead=True), 1),
        (NeuronFilter(dead=False), 7),
        (NeuronFilter(layer=1), 4),
        (NeuronFilter(layer=0, universal=True), 2),
        (NeuronFilter(family="position"), 2),
        (NeuronFilter(role="prediction"), 1),
        (NeuronFilter(role="activation"), 1),
        (NeuronFilter(role="entropy"), 1),
        (NeuronFilter(ranges=(Range("excess_corr", 0.2, 0.6),)), 5),  # both ends included
        (NeuronFilter(ranges=(Range("excess_corr", 0.6, None),)), 3),
        (NeuronFilter(ranges=(Range("excess_corr", None, 0.2),)), 2),
        (NeuronFilter(ranges=(Range("pre_mean", 0.0, None),)), 1),
    ],
)
def test_counts_and_lists_agree_on_every_filter(conn, where, expected):
    assert qn.count_neurons(conn, A, where) == expected
    assert len(page(conn, where)) == expected


def test_role_filter_matches_either_role_column(conn):
    assert page(conn, NeuronFilter(role="activation")) == [(1, 3)]
    assert page(conn, NeuronFilter(role="prediction")) == [(0, 0)]
    assert page(conn, NeuronFilter(family="position")) == [(0, 0), (1, 1)]


def test_export_rows_are_capped_and_ordered_like_the_list(conn):
    capped = qn.export_rows(conn, A, NeuronFilter(), "excess_corr", "desc", ("layer", "excess_corr", "pre_mean"), 3)
    assert capped.truncated
    assert capped.rows == [
        (0, 0, 0, 1, "position", "prediction", 0.9, 0.25),
        (0, 1, 0, 1, None, None, 0.6, -1.0),
        (1, 0, 0, 1, None, None, 0.6, None),
    ]
    everything = qn.export_rows(conn, A, NeuronFilter(), "excess_corr", "asc", ("excess_corr",), 8)
    assert not everything.truncated
    assert [(r[0], r[1]) for r in everything.rows] == BY_EXCESS_ASC
    at = qn.export_rows(conn, A, NeuronFilter(threshold=0.55), "excess_corr", "desc", ("excess_corr",), 4)
    assert [r[3] for r in at.rows] == [1, 1, 1, 0]
    assert qn.export_statistics(("layer", "universal", "pre_mean", "family")) == ("pre_mean",)


def test_scatter_takes_neurons_with_both_coordinates_and_samples_beyond_the_cap(conn):
    full = qn.scatter_rows(conn, A, NeuronFilter(), "excess_corr", "mean_corr", "universal", 10)
    assert (full.total, full.sampled) == (7, False)  # the dead neuron has no excess
    assert sorted((p.layer, p.neuron, p.x, p.y, p.color) for p in full.rows) == sorted(
        (layer, neuron, excess, mean, flag)
        for (layer, neuron), (_, excess, flag, mean) in A_NEURONS.items()
        if excess is not None
    )
    at = qn.scatter_rows(conn, A, NeuronFilter(threshold=0.55), "excess_corr", "mean_corr", "universal", 10)
    assert sorted((p.layer, p.neuron) for p in at.rows if p.color) == [(0, 0), (0, 1), (1, 0)]
    sample = qn.scatter_rows(conn, A, NeuronFilter(), "excess_corr", "mean_corr", "layer", 3)
    assert (sample.total, sample.sampled, len(sample.rows)) == (7, True, 3)

    def hashed(key):
        return ((key[0] * 1000003 + key[1]) * 2654435761) % 4294967291

    live = sorted((k for k, v in A_NEURONS.items() if v[1] is not None), key=hashed)
    assert [(p.layer, p.neuron) for p in sample.rows] == live[:3]
    assert [p.color for p in sample.rows] == [k[0] for k in live[:3]]


def test_one_neuron_its_partners_and_matches(conn):
    scores = qn.get_neuron(conn, A, 1, 1)
    assert (scores.excess_corr, scores.universal, scores.dead) == (0.5, False, False)
    assert qn.get_neuron(conn, A, 1, 1, threshold=0.45).universal is True
    assert qn.get_neuron(conn, A, 0, 3).universal is None
    assert qn.get_neuron(conn, A, 5, 0) is None
    partners = qn.partner_scores(conn, A, 0, 0)
    assert [(p.partner, p.max_corr, p.max_layer, p.max_neuron, p.baseline_unit) for p in partners] == [
        ("B", 0.9, 0, 0, 3),
        ("C", 0.8, 1, 1, 3),
    ]  # family order (position), not id order
    assert [(m.model, m.layer, m.neuron, m.rank, m.corr) for m in qn.matches(conn, A, 0, 0)] == [
        ("B", 0, 0, 0, 0.9),
        ("B", 0, 2, 1, 0.5),
        ("C", 1, 1, 0, 0.8),
    ]
    by = qn.matched_by(conn, A, 0, 0, 5)
    assert [(m.model, m.layer, m.neuron, m.rank, m.corr) for m in by] == [("C", 1, 1, 0, 0.3), ("B", 0, 2, 1, 0.4)]
    assert len(qn.matched_by(conn, A, 0, 0, 1)) == 1


def test_universal_neighbours_step_through_layer_then_neuron(conn):
    assert qn.neighbour_universal(conn, A, 0, 0, "next") == (0, 1)
    assert qn.neighbour_universal(conn, A, 0, 1, "next") == (1, 0)
    assert qn.neighbour_universal(conn, A, 1, 0, "next") is None
    assert qn.neighbour_universal(conn, A, 1, 0, "prev") == (0, 1)
    assert qn.neighbour_universal(conn, A, 0, 0, "prev") is None
    assert qn.neighbour_universal(conn, A, 1, 0, "next", threshold=0.45) == (1, 1)
    assert qn.neighbour_universal(conn, A, 1, 3, "prev", threshold=0.45) == (1, 1)


def test_random_neuron_respects_the_filter(conn, monkeypatch):
    seen = {qn.random_neuron(conn, A, NeuronFilter(universal=True)) for _ in range(60)}
    assert seen == {(0, 0), (0, 1), (1, 0)}
    assert qn.random_neuron(conn, A, NeuronFilter(layer=7)) is None
    monkeypatch.setattr(qn.random, "randrange", lambda n: n - 1)
    assert qn.random_neuron(conn, A, NeuronFilter(layer=1)) == (1, 3)


# --- models and threshold counts -----------------------------------------------------------------------------


def test_threshold_counts_are_strictly_above(conn):
    assert qm.count_above(conn, A, 0.5) == 3
    assert qm.count_above(conn, A, 0.6) == 1
    assert qm.count_above(conn, A, -1.0) == 7
    assert qm.count_above_by_layer(conn, A, 0.5) == {0: 2, 1: 1}
    assert qm.count_above_by_layer(conn, A, 0.25) == {0: 2, 1: 3}
    assert qm.count_above_by_layer(conn, A, 0.6) == {0: 1}
    assert qm.count_universal(conn, A) == 3
    assert qm.count_universal(conn, C) is None


def test_top_neurons_by_excess(conn):
    top = qm.top_neurons(conn, A, 3)
    assert [(t.excess_corr, t.universal) for t in top] == [(0.9, True), (0.6, True), (0.6, True)]
    assert (top[0].layer, top[0].neuron, top[0].mean_corr, top[0].mean_baseline) == (0, 0, 0.95, 0.95 - 0.9)
    assert [t.universal for t in qm.top_neurons(conn, A, 8, threshold=0.6)] == [True, False, False] + [False] * 4
    assert len(qm.top_neurons(conn, A, 20)) == 7  # the dead neuron's NULL excess is left out
    assert qm.top_neurons(conn, C, 5) == []


def test_models_of_a_run_in_family_order_and_their_tables(conn):
    family = qm.models_of_run(conn, RUN)
    assert [(m.id, m.name, m.position, m.is_reference) for m in family] == [
        (A, "A", 0, True),
        (B, "B", 1, False),
        (C, "C", 2, False),
    ]
    assert family[0].n_neurons == 8 and family[0].public_source == "A" and not family[0].published
    assert family[1] == qm.Model(
        id=B,
        run_id=RUN,
        name="B",
        source="/srv/B",
        position=1,
        is_reference=False,
        n_layers=2,
        d_model=8,
        d_mlp=D_MLP,
        d_vocab=20,
        n_ctx=16,
        n_heads=2,
        act_fn="gelu_new",
        tokenizer_hash="t",
        processing={"fold_ln": True},
    )
    assert qm.analysis_tables(conn, A) == frozenset(
        {
            "activation_stats",
            "histograms",
            "position_profiles",
            "weight_stats",
            "attention_scores",
            "percentiles",
            "token_tables",
            "examples",
            "families",
            "feature_scores",
            "roles",
            "entropy_interventions",
            "path_ablations",
        }
    )
    assert qm.analysis_tables(conn, C) == frozenset({"token_tables"})
    summaries = qm.layer_summaries(conn, A)
    assert [(s.layer, s.n_dead, s.n_universal) for s in summaries] == [(0, 1, 2), (1, 0, 1)]


# --- runs, vocabulary, firing --------------------------------------------------------------------------------


def test_runs_newest_first_with_their_settings(conn):
    assert [r.id for r in qr.list_runs(conn)] == [NEWER, RUNNING, RUN]
    assert [(s.id, s.status, s.content_hash) for s in qr.run_states(conn)] == [
        (NEWER, "complete", "h3"),
        (RUNNING, "running", "h2"),
        (RUN, "complete", "h1"),
    ]
    run = qr.get_run(conn, RUN)
    assert (run.threshold, run.bos_id, run.complete, run.published, run.stages) == (
        0.5,
        0,
        True,
        None,
        ["correlations"],
    )
    assert run.timings == {}  # not JSON: the default
    assert run == qr.Run(
        id=RUN,
        created_at="2026-01-01",
        finished_at="2026-02-01",
        status="complete",
        content_hash="h1",
        stages=["correlations"],
        tokens_seen=1000,
        tokens_counted=900,
        config={"threshold": 0.5},
        dataset={"bos_id": 0},
        environment={"python": "3.11"},
        timings={},
        error="none",
    )
    newer = qr.get_run(conn, NEWER)
    assert (newer.threshold, newer.bos_id) == (0.5, None)
    assert qr.get_run(conn, RUNNING).threshold == 0.1 and not qr.get_run(conn, RUNNING).complete
    assert qr.get_run(conn, 99) is None
    assert qr.newest_complete_run(conn).id == NEWER
    assert qr.newest_runs_by_model(conn) == {"A": NEWER, "B": RUN, "C": RUN}


def test_vocab_has_an_empty_text_for_every_missing_id(conn):
    assert qv.load_vocab(conn, RUN) == ["<s>", " a", "", " c"]
    assert qv.load_vocab(conn, NEWER) == []


def test_firing_ids_twins_and_means(conn):
    assert sorted(qf.universal_ids(conn, A, D_MLP, None).tolist()) == [0, 1, 4]
    assert sorted(qf.universal_ids(conn, A, D_MLP, 0.45).tolist()) == [0, 1, 4, 5]
    assert qf.universal_ids(conn, C, D_MLP, None) is None
    none = qf.universal_ids(conn, A, D_MLP, 0.95)  # flags, but no neuron above 0.95: ids an index can take
    assert none.dtype == np.int64 and none.size == 0
    twins = qf.twins_of(conn, A, [(0, 0), (1, 1)])
    assert [(t.layer, t.neuron, t.partner, t.twin_layer, t.twin_neuron, t.corr) for t in twins] == [
        (0, 0, "B", 0, 0, 0.9),
        (0, 0, "C", 1, 1, 0.8),
    ]
    assert qf.twins_of(conn, A, []) == []
    assert qf.post_mean(conn, A, 0, 0) == 0.125
    assert qf.post_mean(conn, A, 0, 1) is None and qf.post_mean(conn, A, 1, 1) is None


# --- one neuron's analyses -----------------------------------------------------------------------------------


def test_analyses_decode_the_stored_arrays(conn):
    key = (A, 0, 0)
    # NaN left out, sorted by name
    assert list(qa.percentiles(conn, key).items()) == [("excess_corr", 0.75), ("w_in_norm", 0.25)]
    assert qa.percentiles(conn, (A, 1, 1)) == {}
    (histogram,) = qa.histograms(conn, key)  # the malformed "pre" row is skipped
    assert (histogram.hook, histogram.counts.tolist()) == ("post", [1, 2, 3, 4, 5])
    tables = qa.token_tables(conn, (A, 0, 1), 2)
    assert list(tables) == ["max_activation", "mean_activation"]
    assert [(t.token_id, t.value, t.count) for t in tables["mean_activation"]] == [
        (7, token_value(0, 7), None),
        (3, token_value(1, 3), None),
    ]
    stats = qa.activation_stats(conn, key)
    assert (stats.n_tokens, stats.values["pre_mean"], stats.post_max) == (100, 0.25, None)
    (ablation,) = qa.path_ablations(conn, key)
    assert ablation.points.tolist() == [[0, 1, 2], [3, 4, 5]] and ablation.head == 1


def test_examples_cut_each_snippet_from_its_dataset_row(conn):
    found = qa.examples(conn, (A, 0, 0), "top", 3)
    assert [(e.rank, e.dataset_row, e.activation) for e in found] == [(0, 0, 2.5), (1, 1, 2.0), (2, 2, 1.5)]
    assert [e.token_ids.tolist() for e in found] == [[3, 4, 5], [6, 7, 8], [9, 10, 11]]
    # the row's snippets share one scale, 0 to 2.5 in 254 steps (revision 0006): within half a step
    assert [float(e.activations[1]) for e in found] == pytest.approx([2.5, 2.0, 1.5], abs=2.5 / 508 + 1e-6)
    assert qa.example_kinds(conn, (A, 0, 0)) == {"top": 4}
    assert qa.examples(conn, (A, 0, 0), "random", 3) == []


def test_entropy_baseline_averages_the_baseline_neurons_per_value(conn):
    rows = qa.entropy_baseline(conn, A)
    assert [(r.value, r.entropy, r.loss, r.n_tokens) for r in rows] == [(0.0, 1.0, 0.5, 10), (1.0, 3.0, 1.5, 10)]


def test_family_and_role_labels(conn):
    assert qa.family_labels(conn, A) == ["position", "token"]
    assert qa.role_labels(conn, A) == ["activation", "entropy", "prediction"]
    assert qa.role_labels(conn, B) == ["entropy", "suppression"]
    members = qa.family_members(conn, A, "position", 5)
    assert [(m.layer, m.neuron, m.best_vr) for m in members] == [(0, 0, 0.8), (1, 1, None)]
    assert [m.neuron for m in qa.family_members(conn, A, "position", 1)] == [0]


def test_one_neurons_panels(conn):
    key = (A, 0, 0)
    profiles = qa.position_profiles(conn, key)
    assert [p.hook for p in profiles] == ["post", "pre"]
    assert profiles[0].mean.tolist() == [0.0, 127.0, 254.0] and profiles[1].mean.tolist() == [254.0, 0.0, 127.0]
    np.testing.assert_array_equal(profiles[0].std, [0.0, 254.0, np.nan])
    assert profiles[0].count.tolist() == [5, 0, 7]
    assert qa.weight_stats(conn, key) == WEIGHTS
    assert qa.weight_stats(conn, (A, 0, 1)) is None
    assert qm.distributions(conn, A) == {
        "excess_corr": qm.Distribution("excess_corr", [0.0, 0.5, 1.0], [3, 4], {"0.5": 0.25})
    }
    assert qa.family(conn, key) == qa.FamilyRow("position", None, 0.8, None, {"rule": "x"})
    assert qa.family(conn, (A, 0, 2)).evidence == "not json"
    assert qa.family(conn, (A, 1, 1)).evidence is None
    assert qa.family(conn, (A, 1, 0)) is None
    assert qa.feature_scores(conn, key, 5) == [qa.FeatureRow(0, "is_digit", "s", -0.2, 0.5)]
    assert qa.roles(conn, (A, 1, 3)) == qa.RolesRow(None, None, "activation", None, None, 0.7)
    assert qa.roles(conn, (A, 0, 1)) is None
    assert qa.entropy_interventions(conn, (A, 1, 0)) == [
        qa.EntropyRow(0.0, True, 1.0, 1.0, 0.5, 0.5, 10),
        qa.EntropyRow(1.0, True, 1.0, 2.0, 1.0, 0.5, 10),
    ]
    assert qa.attention_scores(conn, key, 5) == [qa.AttentionRow(0, 0, 1, 0.5), qa.AttentionRow(1, 1, 0, 0.25)]
    assert qa.attention_scores(conn, key, 1) == [qa.AttentionRow(0, 0, 1, 0.5)]


def test_public_source_keeps_names_and_drops_folders():
    assert qm.public_source("/srv/models/seed-1") == "seed-1"
    assert qm.public_source("C:\\models\\seed-2") == "seed-2"
    assert qm.public_source("~/corpus.txt") == "corpus.txt"
    assert qm.public_source("./here/x") == "x" and qm.public_source("../up/y") == "y"
    assert qm.public_source("stanford-crfm/alias-gpt2-small-x21") == "stanford-crfm/alias-gpt2-small-x21"
    assert qm.public_source("gpt2") == "gpt2"
    assert qm.public_source("/") == "?"


def test_every_statistic_names_the_table_that_holds_its_column(conn):
    aliases = {"n": "neurons", "a": "activation_stats", "w": "weight_stats", "f": "families", "r": "roles"}
    for name, stat in qn.STATISTICS.items():
        alias, column = stat.column.split(".")
        assert stat.name == name and stat.table == aliases[alias]
        assert column in {row[1] for row in conn.execute(f"PRAGMA table_info({stat.table})")}
        assert isinstance(stat.label, str) and stat.label and isinstance(stat.description, str) and stat.description
