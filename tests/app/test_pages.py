"""HTML pages: rendered from the same view model as their JSON twin; panels present or hidden; navigation."""

from __future__ import annotations

import re
import sqlite3

import pytest

from app.viewmodels.explorer import ExplorerPage
from app.viewmodels.index import IndexPage
from app.viewmodels.neuron import ExamplesPanel, NeuronPage
from app.viewmodels.search import SearchPage
from tests.app.conftest import FULL_RUN, HTML, REFERENCE_ONLY_RUN

PANELS = (
    "universality",
    "twins",
    "live",
    "examples",
    "activation",
    "token-tables",
    "weights",
    "vocab",
    "family",
    "roles",
)


@pytest.mark.parametrize(
    ("page_url", "json_url", "view_model"),
    [
        ("/", "/api/v1/", IndexPage),
        ("/models/tiny-a?layer=1&sort=frequency", "/api/v1/models/tiny-a/neurons?layer=1&sort=frequency", ExplorerPage),
        ("/models/tiny-a/neurons/1/7", "/api/v1/models/tiny-a/neurons/1/7", NeuronPage),
        ("/models/tiny-b/neurons/0/2?run=1", "/api/v1/models/tiny-b/neurons/0/2?run=1", NeuronPage),
        ("/search?q=def", "/api/v1/search?q=def", SearchPage),
        ("/?threshold=0.1", "/api/v1/?threshold=0.1", IndexPage),
        (
            "/models/tiny-a?universal=true&threshold=0.4",
            "/api/v1/models/tiny-a/neurons?universal=true&threshold=0.4",
            ExplorerPage,
        ),
        ("/models/tiny-a/neurons/1/7?threshold=0.1", "/api/v1/models/tiny-a/neurons/1/7?threshold=0.1", NeuronPage),
        (
            "/models/tiny-a/neurons/0/3/_partials/examples?kind=quantile",
            "/api/v1/models/tiny-a/neurons/0/3/examples?kind=quantile",
            ExamplesPanel,
        ),
    ],
)
def test_page_context_is_the_json_twins_view_model(client, page_url, json_url, view_model):
    page = client.get(page_url, headers=HTML)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    context = page.context["page"]  # the TestClient exposes the template context
    assert isinstance(context, view_model)
    assert context.model_dump(mode="json") == client.get(json_url).json()


def test_neuron_page_shows_every_panel_and_links_twins(client):
    response = client.get("/models/tiny-a/neurons/0/3", headers=HTML)
    html = response.text
    assert "<title>tiny-a · L0N3 · Universal Neuron Atlas</title>" in html
    for panel in PANELS:
        assert f'id="{panel}"' in html, panel
    page: NeuronPage = response.context["page"]
    for partner in page.partners:
        assert f'href="{partner.best.url}"' in html
    assert page.nav.prev.id == "L0N2" and page.nav.next.id == "L0N4"
    assert 'class="plot-spec"' in html and "/static/vendor/plotly.min.js?v=" in html
    assert response.headers["link"] == '</api/v1/models/tiny-a/neurons/0/3>; rel="alternate"; type="application/json"'
    assert len(response.content) < 300_000


def test_neighbours_wrap_across_layers(client):
    first = client.get("/api/v1/models/tiny-a/neurons/0/0").json()["nav"]
    last = client.get("/api/v1/models/tiny-a/neurons/0/63").json()["nav"]
    end = client.get("/api/v1/models/tiny-a/neurons/1/63").json()["nav"]
    assert first["prev"] is None and last["next"]["id"] == "L1N0" and end["next"] is None


def test_reference_only_run_hides_absent_analyses(client):
    html = client.get(f"/models/tiny-b/neurons/0/2?run={REFERENCE_ONLY_RUN}", headers=HTML).text
    for panel in ("twins", "examples", "activation", "weights", "family", "roles"):
        assert f'id="{panel}"' not in html, panel
    assert 'hx-get="/models/tiny-b/neurons/0/2/_partials/vocab?run=1&amp;tokens=true"' in html  # from the weights
    assert "no aggregates" in html and "have not been computed yet" in html
    # links made on a non-default run keep it
    assert f'href="/models/tiny-b/neurons/0/3?run={REFERENCE_ONLY_RUN}"' in html


