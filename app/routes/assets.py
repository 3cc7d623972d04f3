"""Static files (our CSS/JS, htmx and Plotly from their installed packages), the offline API docs, health.

Only the files listed in `app.templating.static_files` are served (no directory walking). URLs made by the
templates carry ``?v=<content hash>``; such requests are cached for a year as immutable, others for
``static_max_age_s``.
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, Response

from app.deps import ConnDep, StateDep
from app.errors import NotFound
from app.routes.common import error_responses

router = APIRouter(include_in_schema=False)
api = APIRouter(prefix="/api/v1", tags=["runs and models"], responses=error_responses(503))


@router.get("/static/{name:path}")
def static_file(request: Request, state: StateDep, name: str) -> Response:
    assets = request.app.state.assets
    asset = assets.get(name)
    if asset is None:
        raise NotFound(f"no static file {name!r}")
    tag = f'"{asset.digest}"'
    if request.query_params.get("v") == asset.digest:
        cache = "public, max-age=31536000, immutable"
    else:
        cache = f"public, max-age={state.settings.static_max_age_s}"
    headers = {"Cache-Control": cache, "ETag": tag, "Vary": "Accept-Encoding"}
    if request.headers.get("if-none-match") == tag:
        return Response(status_code=304, headers=headers)
    if "gzip" in request.headers.get("accept-encoding", "") and asset.path.stat().st_size > GZIP_MIN_BYTES:
        return Response(
            _gzipped(asset.path), media_type=asset.media_type, headers={**headers, "Content-Encoding": "gzip"}
        )
    return FileResponse(asset.path, media_type=asset.media_type, headers=headers)


#: Files above this size are sent gzip-compressed to clients that accept it (Plotly: 4.8 MB -> about 1.4 MB).
GZIP_MIN_BYTES = 32_768


@functools.lru_cache(maxsize=8)
def _gzipped(path: Path) -> bytes:
    """Compressed once per process: static files do not change while the server runs."""
    return gzip.compress(path.read_bytes(), compresslevel=6, mtime=0)


@router.get("/docs", response_class=HTMLResponse)
def api_docs(request: Request) -> Response:
    """The OpenAPI reference, rendered here from the schema so that it works offline (no CDN)."""
    schema = request.app.openapi()
    operations = []
    for path, methods in schema.get("paths", {}).items():
        for method, op in methods.items():
            operations.append({"path": path, "method": method.upper(), **_operation(op, schema)})
    return request.app.state.templates.TemplateResponse(
        request, "docs.html", {"schema": schema, "operations": operations, "page": None}
    )


def _operation(op: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    params = [
        {
            "name": p["name"],
            "in": p["in"],
            "required": p.get("required", False),
            "type": _type(p.get("schema", {}), schema),
            "description": p.get("description", ""),
        }
        for p in op.get("parameters", [])
    ]
    body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
    ok: dict[str, dict[str, Any]] = op.get("responses", {}).get("200", {}).get("content", {})
    response = next(iter(ok.values())).get("schema") if ok else None
    return {
        "summary": op.get("summary", ""),
        "description": op.get("description", ""),
        "tags": op.get("tags", []),
        "parameters": params,
        "body": _type(body, schema) if body else None,
        "response": _type(response, schema) if response else None,
        "statuses": sorted(op.get("responses", {})),
    }


def _type(node: dict[str, Any], schema: dict[str, Any]) -> str:
    if not node:
        return "any"
    if "$ref" in node:
        return node["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in node:
        return " | ".join(_type(n, schema) for n in node["anyOf"])
    if node.get("type") == "array":
        return f"list[{_type(node.get('items', {}), schema)}]"
    if "enum" in node:
        return " | ".join(str(v) for v in node["enum"][:8]) + (" | ..." if len(node["enum"]) > 8 else "")
    return str(node.get("type", "any"))


@api.get("/health", summary="Liveness and the file served")
def health(state: StateDep, conn: ConnDep) -> dict[str, Any]:
    """Whether the atlas file answers, and how many runs it holds."""
    runs = conn.execute("SELECT count(*), sum(status = 'complete') FROM runs").fetchone()
    return {"status": "ok", "db": state.settings.db_path.name, "runs": runs[0], "complete_runs": runs[1] or 0}
