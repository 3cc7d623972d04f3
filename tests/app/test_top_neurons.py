"""Which neurons fire on my text? POST /api/v1/models/{model}/top-neurons against a brute-force oracle (Hugging
Face's GPT-2 with forward hooks on the MLP's GELU: every neuron at every token), universal_only, twins, limits,
and the page and fragment."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GPT2LMHeadModel

from tests.app.conftest import FULL_RUN, HTML, query

TEXT = "import os\nfor name in os.listdir('.'):\n    print(name.upper())"
URL = "/api/v1/models/{}/top-neurons"


def all_activations(folder: Path, ids: list[int]) -> np.ndarray:
    """Every neuron's post-GELU activation at every token: [pos, n_layers * d_mlp] (the brute force)."""
    model = GPT2LMHeadModel.from_pretrained(folder).eval()
    layers: list[torch.Tensor] = []
    handles = [
        block.mlp.act.register_forward_hook(lambda module, inputs, output: layers.append(output[0].clone()))
        for block in model.transformer.h
    ]
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat(layers, dim=-1).numpy()


def model_folder(db: Path, name: str) -> Path:
    return Path(query(db, "SELECT source FROM models WHERE run_id = ? AND name = ?", FULL_RUN, name)[0][0])


def row_ids(db: Path, token_ids: list[int]) -> list[int]:
    bos = json.loads(query(db, "SELECT dataset FROM runs WHERE id = ?", FULL_RUN)[0][0]).get("bos_id")
    return [0 if bos is None else int(bos), *token_ids]


def test_top_neurons_equal_a_brute_force_argmax(client, atlas_db):
    body = client.post(URL.format("tiny-a"), json={"text": TEXT, "k": 15, "per_token": 4}).json()
    acts = all_activations(model_folder(atlas_db, "tiny-a"), row_ids(atlas_db, body["token_ids"]))[1:]  # no BOS
    d_mlp = 64
    best = acts.max(0)
    expected = np.argsort(-best, kind="stable")[:15]
    assert [n["layer"] * d_mlp + n["neuron"] for n in body["neurons"]] == expected.tolist()
    assert [n["max"] for n in body["neurons"]] == pytest.approx(best[expected].tolist(), abs=1e-3)
    for n in body["neurons"]:
        flat = n["layer"] * d_mlp + n["neuron"]
        assert n["peak"] == int(acts[:, flat].argmax())
        assert n["activations"] == pytest.approx(acts[:, flat].tolist(), abs=1e-3)
    assert len(body["by_token"]) == len(body["tokens"]) == acts.shape[0]
    for position, token in enumerate(body["by_token"]):
        order = np.argsort(-acts[position], kind="stable")[:4]
        assert [x["layer"] * d_mlp + x["neuron"] for x in token["neurons"]] == order.tolist()
        assert [x["activation"] for x in token["neurons"]] == pytest.approx(acts[position, order].tolist(), abs=1e-3)


def test_universal_only_lists_only_universal_neurons(client, atlas_db):
    universal = {
        (layer, neuron)
        for layer, neuron in query(
            atlas_db,
            "SELECT n.layer, n.neuron FROM neurons n JOIN models m ON m.id = n.model_id "
            "WHERE m.run_id = ? AND m.name = 'tiny-a' AND n.universal = 1",
            FULL_RUN,
        )
    }
    assert 0 < len(universal) < 128, "the fixture has universal and non-universal neurons"
    body = client.post(URL.format("tiny-a"), json={"text": TEXT, "k": 100, "universal_only": True}).json()
    listed = {(n["layer"], n["neuron"]) for n in body["neurons"]}
    assert listed and listed <= universal and all(n["universal"] for n in body["neurons"])
    assert len(body["neurons"]) == min(100, len(universal)) and body["n_universal"] == len(universal)
    assert all(x["universal"] for t in body["by_token"] for x in t["neurons"])
    # the same ranking as all neurons, restricted: the brute force over the universal columns
    acts = all_activations(model_folder(atlas_db, "tiny-a"), row_ids(atlas_db, body["token_ids"]))[1:]
    columns = np.array(sorted(layer * 64 + neuron for layer, neuron in universal))
    best = acts[:, columns].max(0)
    expected = columns[np.argsort(-best, kind="stable")]
    assert [n["layer"] * 64 + n["neuron"] for n in body["neurons"]] == expected[: len(body["neurons"])].tolist()
    # all neurons: the flags say which are universal
    every = client.post(URL.format("tiny-a"), json={"text": TEXT, "k": 100}).json()
    assert {(n["layer"], n["neuron"]) for n in every["neurons"] if n["universal"]} <= universal
    assert any(not n["universal"] for n in every["neurons"])


