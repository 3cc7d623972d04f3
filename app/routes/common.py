"""What several routers share: the documented error responses and the explorer's query-string parameters."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Depends, Query
from pydantic import BaseModel, Field

from app.deps import ScopeDep, StateDep
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


#: A field a plain HTML form left empty (``name=``): the parameter is not given. Declared in the parameter's
#: type (not converted before validation) so that the schema says that ``layer=`` is accepted too (issue 8).
Empty = Literal[""]
#: Most ``range`` parameters one request takes (one per statistic is all a filter needs; keeps URLs bounded).
MAX_RANGES = 10
RangeParam = Annotated[str, Field(pattern=RANGE_PATTERN, max_length=100)]


# The filters are optional fields of the explorer's plain GET form, which sends a field left empty as ``name=``
# (`Empty`); the bounds sit on the inner type, so that they apply to given values only.
async def get_explorer_query(
    state: StateDep,
    scope: ScopeDep,
    layer: Annotated[
        Annotated[int, Field(ge=0, le=100_000)] | Empty | None, Query(description="Only this layer (empty: all)")
    ] = None,
    universal: Annotated[
        bool | Empty | None,
        Query(description="Only universal (true) or non-universal (false) neurons, at the threshold in effect"),
    ] = None,
    dead: Annotated[bool | Empty | None, Query(description="Only dead (true) or live (false) neurons")] = None,
    family: Annotated[str | None, Query(max_length=100, description="Only this family label (empty: any)")] = None,
    role: Annotated[
        str | None,
        Query(
            max_length=100,
            description="prediction, suppression, partition, deactivation, activation or entropy (empty: any)",
        ),
    ] = None,
    range: Annotated[
        list[RangeParam] | None,
        Query(
            max_length=MAX_RANGES,
            description="statistic:low:high, repeatable; either bound may be empty (excess_corr:0.5:); "
            "an empty value is no range",
        ),
    ] = None,
    sort: Annotated[Statistic, Query(description="Statistic to sort by")] = Statistic.excess_corr,  # type: ignore[attr-defined]
    order: Annotated[Order, Query(description="asc or desc (missing values always last)")] = "desc",
    limit: Annotated[
        Annotated[int, Field(ge=1, le=100_000)] | Empty | None,
        Query(description="Page size (capped at max_rows; empty: page_size)"),
    ] = None,
    offset: Annotated[int, Query(ge=0, le=10_000_000, description="Rows to skip")] = 0,
    x: Annotated[Statistic, Query(description="Scatter x axis")] = Statistic.excess_corr,  # type: ignore[attr-defined]
    y: Annotated[Statistic, Query(description="Scatter y axis")] = Statistic.mean_baseline,  # type: ignore[attr-defined]
    color: Annotated[ColorBy, Query(description="Scatter colour")] = ColorBy.layer,  # type: ignore[attr-defined]
) -> ExplorerQuery:
    where = NeuronFilter(
        layer=layer if isinstance(layer, int) else None,
        universal=universal if isinstance(universal, bool) else None,
        dead=dead if isinstance(dead, bool) else None,
        family=family or None,
        role=role or None,
        ranges=tuple(parse_range(r) for r in range or [] if r),
        threshold=scope.custom_threshold,
    )
    return ExplorerQuery(
        filter=where,
        sort=sort.value,
        order=order,
        limit=limit if isinstance(limit, int) else state.settings.page_size,
        offset=offset,
        x=x.value,
        y=y.value,
        color=color.value,
    )


ExplorerQueryDep = Annotated[ExplorerQuery, Depends(get_explorer_query)]
