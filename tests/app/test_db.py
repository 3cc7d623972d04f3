"""The database layer: read-only, time-limited, row-capped; the app never changes the atlas file."""

from __future__ import annotations

import hashlib
import sqlite3

import pytest

from app.db import Database, fetch_capped
from app.deps import ConnDep
from app.errors import QueryTimeout
from tests.app.conftest import HTML

SLOW = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 100000000) SELECT count(*) FROM c"


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_requests_never_change_the_file(atlas_db, make_client):
    before = digest(atlas_db)
    client = make_client(atlas_db)
    for url in (
        "/",
        "/models/tiny-a",
        "/models/tiny-a/neurons/0/3",
        "/api/v1/models/tiny-a/neurons?limit=500",
        "/api/v1/search?q=def",
        "/api/v1/models/tiny-a/neurons.csv",
    ):
        assert client.get(url, headers=HTML).status_code == 200, url
    assert client.post("/api/v1/models/tiny-a/run", json={"text": "a = 1", "neurons": [[0, 1]]}).status_code == 200
    assert digest(atlas_db) == before


def test_connections_refuse_writes(atlas_db):
    db = Database(atlas_db, time_limit_ms=1000)
    with db.connect() as conn:
        assert conn.execute("PRAGMA query_only").fetchone()[0] == 1
        with pytest.raises(sqlite3.OperationalError, match=r"readonly|read-only|query_only"):
            conn.execute("DELETE FROM runs")
        conn.execute("PRAGMA query_only=OFF")  # even then the file is opened mode=ro
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            conn.execute("DELETE FROM runs")
    db.close()


def test_immutable_mode_creates_no_side_files(atlas_db):
    db = Database(atlas_db, time_limit_ms=1000, immutable=True)
    with db.connect() as conn:
        assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] == 2
    db.close()
    assert not atlas_db.with_name(atlas_db.name + "-wal").exists()
    assert not atlas_db.with_name(atlas_db.name + "-shm").exists()


def test_deadline_interrupts_a_slow_query(atlas_db):
    db = Database(atlas_db, time_limit_ms=20)
    with pytest.raises(QueryTimeout, match="longer than 20 ms"), db.connect() as conn:
        conn.execute(SLOW).fetchone()
    with db.connect() as conn:  # the pooled connection works again with a fresh deadline
        assert conn.execute("SELECT 1").fetchone()[0] == 1
    db.close()


def test_a_slow_request_is_a_503_in_the_one_error_shape(atlas_db, make_client):
    client = make_client(atlas_db, query_time_limit_ms=20)

    @client.app.get("/api/v1/test-slow")
    def slow(conn: ConnDep) -> dict:
        return {"n": conn.execute(SLOW).fetchone()[0]}

    response = client.get("/api/v1/test-slow")
    assert response.status_code == 503
    assert response.json() == {"error": "the query took longer than 20 ms", "status": 503}


def test_row_cap_reports_truncation(atlas_db):
    db = Database(atlas_db, time_limit_ms=1000)
    with db.connect() as conn:
        capped = fetch_capped(conn, "SELECT layer, neuron FROM neurons WHERE model_id = ?", (1,), 10)
        assert len(capped.rows) == 10 and capped.truncated
        everything = fetch_capped(conn, "SELECT layer FROM layer_summaries", (), 1000)
        assert not everything.truncated
    db.close()


def test_list_limit_is_capped_at_max_rows(atlas_db, make_client):
    client = make_client(atlas_db, max_rows=7, page_size=5)
    body = client.get("/api/v1/models/tiny-a/neurons?limit=100").json()
    assert body["limit"] == 7 and body["limit_capped"] is True and len(body["items"]) == 7
    assert client.get("/api/v1/models/tiny-a/neurons").json()["limit"] == 5
