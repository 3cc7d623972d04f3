"""Search that ranks (issue 10): one row per neuron, its evidence merged, ranked by a score that these tests
recompute independently from the tables (plain Python over the rows, BLOBs decoded with NumPy); filters; twins
grouped; pages that cover every result once; query plans that read indexes only.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.queries import search as sq
from app.queries.neurons import NeuronFilter
from precompute.store import decode_array, decode_examples
from tests.app.conftest import FULL_RUN, HTML, query

Key = tuple[str, int, int]
#: The feature scores with their features' names (``feature_names``, revision 0005).
SCORES = (
    "(SELECT s.model_id, s.layer, s.neuron, s.rank, f.feature, s.variance_reduction FROM feature_scores s "
    "JOIN feature_names f ON f.model_id = s.model_id AND f.feature_id = s.feature_id)"
)


@pytest.fixture
def client(atlas_db: Path, make_client: Any) -> Any:
    """These tests check what is ranked, not how fast: a generous time limit keeps a busy CI machine from turning
    a page into a 503 (the time limit has tests of its own, tests/app/test_db.py)."""
    return make_client(atlas_db, query_time_limit_ms=20_000)


def models_of(db: Path, run: int = FULL_RUN) -> dict[int, str]:
    return dict(query(db, "SELECT id, name FROM models WHERE run_id = ? ORDER BY id", run))


def expected_scores(db: Path, token_ids: list[int], vocab: dict[int, str]) -> dict[Key, float]:
    """The score of every neuron for these tokens, from the tables, without the app's SQL."""
    names = models_of(db)
    scores: dict[Key, float] = {}

    def offer(model_id: int, layer: int, neuron: int, strength: float) -> None:
        key = (names[model_id], layer, neuron)
        scores[key] = max(scores.get(key, 0.0), strength)

    for model_id, layer, neuron, rank, token_id in token_table_entries(db):
        if model_id in names and token_id in token_ids:
            offer(model_id, layer, neuron, 1 / (1 + rank))
    features = {f"token:{vocab[t]}" for t in token_ids}
    for model_id, layer, neuron, feature, vr in query(
        db, f"SELECT model_id, layer, neuron, feature, variance_reduction FROM {SCORES}"
    ):
        if model_id in names and feature in features:
            offer(model_id, layer, neuron, min(1.0, max(0.0, vr)))
    tops: dict[tuple[int, int, int], list[int]] = {}
    rows = {
        (m, r): np.frombuffer(ids, dtype=f"<u{size}")
        for m, r, size, ids in query(db, "SELECT model_id, dataset_row, itemsize, token_ids FROM example_rows")
    }
    columns = "ranks, bins, bin_ranges, dataset_rows, starts, peaks, activations, lengths, snippets"
    for model_id, layer, neuron, *packed in query(
        db, f"SELECT model_id, layer, neuron, {columns} FROM examples WHERE kind = 'top'"
    ):  # the peak's token from the example's row (revision 0005), not from the table the app searches
        if model_id in names:
            for e in decode_examples(packed):
                token = int(rows[(model_id, e["dataset_row"])][e["start"] + e["peak"]])
                tops.setdefault((model_id, layer, neuron), []).append(token)
    for (model_id, layer, neuron), peaks in tops.items():
        hits = sum(p in token_ids for p in peaks)
        if hits:
            offer(model_id, layer, neuron, hits / len(peaks))
    return scores


def token_table_entries(db: Path) -> Iterator[tuple[int, int, int, int, int]]:
    """(model, layer, neuron, rank, token id) of every entry of the token tables (arrays per neuron and kind)."""
    for model_id, layer, neuron, ids in query(db, "SELECT model_id, layer, neuron, token_ids FROM token_tables"):
        for rank, token_id in enumerate(decode_array(ids).tolist()):
            yield model_id, layer, neuron, rank, token_id


def neuron_facts(db: Path) -> dict[Key, tuple[bool, float | None, int]]:
    """(universal at the run's threshold, excess correlation, model id) of every neuron of the full run."""
    names = models_of(db)
    return {
        (names[m], layer, neuron): (bool(universal), excess, m)
        for m, layer, neuron, universal, excess in query(
            db, "SELECT model_id, layer, neuron, universal, excess_corr FROM neurons"
        )
        if m in names
    }


def expected_order(scores: dict[Key, float], facts: dict[Key, tuple[bool, float | None, int]]) -> list[Key]:
    def key(k: Key) -> tuple[Any, ...]:
        universal, excess, model_id = facts[k]
        return (-scores[k], -int(universal), excess is None, -(excess or 0.0), model_id, k[1], k[2])

    return sorted(scores, key=key)


