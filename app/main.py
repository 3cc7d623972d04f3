"""The web app: `create_app(settings)` wires settings, the read-only database, templates, routes and errors.

Nothing happens at import: no settings are read, no file is opened and no model is loaded until
`create_app` is called (by ``universal-neurons serve`` or a test).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

import anyio.to_thread
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.db import Database
from app.deps import AppState
from app.errors import install_error_handlers
from app.live import LRU, LiveRunner
from app.routes import ROUTERS
from app.settings import Settings
from app.templating import make_templates, static_files

API_VERSION = "1.0.0"


def create_app(settings: Settings) -> FastAPI:
    """Build the dashboard and JSON API for one atlas file."""
    state = AppState(
        settings=settings,
        db=Database(settings.db_path, settings.query_time_limit_ms, immutable=settings.immutable),
        live=LiveRunner(settings),
        cache=LRU(512),
    )

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # Starlette runs sync routes in anyio's thread pool (40 threads by default); see `request_threads`.
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.request_threads
        yield
        state.live.close()
        state.db.close()

    app = FastAPI(
        title="Universal Neuron Atlas",
        version=API_VERSION,
        description="Browse the universal neurons of a family of language models (Gurnee et al. 2024). "
        "Every HTML page has a JSON twin under /api/v1/; errors are JSON {error, status}.",
        docs_url=None,  # /docs is rendered offline by app.routes.assets (FastAPI's page loads a CDN)
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.atlas = state
    app.state.assets = static_files()
    app.state.templates = make_templates(app.state.assets)
    app.add_middleware(ServerTiming)
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    return app


def app_from_environment() -> FastAPI:
    """An app configured from ``UNA_*`` environment variables, for ``uvicorn --factory`` (several workers).

    ``UNA_DB_PATH=atlas.db uvicorn --factory app.main:app_from_environment --workers 2``
    """
    return create_app(Settings())  # type: ignore[call-arg]  # db_path comes from UNA_DB_PATH


class ServerTiming:
    """Adds ``Server-Timing: app;dur=<ms>`` (time until the response starts) to every answer (bench/dashboard.py)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                duration = f"app;dur={(time.perf_counter() - started) * 1000:.2f}".encode()
                message = {**message, "headers": [*message.get("headers", []), (b"server-timing", duration)]}
            await send(message)

        await self.app(scope, receive, timed_send)
