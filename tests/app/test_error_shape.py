"""One error shape for every route (Datasette's tests/test_error_shape.py): walk the app's routes, make each one
fail, and check the answer is ``{"error", "status"}`` JSON (or an HTML page for browsers), never a stack trace."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tests.app.conftest import HTML

#: Routes with nothing to look up (they cannot 404 on a run, model or neuron).
NO_LOOKUP = {"/docs", "/openapi.json", "/api/v1/health", "/api/v1/runs", "/static/{name:path}"}


@dataclass(frozen=True)
class Route:
    path: str
    methods: tuple[str, ...]


def routes(client) -> list[Route]:
    """Every documented route (the app's OpenAPI schema lists them all but /static and /docs)."""
    paths = client.app.openapi()["paths"]
    return [Route(path, tuple(m.upper() for m in ops)) for path, ops in paths.items() if path not in NO_LOOKUP]


#: Routes that take their runs as MODEL@RUN parameters instead of ?run= (issue 7).
RUN_IN_SPECS = {"/compare", "/api/v1/compare"}


def failing_url(route: Route) -> str:
    path = route.path.replace("{model}", "no-such-model").replace("{layer}", "0").replace("{neuron}", "0")
    if route.path in RUN_IN_SPECS:
        return path + "?a=no-such-model@999&b=no-such-model@999"
    return path + "?run=999"


def test_every_route_answers_404_in_the_one_shape(client):
    checked = 0
    for route in routes(client):
        for method in route.methods:
            body = {"text": "x", "neurons": [[0, 0]]} if method == "POST" else None
            response = client.request(method, failing_url(route), json=body, follow_redirects=False)
            assert response.status_code == 404, (method, route.path, response.text)
            assert response.headers["content-type"].startswith("application/json"), route.path
            assert response.json() == {"error": "no run 999", "status": 404}, route.path
            assert response.headers["cache-control"] == "no-store"
            checked += 1
    assert checked >= 20 and {"GET", "POST"} <= {m for r in routes(client) for m in r.methods}


def test_browsers_get_the_same_error_as_html(client):
    for route in routes(client):
        if "GET" not in route.methods or route.path.startswith("/api/"):
            continue
        response = client.get(failing_url(route), headers=HTML, follow_redirects=False)
        assert response.status_code == 404, route.path
        assert response.headers["content-type"].startswith("text/html"), route.path
        assert "no run 999" in response.text


def test_htmx_fragments_get_fragments(client):
    response = client.get("/models/tiny-a/neurons/0/0/_partials/examples?run=999", headers={"HX-Request": "true"})
    assert response.status_code == 404
    assert response.text.strip() == '<p class="error" role="alert" data-status="404">no run 999</p>'


@pytest.mark.parametrize("body", [b"{not json", b"{\xff\xfe\x03"], ids=["not-json", "not-utf8"])
def test_a_body_that_is_not_json_is_422(client, body):
    response = client.post("/api/v1/models/tiny-a/run", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    payload = response.json()
    assert payload["status"] == 422 and payload["error"]


def test_unknown_paths_and_methods(client):
    assert client.get("/nope").json() == {"error": "no page at /nope", "status": 404}
    response = client.delete("/api/v1/models")
    assert response.status_code == 405 and response.json()["status"] == 405


def test_a_bug_is_a_logged_500_without_a_stack_trace(atlas_db, make_client, caplog):
    from fastapi.testclient import TestClient

    app = make_client(atlas_db).app

    @app.get("/api/v1/test-bug")
    def bug() -> None:
        raise RuntimeError("secret internals")

    client = TestClient(app, raise_server_exceptions=False)
    response = client.get("/api/v1/test-bug")
    assert response.status_code == 500
    assert response.json() == {"error": "internal server error", "status": 500}
    assert "secret" not in response.text and "Traceback" not in response.text
    assert "secret internals" in caplog.text  # logged for the operator


def test_remaining_routes_answer(client):
    """The routes with nothing to look up, and the vocabulary histogram, answer with what they describe."""
    health = client.get("/api/v1/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "db": "atlas.db", "runs": 2, "complete_runs": 2}  # the fixture's runs
    vocab = client.get("/api/v1/models/tiny-a/neurons/0/0/vocab")
    assert vocab.status_code == 200
    body = vocab.json()
    d_vocab = client.get("/api/v1/models/tiny-a").json()["model"]["d_vocab"]
    assert list(body) == ["bin_edges", "counts", "top", "bottom", "moments"] and sum(body["counts"]) == d_vocab
