"""What several routers share: the documented error responses and the explorer's query-string parameters."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Query
from pydantic import BaseModel, BeforeValidator, Field

from app.deps import EmptyAsNone, ScopeDep, StateDep
from app.queries.neurons import NeuronFilter
from app.viewmodels.explorer import RANGE_PATTERN, ColorBy, ExplorerQuery, Order, Statistic, parse_range


class ErrorBody(BaseModel):
    """The one error shape."""

    error: str = Field(description="What went wrong")
    status: int = Field(description="The HTTP status")
    detail: list[dict[str, Any]] | None = Field(None, description="For 422: each invalid field (loc, msg, type)")


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    descriptions = {
        404: "Unknown run, model or neuron",
        413: "Text too large for a live run",
        422: "Malformed request",
        503: "Busy, a query ran past its time limit, or a model is unavailable for live runs",
        504: "A live run ran past its time limit",
    }
    content = {
        "application/json": {"schema": ErrorBody.model_json_schema()},
        "text/html": {"schema": {"type": "string", "description": "error page or htmx fragment"}},
    }
    return {s: {"description": descriptions[s], "content": content} for s in statuses}


RangeParam = Annotated[str, Field(pattern=RANGE_PATTERN, max_length=200)]


def _drop_empty(values: object) -> object:
    """A form's empty range field arrives as ``range=``: it is no range."""
    return [v for v in values if v != ""] if isinstance(values, list) else values


# The filters are optional fields of the explorer's plain GET form, which sends a field left empty as ``name=``
# (EmptyAsNone): constraints sit on the inner type so that they apply to given values only.
async def get_explorer_query(
    state: StateDep,
    scope: ScopeDep,
    layer: Annotated[
        Annotated[int, Field(ge=0, le=100_000)] | None, EmptyAsNone, Query(description="Only this layer")
    ] = None,
    universal: Annotated[
        bool | None,
        EmptyAsNone,
        Query(description="Only universal (true) or non-universal (false) neurons, at the threshold in effect"),
    ] = None,
    dead: Annotated[bool | None, EmptyAsNone, Query(description="Only dead (true) or live (false) neurons")] = None,
    family: Annotated[str | None, Query(max_length=100, description="Only this family label")] = None,
    role: Annotated[
        str | None,
        Query(max_length=100, description="prediction, suppression, partition, deactivation, activation or entropy"),
    ] = None,
    range: Annotated[
        list[RangeParam] | None,
        BeforeValidator(_drop_empty),
        Query(description="statistic:low:high, repeatable; either bound may be empty (excess_corr:0.5:)"),
    ] = None,
    sort: Annotated[Statistic, Query(description="Statistic to sort by")] = Statistic.excess_corr,  # type: ignore[attr-defined]
    order: Annotated[Order, Query(description="asc or desc (missing values always last)")] = "desc",
    limit: Annotated[
        Annotated[int, Field(ge=1, le=100_000)] | None, EmptyAsNone, Query(description="Page size (capped at max_rows)")
    ] = None,
    offset: Annotated[int, Query(ge=0, le=10_000_000, description="Rows to skip")] = 0,
    x: Annotated[Statistic, Query(description="Scatter x axis")] = Statistic.excess_corr,  # type: ignore[attr-defined]
    y: Annotated[Statistic, Query(description="Scatter y axis")] = Statistic.mean_baseline,  # type: ignore[attr-defined]
    color: Annotated[ColorBy, Query(description="Scatter colour")] = ColorBy.layer,  # type: ignore[attr-defined]
) -> ExplorerQuery:
    where = NeuronFilter(
        layer=layer,
        universal=universal,
        dead=dead,
        family=family or None,
        role=role or None,
        ranges=tuple(parse_range(r) for r in range or []),
        threshold=scope.custom_threshold,
    )
    return ExplorerQuery(
        filter=where,
        sort=sort.value,
        order=order,
        limit=limit or state.settings.page_size,
        offset=offset,
        x=x.value,
        y=y.value,
        color=color.value,
    )


ExplorerQueryDep = Annotated[ExplorerQuery, Depends(get_explorer_query)]
