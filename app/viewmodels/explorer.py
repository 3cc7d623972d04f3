"""The model explorer: filters and sorting from the query string, a page of neurons, a scatter, a CSV export.

The JSON twin is GET /api/v1/models/{model}/neurons (the contract's ``{"total", "items"}`` plus the state).
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

from pydantic import Field

from app.errors import Unprocessable
from app.queries import analyses as q
from app.queries import neurons as nq
from app.queries.models import Model
from app.urls import Scope, neuron_label
from app.viewmodels.common import ModelSummary, ViewModel, number
from app.viewmodels.published import PublishedNote, published_note

Statistic = StrEnum("Statistic", {name: name for name in nq.STATISTICS})  # type: ignore[misc]
ColorBy = StrEnum("ColorBy", {name: name for name in nq.COLOR_COLUMNS})  # type: ignore[misc]
Order = Literal["asc", "desc"]

#: A finite range bound: at most 30 digits either side of the point and a two-digit exponent, so that every match
#: is a finite float (``1e999`` does not match). ``[0-9]``, not ``\d``: that would match other scripts' digits in
#: the server's regex engine but not in the schema's (ECMA) one.
NUMBER_PATTERN = r"[-+]?(?:[0-9]{1,30}(?:\.[0-9]{0,30})?|\.[0-9]{1,30})(?:[eE][-+]?[0-9]{1,2})?"
#: ``statistic:low:high`` with either bound optional, e.g. ``excess_corr:0.5:`` or ``vocab_kurt:10:50``; the
#: empty string is a range field the explorer's form left empty (no range).
RANGE_PATTERN = rf"^$|^(?:{'|'.join(nq.STATISTICS)}):(?:{NUMBER_PATTERN})?:(?:{NUMBER_PATTERN})?$"
_RANGE = re.compile(RANGE_PATTERN)


def parse_range(text: str) -> nq.Range:
    """Parse one ``range`` parameter (the request schema has checked it against `RANGE_PATTERN` already).

    >>> parse_range("excess_corr:0.5:")
    Range(statistic='excess_corr', low=0.5, high=None)

    Raises:
        Unprocessable: not ``statistic:low:high`` with a known statistic and finite numbers.
    """
    if not text or not _RANGE.fullmatch(text):
        raise Unprocessable(
            f"range {text!r} is not statistic:low:high (e.g. excess_corr:0.5:) with a statistic of "
            f"{', '.join(nq.STATISTICS)}"
        )
    name, low, high = text.split(":")
    return nq.Range(name, float(low) if low else None, float(high) if high else None)


@dataclass(frozen=True)
class ExplorerQuery:
    """The explorer's state, all of it from the query string."""

    filter: nq.NeuronFilter = field(default_factory=nq.NeuronFilter)
    sort: str = "excess_corr"
    order: Order = "desc"
    limit: int = 50
    offset: int = 0
    x: str = "excess_corr"
    y: str = "mean_baseline"
    color: str = "layer"

    def params(self, **changes: object) -> dict[str, object]:
        f = self.filter
        params: dict[str, object] = {
            "layer": f.layer,
            "universal": f.universal,
            "dead": f.dead,
            "family": f.family,
            "role": f.role,
            "range": [f"{r.statistic}:{_fmt(r.low)}:{_fmt(r.high)}" for r in f.ranges],
            "sort": self.sort,
            "order": self.order,
            "limit": self.limit,
            "offset": self.offset or None,
            "x": self.x,
            "y": self.y,
            "color": self.color,
        }
        params.update(changes)
        return params


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:g}"


class StatisticInfo(ViewModel):
    name: str
    label: str
    description: str
    available: bool = Field(description="The table holding it has rows for this model")


class RangeState(ViewModel):
    statistic: str
    low: float | None
    high: float | None


class Filters(ViewModel):
    layer: int | None
    universal: bool | None
    dead: bool | None
    family: str | None
    role: str | None = Field(description="prediction | suppression | partition | deactivation | activation | entropy")
    ranges: list[RangeState]


class NeuronSummary(ViewModel):
    """A neuron in a list."""

    model: str
    layer: int
    neuron: int
    id: str = Field(description="L{layer}N{neuron}")
    url: str
    api_url: str
    dead: bool
    universal: bool | None
    excess_corr: float | None
    mean_corr: float | None
    max_corr: float | None
    min_corr: float | None
    mean_baseline: float | None
    family: str | None
    vocab_role: str | None
    attention_role: str | None
    values: dict[str, float | None] = Field(description="The sort key and the scatter axes")


class ExplorerPage(ViewModel):
    """A filtered, sorted page of a model's neurons (``total`` counts every match)."""

    model: ModelSummary
    total: int = Field(description="Neurons matching the filters")
    items: list[NeuronSummary]
    limit: int
    offset: int
    limit_capped: bool = Field(description="The requested limit exceeded max_rows and was lowered")
    sort: str
    order: Order
    filters: Filters
    x: str
    y: str
    color: str
    statistics: list[StatisticInfo] = Field(description="What can be filtered, sorted and plotted")
    families: list[str] = Field(description="Family labels present in this model")
    roles: list[str] = Field(description="Role labels present in this model")
    url: str
    api_url: str
    csv_url: str
    scatter_url: str = Field(description="htmx fragment with the scatter plot")
    scatter_api_url: str
    prev_url: str | None
    next_url: str | None
    random_url: str = Field(description="A random neuron among the filtered ones")
    threshold: float = Field(
        description="The universality threshold in effect for `universal` (?threshold=, default: the run's)"
    )
    published: PublishedNote | None = Field(
        description="For a run imported from the paper's tables (its universal neurons only): what it holds and "
        "lacks (None for a run computed here)"
    )


