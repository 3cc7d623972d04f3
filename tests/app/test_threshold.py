"""The universality threshold (``?threshold=``): the run's by default; any finite number in [-1, 2] recounts the front
page, the explorer (list, CSV, scatter, random) and the neuron page consistently with the neurons in the file;
every link keeps it (and stays clean at the run's threshold); anything else is a 422 in the one error shape."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from app import plots
from app.queries import models as mq
from tests.app.conftest import FULL_RUN, HTML, REFERENCE_ONLY_RUN, query

#: A threshold below the run's 0.3 with tiny-b neurons on both sides of it (tests below check the fixture has them).
CUSTOM = 0.1
THRESHOLDS = (-1.0, CUSTOM, 0.4, 2.0)


def run_threshold(db: Path, run: int = FULL_RUN) -> float:
    return json.loads(query(db, "SELECT config FROM runs WHERE id = ?", run)[0][0])["threshold"]


def excess_of(db: Path, model: str, run: int = FULL_RUN) -> dict[tuple[int, int], float | None]:
    """Every neuron's excess correlation, read straight from the file."""
    rows = query(
        db,
        "SELECT n.layer, n.neuron, n.excess_corr FROM neurons n JOIN models m ON m.id = n.model_id "
        "WHERE m.run_id = ? AND m.name = ?",
        run,
        model,
    )
    return {(layer, neuron): excess for layer, neuron, excess in rows}


def reference_excess(db: Path) -> dict[tuple[int, int], float]:
    """tiny-a's excess correlations in the reference-only run, recomputed from its partner scores (paper eq. 3: the
    mean over partners of the best correlation minus that of the best rotated unit), not read from ``neurons``."""
    rows = query(
        db,
        "SELECT p.layer, p.neuron, avg(p.max_corr) - avg(p.baseline_corr), count(*) FROM partner_scores p "
        "JOIN models m ON m.id = p.model_id WHERE m.run_id = ? AND m.name = 'tiny-a' GROUP BY 1, 2",
        REFERENCE_ONLY_RUN,
    )
    assert rows and all(n == 2 for *_, n in rows)  # both other models are partners of the reference
    return {(layer, neuron): excess for layer, neuron, excess, _ in rows}


def above(excess: dict[tuple[int, int], float | None], threshold: float, layer: int | None = None) -> set:
    return {k for k, e in excess.items() if e is not None and e > threshold and (layer is None or k[0] == layer)}


def threshold_of(url: str) -> list[str]:
    return parse_qs(urlparse(url).query).get("threshold", [])


def test_the_default_is_the_runs_threshold_and_links_stay_clean(client, atlas_db):
    default = run_threshold(atlas_db)
    for url in (
        "/api/v1/",
        "/api/v1/models/tiny-a",
        "/api/v1/models/tiny-a/neurons?limit=5",
        "/api/v1/models/tiny-a/scatter",
        "/api/v1/models/tiny-a/neurons/0/3",
    ):
        plain = client.get(url).json()
        assert plain["threshold"] == default, url
        separator = "&" if "?" in url else "?"
        # the run's own threshold, given explicitly, is the same view with the same (clean) links
        assert client.get(f"{url}{separator}threshold={default}").json() == plain, url
        assert "threshold=" not in json.dumps(plain), url
    index = client.get("/api/v1/").json()
    stored = {
        row[0]: row[1] for row in query(atlas_db, "SELECT model_id, sum(n_universal) FROM layer_summaries GROUP BY 1")
    }
    ids = dict(query(atlas_db, "SELECT name, id FROM models WHERE run_id = ?", FULL_RUN))
    assert {o["model"]["name"]: o["model"]["n_universal"] for o in index["models"]} == {
        name: stored[i] for name, i in ids.items()
    }
    # and the stored per-layer aggregates are those of the neurons at the run's threshold, not at another one
    # (tiny-a has neurons between the run's 0.3 and the paper's 0.5)
    excess_a = excess_of(atlas_db, "tiny-a")
    assert above(excess_a, default) - above(excess_a, 0.5)
    for name, model_id in ids.items():
        excess = excess_of(atlas_db, name)
        for layer, n_universal, mean_excess, max_excess in query(
            atlas_db,
            "SELECT layer, n_universal, mean_excess, max_excess FROM layer_summaries WHERE model_id = ?",
            model_id,
        ):
            values = [e for (lay, _), e in excess.items() if lay == layer and e is not None]
            assert n_universal == len(above(excess, default, layer)), (name, layer)
            assert mean_excess == pytest.approx(sum(values) / len(values), abs=1e-9)
            assert max_excess == pytest.approx(max(values), abs=1e-9)