def test_dead_neuron_renders(atlas_db, make_client):
    with sqlite3.connect(atlas_db) as conn:  # a fixture variation: neuron L1N9 of tiny-a never fired
        model_id = conn.execute("SELECT id FROM models WHERE run_id = ? AND name = 'tiny-a'", (FULL_RUN,)).fetchone()[0]
        conn.execute(
            "UPDATE neurons SET dead = 1, max_corr = NULL, mean_corr = NULL, min_corr = NULL, max_baseline = NULL, "
            "mean_baseline = NULL, min_baseline = NULL, excess_corr = NULL, universal = NULL "
            "WHERE model_id = ? AND layer = 1 AND neuron = 9",
            (model_id,),
        )
        for table in ("partner_scores", "matches", "examples"):
            conn.execute(f"DELETE FROM {table} WHERE model_id = ? AND layer = 1 AND neuron = 9", (model_id,))
    client = make_client(atlas_db)
    response = client.get("/models/tiny-a/neurons/1/9", headers=HTML)
    assert response.status_code == 200
    assert "badge dead" in response.text and "never varied" in response.text
    body = client.get("/api/v1/models/tiny-a/neurons/1/9").json()
    assert body["dead"] is True and body["matches"] == [] and body["examples"] is None and body["twins_url"] is None


def test_runs_that_are_not_complete_are_listed_but_not_browsable(atlas_db, make_client):
    with sqlite3.connect(atlas_db) as conn:
        conn.execute(
            "INSERT INTO runs (id, created_at, status, config_hash, config, environment, dataset) "
            "VALUES (7, '2030-01-01', 'running', 'x', '{}', '{}', '{}')"
        )
    client = make_client(atlas_db)
    runs = client.get("/api/v1/runs").json()
    assert runs[0]["id"] == 7 and runs[0]["status"] == "running" and runs[0]["url"] is None
    assert client.get("/api/v1/models").json()[0]["run"] == FULL_RUN  # the default stays the newest complete run
    response = client.get("/api/v1/models?run=7")
    assert response.status_code == 404 and "running" in response.json()["error"]


def test_etag_and_304(client):
    first = client.get("/api/v1/models/tiny-a/neurons/0/3")
    tag = first.headers["etag"]
    assert first.headers["cache-control"] == "no-cache"
    again = client.get("/api/v1/models/tiny-a/neurons/0/3", headers={"if-none-match": tag})
    assert again.status_code == 304 and again.content == b""
    page = client.get("/models/tiny-a/neurons/0/3", headers={**HTML, "if-none-match": tag})
    assert page.status_code == 304


def test_index_page(client):
    html = client.get("/", headers=HTML).text
    assert html.count('class="plot-spec"') == 6  # per model: layer counts and the Fig. 2a distributions
    assert 'href="/?run=1"' in html and 'href="/models/tiny-a-permuted"' in html


def test_explorer_keeps_its_state_in_the_url(client):
    url = "/models/tiny-a?layer=1&universal=true&range=excess_corr:0.2:&sort=frequency&order=asc&limit=5"
    response = client.get(url, headers=HTML)
    page: ExplorerPage = response.context["page"]
    assert page.filters.layer == 1 and page.filters.universal is True and page.sort == "frequency"
    assert page.items, "the fixture has universal layer-1 neurons above 0.2: the check below is not vacuous"
    assert all(item.layer == 1 and item.universal and item.excess_corr >= 0.2 for item in page.items)
    values = [item.values["frequency"] for item in page.items]
    assert values == sorted(values)
    html = response.text
    assert '<option value="1" selected>1</option>' in html and 'value="excess_corr:0.2:"' in html
    if page.total > 5:
        assert page.next_url and "offset=5" in page.next_url and "range=excess_corr%3A0.2%3A" in page.next_url
    assert 'hx-get="/models/tiny-a/_partials/scatter?' in html


def test_explorer_scatter_fragment(client):
    response = client.get("/models/tiny-a/_partials/scatter?x=vocab_kurt&y=excess_corr&color=family", headers=HTML)
    assert response.status_code == 200
    assert 'data-neuron-url="/models/tiny-a/neurons/{layer}/{neuron}"' in response.text


def test_csv_export_is_what_is_filtered(client):
    response = client.get("/api/v1/models/tiny-a/neurons.csv?layer=0&universal=true")
    assert response.headers["content-type"].startswith("text/csv")
    lines = response.text.strip().splitlines()
    header = lines[0].split(",")
    assert header[:8] == ["model", "id", "layer", "neuron", "dead", "universal", "family", "vocab_role"]
    assert "excess_corr" in header and "vocab_kurt" in header
    total = int(response.headers["x-total-count"])
    assert len(lines) - 1 == total > 0
    assert all(line.split(",")[2] == "0" and line.split(",")[5] == "1" for line in lines[1:])
    assert response.headers["x-truncated"] == "false"


def test_random_respects_filters(client):
    response = client.get("/models/tiny-a/random?universal=true&layer=1", follow_redirects=False)
    assert response.status_code == 307
    match = re.fullmatch(r"/models/tiny-a/neurons/1/(\d+)", response.headers["location"])
    assert match
    assert client.get(f"/api/v1/models/tiny-a/neurons/1/{match[1]}").json()["universal"] is True
    assert client.get("/models/tiny-a/random?layer=1&range=excess_corr:5:", follow_redirects=False).status_code == 404