class ScatterData(ViewModel):
    """Columns of the scatter plot (a fixed pseudo-random sample when `sampled`)."""

    x: str
    y: str
    color: str
    total: int = Field(description="Filtered neurons with both coordinates")
    sampled: bool
    layer: list[int]
    neuron: list[int]
    xs: list[float | None]
    ys: list[float | None]
    colors: list[str | float | None]
    neuron_url_template: str = Field(description="URL of a point's page with {layer} and {neuron} to fill in")
    threshold: float = Field(description="The universality threshold in effect (for color=universal)")


def statistics_info(tables: frozenset[str]) -> list[StatisticInfo]:
    return [
        StatisticInfo(
            name=s.name, label=s.label, description=s.description, available=s.table == "neurons" or s.table in tables
        )
        for s in nq.STATISTICS.values()
    ]


def labels(conn: sqlite3.Connection, model_id: int, tables: frozenset[str]) -> tuple[list[str], list[str]]:
    """The family and role labels present in the model (the explorer's filter choices)."""
    families = q.family_labels(conn, model_id) if "families" in tables else []
    roles = q.role_labels(conn, model_id) if "roles" in tables else []
    return families, roles


def build_explorer(
    conn: sqlite3.Connection,
    scope: Scope,
    model: Model,
    query: ExplorerQuery,
    tables: frozenset[str],
    n_universal: int | None,
    max_rows: int,
    label_values: tuple[list[str], list[str]],
) -> ExplorerPage:
    requested = query.limit
    limit = min(query.limit, max_rows)
    query = ExplorerQuery(query.filter, query.sort, query.order, limit, query.offset, query.x, query.y, query.color)
    extra = tuple(dict.fromkeys([query.sort, query.x, query.y]))
    extra = tuple(e for e in extra if e not in ("layer", "neuron"))
    with_labels = tuple(a for a, t in (("f", "families"), ("r", "roles")) if t in tables)
    rows = nq.list_neurons(
        conn, model.id, query.filter, query.sort, query.order, limit, query.offset, extra, with_labels
    )
    total = nq.count_neurons(conn, model.id, query.filter)
    items = [
        NeuronSummary(
            model=model.name,
            layer=r.layer,
            neuron=r.neuron,
            id=neuron_label(r.layer, r.neuron),
            url=scope.neuron_url(model.name, r.layer, r.neuron),
            api_url=scope.api_neuron_url(model.name, r.layer, r.neuron),
            dead=r.dead,
            universal=r.universal,
            excess_corr=number(r.excess_corr),
            mean_corr=number(r.mean_corr),
            max_corr=number(r.max_corr),
            min_corr=number(r.min_corr),
            mean_baseline=number(r.mean_baseline),
            family=r.family,
            vocab_role=r.vocab_role,
            attention_role=r.attention_role,
            values={e: number(v) for e, v in r.values.items()},
        )
        for r in rows
    ]
    f = query.filter
    families, roles = label_values
    return ExplorerPage(
        model=ModelSummary.build(scope, model, n_universal),
        total=total,
        items=items,
        limit=limit,
        offset=query.offset,
        limit_capped=limit < requested,
        sort=query.sort,
        order=query.order,
        filters=Filters(
            layer=f.layer,
            universal=f.universal,
            dead=f.dead,
            family=f.family,
            role=f.role,
            ranges=[RangeState(statistic=r.statistic, low=r.low, high=r.high) for r in f.ranges],
        ),
        x=query.x,
        y=query.y,
        color=query.color,
        statistics=statistics_info(tables),
        families=families,
        roles=roles,
        url=scope.model_url(model.name, query.params()),
        api_url=scope.api_model_url(model.name, "/neurons", query.params()),
        csv_url=scope.api_model_url(model.name, "/neurons.csv", query.params(limit=None, offset=None)),
        scatter_url=scope.model_partial_url(
            model.name, "scatter", query.params(limit=None, offset=None, sort=None, order=None)
        ),
        scatter_api_url=scope.api_model_url(
            model.name, "/scatter", query.params(limit=None, offset=None, sort=None, order=None)
        ),
        prev_url=scope.model_url(model.name, query.params(offset=max(0, query.offset - limit) or None))
        if query.offset > 0
        else None,
        next_url=scope.model_url(model.name, query.params(offset=query.offset + limit))
        if query.offset + limit < total
        else None,
        random_url=scope.random_url(
            model.name, query.params(sort=None, order=None, limit=None, offset=None, x=None, y=None, color=None)
        ),
        threshold=scope.threshold,
        published=published_note(scope.run),
    )


def build_scatter(conn: sqlite3.Connection, scope: Scope, model: Model, query: ExplorerQuery, cap: int) -> ScatterData:
    data = nq.scatter_rows(conn, model.id, query.filter, query.x, query.y, query.color, cap)
    colors: list[str | float | None] = []
    for r in data.rows:
        c = r.color
        if query.color == "universal":
            colors.append("universal" if c == 1 else "not universal" if c == 0 else "unknown")
        elif query.color in ("family", "vocab_role"):
            colors.append(c if c is not None else "none")
        else:
            colors.append(c)
    return ScatterData(
        x=query.x,
        y=query.y,
        color=query.color,
        total=data.total,
        sampled=data.sampled,
        layer=[r.layer for r in data.rows],
        neuron=[r.neuron for r in data.rows],
        xs=[number(r.x) for r in data.rows],
        ys=[number(r.y) for r in data.rows],
        colors=colors,
        neuron_url_template=scope.neuron_url(model.name, 0, 0).replace("/neurons/0/0", "/neurons/{layer}/{neuron}"),
        threshold=scope.threshold,
    )
