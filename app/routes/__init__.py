"""Thin handlers, one module per resource; `ROUTERS` aggregates them in the order they are matched."""

from __future__ import annotations

from app.routes import assets, index, models, neurons, search

ROUTERS = (
    assets.router,
    assets.api,
    index.pages,
    index.api,
    models.pages,
    models.api,
    neurons.pages,
    neurons.api,
    search.pages,
    search.api,
)
