"""Escaping: a model whose vocabulary holds HTML/JS-like tokens renders them as text everywhere.

The family's tokenizer has `NASTY_TOKENS` added (``<script>alert(1)</script>``, ``" onmouseover="alert(2)``,
``'><img src=x onerror=alert(3)>``, control characters, a Jinja-looking ``{{ 7*7 }}``), and the precompute runs on
a text full of them, so they reach the vocab table, the examples, the token tables and search results.
"""

from __future__ import annotations

import html
import re

import pytest
from markupsafe import escape

from tests.app.conftest import HTML
from tests.dashboard_factories import NASTY_TOKENS, copy_atlas

#: The token that a template engine would evaluate to 49.
TEMPLATE_TOKEN = "{{ 7*7 }}"
RAW_MARKUP = ("<script>alert", "<img src=x", 'onmouseover="alert', "<b>bold</b>", "</span><b>")


@pytest.fixture
def xss_client(xss_atlas_template, tmp_path, make_client):
    return make_client(copy_atlas(xss_atlas_template, tmp_path / "xss.db"))


def assert_escaped(text: str) -> None:
    for raw in RAW_MARKUP:
        assert raw not in text, f"unescaped {raw!r}"
    shown = re.sub(r"<textarea[^>]*>.*?</textarea>", "", text, flags=re.DOTALL)  # the user's own text, as typed
    assert "\x07" not in shown and "\x1b" not in shown  # control characters are made visible
    # no template syntax reaches a page but the data's own ``{{ 7*7 }}`` token, shown as it is (never as 49: see
    # `TEMPLATE_TOKEN` in the tests below, which check that it is there)
    assert set(re.findall(r"\{\{.*?\}\}", text)) <= {TEMPLATE_TOKEN}


def test_neuron_pages_render_nasty_tokens_as_text(xss_client):
    models = [m["name"] for m in xss_client.get("/api/v1/models").json()]
    seen = set()
    for model in models:
        for layer, neuron in ((0, 0), (0, 5), (1, 1), (1, 30)):
            page = xss_client.get(f"/models/{model}/neurons/{layer}/{neuron}", headers=HTML)
            assert page.status_code == 200
            assert_escaped(page.text)
            seen |= {
                t for t in NASTY_TOKENS if html.escape(t.replace("\x07", "\\x07").replace("\x1b", "\\x1b")) in page.text
            }
            for kind in ("quantile", "random"):
                fragment = xss_client.get(
                    f"/models/{model}/neurons/{layer}/{neuron}/_partials/examples?kind={kind}", headers=HTML
                )
                assert_escaped(fragment.text)
    assert "<script>alert(1)</script>" in seen, "the fixture should put the script token on the pages"
    assert TEMPLATE_TOKEN in seen, "the template-like token is shown as text, not evaluated"


def test_api_returns_the_raw_decoded_tokens(xss_client):
    model = xss_client.get("/api/v1/models").json()[0]["name"]
    body = xss_client.post(
        f"/api/v1/models/{model}/run", json={"text": "x <script>alert(1)</script> y", "neurons": [[0, 1]]}
    ).json()
    assert "<script>alert(1)</script>" in body["tokens"]  # JSON carries data as it is


def test_live_text_and_search_are_escaped(xss_client):
    model = xss_client.get("/api/v1/models").json()[0]["name"]
    nasty = " ".join(NASTY_TOKENS) + ' "><svg onload=alert(5)>'
    fragment = xss_client.get(f"/models/{model}/neurons/0/1/_partials/live", params={"text": nasty}, headers=HTML)
    assert fragment.status_code == 200
    assert_escaped(fragment.text)
    assert "<svg" not in fragment.text
    assert TEMPLATE_TOKEN in re.sub(r"<textarea[^>]*>.*?</textarea>", "", fragment.text, flags=re.DOTALL)
    page = xss_client.get(f"/models/{model}/neurons/0/1", params={"text": nasty}, headers=HTML)
    assert_escaped(page.text)
    assert "<svg" not in page.text
    twins = xss_client.get(f"/models/{model}/neurons/0/1/_partials/twins", headers=HTML)
    assert_escaped(twins.text)
    for q in ("<script>alert(1)</script>", '" onmouseover="alert(2)', "family:<script>"):
        result = xss_client.get("/search", params={"q": q}, headers=HTML)
        assert result.status_code == 200
        assert_escaped(result.text)
    explorer = xss_client.get(f"/models/{model}", params={"family": "<script>alert(1)</script>"}, headers=HTML)
    assert_escaped(explorer.text)


def test_error_pages_escape_the_request(xss_client):
    page = xss_client.get("/models/<script>alert(1)</script>", headers=HTML)
    assert page.status_code == 404
    assert_escaped(page.text)
    assert "&lt;script&gt;" in page.text


def test_no_inline_event_handlers(xss_client):
    model = xss_client.get("/api/v1/models").json()[0]["name"]
    text = xss_client.get(f"/models/{model}/neurons/0/0", headers=HTML).text
    assert not re.search(r"<[^>]+\son[a-z]+\s*=", text), "inline event handler in the markup"


def test_link_preview_tags_are_escaped(xss_client):
    """A neuron whose best feature is a nasty token: the description and og tags carry it as escaped text."""
    model = xss_client.get("/api/v1/models").json()[0]["name"]
    found = []
    for neuron in range(64):
        family = xss_client.get(f"/api/v1/models/{model}/neurons/0/{neuron}").json()["family"]
        if family and family["best_feature"] and any(t in family["best_feature"] for t in NASTY_TOKENS[:4]):
            found.append((neuron, family["best_feature"]))
    assert found, "the fixture should give some neuron a nasty best feature"
    for neuron, feature in found[:3]:
        page = xss_client.get(f"/models/{model}/neurons/0/{neuron}", headers=HTML).text
        head = page.split("</head>")[0]
        assert_escaped(head)
        expected = str(escape(feature))  # as Jinja's autoescape writes it
        assert '<meta name="description" content="' in head and expected in head
        assert head.count(expected) == 2  # the description and og:description
