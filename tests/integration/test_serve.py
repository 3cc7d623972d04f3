"""``universal-neurons serve`` over real HTTP, as ``make demo`` starts it (issue 9).

The installed console script serves a precomputed atlas with its default worker count (``make demo`` passes no
``--workers``: two processes on a machine with two or more cores) and with one worker (the in-process app). Each
answers pages and JSON, adds a ``Server-Timing`` header, sends large static files gzip-compressed, and answers a live
run past its time limit with a 504 in the one error shape. (tests/integration/test_wheel_install.py starts
``--workers 2`` from a wheel.)
"""

from __future__ import annotations

import gzip
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import plotly
import pytest

from cli.main import main


@pytest.fixture(scope="module")
def atlas(tiny_family, tmp_path_factory) -> Path:
    db = tmp_path_factory.mktemp("serve") / "atlas.db"
    models = [str(tiny_family["base"]), str(tiny_family["other"])]
    assert main(["precompute", "--db", str(db), "--tokens", "3000", "--stages", "correlations", *models]) == 0
    return db


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def request(url: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    """Status, headers (lower-case names) and raw body of one HTTP request; error statuses are answers too."""
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read()


@pytest.mark.parametrize("workers", [[], ["--workers", "1"]], ids=["default-workers", "one-worker"])
def test_serve_answers_over_http(atlas, workers, tmp_path):
    port = _free_port()
    command = [str(Path(sys.executable).with_name("universal-neurons")), "serve", "--db", str(atlas)]
    env = os.environ | {"UNA_LIVE_TIMEOUT_S": "0.001"}  # every live run is past its limit: a 504
    log = tmp_path / "serve.log"  # a file, not a pipe: a server that logs much never blocks on it
    with log.open("wb") as err:
        server = subprocess.Popen([*command, "--port", str(port), *workers], env=env, stdout=err, stderr=err)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                status, headers, body = request(f"{base}/api/v1/models")
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    server.terminate()
                    server.wait(timeout=30)
                    raise AssertionError(f"the server did not answer:\n{log.read_text()[-4000:]}") from None
                time.sleep(0.3)
        assert status == 200 and [m["name"] for m in json.loads(body)] == ["tiny-a", "tiny-b"]
        assert re.fullmatch(r"app;dur=\d+\.\d\d", headers["server-timing"]), headers

        status, headers, page = request(f"{base}/models/tiny-a/neurons/0/1", headers={"accept": "text/html"})
        assert status == 200 and headers["content-type"].startswith("text/html") and b"L0N1" in page
        assert "server-timing" in headers

        plotly_js = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
        status, headers, packed = request(f"{base}/static/vendor/plotly.min.js", headers={"accept-encoding": "gzip"})
        assert status == 200 and headers["content-encoding"] == "gzip" and headers["vary"] == "Accept-Encoding"
        assert len(packed) < plotly_js.stat().st_size // 2 and gzip.decompress(packed) == plotly_js.read_bytes()
        status, headers, plain = request(f"{base}/static/vendor/plotly.min.js")
        assert status == 200 and "content-encoding" not in headers and plain == plotly_js.read_bytes()

        run = json.dumps({"text": "def f(x): return x", "neurons": [[0, 1]]}).encode()
        status, headers, body = request(
            f"{base}/api/v1/models/tiny-a/run", data=run, headers={"content-type": "application/json"}
        )
        assert status == 504, body
        assert headers["content-type"].startswith("application/json")
        assert json.loads(body) == {"error": "the live run took longer than 0.001 s", "status": 504}
    finally:
        server.terminate()
        server.wait(timeout=30)
