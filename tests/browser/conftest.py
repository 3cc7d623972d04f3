"""A real server and a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright).

The server is uvicorn on a free loopback port in a thread, serving a fresh copy of a precomputed atlas file.
This machine's network is closed, so Chromium starts with everything that phones home turned off.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.dashboard_factories import copy_atlas, family_template, xss_template

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Screenshots for review are copied here too (git-ignored).
RESULTS = Path(__file__).resolve().parents[2] / "test-results"


@pytest.fixture(scope="session")
def chromium() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium (Debian chromium; .ci/run installs it); see tests/QUARANTINES.md")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(chromium: Any) -> Iterator[Any]:
    context = chromium.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)  # the first live run loads the models (seconds on a busy 2-core machine)
    page.errors = []  # type: ignore[attr-defined]
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.on("console", lambda message: page.errors.append(message.text) if message.type == "error" else None)
    yield page
    context.close()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[Path], str]]:
    """Start uvicorn on a copy of an atlas file; returns the base URL."""
    import uvicorn

    from app.main import create_app
    from app.settings import Settings

    servers: list[tuple[Any, threading.Thread]] = []

    def start(template: Path) -> str:
        db = copy_atlas(template, tmp_path / f"atlas-{len(servers)}.db")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server = uvicorn.Server(
            uvicorn.Config(create_app(Settings(db_path=db)), host="127.0.0.1", port=port, log_level="warning")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        servers.append((server, thread))
        return f"http://127.0.0.1:{port}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def family_atlas(tiny_family: dict[str, Any]) -> Path:
    return family_template(tiny_family["base"], tiny_family["permuted"], tiny_family["other"])


@pytest.fixture
def xss_atlas() -> Path:
    return xss_template()


@pytest.fixture
def screenshot(tmp_path: Path, request: pytest.FixtureRequest) -> Callable[[Any, str], Path]:
    """Save a full-page screenshot under the test's tmp output and copy it to test-results/."""

    def take(page: Any, name: str) -> Path:
        path = tmp_path / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        RESULTS.mkdir(exist_ok=True)
        shutil.copyfile(path, RESULTS / path.name)
        request.node.user_properties.append(("screenshot", str(path)))
        print(f"screenshot: {path} (copy: {RESULTS / path.name})")  # noqa: T201 - the path is for the reviewer
        return path

    return take