def all_pages(client: Any, **params: Any) -> Iterator[dict[str, Any]]:
    page = 1
    while True:
        response = client.get("/api/v1/search", params={**params, "page": page, "per_page": 7})
        assert response.status_code == 200, response.text
        body = response.json()
        yield body
        if page >= body["pages"]:
            return
        page += 1


def key_of(ref: dict[str, Any]) -> Key:
    return ref["model"], ref["layer"], ref["neuron"]


def token_search(client: Any, q: str = "def") -> tuple[list[int], dict[int, str]]:
    body = client.get("/api/v1/search", params={"q": q}).json()
    return [t["token_id"] for t in body["tokens"]], {t["token_id"]: t["token"] for t in body["tokens"]}


def test_the_ranking_is_the_independent_recomputation(client, atlas_db):
    token_ids, vocab = token_search(client)
    scores = expected_scores(atlas_db, token_ids, vocab)
    order = expected_order(scores, neuron_facts(atlas_db))
    assert len(order) > 20  # the fixture gives enough neurons to rank
    rows = [item for body in all_pages(client, q="def", group=False) for item in body["items"]]
    assert [key_of(r["neuron"]) for r in rows] == order  # one row per neuron, in the expected order
    for row in rows:
        assert row["score"] == pytest.approx(scores[key_of(row["neuron"])], abs=1e-6)
        assert row["score"] == pytest.approx(max(e["strength"] for e in row["evidence"]), abs=1e-6)
        assert row["best"] == row["evidence"][0]["kind"] and row["twins"] == []


def test_a_token_at_rank_0_ranks_above_one_at_rank_5(client, atlas_db):
    token_ids, vocab = token_search(client)
    scores = expected_scores(atlas_db, token_ids, vocab)
    names = models_of(atlas_db)
    ranks: dict[Key, int] = {}
    for m, layer, neuron, rank, token_id in token_table_entries(atlas_db):
        if m in names and token_id in token_ids:
            key = (names[m], layer, neuron)
            ranks[key] = min(rank, ranks.get(key, rank))
    first = next(k for k, r in ranks.items() if r == 0)
    # a neuron whose best evidence is the token at rank 5 or lower in a token table
    later = next(k for k, r in ranks.items() if r >= 5 and scores[k] == 1 / (1 + r))
    rows = [key_of(i["neuron"]) for body in all_pages(client, q="def", group=False) for i in body["items"]]
    assert rows.index(first) < rows.index(later)


def test_pages_cover_every_grouped_result_exactly_once(client, atlas_db):
    token_ids, vocab = token_search(client)
    expected = set(expected_scores(atlas_db, token_ids, vocab))
    seen: list[Key] = []
    bodies = list(all_pages(client, q="def"))
    for body in bodies:
        assert len(body["items"]) <= body["per_page"]
        for item in body["items"]:
            seen.append(key_of(item["neuron"]))
            seen += [key_of(t["neuron"]) for t in item["twins"] if t["grouped"]]
    assert len(seen) == len(set(seen)) == bodies[0]["neurons"]
    assert set(seen) == expected
    assert sum(len(b["items"]) for b in bodies) == bodies[0]["total"] < bodies[0]["neurons"]


def test_twins_are_the_best_matches_and_sit_together(client, atlas_db):
    names = models_of(atlas_db)
    best = {
        ((names[m], layer, neuron), names[p]): (pl, pn, corr)
        for m, layer, neuron, p, pl, pn, corr in query(
            atlas_db,
            "SELECT model_id, layer, neuron, partner_model_id, partner_layer, partner_neuron, corr FROM matches "
            "WHERE rank = 0",
        )
        if m in names
    }
    grouped_pairs = 0
    for body in all_pages(client, q="def"):
        for item in body["items"]:
            leader = key_of(item["neuron"])
            partners = [t["neuron"]["model"] for t in item["twins"]]
            assert partners == [n for n in names.values() if n != leader[0]]  # one per other model, in run order
            for twin in item["twins"]:
                layer, neuron, corr = best[(leader, twin["neuron"]["model"])]
                assert (twin["neuron"]["layer"], twin["neuron"]["neuron"]) == (layer, neuron)
                assert twin["corr"] == pytest.approx(corr, abs=1e-6)
                assert (twin["score"] is None) == (twin["evidence"] == [])
                if twin["grouped"]:
                    assert twin["score"] is not None and twin["score"] <= item["score"] + 1e-9
                if {leader[0], twin["neuron"]["model"]} == {"tiny-a", "tiny-a-permuted"}:
                    # the permuted copy is the same network: its twin has corr 1, the same evidence, and sits here
                    assert twin["corr"] == pytest.approx(1.0, abs=1e-4)
                    assert twin["grouped"] and twin["score"] == item["score"]
                    grouped_pairs += 1
    assert grouped_pairs > 0


