"""Live re-runs: limits on size, time and concurrency; caching; twins; the shareable ?text= page."""

from __future__ import annotations

import sqlite3
import threading
import time
from urllib.parse import quote

import pytest

from app.errors import GatewayTimeout, ServiceUnavailable
from app.live import LiveRunner
from app.settings import Settings
from tests.app.conftest import FULL_RUN, HTML


def runner(tmp_path, **overrides) -> LiveRunner:
    db = tmp_path / "x.db"
    db.write_bytes(b"")
    return LiveRunner(Settings(db_path=db, **overrides))


def test_concurrency_is_bounded(tmp_path):
    live = runner(tmp_path, live_max_concurrent=1, live_queue_timeout_s=0.05)
    started = threading.Event()

    def slow() -> str:
        started.set()
        time.sleep(0.4)
        return "done"

    holder = threading.Thread(target=live._call, args=(slow, 5, "slow work"))
    holder.start()
    started.wait(2)
    with pytest.raises(ServiceUnavailable, match="busy") as caught:
        live._call(lambda: "second", 5, "second work")
    assert caught.value.headers["Retry-After"] == "2"
    holder.join()
    assert live._call(lambda: "third", 5, "third work") == "third"  # the slot is free again
    live.close()


def test_time_limit_gives_504_and_keeps_the_slot_until_the_work_ends(tmp_path):
    live = runner(tmp_path, live_max_concurrent=1, live_queue_timeout_s=0.01)
    with pytest.raises(GatewayTimeout, match=r"longer than 0\.05 s"):
        live._call(lambda: time.sleep(0.3), 0.05, "the live run")
    with pytest.raises(ServiceUnavailable):  # still running in the background: the bound holds
        live._call(lambda: None, 1, "next")
    time.sleep(0.4)
    assert live._call(lambda: 1, 1, "after") == 1
    live.close()


def test_live_page_fragment_shades_the_neuron_and_its_twins(client):
    text = "def add(a, b):\n    return a + b"
    response = client.get("/models/tiny-a/neurons/0/3/_partials/live", params={"text": text}, headers=HTML)
    assert response.status_code == 200
    html = response.text
    assert html.count('class="twin-row live-row"') == 3
    assert 'data-role="self"' in html and html.count('data-role="twin"') == 2
    assert 'href="/models/tiny-a-permuted/neurons/' in html and 'href="/models/tiny-b/neurons/' in html
    assert 'title="+' in html or 'title="-' in html  # exact values on hover
    assert "↵" in html  # the newline is visible


def test_text_in_the_url_is_shareable(client):
    text = "import os\nprint(os.getcwd())"
    html = client.get(f"/models/tiny-a/neurons/0/3?text={quote(text)}", headers=HTML).text
    assert "import os\nprint(os.getcwd())</textarea>" in html
    assert 'hx-get="/models/tiny-a/neurons/0/3/_partials/live?text=import+os%0Aprint%28os.getcwd%28%29%29"' in html


def test_results_are_memoised(client):
    payload = {"text": "for i in range(3): pass", "neurons": [[1, 2]], "twins": True}
    first = client.post("/api/v1/models/tiny-a/run", json=payload).json()
    second = client.post("/api/v1/models/tiny-a/run", json=payload).json()
    assert first == second  # the same result object (same `seconds`) came from the cache


def test_live_runs_can_be_disabled(atlas_db, make_client):
    client = make_client(atlas_db, live_enabled=False)
    response = client.post("/api/v1/models/tiny-a/run", json={"text": "x", "neurons": [[0, 1]]})
    assert response.status_code == 503 and "disabled" in response.json()["error"]
    html = client.get("/models/tiny-a/neurons/0/3", headers=HTML).text
    assert 'id="live"' not in html and 'id="twins"' not in html


def test_missing_model_files_are_a_clear_503(atlas_db, make_client, tmp_path):
    with sqlite3.connect(atlas_db) as conn:
        conn.execute("UPDATE models SET source = ? WHERE run_id = ?", (str(tmp_path / "gone"), FULL_RUN))
    client = make_client(atlas_db)
    response = client.post("/api/v1/models/tiny-a/run", json={"text": "x = 1", "neurons": [[0, 1]]})
    assert response.status_code == 503
    assert "not available for live runs" in response.json()["error"]
    fragment = client.get("/models/tiny-a/neurons/0/3/_partials/twins", headers=HTML)
    assert fragment.status_code == 503 and 'class="error"' in fragment.text
    # the rest of the page still works
    assert client.get("/models/tiny-a/neurons/0/3", headers=HTML).status_code == 200


def test_twins_fragment(client):
    response = client.get("/models/tiny-a/neurons/1/4/_partials/twins?context=full", headers=HTML)
    assert response.status_code == 200
    html = response.text
    assert 'class="twins full"' in html
    assert html.count('class="twin-block"') == 4  # twin_examples
    assert html.count('class="twin-row"') == 4 * 3


def test_model_work_does_not_count_against_the_sql_deadline(atlas_db, make_client):
    # a fresh app loads its models during these requests, which takes longer than this SQL deadline
    client = make_client(atlas_db, query_time_limit_ms=20)
    assert client.get("/api/v1/models/tiny-a/neurons/0/3/vocab").status_code == 200
    assert client.get("/api/v1/models/tiny-b/neurons/0/3/twins").status_code == 200
    response = client.post(
        "/api/v1/models/tiny-a-permuted/run", json={"text": "x = 1", "neurons": [[1, 1]], "twins": True}
    )
    assert response.status_code == 200
