"""The paper's published tables in a real headless Chromium (issue 7): the front page shows them next to the
fixture's family, a published neuron's page says what the table lacks, and the comparison's plot renders."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.main import main
from tests.dashboard_factories import copy_atlas

pytestmark = pytest.mark.browser

MEDIUM = "stanford-gpt2-medium-a"


@pytest.fixture
def paper_atlas(family_atlas: Path, tmp_path: Path) -> Path:
    db = copy_atlas(family_atlas, tmp_path / "paper.db")
    assert main(["import-paper", "--db", str(db)]) == 0
    return db


def test_front_page_and_a_published_neuron(serve, paper_atlas, page, screenshot):
    base = serve(paper_atlas)
    page.goto(base + "/")
    # two plots per model: the three published models and the fixture's newest run of three
    page.wait_for_function("document.querySelectorAll('.plot[data-rendered]').length == 12")
    assert page.locator(".run-group").count() == 4
    headings = page.locator(".run-heading").all_inner_texts()
    assert sum("published" in h for h in headings) == 3 and any("universal.csv" in h for h in headings)
    counts = dict(
        zip(
            page.locator("#threshold-counts tr[data-model] td:first-child").all_inner_texts(),
            page.locator("#threshold-counts td.count").all_inner_texts(),
            strict=True,
        )
    )
    assert {k: counts[k] for k in ("stanford-gpt2-small-a", MEDIUM, "pythia-160m")} == {
        "stanford-gpt2-small-a": "1533",
        MEDIUM: "1211",
        "pythia-160m": "465",
    }
    screenshot(page, "index-published")

    # a published neuron: the paper's numbers and labels, one note on what the table lacks, nothing live
    page.goto(f"{base}/models/{MEDIUM}/neurons/23/3440")
    assert page.locator("#neuron-id").inner_text() == "L23N3440"
    note = page.locator("#published").inner_text()
    assert "suppression" in note and "all_caps" in note and "universal-neurons precompute" in note
    assert page.locator("h1 .badge.published").inner_text() == "published"
    assert page.locator("textarea.live").count() == 0 and page.locator("#twins").count() == 0
    assert page.locator("#weights").count() == 1 and page.locator("#activation").count() == 1
    page.wait_for_selector("#partner-plot", state="detached")  # no partner scores, and no empty plot for them
    screenshot(page, "published-neuron")

    # the explorer's scatter of layer against vocabulary kurtosis: the late-layer prediction/suppression neurons
    page.goto(f"{base}/models/{MEDIUM}?x=layer&y=vocab_kurt&color=universal")
    page.wait_for_selector("#scatter-plot[data-rendered='1']")
    assert page.locator("#neuron-table tr").count() == 51  # the header and the first page of 1211
    screenshot(page, "published-explorer")
    assert page.errors == []


def test_compare_page_renders_its_plot(serve, paper_atlas, page, screenshot):
    base = serve(paper_atlas)
    page.goto(f"{base}/compare")
    options = page.locator("select[name=a] option").all_inner_texts()
    assert any(o.startswith(f"{MEDIUM}@4") for o in options)
    page.select_option("select[name=a]", f"{MEDIUM}@4")
    page.select_option("select[name=b]", f"{MEDIUM}@4")
    page.click("#compare-form button[type=submit]")
    page.wait_for_selector("#compare-layers[data-rendered='1']")
    assert page.locator("#compare-agreement").inner_text().count("1.0000") == 3  # a run against itself
    assert "a=stanford-gpt2-medium-a%404" in page.url
    screenshot(page, "compare")
    assert page.errors == []