def test_filters(client, atlas_db):
    token_ids, vocab = token_search(client)
    scores = expected_scores(atlas_db, token_ids, vocab)
    facts = neuron_facts(atlas_db)
    for params, keep in (
        ({"layer": 1}, lambda k: k[1] == 1),
        ({"model": "tiny-b"}, lambda k: k[0] == "tiny-b"),
        ({"universal": "true"}, lambda k: facts[k][0]),
        ({"universal": "false"}, lambda k: not facts[k][0]),
        ({"family": "none"}, lambda k: True),  # random tiny models: every neuron's family is "none"
        ({"family": "syntax"}, lambda k: False),
        ({"role": "entropy"}, lambda k: True),
        ({"role": "prediction"}, lambda k: False),
    ):
        rows = [key_of(i["neuron"]) for b in all_pages(client, q="def", group=False, **params) for i in b["items"]]
        wanted = expected_order({k: s for k, s in scores.items() if keep(k)}, facts)
        assert rows == wanted, params
    body = client.get("/api/v1/search", params={"q": "def", "layer": 1, "universal": "", "role": ""}).json()
    assert body["filters"] == {"model": None, "layer": 1, "universal": None, "family": None, "role": None}


def test_family_role_and_feature_searches_rank_by_their_strength(client, atlas_db):
    names = models_of(atlas_db)
    facts = neuron_facts(atlas_db)

    def rows(q: str) -> list[dict[str, Any]]:
        return [i for b in all_pages(client, q=q, group=False) for i in b["items"]]

    family = rows("family:none")
    vr = {(names[m], la, n): min(1.0, max(0.0, v or 0.0)) for m, la, n, v in query(
        atlas_db, "SELECT model_id, layer, neuron, best_vr FROM families")
        if m in names}  # fmt: skip
    assert [key_of(r["neuron"]) for r in family] == expected_order(vr, facts)
    assert {r["best"] for r in family} == {"family"}

    entropy = rows("role:entropy")
    rank = {(names[m], la, n): 1 / (1 + r) for m, la, n, r in query(
        atlas_db, "SELECT model_id, layer, neuron, entropy_rank FROM roles WHERE entropy_rank IS NOT NULL")
        if m in names}  # fmt: skip
    assert [key_of(r["neuron"]) for r in entropy] == expected_order(rank, facts)
    assert client.get("/api/v1/search", params={"q": "role:nonsense"}).json()["message"].startswith("unknown role")

    (feature,) = query(atlas_db, f"SELECT feature FROM {SCORES} WHERE feature LIKE 'position:%' LIMIT 1")[0]
    body = client.get("/api/v1/search", params={"q": feature}).json()
    assert body["kind"] == "feature" and body["features"] == [feature]
    found = {(names[m], la, n): min(1.0, max(0.0, v)) for m, la, n, v in query(
        atlas_db, f"SELECT model_id, layer, neuron, variance_reduction FROM {SCORES} WHERE feature = ?",
        feature) if m in names}  # fmt: skip
    assert [key_of(r["neuron"]) for r in rows(feature)] == expected_order(found, facts)
    assert client.get("/api/v1/search", params={"q": f"feature:{feature}"}).json()["neurons"] == len(found)


def test_a_tokens_unigram_feature_is_evidence(client, atlas_db):
    (name,) = query(atlas_db, f"SELECT feature FROM {SCORES} WHERE feature LIKE 'token:%' LIMIT 1")[0]
    body = client.get("/api/v1/search", params={"q": name, "group": "false", "per_page": 200}).json()
    assert body["kind"] == "token" and name in body["features"]
    assert any(e["kind"] == "feature" and e["label"] == name for i in body["items"] for e in i["evidence"])


def test_the_schema_states_the_bounds(client):
    params = {
        p["name"]: p["schema"]
        for p in client.get("/openapi.json").json()["paths"]["/api/v1/search"]["get"]["parameters"]
    }
    assert params["per_page"]["maximum"] == 200 and params["per_page"]["minimum"] == 1
    assert params["page"]["maximum"] == 1000 and params["page"]["minimum"] == 1
    for bad in ({"per_page": 0}, {"per_page": 201}, {"page": 0}, {"role": "nonsense"}, {"layer": -1}):
        assert client.get("/api/v1/search", params={"q": "def", **bad}).status_code == 422, bad
    past = client.get("/api/v1/search", params={"q": "def", "page": 1000}).json()
    assert past["items"] == [] and past["total"] > 0


