"""Every page fits a phone's screen (issue 10: shared links are opened on phones): at 390×844 the document is no
wider than the viewport once the plots and lazy panels have rendered; panels stack, wide tables scroll inside
their panel, plots resize. The same pages at 1280 px are screenshotted for review."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.browser

PAGES = {
    "index": "/",
    "explorer": "/models/tiny-a?x=vocab_kurt&y=excess_corr",
    "neuron": "/models/tiny-a/neurons/0/3",
    "search": "/search?q=def",
    "compare": "/compare?a=tiny-a@1&b=tiny-a@2",
    "docs": "/docs",
}
#: Every visible plot has been drawn by Plotly (hidden ones, e.g. in closed <details>, are not drawn).
PLOTS_DRAWN = "Array.from(document.querySelectorAll('.plot')).every(e => e.dataset.rendered || e.offsetParent === null)"


def settle(page: Any) -> None:
    """Load lazy panels (htmx ``revealed``) by scrolling to the end, and wait for them and every plot."""
    page.wait_for_load_state("networkidle")
    page.evaluate("window.scrollTo(0, document.documentElement.scrollHeight)")
    page.wait_for_load_state("networkidle")
    page.wait_for_function(PLOTS_DRAWN)
    page.evaluate("window.scrollTo(0, 0)")


def overflowing(page: Any) -> list[str]:
    """The outermost visible elements that reach past the viewport's right edge (for the failure message)."""
    return page.evaluate(
        """() => { const W = window.innerWidth, out = [];
        for (const el of document.querySelectorAll('body *')) {
          if (el.offsetParent === null || el.getBoundingClientRect().right <= W + 0.5) continue;
          let p = el.parentElement, inside = false;
          for (; p && p !== document.body; p = p.parentElement) {
            if (getComputedStyle(p).overflowX !== 'visible') { inside = true; break; }
          }
          if (!inside) out.push(el.tagName.toLowerCase() + (el.id ? '#' + el.id : '') + '.' + el.className);
        }
        return out.slice(0, 10); }"""
    )


@pytest.mark.parametrize("width", [390, 1280])
def test_every_page_fits_the_screen(serve, family_atlas, chromium, screenshot, width):
    base = serve(family_atlas)
    context = chromium.new_context(viewport={"width": width, "height": 844 if width < 600 else 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        for name, path in PAGES.items():
            response = page.goto(base + path)
            assert response is not None and response.status == 200, path
            settle(page)
            scroll_width, inner_width = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
            assert scroll_width <= inner_width, (path, scroll_width, overflowing(page))
            screenshot(page, f"layout-{width}-{name}")
    finally:
        context.close()
    assert errors == []