def test_front_page_counts_follow_the_threshold(client, atlas_db):
    for threshold in THRESHOLDS:
        index = client.get("/api/v1/", params={"threshold": threshold}).json()
        assert index["threshold"] == threshold
        for overview in index["models"]:
            name = overview["model"]["name"]
            excess = excess_of(atlas_db, name)
            assert overview["threshold"] == threshold
            assert overview["model"]["n_universal"] == len(above(excess, threshold)), (name, threshold)
            assert overview["fraction_universal"] == pytest.approx(
                len(above(excess, threshold)) / len(excess), abs=1e-6
            )
            for layer in overview["layers"]:
                assert layer["n_universal"] == len(above(excess, threshold, layer["layer"]))
                assert threshold_of(layer["url"]) == [str(threshold)]
            for top in overview["top"]:
                assert top["universal"] == (excess[(top["layer"], top["neuron"])] > threshold)
                assert threshold_of(top["url"]) == [str(threshold)]
            assert threshold_of(overview["model"]["url"]) == [str(threshold)]
            # the model's own overview and the models list say the same
            assert client.get(f"/api/v1/models/{name}", params={"threshold": threshold}).json() == overview
        models = client.get("/api/v1/models", params={"threshold": threshold}).json()
        assert [m["n_universal"] for m in models] == [o["model"]["n_universal"] for o in index["models"]]


def test_models_without_aggregates_stay_without_counts(client, atlas_db):
    index = client.get("/api/v1/", params={"run": REFERENCE_ONLY_RUN, "threshold": CUSTOM}).json()
    counts = {o["model"]["name"]: o["model"]["n_universal"] for o in index["models"]}
    assert counts["tiny-a"] == len(above(reference_excess(atlas_db), CUSTOM)) > 0
    assert counts["tiny-b"] is None and counts["tiny-a-permuted"] is None
    assert all(layer["n_universal"] is None for o in index["models"][1:] for layer in o["layers"])
    assert index["models"][0]["model"]["url"] == f"/models/tiny-a?run={REFERENCE_ONLY_RUN}&threshold={CUSTOM}"


def test_explorer_filters_colours_and_exports_at_the_threshold(client, atlas_db):
    excess = excess_of(atlas_db, "tiny-b")
    universal, total = above(excess, CUSTOM), len(excess)
    assert 0 < len(universal) < len(above(excess, -1.0))  # the fixture has neurons on both sides of 0.1
    assert above(excess, run_threshold(atlas_db)) == set()  # and none above the run's threshold

    body = client.get("/api/v1/models/tiny-b/neurons", params={"universal": "true", "threshold": CUSTOM}).json()
    assert body["threshold"] == CUSTOM and body["total"] == len(universal)
    assert {(i["layer"], i["neuron"]) for i in body["items"]} == universal
    assert all(i["universal"] is True for i in body["items"])
    assert body["model"]["n_universal"] == len(universal)
    for key in ("url", "api_url", "csv_url", "scatter_url", "scatter_api_url", "random_url"):
        assert threshold_of(body[key]) == [str(CUSTOM)], key
    assert all(threshold_of(i["url"]) == threshold_of(i["api_url"]) == [str(CUSTOM)] for i in body["items"])
    rest = client.get("/api/v1/models/tiny-b/neurons", params={"universal": "false", "threshold": CUSTOM}).json()
    assert rest["total"] == total - len(universal)  # no neuron of this model lacks an excess
    page = client.get("/api/v1/models/tiny-b/neurons", params={"limit": 2, "threshold": CUSTOM}).json()
    assert threshold_of(page["next_url"]) == [str(CUSTOM)]
    assert sum(i["universal"] for i in page["items"]) == len(
        universal & {(i["layer"], i["neuron"]) for i in page["items"]}
    )

    export = client.get("/api/v1/models/tiny-b/neurons.csv", params={"threshold": CUSTOM})
    assert export.headers["x-universal-threshold"] == str(CUSTOM)
    rows = list(csv.DictReader(io.StringIO(export.text)))
    assert {(int(r["layer"]), int(r["neuron"])) for r in rows if r["universal"] == "1"} == universal
    assert len(rows) == total

    scatter = client.get("/api/v1/models/tiny-b/scatter", params={"color": "universal", "threshold": CUSTOM}).json()
    assert scatter["threshold"] == CUSTOM and scatter["colors"].count("universal") == len(universal)
    assert threshold_of(scatter["neuron_url_template"]) == [str(CUSTOM)]

    picked = client.get(
        "/models/tiny-b/random", params={"universal": "true", "threshold": CUSTOM}, follow_redirects=False
    )
    assert picked.status_code == 307 and threshold_of(picked.headers["location"]) == [str(CUSTOM)]
    layer, neuron = map(int, urlparse(picked.headers["location"]).path.split("/")[-2:])
    assert (layer, neuron) in universal
    # at the run's threshold tiny-b has no universal neuron at all
    assert client.get("/models/tiny-b/random?universal=true", follow_redirects=False).status_code == 404


