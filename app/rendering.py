"""One way to answer with a view model: as an HTML page or fragment, or as JSON, with caching headers.

Pages of a complete run are immutable, so they carry an ETag (the run's content hash, plus a per-process id
so that a new version of the app never serves stale HTML) and ``Cache-Control: no-cache`` (revalidate, then
304). HTML pages point to their JSON twin with ``Link: <...>; rel="alternate"; type="application/json"``.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, TypeAdapter

from app.urls import Scope

#: Changes on every start, so that cached pages of an older app version are not reused.
BOOT_ID = secrets.token_hex(4)

_list_adapters: dict[type, TypeAdapter] = {}


def etag(scope: Scope) -> str:
    """The run's content hash, what its links depend on (`Scope.links_key`), and this process's id."""
    return f'W/"{scope.run.content_hash or scope.run.id}{scope.links_key}-{BOOT_ID}"'


def not_modified(request: Request, tag: str) -> Response | None:
    """A 304 when the client already holds this version."""
    header = request.headers.get("if-none-match")
    if header and (header.strip() == "*" or tag in [t.strip() for t in header.split(",")]):
        return Response(status_code=304, headers={"ETag": tag, "Cache-Control": "no-cache"})
    return None


def _cache_headers(tag: str | None) -> dict[str, str]:
    if tag is None:
        return {"Cache-Control": "no-store"}
    return {"ETag": tag, "Cache-Control": "no-cache"}


def html(
    request: Request,
    template: str,
    page: Any,
    *,
    tag: str | None = None,
    alternate: str | None = None,
    status: int = 200,
    **context: Any,
) -> Response:
    headers = _cache_headers(tag)
    if alternate:
        headers["Link"] = f'<{alternate}>; rel="alternate"; type="application/json"'
    return request.app.state.templates.TemplateResponse(
        request, template, {"page": page, **context}, status_code=status, headers=headers
    )


def json(page: BaseModel | Sequence[BaseModel], *, tag: str | None = None, status: int = 200) -> Response:
    if isinstance(page, BaseModel):
        body = page.model_dump_json()
    else:
        items = list(page)
        kind = type(items[0]) if items else BaseModel
        adapter = _list_adapters.setdefault(kind, TypeAdapter(list[kind]))  # type: ignore[valid-type]
        body = adapter.dump_json(items).decode()
    return Response(body, status_code=status, media_type="application/json", headers=_cache_headers(tag))
