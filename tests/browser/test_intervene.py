"""Interventions and "which neurons fire on my text?" in a real headless Chromium: fill the forms, submit, read the
tables, hover a token, and share the URL."""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse

import pytest

pytestmark = pytest.mark.browser


def test_intervention_panel(serve, family_atlas, page, screenshot):
    base = serve(family_atlas)
    page.goto(f"{base}/models/tiny-a/neurons/1/4")
    form = page.locator("#intervene-form")
    text = "def greet(name):\n    return 'hi ' + name"
    form.locator("textarea[name=text]").fill(text)
    page.fill("#intervene-value", "8")
    page.fill("#intervene-positions", "2,3")
    form.locator("button[type=submit]").click()
    page.wait_for_selector("#intervene-output .iv-model")

    # the neuron and its twin in every other model, side by side, with the twins' agreement
    rows = page.locator("#intervene-output tr.iv-model")
    assert [rows.nth(i).get_attribute("data-role") for i in range(3)] == ["self", "twin", "twin"]
    assert rows.nth(1).get_attribute("data-model") == "tiny-a-permuted"
    assert rows.nth(1).locator("td.agreement").inner_text() == "1.000"  # the permuted copy: the same function
    assert rows.nth(2).locator("td.agreement").inner_text() not in ("", "—")
    # the before/after table: one row per token, before and after per model
    table = page.locator("#intervene-output table.iv-table").first
    positions = table.locator("tr.iv-pos")
    assert positions.count() >= 4
    assert table.locator("tr.iv-pos.clamped").count() == 2
    assert positions.nth(0).locator("td.before").count() == 3 and positions.nth(0).locator("td.after").count() == 3

    # the URL holds the text and the intervention: the result can be shared
    query = parse_qs(urlparse(page.url).query)
    assert query["text"] == [text] and query["clamp"] == ["8"] and query["positions"] == ["2,3"]
    page.locator("#intervene").scroll_into_view_if_needed()
    screenshot(page, "intervene")

    # the shared link runs it again on its own
    page.goto(page.url)
    page.wait_for_selector("#intervene-output .iv-model")
    assert page.locator("#intervene-output tr.iv-model").count() == 3
    assert page.input_value("#intervene-value") == "8"
    assert page.errors == []


def test_which_neurons_fire(serve, family_atlas, page, screenshot):
    base = serve(family_atlas)
    page.goto(base + "/")
    form = page.locator("#fire-form")
    form.locator("select[name=model]").select_option("tiny-b")
    form.locator("textarea[name=text]").fill("for x in range(10):\n    print(x)")
    form.locator("button[type=submit]").click()
    page.wait_for_selector("#fire-output .fire-neuron")
    assert page.locator("#fire-output tr.fire-neuron").count() == 20
    assert page.locator("#fire-output a.twin-link").count() == 40  # a twin in each of the two other models

    # hover a token: its top neurons
    token = page.locator("#fire-output .fire-toks .t").nth(3)
    token.hover()
    tip = page.locator("#tip.on")
    tip.wait_for()
    assert "(position 3)" in tip.inner_text() and "L" in tip.inner_text()
    screenshot(page, "top-neurons")

    # universal only, on the model's page
    page.goto(f"{base}/models/tiny-a")
    page.locator("#fire summary").click()
    page.locator("#fire-form textarea[name=text]").fill("import os")
    page.locator("#fire-form input[name=universal_only]").check()
    page.locator("#fire-form button[type=submit]").click()
    page.wait_for_selector("#fire-output .fire-neuron")
    rows = page.locator("#fire-output tr.fire-neuron")
    assert rows.count() > 0 and rows.locator(".badge.universal").count() == rows.count()

    # the result's link opens the shareable page
    page.locator("#fire-output a.share").click()
    page.wait_for_selector("#fire-output .fire-neuron")
    assert urlparse(page.url).path == "/top-neurons"
    assert parse_qs(urlparse(page.url).query)["universal_only"] == ["true"]
    assert page.errors == []