def test_neuron_page_at_the_threshold(client, atlas_db):
    excess = excess_of(atlas_db, "tiny-a")
    default = run_threshold(atlas_db)
    layer, neuron = min(k for k, e in excess.items() if CUSTOM < e <= default)  # universal only at CUSTOM
    url = f"/api/v1/models/tiny-a/neurons/{layer}/{neuron}"
    assert client.get(url).json()["universal"] is False
    body = client.get(url, params={"threshold": CUSTOM}).json()
    assert body["universal"] is True and body["threshold"] == CUSTOM
    assert body["permalink"] == f"/models/tiny-a/neurons/{layer}/{neuron}?run={FULL_RUN}&threshold={CUSTOM}"
    for key in ("url", "api_url"):
        assert threshold_of(body[key]) == [str(CUSTOM)]
    links = [p["best"]["url"] for p in body["partners"]] + [m["url"] for m in body["matches"] + body["matched_by"]]
    assert links and all(threshold_of(link) == [str(CUSTOM)] for link in links)
    nav = body["nav"]
    for key in ("random_url", "random_universal_url", "model_url", "layer_url"):
        assert threshold_of(nav[key]) == [str(CUSTOM)], key
    neighbours = [nav[key] for key in ("prev", "next", "prev_universal", "next_universal") if nav[key]]
    assert len(neighbours) >= 2 and all(threshold_of(n["url"]) == [str(CUSTOM)] for n in neighbours)
    # the universal neighbours at 0.4 (some neurons above, some below) against a brute force over the file
    for threshold in (0.4, default):
        ordered = sorted(above(excess, threshold))
        for key in ((0, 0), (0, 40), (1, 10), (1, 63)):
            nav = client.get(
                f"/api/v1/models/tiny-a/neurons/{key[0]}/{key[1]}", params={"threshold": threshold}
            ).json()["nav"]
            after = [u for u in ordered if u > key]
            before = [u for u in ordered if u < key]
            found_next = nav["next_universal"] and (nav["next_universal"]["layer"], nav["next_universal"]["neuron"])
            found_prev = nav["prev_universal"] and (nav["prev_universal"]["layer"], nav["prev_universal"]["neuron"])
            assert found_next == (after[0] if after else None), (threshold, key)
            assert found_prev == (before[-1] if before else None), (threshold, key)


def test_search_keeps_the_threshold(client):
    jump = client.get("/search", params={"q": "L1N2", "threshold": CUSTOM}, headers=HTML, follow_redirects=False)
    assert jump.status_code == 303 and jump.headers["location"] == f"/models/tiny-a/neurons/1/2?threshold={CUSTOM}"
    body = client.get("/api/v1/search", params={"q": "def", "threshold": CUSTOM}).json()
    hits = body["items"] + [t for item in body["items"] for t in item["twins"]]
    assert hits and all(threshold_of(h["neuron"]["url"]) == [str(CUSTOM)] for h in hits)
    assert body["threshold"] == CUSTOM and threshold_of(body["next_url"]) == [str(CUSTOM)]