def test_the_html_page_lists_the_rows_and_pages(client):
    html = client.get("/search", params={"q": "def", "per_page": 5, "page": 2}, headers=HTML).text
    assert 'id="search-hits"' in html and 'class="table-wrap"' in html
    assert 'rel="prev" href="/search?q=def&amp;per_page=5"' in html
    assert 'rel="next" href="/search?q=def&amp;page=3&amp;per_page=5"' in html
    assert 'class="twin' in html


# --- bounded queries -------------------------------------------------------------------------------------------

SEARCHED_TABLES = (
    "token_postings",
    "feature_scores",
    "example_peaks",
    "examples",
    "families",
    "roles",
    "matches",
    "neurons",
)


def plan(conn: sqlite3.Connection, statement: sq.Statement) -> list[str]:
    return [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + statement.sql, statement.params)]


def assert_no_table_scan(lines: list[str]) -> None:
    """No full scan of a table: only the CTEs' bounded rows and json_each's list may be scanned."""
    for line in lines:
        for table in SEARCHED_TABLES:
            assert not line.startswith((f"SCAN {table}", "SCAN e ", "SCAN t ", "SCAN m ")), lines


def test_every_search_statement_reads_index_ranges(atlas_db):
    conn = sqlite3.connect(f"file:{atlas_db}?mode=ro", uri=True)
    ids = [m for m, _ in query(atlas_db, "SELECT id, name FROM models WHERE run_id = ?", FULL_RUN)]
    indexes = sq.present_indexes(conn)
    assert indexes == frozenset(sq.INDEXES.values())  # revision 0004 is applied by the precompute
    (feature,) = query(atlas_db, f"SELECT feature FROM {SCORES} LIMIT 1")[0]
    parts = {
        "token": [
            sq.token_table_evidence(conn, ids, [366, 367]),
            sq.feature_evidence(ids, ["token: def"], indexes),
            sq.example_evidence(ids, [366, 367]),
        ],
        "feature": [sq.feature_evidence(ids, [feature], indexes)],
        "family": [sq.family_evidence(ids, "none", indexes)],
        **{role: [sq.role_evidence(ids, role, indexes)] for role in ("prediction", "activation", "entropy")},
    }
    reads = {"token": ("feature_scores",), "feature": ("feature_scores",), "family": ("families",)}
    filters = (NeuronFilter(), NeuronFilter(layer=1, universal=True, family="none", role="prediction", threshold=0.1))
    for name, statements in parts.items():
        for where in filters:
            lines = plan(conn, sq.ranking_statement(statements, where, 1000))
            assert_no_table_scan(lines)
            for table in reads.get(name, ("roles",)):  # each evidence through its own index
                uses = (f"SEARCH {table} USING INDEX ix_", f"SEARCH {table} USING COVERING INDEX ix_")
                assert any(line.startswith(uses) for line in lines), (name, lines)
            if name == "token":  # the token tables' entries: listed (json_each); the top examples' peaks: a key range
                assert any(line.startswith("SCAN json_each VIRTUAL TABLE") for line in lines), lines
                assert any(line.startswith("SEARCH e USING PRIMARY KEY (model_id=? AND peak_token=?") for line in lines)
    postings = (
        "SELECT postings FROM token_postings WHERE model_id IN (1, 2) AND kind IN (0, 3) AND token_id IN (366, 367)"
    )
    (line,) = plan(conn, sq.Statement(postings, ()))  # one key lookup per model, kind and token
    assert line.startswith("SEARCH token_postings USING") and "(model_id=? AND kind=? AND token_id=?)" in line, line
    keys = [(ids[0], 0, n) for n in range(20)]
    for threshold in (None, 0.1):
        lines = plan(conn, sq.best_matches_statement(keys, ids, threshold))
        assert lines[0].startswith("SCAN c VIRTUAL TABLE"), lines  # the neurons' list, then primary keys
        assert any("PRIMARY KEY (model_id=? AND layer=? AND neuron=?" in line for line in lines), lines
        assert_no_table_scan(lines)
    conn.close()


def test_a_file_without_the_search_indexes_gives_the_same_results(client, atlas_db, make_client):
    before = [i["neuron"]["url"] for b in all_pages(client, q="def") for i in b["items"]]
    with sqlite3.connect(atlas_db) as conn:
        for name in sorted(set(sq.INDEXES.values()) - {"ix_families_family"}):
            conn.execute(f"DROP INDEX {name}")
    older = make_client(atlas_db, query_time_limit_ms=20_000)
    body = older.get("/api/v1/search", params={"q": "def"}).json()
    assert body["examples_complete"]  # the top examples' peaks are their own table (revision 0005)
    assert [i["neuron"]["url"] for b in all_pages(older, q="def") for i in b["items"]] == before
    assert older.get("/api/v1/search", params={"q": "role:entropy"}).json()["neurons"] > 0
