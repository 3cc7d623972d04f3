"""Interventions: a planted prediction neuron, its permuted twins, an independent Hugging Face oracle, and the
live limits (413/422/404/503) of POST /api/v1/models/{model}/intervene and its fragment."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GPT2LMHeadModel

from tests.app.conftest import FULL_RUN, HTML, query
from tests.dashboard_factories import PLANTED, copy_atlas, planted_template

TEXT = "def add(a, b):\n    return a + b"
URL = "/api/v1/models/{}/intervene"


@pytest.fixture(scope="module")
def planted() -> tuple[Path, dict[str, list]]:
    return planted_template()


@pytest.fixture
def planted_client(planted, tmp_path, make_client):
    db = copy_atlas(planted[0], tmp_path / "planted.db")
    return make_client(db)


def twin_index(permutation: np.ndarray, neuron: int) -> int:
    """The copy's index of the source's neuron (neuron perm[j] of the source is neuron j of the copy)."""
    return int(np.flatnonzero(permutation == neuron)[0])


def hf_next_token(folder: Path, ids: list[int], layer: int, neuron: int, value: float | None) -> torch.Tensor:
    """The oracle: Hugging Face's GPT-2 with a forward hook on the MLP's GELU, log-probabilities [pos, vocab]."""
    model = GPT2LMHeadModel.from_pretrained(folder).eval()

    def clamp(module: torch.nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor:
        output[..., neuron] = value
        return output

    handle = model.transformer.h[layer].mlp.act.register_forward_hook(clamp) if value is not None else None
    try:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
    finally:
        if handle is not None:
            handle.remove()
    return torch.log_softmax(logits.double(), -1)


def bos_id(db: Path, run: int) -> int:
    return int(json.loads(query(db, "SELECT dataset FROM runs WHERE id = ?", run)[0][0])["bos_id"])


def test_a_planted_neuron_clamped_high_predicts_its_token_and_its_twins_agree(planted_client, planted):
    _, permutations = planted
    layer, neuron, token = PLANTED["layer"], PLANTED["neuron"], PLANTED["token"]
    payload = {"text": TEXT, "neuron": [layer, neuron], "value": 50, "twins": True}
    response = planted_client.post(URL.format("plant-a"), json=payload)
    assert response.status_code == 200, response.text
    body = response.json()
    assert [r["model"] for r in body["results"]] == ["plant-a", "plant-b", "plant-c"]
    assert [r["role"] for r in body["results"]] == ["self", "twin", "twin"]
    # the twins are the permuted copies of the neuron (their best match in partner_scores)
    assert [r["neuron"] for r in body["results"][1:]] == [
        twin_index(permutations["plant-b"][layer], neuron),
        twin_index(permutations["plant-c"][layer], neuron),
    ]
    n = len(body["tokens"])
    for result in body["results"]:
        assert [top[0]["token_id"] for top in result["patched"]["top"]] == [token] * n
        assert [top[0]["token_id"] for top in result["clean"]["top"]] != [token] * n  # it was not already so
        assert result["moved"][0]["token_id"] == token and result["moved"][0]["change"] > 0
        assert result["mean_kl"] > 0
    assert body["results"][0]["agreement"] is None
    for twin in body["results"][1:]:
        assert twin["agreement"] == pytest.approx(1.0, abs=1e-6)
        assert twin["kl"] == pytest.approx(body["results"][0]["kl"], abs=1e-4)


def test_clean_and_patched_match_a_hugging_face_oracle(planted_client, planted):
    db = planted[0]
    folder = Path(query(db, "SELECT source FROM models WHERE name = 'plant-a'")[0][0])
    layer, neuron = PLANTED["layer"], PLANTED["neuron"]
    body = planted_client.post(
        URL.format("plant-a"), json={"text": TEXT, "neuron": [layer, neuron], "value": 3.5, "positions": [2, 4]}
    ).json()
    ids = [bos_id(db, 1), *body["token_ids"]]
    clean = hf_next_token(folder, ids, layer, neuron, None)[1:]  # the BOS row is not shown
    patched_all = hf_next_token(folder, ids, layer, neuron, 3.5)  # clamped at every position: compare only 2 and 4
    result = body["results"][0]
    assert [r["model"] for r in body["results"]] == ["plant-a"]  # twins only when asked
    n = len(body["tokens"])
    for i in range(n):
        top = result["clean"]["top"][i]
        assert [t["token_id"] for t in top] == torch.topk(clean[i], 5).indices.tolist()
        assert [t["prob"] for t in top] == pytest.approx(
            clean[i].exp()[[t["token_id"] for t in top]].tolist(), abs=1e-5
        )
        entropy = float(-(clean[i].exp() * clean[i]).sum())
        assert result["clean"]["entropy"][i] == pytest.approx(entropy, abs=1e-4)
        if i + 1 < n:
            assert result["clean"]["loss"][i] == pytest.approx(float(-clean[i][body["token_ids"][i + 1]]), abs=1e-4)
    assert result["clean"]["loss"][-1] is None and result["patched"]["loss"][-1] is None
    # positions 0, 1 come before the first set position: nothing can change there (causal attention)
    assert body["affected_from"] == 2 and result["kl"][:2] == [0.0, 0.0]
    assert result["patched"]["top"][:2] == result["clean"]["top"][:2]
    # the planted neuron is in the last layer: position 4 is changed only through its own activation, so the
    # patched prediction there equals the oracle's clamped-everywhere run; KL(clean || patched) at it too
    p4 = patched_all[1 + 4]
    assert [t["token_id"] for t in result["patched"]["top"][4]] == torch.topk(p4, 5).indices.tolist()
    kl = float((clean[4].exp() * (clean[4] - p4)).sum())
    assert result["kl"][4] == pytest.approx(kl, abs=1e-5)
    assert result["kl"][3] == pytest.approx(0.0, abs=1e-7)  # not set, and no later layer reads it


def test_zero_and_mean_ablations_use_the_stored_mean(planted_client, planted):
    db = planted[0]
    layer, neuron = PLANTED["layer"], PLANTED["neuron"]
    (mean,) = query(
        db,
        "SELECT a.post_mean FROM activation_stats a JOIN models m ON m.id = a.model_id "
        "WHERE m.name = 'plant-a' AND a.layer = ? AND a.neuron = ?",
        layer,
        neuron,
    )[0]
    body = planted_client.post(
        URL.format("plant-a"), json={"text": TEXT, "neuron": [layer, neuron], "value": "mean", "twins": True}
    ).json()
    assert body["value"] == "mean"
    assert [r["value"] for r in body["results"]] == pytest.approx([mean] * 3, abs=1e-5)  # each twin its own mean
    zero = planted_client.post(URL.format("plant-a"), json={"text": TEXT, "neuron": [layer, neuron], "value": "zero"})
    assert zero.json()["results"][0]["value"] == 0.0


def test_the_fragment_shows_before_after_and_agreement_and_moves_the_url(client):
    headers = {**HTML, "HX-Request": "true", "HX-Trigger": "intervene-form"}
    params = {"text": TEXT, "clamp": "5", "positions": "1,3"}
    response = client.get("/models/tiny-a/neurons/1/4/_partials/intervene", params=params, headers=headers)
    assert response.status_code == 200, response.text
    html = response.text
    assert html.count('class="iv-model"') == 3 and 'data-role="twin"' in html
    assert 'class="num agreement">1.000<' in html  # the permuted copy's twin is the same function
    assert (
        response.headers["HX-Push-Url"]
        == "/models/tiny-a/neurons/1/4?text=def+add%28a%2C+b%29%3A%0A++++return+a+%2B+b&clamp=5&positions=1%2C3"
    )
    # loading the shared URL runs it again on page load
    page = client.get(response.headers["HX-Push-Url"], headers=HTML).text
    assert 'hx-get="/models/tiny-a/neurons/1/4/_partials/intervene?text=' in page and 'value="1,3"' in page
    # the page's own load does not push another history entry
    again = client.get("/models/tiny-a/neurons/1/4/_partials/intervene", params=params, headers=HTML)
    assert "HX-Push-Url" not in again.headers


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"text": "x" * 2001, "neuron": [0, 1], "value": 1}, 413, "characters"),
        ({"text": " zebra" * 200, "neuron": [0, 1], "value": 1}, 413, "tokens"),
        ({"text": TEXT, "neuron": [0, 1], "value": 1000.5}, 422, None),
        ({"text": TEXT, "neuron": [0, 1], "value": "half"}, 422, None),
        ({"text": TEXT, "neuron": [0, 1], "value": True}, 422, None),
        ({"text": TEXT, "neuron": [0, 1], "value": 1, "positions": [99]}, 422, "outside the text"),
        ({"text": TEXT, "neuron": [0, 1], "value": 1, "positions": [-1]}, 422, None),
        ({"text": TEXT, "neuron": [0, 1], "value": 1, "positions": []}, 422, None),
        ({"text": TEXT, "neuron": [0, 1], "value": 1, "top_k": 0}, 422, None),
        ({"text": TEXT, "neuron": [0], "value": 1}, 422, None),
        ({"text": "   ", "neuron": [0, 1], "value": 1}, 422, None),
        ({"text": TEXT, "neuron": [2, 0], "value": 1}, 404, "no neuron L2N0"),
        ({"text": TEXT, "neuron": [0, 64], "value": 1}, 404, "no neuron L0N64"),
    ],
)
def test_limits(client, body, status, message):
    response = client.post(URL.format("tiny-a"), json=body)
    assert response.status_code == status, response.text
    assert response.json()["status"] == status
    if message:
        assert message in response.json()["error"]


def test_the_schema_states_the_bounds(client):
    schema = client.get("/openapi.json").json()
    body = schema["components"]["schemas"]["InterveneRequest"]["properties"]
    number = next(s for s in body["value"]["anyOf"] if s.get("type") == "number")
    assert (number["minimum"], number["maximum"]) == (-1000, 1000)
    assert {"413", "422", "404", "503"} <= set(schema["paths"]["/api/v1/models/{model}/intervene"]["post"]["responses"])


def test_mean_without_stored_statistics_is_422(client):
    # run 1 of the fixture has no analyses: no activation_stats
    response = client.post(URL.format("tiny-a") + "?run=1", json={"text": TEXT, "neuron": [0, 1], "value": "mean"})
    assert response.status_code == 422 and "no stored mean" in response.json()["error"]


def test_published_models_and_missing_folders_are_503(atlas_db, make_client, tmp_path):
    with sqlite3.connect(atlas_db) as conn:
        conn.execute(
            "UPDATE models SET source = ? WHERE run_id = ? AND name = 'tiny-b'", (str(tmp_path / "gone"), FULL_RUN)
        )
    client = make_client(atlas_db)
    payload = {"text": TEXT, "neuron": [0, 1], "value": 1, "twins": True}
    missing = client.post(URL.format("tiny-a"), json=payload)  # a twin's folder is gone
    assert missing.status_code == 503 and "not available for live runs" in missing.json()["error"]
    assert str(tmp_path) not in missing.text
    with sqlite3.connect(atlas_db) as conn:
        conn.execute("UPDATE models SET tokenizer_hash = 'published' WHERE run_id = ?", (FULL_RUN,))
    client = make_client(atlas_db)
    published = client.post(URL.format("tiny-a"), json={**payload, "twins": False})
    assert published.status_code == 503 and "published" in published.json()["error"]


def test_busy_is_503_with_retry_after(atlas_db, make_client):
    client = make_client(atlas_db, live_max_concurrent=1, live_queue_timeout_s=0.05)
    runner = client.app.state.atlas.live
    started, release = threading.Event(), threading.Event()

    def hold() -> None:
        # hold the only slot until the request has been answered, however slow a loaded machine is
        started.set()
        release.wait(30)

    holder = threading.Thread(target=runner._call, args=(hold, 60, "holding the slot"))
    holder.start()
    assert started.wait(10)
    try:
        response = client.post(URL.format("tiny-a"), json={"text": TEXT, "neuron": [0, 1], "value": 1})
    finally:
        release.set()
        holder.join()
    assert response.status_code == 503 and response.headers["Retry-After"] == "2"