def test_pages_show_and_keep_the_threshold(client):
    index = client.get("/", params={"threshold": CUSTOM}, headers=HTML)
    html = index.text
    assert f'name="threshold" id="threshold-value" value="{CUSTOM}"' in html
    assert 'id="threshold-counts"' in html and 'href="/">back to the run' in html
    assert index.headers["link"].startswith(f"</api/v1/?threshold={CUSTOM}>")
    counts = {o.model.name: o.model.n_universal for o in index.context["page"].models}
    for name, n in counts.items():
        assert f'<tr data-model="{name}">' in html and f'<td class="num count">{n}</td>' in html
    # Fig. 2a marks the threshold with a vertical line, inside the range shown
    figure = plots.universality_distributions(index.context["page"].models[0])
    assert figure["layout"]["shapes"][0]["x0"] == CUSTOM and html.count(f'"x0":{CUSTOM}') == 3
    low, high = figure["layout"]["xaxis"]["range"]
    assert low < CUSTOM < high

    explorer = client.get("/models/tiny-a", params={"threshold": CUSTOM}, headers=HTML).text
    assert f'name="threshold" value="{CUSTOM}"' in explorer
    assert '<input type="hidden" name="threshold"' in explorer  # the header's search box keeps it
    neuron = client.get("/models/tiny-a/neurons/0/3", params={"threshold": CUSTOM}, headers=HTML).text
    hidden = f'<input type="hidden" name="threshold" value="{CUSTOM}">'
    assert neuron.count(hidden) == 4  # search, jump, live text, intervention
    assert f"threshold {CUSTOM} (the run" in neuron
    assert 'name="threshold"' not in client.get("/models/tiny-a/neurons/0/3", headers=HTML).text


def test_a_plain_form_submission_with_empty_fields_works(client):
    """The explorer's GET form sends every field, empty ones as ``name=``: they mean "not given"."""
    url = (
        "/models/tiny-a?layer=&universal=&dead=&family=&role=&range=&range=excess_corr:0.2:&sort=excess_corr"
        f"&order=desc&threshold={CUSTOM}&x=excess_corr&y=mean_baseline&color=layer&limit="
    )
    page = client.get(url, headers=HTML)
    assert page.status_code == 200, page.text
    context = page.context["page"]
    assert context.threshold == CUSTOM and context.filters.ranges[0].low == 0.2 and context.limit == 50
    # The threshold fields are required (always sent with a value): an empty one is no number, as the schema says.
    empty = client.get("/api/v1/?threshold=")
    assert empty.status_code == 422 and [d["loc"] for d in empty.json()["detail"]] == [["query", "threshold"]]


BAD_VALUES = ("nan", "inf", "-inf", "1e999", "2.01", "-1.5", "abc", "0.3x", "")
ROUTES = (
    "/api/v1/",
    "/",
    "/api/v1/models",
    "/api/v1/models/tiny-a",
    "/models/tiny-a",
    "/api/v1/models/tiny-a/neurons",
    "/api/v1/models/tiny-a/neurons.csv",
    "/api/v1/models/tiny-a/scatter",
    "/models/tiny-a/random",
    "/models/tiny-a/neurons/0/3",
    "/api/v1/models/tiny-a/neurons/0/3",
    "/api/v1/search",
)


def test_an_invalid_threshold_is_422_in_the_one_shape(client):
    for route in ROUTES:
        for value in BAD_VALUES:
            response = client.get(route, params={"threshold": value}, follow_redirects=False)
            assert response.status_code == 422, (route, value, response.text)
            assert response.headers["content-type"].startswith("application/json")
            body = response.json()
            assert list(body) == ["error", "status", "detail"] and body["status"] == 422
            assert [d["loc"] for d in body["detail"]] == [["query", "threshold"]]  # said once
    for value in ("-1", "2", "0", "1e-3"):  # the bounds are allowed
        assert client.get("/api/v1/", params={"threshold": value}).status_code == 200


def test_threshold_counts_read_a_range_of_the_excess_index(atlas_db):
    with sqlite3.connect(f"file:{atlas_db}?mode=ro", uri=True) as conn:
        for sql in (mq.ABOVE_SQL, mq.ABOVE_BY_LAYER_SQL):
            plan = " ".join(row[-1] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", (1, 0.3)))
            assert "USING" in plan and "INDEX ix_neurons_model_excess (model_id=? AND excess_corr>?)" in plan, plan
        plan = " ".join(row[-1] for row in conn.execute(f"EXPLAIN QUERY PLAN {mq.ABOVE_SQL}", (1, 0.3)))
        assert "COVERING INDEX" in plan
