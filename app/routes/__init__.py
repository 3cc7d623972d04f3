"""Thin handlers, one module per resource; `ROUTERS` aggregates them in the order they are matched."""

from __future__ import annotations

from app.routes import assets, compare, firing, index, intervene, models, neurons, search

ROUTERS = (
    assets.router,
    assets.api,
    index.pages,
    index.api,
    models.pages,
    models.api,
    neurons.pages,
    neurons.api,
    intervene.pages,
    intervene.api,
    firing.pages,
    firing.api,
    search.pages,
    search.api,
    compare.pages,
    compare.api,
)