def test_twins_activations_equal_a_direct_run_of_the_twin_model(client, atlas_db):
    body = client.post(URL.format("tiny-a"), json={"text": TEXT, "k": 5, "twins": True}).json()
    ids = row_ids(atlas_db, body["token_ids"])
    direct = {name: all_activations(model_folder(atlas_db, name), ids)[1:] for name in ("tiny-a-permuted", "tiny-b")}
    for n in body["neurons"]:
        assert [t["model"] for t in n["twins"]] == ["tiny-a-permuted", "tiny-b"]
        for twin in n["twins"]:
            column = direct[twin["model"]][:, twin["layer"] * 64 + twin["neuron"]]
            assert twin["activations"] == pytest.approx(column.tolist(), abs=1e-3)
            assert twin["max"] == pytest.approx(float(column.max()), abs=1e-3)
        # the permuted copy's twin is the same neuron
        assert n["twins"][0]["activations"] == pytest.approx(n["activations"], abs=1e-3)
    without = client.post(URL.format("tiny-a"), json={"text": TEXT, "k": 5}).json()
    assert all(n["twins"] == [] for n in without["neurons"])


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"text": "x" * 2001}, 413),
        ({"text": " zebra" * 200}, 413),
        ({"text": "   "}, 422),
        ({"text": TEXT, "k": 0}, 422),
        ({"text": TEXT, "k": 101}, 422),
        ({"text": TEXT, "per_token": 21}, 422),
        ({"text": TEXT, "universal_only": 1}, 422),
        ({"text": 5}, 422),
    ],
)
def test_limits(client, body, status):
    response = client.post(URL.format("tiny-a"), json=body)
    assert response.status_code == status, response.text
    assert response.json()["status"] == status


def test_unknown_model_is_404(client):
    assert client.post(URL.format("nope"), json={"text": TEXT}).status_code == 404
    assert client.get("/top-neurons", params={"model": "nope"}, headers=HTML).status_code == 404


def test_page_fragment_and_forms(client):
    page = client.get("/top-neurons", params={"model": "tiny-b", "text": TEXT, "universal_only": "true"}, headers=HTML)
    assert page.status_code == 200
    assert 'hx-get="/_partials/top-neurons?model=tiny-b&amp;text=' in page.text and "universal_only=true" in page.text
    fragment = client.get("/_partials/top-neurons", params={"model": "tiny-b", "text": TEXT}, headers=HTML)
    assert fragment.status_code == 200
    html = fragment.text
    assert html.count('class="fire-neuron"') == 20 and "data-tip=" in html
    assert 'class="twin-link" href="/models/tiny-a/neurons/' in html  # twins link to their pages
    # the forms on the front page and on each model's page
    assert 'id="fire-form"' in client.get("/", headers=HTML).text
    explorer = client.get("/models/tiny-a", headers=HTML).text
    assert 'id="fire-form"' in explorer and '<input type="hidden" name="model" value="tiny-a">' in explorer


def test_nasty_tokens_render_as_text(xss_atlas_template, tmp_path, make_client):
    from tests.app.test_xss import assert_escaped
    from tests.dashboard_factories import NASTY_TOKENS, copy_atlas

    client = make_client(copy_atlas(xss_atlas_template, tmp_path / "xss.db"))
    text = " ".join(NASTY_TOKENS)
    fire = client.get("/_partials/top-neurons", params={"model": "xss-0", "text": text}, headers=HTML)
    assert fire.status_code == 200
    assert_escaped(fire.text)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in fire.text
    params = {"text": text, "clamp": "5", "positions": "0,1"}
    intervene = client.get("/models/xss-0/neurons/1/3/_partials/intervene", params=params, headers=HTML)
    assert intervene.status_code == 200
    assert_escaped(intervene.text)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in intervene.text
    page = client.get("/models/xss-0/neurons/1/3", params=params, headers=HTML)
    assert_escaped(page.text)
