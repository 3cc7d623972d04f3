"""The dashboard in a real headless Chromium: plots render, token values on hover, live text shaded by the neuron
and its twins, twin links, and no script from the data ever runs."""

from __future__ import annotations

import re
from urllib.parse import parse_qs, urlparse

import pytest

pytestmark = pytest.mark.browser


def test_neuron_page_end_to_end(serve, family_atlas, page, screenshot):
    base = serve(family_atlas)
    page.goto(f"{base}/models/tiny-a/neurons/0/3")
    assert page.locator("#neuron-id").inner_text() == "L0N3"

    # plots render (Plotly from the installed package, no network)
    page.wait_for_selector(".plot[data-rendered='1']")
    page.wait_for_function("document.querySelectorAll('.plot[data-rendered]').length >= 4")
    assert page.locator("#partner-plot .main-svg").count() >= 1

    # twins side by side: every example re-run through the three models
    page.wait_for_selector("#twins-panel .twin-row")
    assert page.locator("#twins-panel .twin-block").first.locator(".twin-row").count() == 3

    # the vocabulary histogram loads when scrolled into view (computed from the model's weights)
    page.locator("#vocab").scroll_into_view_if_needed()
    page.wait_for_selector("#vocab-hist[data-rendered='1']")
    page.locator("#top-examples").scroll_into_view_if_needed()

    # hover the peak token of the first top example: the tooltip shows its exact value
    token = page.locator("#top-examples .example").first.locator(".t.pk")
    stored = token.get_attribute("title")
    assert re.fullmatch(r"[+-]\d+\.\d{4}", stored)
    token.hover()
    tip = page.locator("#tip.on")
    tip.wait_for()
    assert f"activation {stored}" in tip.inner_text()

    # live text: tokens shaded for the neuron and its twin in every other model; the text goes into the URL
    text = "def greet(name):\n    return 'hi ' + name"
    page.fill("textarea.live", text)
    page.click("form.live-form button[type=submit]")
    page.wait_for_selector("#live-output .live-row")
    rows = page.locator("#live-output .live-row")
    assert rows.count() == 3
    assert [rows.nth(i).get_attribute("data-role") for i in range(3)] == ["self", "twin", "twin"]
    for i in range(3):
        assert rows.nth(i).locator(".t.p, .t.n").count() > 0
    assert parse_qs(urlparse(page.url).query)["text"] == [text]
    screenshot(page, "neuron-page")

    # the shared link shows the same result on its own
    page.goto(page.url)
    page.wait_for_selector("#live-output .live-row")
    assert page.locator("#live-output .live-row").count() == 3

    # follow a twin link to the partner's neuron page
    twin = page.locator("#partners a.twin-link").first
    href = twin.get_attribute("href")
    twin.click()
    page.wait_for_url(f"{base}{href}")
    assert page.locator("h1").inner_text().startswith("tiny-a-permuted")
    page.wait_for_selector(".plot[data-rendered='1']")
    assert page.errors == []


def test_index_and_explorer(serve, family_atlas, page, screenshot):
    base = serve(family_atlas)
    page.goto(base + "/")
    page.wait_for_function("document.querySelectorAll('.plot[data-rendered]').length == 6")
    screenshot(page, "index")

    # choose another universality threshold with the slider: the page reloads with it in the URL and the counts per
    # model follow (the same numbers as the JSON twin)
    counts = page.locator("#threshold-counts td.count")
    before = counts.all_inner_texts()
    page.locator("input.threshold-slider").fill("0.1")  # the slider is shown by app.js and applies on release
    page.wait_for_url("**/?threshold=0.1")
    after = counts.all_inner_texts()
    twin = page.request.get(f"{base}/api/v1/?threshold=0.1").json()
    assert after == [str(o["model"]["n_universal"]) for o in twin["models"]] and after != before
    assert page.locator("#threshold-value").input_value() == "0.1"
    page.wait_for_function("document.querySelectorAll('.plot[data-rendered]').length == 6")
    screenshot(page, "index-threshold")

    # a model's count links to its universal neurons at that threshold; the explorer keeps it
    page.locator("#threshold-counts tr[data-model='tiny-b'] a").click()
    page.wait_for_selector("#neuron-table")
    assert parse_qs(urlparse(page.url).query)["threshold"] == ["0.1"]
    assert page.locator("#neuron-table .badge.universal").count() == int(after[-1])

    page.goto(f"{base}/models/tiny-a?x=vocab_kurt&y=excess_corr&color=family&universal=true")
    page.wait_for_selector("#scatter-plot[data-rendered='1']")
    assert page.locator("#neuron-table tr").count() > 1
    screenshot(page, "explorer")
    assert page.errors == []


def test_data_never_runs_as_script(serve, xss_atlas, page, screenshot):
    base = serve(xss_atlas)
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.goto(f"{base}/models/xss-0/neurons/0/0")
    page.wait_for_selector("#twins-panel .twin-row")
    shown = page.locator("#top-examples .t").all_inner_texts() + page.locator("#twins-panel .t").all_inner_texts()
    assert "<script>alert(1)</script>" in shown  # rendered as text
    page.fill("textarea.live", 'x <script>alert(1)</script> " onmouseover="alert(2) \'><img src=x onerror=alert(3)>')
    page.click("form.live-form button[type=submit]")
    page.wait_for_selector("#live-output .live-row")
    for token in page.locator("#live-output .t").all()[:40]:
        token.hover()
    page.goto(f"{base}/search?q=%3Cscript%3Ealert(1)%3C%2Fscript%3E")
    page.wait_for_load_state("networkidle")
    screenshot(page, "xss-search")
    assert dialogs == []
    assert page.locator("img[src=x]").count() == 0
