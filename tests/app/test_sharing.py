"""Link previews (issue 10): every neuron page's <head> has a title, a one-line description (excess correlation,
family, role), Open Graph tags and a canonical link to the permalink pinned to its run, all escaped."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest

from tests.app.conftest import HTML, REFERENCE_ONLY_RUN


class Head(HTMLParser):
    """The <title>, <meta> and <link rel=canonical> of a page, with their attributes unescaped."""

    def __init__(self) -> None:
        super().__init__()
        self.meta: dict[str, str] = {}
        self.links: dict[str, str] = {}
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag == "meta" and ("name" in values or "property" in values):
            self.meta[values.get("name") or values["property"]] = values.get("content", "")
        elif tag == "link" and "rel" in values:
            self.links[values["rel"]] = values.get("href", "")
        self._in_title = tag == "title"

    def handle_endtag(self, tag: str) -> None:
        self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data


def head_of(html: str) -> Head:
    parser = Head()
    parser.feed(html.split("</head>")[0])
    return parser


@pytest.mark.parametrize(
    ("url", "permalink"),
    [
        ("/models/tiny-a/neurons/0/3", "/models/tiny-a/neurons/0/3?run=2"),
        ("/models/tiny-b/neurons/1/5?threshold=0.1", "/models/tiny-b/neurons/1/5?run=2&threshold=0.1"),
        (f"/models/tiny-b/neurons/0/2?run={REFERENCE_ONLY_RUN}", "/models/tiny-b/neurons/0/2?run=1"),
    ],
)
def test_a_neuron_page_previews_well(client, url, permalink):
    response = client.get(url, headers=HTML)
    page = response.context["page"]
    head = head_of(response.text)
    absolute = "http://testserver" + permalink
    assert head.title == f"{page.model} · {page.id} · Universal Neuron Atlas"
    assert head.links["canonical"] == head.meta["og:url"] == absolute  # pinned to the run
    assert head.meta["og:type"] == "website"
    assert head.meta["og:title"].startswith(f"{page.model} {page.id}")
    description = head.meta["description"]
    assert description == head.meta["og:description"] == page.share_description
    assert "\n" not in description and description.startswith(f"{page.model} {page.id}: ")
    if page.excess_corr is None:
        assert "no universality scores" in description
    else:
        assert f"excess correlation {page.excess_corr:.3f}" in description
        assert ("(universal at" in description) == bool(page.universal)
    assert "; family: " in description and "; role: " in description
    if page.family:
        assert f"best feature {page.family.best_feature}" in description


def test_other_pages_have_a_description(client):
    for url in ("/", "/models/tiny-a", "/search?q=def"):
        head = head_of(client.get(url, headers=HTML).text)
        assert head.meta["description"].startswith("Universal neurons")
