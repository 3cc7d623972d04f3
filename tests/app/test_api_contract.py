"""The JSON API contract: every route's status and keys (golden lists), and the error cases.

Golden key lists are pinned here on purpose: adding a key is an extension (update the list), removing or
renaming one breaks clients and must fail this test.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.app.conftest import FULL_RUN, REFERENCE_ONLY_RUN, query

#: The quantiles stored with every distribution, in order.
QUANTILES = ["0.01", "0.05", "0.1", "0.25", "0.5", "0.75", "0.9", "0.95", "0.99", "0.999"]

CONTRACT_NEURON_KEYS = {
    "model",
    "layer",
    "neuron",
    "excess_corr",
    "mean_corr",
    "max_corr",
    "min_corr",
    "mean_baseline",
    "universal",
    "matches",
    "activation",
    "weights",
    "vocab",
    "family",
    "explanation",
    "roles",
    "examples",
}
NEURON_KEYS = [
    "model",
    "run",
    "layer",
    "neuron",
    "id",
    "url",
    "permalink",
    "api_url",
    "family_models",
    "dead",
    "universal",
    "threshold",
    "excess_corr",
    "mean_corr",
    "max_corr",
    "min_corr",
    "mean_baseline",
    "max_baseline",
    "min_baseline",
    "partners",
    "matches",
    "matched_by",
    "activation",
    "weights",
    "vocab",
    "tokens",
    "family",
    "explanation",
    "roles",
    "examples",
    "nav",
    "live",
    "vocab_histogram_url",
    "twins_url",
    "twins_api_url",
    "published",
]
MODEL_KEYS = [
    "name",
    "run",
    "position",
    "is_reference",
    "n_layers",
    "d_mlp",
    "d_model",
    "d_vocab",
    "n_ctx",
    "n_heads",
    "act_fn",
    "n_neurons",
    "n_universal",
    "source",
    "processing",
    "url",
    "api_url",
]
RUN_KEYS = [
    "id",
    "status",
    "created_at",
    "finished_at",
    "content_hash",
    "models",
    "stages",
    "tokens_seen",
    "tokens_counted",
    "threshold",
    "dataset",
    "default",
    "url",
    "error",
    "published",
]
LIST_KEYS = [
    "model",
    "total",
    "items",
    "limit",
    "offset",
    "limit_capped",
    "sort",
    "order",
    "filters",
    "x",
    "y",
    "color",
    "statistics",
    "families",
    "roles",
    "url",
    "api_url",
    "csv_url",
    "scatter_url",
    "scatter_api_url",
    "prev_url",
    "next_url",
    "random_url",
    "threshold",
    "published",
]
SUMMARY_KEYS = [
    "model",
    "layer",
    "neuron",
    "id",
    "url",
    "api_url",
    "dead",
    "universal",
    "excess_corr",
    "mean_corr",
    "max_corr",
    "min_corr",
    "mean_baseline",
    "family",
    "vocab_role",
    "attention_role",
    "values",
]
MATCH_KEYS = ["model", "layer", "neuron", "corr", "rank", "id", "url"]
OVERVIEW_KEYS = ["model", "fraction_universal", "layers", "distributions", "top", "analyses", "threshold"]
INDEX_KEYS = ["runs", "run", "models", "threshold", "groups", "compare_url"]
SCATTER_KEYS = [
    "x",
    "y",
    "color",
    "total",
    "sampled",
    "layer",
    "neuron",
    "xs",
    "ys",
    "colors",
    "neuron_url_template",
    "threshold",
]
EXAMPLES_KEYS = ["kind", "context", "scale", "groups", "counts"]
EXAMPLE_KEYS = [
    "kind",
    "rank",
    "bin",
    "dataset_row",
    "start",
    "peak",
    "activation",
    "tokens",
    "token_ids",
    "activations",
    "window",
]
SEARCH_KEYS = [
    "q",
    "kind",
    "model",
    "redirect",
    "message",
    "tokens",
    "features",
    "filters",
    "group",
    "total",
    "neurons",
    "page",
    "per_page",
    "pages",
    "items",
    "truncated",
    "examples_complete",
    "families",
    "roles",
    "threshold",
    "url",
    "api_url",
    "prev_url",
    "next_url",
]
SEARCH_ITEM_KEYS = [
    "neuron",
    "score",
    "best",
    "universal",
    "excess_corr",
    "family",
    "roles",
    "evidence",
    "twins",
]
SEARCH_TWIN_KEYS = [
    "neuron",
    "corr",
    "grouped",
    "score",
    "universal",
    "excess_corr",
    "family",
    "roles",
    "evidence",
]
SEARCH_EVIDENCE_KEYS = ["kind", "strength", "rank", "value", "token", "label"]
RUN_RESULT_KEYS = ["model", "text", "tokens", "token_ids", "neurons", "seconds"]
LIVE_NEURON_KEYS = ["model", "layer", "neuron", "id", "url", "role", "twin_of", "corr", "activations", "max", "min"]
TWINS_KEYS = ["neurons", "scales", "examples", "context", "note"]
ERROR_KEYS = ["error", "status"]


def test_models_list(client):
    response = client.get("/api/v1/models")
    assert response.status_code == 200
    models = response.json()
    assert [m["name"] for m in models] == ["tiny-a", "tiny-a-permuted", "tiny-b"]
    assert all(list(m) == MODEL_KEYS for m in models)
    expected = {"n_layers": 2, "d_mlp": 64, "d_model": 32, "is_reference": True, "run": FULL_RUN}
    assert {k: models[0][k] for k in expected} == expected
    # a local model is named by its folder's name, never by the folder's path on the server (issue 8)
    assert [m["source"] for m in models] == ["tiny-a", "tiny-a-permuted", "tiny-b"]


def test_models_of_another_run(client):
    models = client.get(f"/api/v1/models?run={REFERENCE_ONLY_RUN}").json()
    assert [m["name"] for m in models] == ["tiny-a", "tiny-b", "tiny-a-permuted"]
    assert models[1]["n_universal"] is None  # reference-only: no aggregates for tiny-b


def test_index_and_runs(client):
    index = client.get("/api/v1/").json()
    assert list(index) == INDEX_KEYS
    assert index["run"]["id"] == FULL_RUN and index["run"]["default"] is True
    assert [list(r) for r in index["runs"]] == [RUN_KEYS, RUN_KEYS]
    assert [list(o) for o in index["models"]] == [OVERVIEW_KEYS] * 3
    runs = client.get("/api/v1/runs").json()
    assert [r["id"] for r in runs] == [FULL_RUN, REFERENCE_ONLY_RUN]
    assert runs[1]["url"] == f"/?run={REFERENCE_ONLY_RUN}"


def test_model_overview(client, atlas_db):
    overview = client.get("/api/v1/models/tiny-a").json()
    assert list(overview) == OVERVIEW_KEYS
    assert [layer["layer"] for layer in overview["layers"]] == [0, 1]
    # Fig. 2a: fixed-edge histograms and quantiles of the model's neurons, recomputed here from the neurons table
    assert set(overview["distributions"]) == {"max_corr", "mean_corr", "mean_baseline", "excess_corr"}
    edges = np.linspace(-1, 1, 201)
    for quantity, distribution in overview["distributions"].items():
        values = np.array(
            query(
                atlas_db,
                f"SELECT n.{quantity} FROM neurons n JOIN models m ON m.id = n.model_id "
                f"WHERE m.run_id = ? AND m.name = 'tiny-a' AND n.{quantity} IS NOT NULL",
                FULL_RUN,
            ),
            dtype=float,
        )[:, 0]
        assert distribution["quantity"] == quantity and values.size == 128
        assert distribution["bin_edges"] == pytest.approx(edges.tolist(), abs=1e-6)
        assert distribution["counts"] == np.histogram(np.clip(values, -1, 1), bins=edges)[0].tolist(), quantity
        assert list(distribution["quantiles"]) == QUANTILES
        for q, value in distribution["quantiles"].items():
            assert value == pytest.approx(float(np.quantile(values, float(q))), abs=1e-6), (quantity, q)
    excess = [t["excess_corr"] for t in overview["top"]]
    assert excess == sorted(excess, reverse=True)
    assert "examples" in overview["analyses"]


def test_neuron_list_contract(client):
    body = client.get("/api/v1/models/tiny-a/neurons?limit=5").json()
    assert list(body) == LIST_KEYS
    assert body["total"] == 128 and len(body["items"]) == 5
    assert all(list(item) == SUMMARY_KEYS for item in body["items"])
    excess = [item["excess_corr"] for item in body["items"]]
    assert excess == sorted(excess, reverse=True)


def test_neuron_detail_contract(client):
    body = client.get("/api/v1/models/tiny-a/neurons/0/3").json()
    assert list(body) == NEURON_KEYS
    assert set(body) >= CONTRACT_NEURON_KEYS
    assert (body["model"], body["layer"], body["neuron"]) == ("tiny-a", 0, 3)
    assert body["excess_corr"] == pytest.approx(body["mean_corr"] - body["mean_baseline"], abs=1e-5)
    # matches: for each partner model its matches, best first
    assert {m["model"] for m in body["matches"]} == {"tiny-a-permuted", "tiny-b"}
    assert all(list(m) == MATCH_KEYS for m in body["matches"])
    for partner in ("tiny-a-permuted", "tiny-b"):
        ranks = [m for m in body["matches"] if m["model"] == partner]
        assert ranks[0]["rank"] == 0
        assert [m["corr"] for m in ranks] == sorted((m["corr"] for m in ranks), reverse=True)
    # the permuted copy computes the same function: its twin correlates perfectly
    twin = next(p for p in body["partners"] if p["model"] == "tiny-a-permuted")
    assert twin["corr"] == pytest.approx(1.0, abs=1e-3)
    for key in ("activation", "weights", "vocab", "family", "roles", "examples"):
        assert body[key] is not None, key
    assert list(body["examples"]) == EXAMPLES_KEYS
    example = body["examples"]["groups"][0]["examples"][0]
    assert list(example) == EXAMPLE_KEYS
    assert len(example["tokens"]) == len(example["activations"]) == len(example["token_ids"])


def test_analyses_are_null_when_absent(client):
    body = client.get(f"/api/v1/models/tiny-b/neurons/1/5?run={REFERENCE_ONLY_RUN}").json()
    for key in ("activation", "weights", "vocab", "tokens", "family", "explanation", "roles", "examples"):
        assert body[key] is None, key
    assert body["excess_corr"] is None and body["universal"] is None  # --reference-only leaves these NULL
    assert [p["model"] for p in body["partners"]] == ["tiny-a"]


def test_token_strings_are_decoded_text(client):
    body = client.get("/api/v1/models/tiny-a/neurons/0/3").json()
    tokens = [t for g in body["examples"]["groups"] for e in g["examples"] for t in e["tokens"]]
    assert any(t.startswith(" ") for t in tokens)
    assert not any("Ġ" in t or "Ċ" in t for t in tokens)


def test_scatter_and_examples_and_search(client):
    scatter = client.get("/api/v1/models/tiny-a/scatter?x=excess_corr&y=mean_corr&color=family").json()
    assert list(scatter) == SCATTER_KEYS
    assert scatter["total"] == len(scatter["xs"]) == 128
    examples = client.get("/api/v1/models/tiny-a/neurons/0/3/examples?kind=quantile").json()
    assert list(examples) == EXAMPLES_KEYS and examples["kind"] == "quantile"
    assert [g["bin"] for g in examples["groups"]] == sorted(g["bin"] for g in examples["groups"])
    search = client.get("/api/v1/search?q=L1N2").json()
    assert list(search) == SEARCH_KEYS
    assert search["redirect"] == "/models/tiny-a/neurons/1/2"
    ranked = client.get("/api/v1/search?q=def").json()
    assert list(ranked) == SEARCH_KEYS and ranked["items"]
    item = ranked["items"][0]
    assert list(item) == SEARCH_ITEM_KEYS and list(item["evidence"][0]) == SEARCH_EVIDENCE_KEYS
    assert list(item["twins"][0]) == SEARCH_TWIN_KEYS


@pytest.mark.parametrize("q", ["L9N9", "L2N0", "L1N64"])
def test_a_neuron_id_out_of_range_is_explained_not_redirected(client, q):
    body = client.get("/api/v1/search", params={"q": q}).json()
    assert (body["kind"], body["redirect"], body["items"], body["total"]) == ("neuron", None, [], 0)
    assert body["message"] == "tiny-a has 2 layers of 64 neurons"
    assert client.get("/api/v1/search", params={"q": "L1N63"}).json()["redirect"] == "/models/tiny-a/neurons/1/63"


def test_run_contract_with_twins(client):
    response = client.post(
        "/api/v1/models/tiny-a/run", json={"text": "def f(x):\n    return x", "neurons": [[0, 3]], "twins": True}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert list(body) == RUN_RESULT_KEYS
    assert "".join(body["tokens"]) == "def f(x):\n    return x"
    assert [(n["model"], n["role"]) for n in body["neurons"]] == [
        ("tiny-a", "self"),
        ("tiny-a-permuted", "twin"),
        ("tiny-b", "twin"),
    ]
    assert all(list(n) == LIVE_NEURON_KEYS and len(n["activations"]) == len(body["tokens"]) for n in body["neurons"])
    # the permuted copy's twin is the same neuron: identical activations
    assert body["neurons"][1]["activations"] == pytest.approx(body["neurons"][0]["activations"], abs=1e-3)
    plain = client.post("/api/v1/models/tiny-a/run", json={"text": "x = 1", "neurons": [[0, 3], [1, 4]]}).json()
    assert [n["role"] for n in plain["neurons"]] == ["self", "self"]


def test_vocab_histogram_from_the_weights(client):
    body = client.get("/api/v1/models/tiny-a/neurons/1/4/vocab").json()
    assert list(body) == ["bin_edges", "counts", "top", "bottom", "moments"]
    assert sum(body["counts"]) == 512 and len(body["bin_edges"]) == len(body["counts"]) + 1
    top = [t["value"] for t in body["top"]]
    assert top == sorted(top, reverse=True) and body["bottom"][0]["value"] <= top[-1]
    # the same projection as the stored token table (both from the processed weights)
    stored = client.get("/api/v1/models/tiny-a/neurons/1/4").json()["vocab"]["unembed_top"]
    assert [t["token_id"] for t in body["top"][:5]] == [t["token_id"] for t in stored[:5]]


def test_twins_contract(client):
    body = client.get("/api/v1/models/tiny-a/neurons/0/3/twins").json()
    assert list(body) == TWINS_KEYS
    assert [n["model"] for n in body["neurons"]] == ["tiny-a", "tiny-a-permuted", "tiny-b"]
    assert body["examples"], "the neuron has top examples to re-run: the loop below is not vacuous"
    for example in body["examples"]:
        assert len(example["activations"]) == 3
        assert all(len(a) == len(example["tokens"]) for a in example["activations"])
        # the permuted copy's twin is the same function: its row equals this neuron's
        assert example["activations"][0] == pytest.approx(example["activations"][1], abs=1e-3)


@pytest.mark.parametrize(
    ("method", "url", "body", "status"),
    [
        ("get", "/api/v1/models/nope", None, 404),
        ("get", "/api/v1/models/nope/neurons", None, 404),
        ("get", "/api/v1/models/tiny-a/neurons/2/0", None, 404),
        ("get", "/api/v1/models/tiny-a/neurons/0/64", None, 404),
        ("get", "/api/v1/models/tiny-a/neurons/-1/0", None, 404),
        ("get", "/api/v1/models/tiny-a/neurons/0/99999999999999999999999", None, 404),
        ("get", "/api/v1/models/tiny-a/neurons/x/0", None, 422),
        ("get", "/api/v1/models/tiny-a/neurons?limit=0", None, 422),
        ("get", "/api/v1/models/tiny-a/neurons?sort=nope", None, 422),
        ("get", "/api/v1/models/tiny-a/neurons?range=nope:1:", None, 422),
        ("get", "/api/v1/models/tiny-a/neurons?range=excess_corr:1e999:", None, 422),
        ("get", "/api/v1/models/tiny-a/neurons?run=99", None, 404),
        ("get", "/api/v1/models/tiny-a/neurons/0/3/examples?kind=nope", None, 422),
        ("get", "/api/v1/nope", None, 404),
        ("post", "/api/v1/models/tiny-a/run", {"text": "x"}, 422),
        ("post", "/api/v1/models/tiny-a/run", {"text": "x", "neurons": [[0]]}, 422),
        ("post", "/api/v1/models/tiny-a/run", {"text": "x", "neurons": []}, 422),
        ("post", "/api/v1/models/tiny-a/run", {"text": "   ", "neurons": [[0, 1]]}, 422),
        ("post", "/api/v1/models/tiny-a/run", {"text": "x", "neurons": [[5, 1]]}, 404),
        ("post", "/api/v1/models/tiny-a/run", {"text": "x" * 2001, "neurons": [[0, 1]]}, 413),
        ("post", "/api/v1/models/nope/run", {"text": "x", "neurons": [[0, 1]]}, 404),
    ],
)
def test_errors_have_one_shape(client, method, url, body, status):
    response = client.request(method.upper(), url, json=body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    payload = response.json()
    if status >= 400:
        assert list(payload)[:2] == ERROR_KEYS
        assert payload["status"] == status and payload["error"]
        if status != 422:
            assert "detail" not in payload
        assert "Traceback" not in response.text


def test_too_many_tokens_is_413(client):
    # the tiny models have a 64-token context: 63 tokens plus BOS is the most a live run takes
    text = " ".join(["zebra"] * 200)
    response = client.post("/api/v1/models/tiny-a/run", json={"text": text, "neurons": [[0, 1]]})
    assert response.status_code == 413
    assert "tokens" in response.json()["error"]


def test_openapi_documents_every_api_route(client):
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    for path in (
        "/api/v1/models",
        "/api/v1/models/{model}",
        "/api/v1/models/{model}/neurons",
        "/api/v1/models/{model}/neurons/{layer}/{neuron}",
        "/api/v1/models/{model}/run",
        "/api/v1/search",
        "/api/v1/models/{model}/neurons.csv",
        "/api/v1/models/{model}/scatter",
    ):
        assert path in paths, path
    run = paths["/api/v1/models/{model}/run"]["post"]
    assert {"413", "422", "404"} <= set(run["responses"])
    docs = client.get("/docs", headers={"accept": "text/html"})
    assert docs.status_code == 200 and "/api/v1/models/{model}/run" in docs.text
    assert "cdn" not in docs.text.lower()


#: uvicorn's HTTP parser (httptools, from uvicorn[standard]) answers a request line past 64 KiB with a bare
#: "400 Invalid HTTP request" that no route documents; the schema keeps every URL well below (issue 8).
SERVER_URL_LIMIT = 65_536
#: The longest text of a number or an unbounded integer that a client sends (a float's repr, a 64-bit integer).
NUMBER_CHARS = 32
#: What one character of a string costs in a URL at most: 4 UTF-8 bytes, each percent-encoded.
CHAR_BYTES = 12


def longest_value(schema: dict, components: dict, separator: int = 0) -> int:
    """The longest URL text of a value the JSON schema allows (AssertionError where nothing bounds it); each
    item of an array costs `separator` more (a repeated query parameter's ``&name=``)."""
    if "$ref" in schema:
        return longest_value(components[schema["$ref"].rsplit("/", 1)[-1]], components, separator)
    if "anyOf" in schema:
        return max(longest_value(s, components, separator) for s in schema["anyOf"])
    if "enum" in schema or "const" in schema:
        return max(len(str(v)) * 3 for v in schema.get("enum", [schema.get("const")]))
    kind = schema.get("type")
    if kind == "string":
        assert "maxLength" in schema, f"unbounded string: {schema}"
        return schema["maxLength"] * CHAR_BYTES
    if kind == "array":
        assert "maxItems" in schema, f"unbounded array: {schema}"
        return schema["maxItems"] * (longest_value(schema["items"], components) + separator)
    return {"integer": NUMBER_CHARS, "number": NUMBER_CHARS, "boolean": 5, "null": 0}[kind]


def test_no_url_the_schema_allows_is_too_long_for_the_server(client):
    schema = client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    longest = {}
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            size = len(path)
            for parameter in operation.get("parameters", []):
                separator = len(parameter["name"]) + 2 if parameter["in"] == "query" else 0  # &name=
                size += longest_value(parameter["schema"], components, separator) + separator
            longest[f"{method.upper()} {path}"] = size
    assert max(longest.values()) < SERVER_URL_LIMIT // 2, longest