@pytest.mark.parametrize(
    ("q", "location"),
    [
        ("L1N2", "/models/tiny-a/neurons/1/2"),
        ("1:2", "/models/tiny-a/neurons/1/2"),
        ("l1.2", "/models/tiny-a/neurons/1/2"),
        ("tiny-b/L0N5", "/models/tiny-b/neurons/0/5"),
        ("tiny-a-permuted:L1N63", "/models/tiny-a-permuted/neurons/1/63"),
    ],
)
def test_jump_box(client, q, location):
    response = client.get("/search", params={"q": q}, headers=HTML, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == location


def test_jump_box_keeps_the_model_and_run(client):
    response = client.get(
        "/search", params={"q": "L0N1", "model": "tiny-b", "run": REFERENCE_ONLY_RUN}, follow_redirects=False
    )
    assert response.headers["location"] == f"/models/tiny-b/neurons/0/1?run={REFERENCE_ONLY_RUN}"


def test_search_by_token_and_family(client):
    body = client.get("/api/v1/search", params={"q": "def"}).json()
    assert body["kind"] == "token" and body["tokens"][0]["token"].strip() == "def"
    evidence = [e for item in body["items"] for e in item["evidence"]]
    assert evidence and {e["kind"] for e in evidence} <= {
        "mean_activation",
        "max_activation",
        "unembed_top",
        "unembed_bottom",
        "embed_top",
        "top_examples",
        "feature",
    }
    assert all(e["token"].strip().casefold() == "def" for e in evidence if e["token"] is not None)
    label = body["families"][0]  # random tiny models: the families stage labels them all "none"
    family = client.get("/api/v1/search", params={"q": f"family:{label}", "model": "tiny-a"}).json()
    assert family["kind"] == "family" and family["items"]
    assert all(h["neuron"]["model"] == "tiny-a" for h in family["items"])
    html = client.get("/search", params={"q": f"family:{label}"}, headers=HTML).text
    assert 'id="search-hits"' in html
    nothing = client.get("/api/v1/search", params={"q": "no-such-token-xyz"}).json()
    assert nothing["items"] == [] and "no token" in nothing["message"]


def test_static_files_are_cached_and_local(client):
    html = client.get("/models/tiny-a/neurons/0/3", headers=HTML).text
    urls = re.findall(r'(?:src|href)="(/static/[^"]+)"', html)
    assert {u.split("?")[0] for u in urls} == {
        "/static/app.css",
        "/static/app.js",
        "/static/vendor/htmx.min.js",
        "/static/vendor/plotly.min.js",
    }
    # nothing from a CDN: the only absolute URLs are the page's own (canonical link, og:url, for link previews)
    assert set(re.findall(r"https?://[^/\"]*", html)) == {"http://testserver"}
    for url in urls:
        response = client.get(url)
        assert response.status_code == 200
        assert response.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert client.get(url, headers={"if-none-match": response.headers["etag"]}).status_code == 304
    assert client.get("/static/app.css").headers["cache-control"] == "public, max-age=86400"
    assert client.get("/static/../app/main.py").status_code == 404


def test_browsers_get_html_errors_and_fragments_get_fragments(atlas_db, make_client):
    client = make_client(atlas_db, live_max_chars=100)
    page = client.get("/models/tiny-a/neurons/5/5", headers=HTML)
    assert page.status_code == 404 and page.headers["content-type"].startswith("text/html")
    assert "has no neuron L5N5" in page.text
    fragment = client.get("/models/tiny-a/neurons/0/3/_partials/live", params={"text": "x" * 150}, headers=HTML)
    assert fragment.status_code == 413 and fragment.text.startswith('<p class="error"')
    # beyond what a URL carries (MAX_TEXT_IN_URL), the request schema refuses it
    fragment = client.get("/models/tiny-a/neurons/0/3/_partials/live", params={"text": "x" * 3000}, headers=HTML)
    assert fragment.status_code == 422 and fragment.text.startswith('<p class="error"')


def test_universal_neighbours_match_a_brute_force(client):
    listed = client.get("/api/v1/models/tiny-a/neurons?universal=true&sort=layer&order=asc&limit=1000").json()
    universal = [(item["layer"], item["neuron"]) for item in listed["items"]]
    assert universal == sorted(universal)
    for layer, neuron in ((0, 0), (0, 31), (1, 5), (1, 63)):
        nav = client.get(f"/api/v1/models/tiny-a/neurons/{layer}/{neuron}").json()["nav"]
        after = [u for u in universal if u > (layer, neuron)]
        before = [u for u in universal if u < (layer, neuron)]
        assert (nav["next_universal"] and (nav["next_universal"]["layer"], nav["next_universal"]["neuron"])) == (
            after[0] if after else None
        )
        assert (nav["prev_universal"] and (nav["prev_universal"]["layer"], nav["prev_universal"]["neuron"])) == (
            before[-1] if before else None
        )
