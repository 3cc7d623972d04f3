"""No answer shows where the server keeps its files: models are named by their folder's name (issue 8).

The fixture's models are local folders, stored in the atlas file as absolute paths (the live re-runs load them
from there); every page, fragment, JSON answer and error must leave those paths out.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from tests.app.conftest import FULL_RUN, HTML, REFERENCE_ONLY_RUN, query

#: Values for the path parameters of every route: a neuron that exists in both runs.
PATH_VALUES = {"model": "tiny-a", "layer": 0, "neuron": 3}
#: Required query parameters.
REQUIRED = {"/models/{model}/neurons/{layer}/{neuron}/_partials/live": {"text": "def f(x):"}}


def folders(tiny_family: dict[str, Any]) -> list[str]:
    return [str(Path(tiny_family[name]).resolve()) for name in ("base", "permuted", "other")]


def test_the_atlas_file_stores_absolute_folders(atlas_db, tiny_family):
    stored = {source for (source,) in query(atlas_db, "SELECT source FROM models")}
    assert stored == set(folders(tiny_family))  # else the test below would prove nothing


def test_no_answer_contains_a_model_folder(client, tiny_family):
    root = str(Path(tiny_family["base"]).resolve().parent)
    schema = client.get("/openapi.json")
    answers = [schema, client.get("/docs", headers=HTML)]
    for path, operations in schema.json()["paths"].items():
        if "get" not in operations:
            continue
        url = path.format(**PATH_VALUES)
        for run in (FULL_RUN, REFERENCE_ONLY_RUN):
            params = {**REQUIRED.get(path, {}), "run": run}
            headers = HTML if not url.startswith("/api/") else {}
            answers.append(client.get(url, params=params, headers=headers))
    run = {"text": "def f(x): return x", "neurons": [[0, 3]], "twins": True}
    answers.append(client.post("/api/v1/models/tiny-a/run", json=run))
    assert sum(a.status_code == 200 for a in answers) >= 25
    for answer in answers:
        assert root not in answer.text, answer.url
    sources = {m["source"] for m in client.get("/api/v1/models").json()}
    assert sources == {Path(folder).name for folder in folders(tiny_family)}


def test_a_missing_model_folder_is_named_not_shown(atlas_db, make_client, tmp_path):
    gone = tmp_path / "elsewhere" / "seed-7"
    with sqlite3.connect(atlas_db) as conn:
        conn.execute("UPDATE models SET source = ? WHERE run_id = ?", (str(gone), FULL_RUN))
    client = make_client(atlas_db)
    response = client.post("/api/v1/models/tiny-a/run", json={"text": "x = 1", "neurons": [[0, 1]]})
    assert response.status_code == 503
    error = response.json()["error"]
    assert "not available for live runs" in error and "'seed-7'" in error and str(tmp_path) not in error
    assert str(tmp_path) not in client.get("/api/v1/models").text
