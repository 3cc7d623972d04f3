"""Plotly figure specifications (plain dicts) built from view models, for the HTML pages only.

The JSON twins carry the data; the figures are presentation, so they are built here and placed in the page as
JSON islands that static/app.js hands to Plotly. Plain dicts (not plotly.graph_objects) keep this cheap.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # the view models are only annotations here: plots stay importable without them
    from app.viewmodels.compare import ComparePage
    from app.viewmodels.explorer import ScatterData
    from app.viewmodels.index import ModelOverview
    from app.viewmodels.labels import PathAblationData, RolesPanel
    from app.viewmodels.neuron import UniversalityPanel
    from app.viewmodels.stats import HistogramData, PositionProfileData, VocabHistogram

POSITIVE = "#2166ac"  # blue: positive activations (CircuitsVis' diverging convention)
NEGATIVE = "#b2182b"  # red: negative
GREY = "#888888"
PALETTE = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#ff9da6", "#9d755d", "#bab0ac", "#eeca3b"]
CONFIG = {"displaylogo": False, "responsive": True, "modeBarButtonsToRemove": ["lasso2d", "select2d"]}


def _layout(height: int = 240, **extra: Any) -> dict[str, Any]:
    layout: dict[str, Any] = {
        "height": height,
        "margin": {"l": 48, "r": 12, "t": 30, "b": 40},
        "font": {"size": 11},
        "paper_bgcolor": "rgba(0,0,0,0)",
        "plot_bgcolor": "rgba(0,0,0,0)",
        "legend": {"orientation": "h", "y": 1.0, "yanchor": "bottom", "x": 0},
    }
    layout.update(extra)
    return layout


def figure(data: list[dict[str, Any]], layout: dict[str, Any]) -> dict[str, Any]:
    return {"data": data, "layout": layout, "config": CONFIG}


def _centers(edges: list[float]) -> list[float]:
    return [round((a + b) / 2, 6) for a, b in itertools.pairwise(edges)]


def layer_counts(overview: ModelOverview) -> dict[str, Any]:
    layers = overview.layers
    data = [
        {
            "type": "bar",
            "name": "universal",
            "x": [s.layer for s in layers],
            "y": [s.n_universal or 0 for s in layers],
            "marker": {"color": POSITIVE},
        },
        {
            "type": "bar",
            "name": "dead",
            "x": [s.layer for s in layers],
            "y": [s.n_dead for s in layers],
            "marker": {"color": GREY},
        },
    ]
    return figure(
        data,
        _layout(
            200, barmode="group", xaxis={"title": {"text": "layer"}, "dtick": 1}, yaxis={"title": {"text": "count"}}
        ),
    )


def compare_layers(page: ComparePage) -> dict[str, Any]:
    """Universal neurons per layer in run A, run B and both, side by side (issue 7)."""
    layers = page.layers
    x = [c.layer for c in layers]
    a = page.a.spec if page.a else "A"
    b = page.b.spec if page.b else "B"
    data = [
        {"type": "bar", "name": f"A: {a}", "x": x, "y": [c.universal_a for c in layers], "marker": {"color": POSITIVE}},
        {
            "type": "bar",
            "name": f"B: {b}",
            "x": x,
            "y": [c.universal_b for c in layers],
            "marker": {"color": "#f58518"},
        },
        {"type": "bar", "name": "both", "x": x, "y": [c.universal_both for c in layers], "marker": {"color": GREY}},
    ]
    return figure(
        data,
        _layout(
            280,
            barmode="group",
            xaxis={"title": {"text": "layer"}, "dtick": 1},
            yaxis={"title": {"text": "universal neurons"}},
            margin={"l": 48, "r": 12, "t": 48, "b": 40},
        ),
    )


class Binned(Protocol):
    """A histogram with fixed edges: len(bin_edges) == len(counts) + 1."""

    @property
    def bin_edges(self) -> list[float]: ...

    @property
    def counts(self) -> list[int]: ...


def _extent(distributions: list[Binned], pad: float = 0.02) -> tuple[float, float] | None:
    """From the first to the last non-empty bin over all the histograms (None when they are all empty).

    >>> class D: bin_edges, counts = [-1.0, -0.5, 0.0, 0.5, 1.0], [0, 3, 0, 1]
    >>> _extent([D()], pad=0)
    (-0.5, 1.0)
    """
    lows, highs = [], []
    for dist in distributions:
        filled = [i for i, c in enumerate(dist.counts) if c]
        if filled:
            lows.append(dist.bin_edges[filled[0]])
            highs.append(dist.bin_edges[filled[-1] + 1])
    if not lows:
        return None
    return round(min(lows) - pad, 6), round(max(highs) + pad, 6)


def universality_distributions(overview: ModelOverview) -> dict[str, Any]:
    """Paper Fig. 2a: max correlation, rotated baseline and excess, overlaid; the whole range of the data is shown
    and a dashed line marks the universality threshold in effect (``overview.threshold``)."""
    names = {"mean_corr": "mean max-corr", "mean_baseline": "mean baseline", "excess_corr": "excess"}
    colors = {"mean_corr": POSITIVE, "mean_baseline": GREY, "excess_corr": "#f58518"}
    data = []
    shown: list[Binned] = []
    for quantity, label in names.items():
        dist = overview.distributions.get(quantity)
        if dist is None:
            continue
        shown.append(dist)
        data.append(
            {
                "type": "bar",
                "name": label,
                "x": _centers(dist.bin_edges),
                "y": dist.counts,
                "marker": {"color": colors[quantity]},
                "opacity": 0.6,
            }
        )
    threshold = overview.threshold
    low, high = _extent(shown) or (-0.2, 1.02)
    low, high = min(low, threshold - 0.05), max(high, threshold + 0.05)
    layout = _layout(
        200,
        barmode="overlay",
        bargap=0,
        xaxis={"title": {"text": "correlation"}, "range": [low, high]},
        yaxis={"title": {"text": "neurons"}},
    )
    layout["shapes"] = [
        {
            "type": "line",
            "x0": threshold,
            "x1": threshold,
            "yref": "paper",
            "y0": 0,
            "y1": 1,
            "line": {"dash": "dash", "color": NEGATIVE, "width": 1.5},
        }
    ]
    layout["annotations"] = [
        {
            "x": threshold,
            "y": 1,
            "yref": "paper",
            "text": f"threshold {threshold:g}",
            "showarrow": False,
            "xanchor": "left",
            "yanchor": "top",
            "font": {"size": 10, "color": NEGATIVE},
        }
    ]
    return figure(data, layout)


def partner_bars(universality: UniversalityPanel) -> dict[str, Any]:
    """ρ with the twin against the rotated baseline, per partner; the dotted line is the mean baseline."""
    partners = universality.partners
    x = [p.model for p in partners]
    data = [
        {"type": "bar", "name": "ρ with twin", "x": x, "y": [p.corr for p in partners], "marker": {"color": POSITIVE}},
        {
            "type": "bar",
            "name": "rotated baseline",
            "x": x,
            "y": [p.baseline_corr for p in partners],
            "marker": {"color": GREY},
        },
    ]
    layout = _layout(200, barmode="group", yaxis={"range": [min(0, *[p.baseline_corr or 0 for p in partners]), 1]})
    layout["shapes"] = [
        {
            "type": "line",
            "xref": "paper",
            "x0": 0,
            "x1": 1,
            "y0": universality.mean_baseline or 0,
            "y1": universality.mean_baseline or 0,
            "line": {"dash": "dot", "color": GREY, "width": 1},
        }
    ]
    return figure(data, layout)


def activation_histogram(hist: HistogramData) -> dict[str, Any]:
    n = len(hist.counts)
    width = (hist.high - hist.low) / n if n else 1
    centers = [round(hist.low + (i + 0.5) * width, 6) for i in range(n)]
    colors = [NEGATIVE if c < 0 else POSITIVE for c in centers]
    title = f"{hist.hook} (below {hist.low:g}: {hist.underflow}, above {hist.high:g}: {hist.overflow})"
    layout = _layout(
        220,
        bargap=0,
        title={"text": title, "font": {"size": 11}},
        xaxis={"title": {"text": "activation"}},
        yaxis={"title": {"text": "tokens"}, "type": "linear"},
    )
    layout["updatemenus"] = [
        {
            "type": "buttons",
            "direction": "right",
            "x": 1,
            "xanchor": "right",
            "y": 1.25,
            "showactive": True,
            "buttons": [
                {"label": "linear", "method": "relayout", "args": [{"yaxis.type": "linear"}]},
                {"label": "log", "method": "relayout", "args": [{"yaxis.type": "log"}]},
            ],
        }
    ]
    return figure(
        [
            {
                "type": "bar",
                "x": centers,
                "y": hist.counts,
                "marker": {"color": colors},
                "hovertemplate": "%{x:.3f}: %{y} tokens<extra></extra>",
            }
        ],
        layout,
    )


def vocab_histogram(hist: VocabHistogram) -> dict[str, Any]:
    """Paper Fig. 5 style: how many tokens get each direct logit effect (log y: the tails are what matter)."""
    centers = _centers(hist.bin_edges)
    colors = [NEGATIVE if c < 0 else POSITIVE for c in centers]
    data = [
        {
            "type": "bar",
            "x": centers,
            "y": hist.counts,
            "marker": {"color": colors},
            "hovertemplate": "%{x:.4f}: %{y} tokens<extra></extra>",
        }
    ]
    return figure(
        data,
        _layout(
            200, bargap=0, xaxis={"title": {"text": "W_U·w_out"}}, yaxis={"title": {"text": "tokens"}, "type": "log"}
        ),
    )


def position_profile(profile: PositionProfileData) -> dict[str, Any]:
    x = list(range(len(profile.mean)))
    upper = [m + s for m, s in zip(profile.mean, profile.std, strict=True)]
    lower = [m - s for m, s in zip(profile.mean, profile.std, strict=True)]
    data: list[dict[str, Any]] = [
        {
            "type": "scatter",
            "mode": "lines",
            "x": x,
            "y": upper,
            "line": {"width": 0},
            "showlegend": False,
            "hoverinfo": "skip",
        },
        {
            "type": "scatter",
            "mode": "lines",
            "x": x,
            "y": lower,
            "line": {"width": 0},
            "fill": "tonexty",
            "fillcolor": "rgba(33,102,172,0.2)",
            "showlegend": False,
            "hoverinfo": "skip",
        },
        {
            "type": "scatter",
            "mode": "lines",
            "x": x,
            "y": profile.mean,
            "name": f"mean {profile.hook}",
            "line": {"color": POSITIVE},
        },
    ]
    return figure(
        data,
        _layout(
            200,
            title={"text": f"{profile.hook} by position (mean ± std)", "font": {"size": 11}},
            xaxis={"title": {"text": "position"}},
        ),
    )


def percentile_bars(percentiles: dict[str, float], title: str) -> dict[str, Any]:
    names = list(percentiles)
    data = [
        {
            "type": "bar",
            "orientation": "h",
            "y": names,
            "x": [percentiles[n] for n in names],
            "marker": {"color": POSITIVE},
            "hovertemplate": "%{y}: %{x:.1f}th percentile<extra></extra>",
        }
    ]
    layout = _layout(
        40 + 22 * len(names),
        title={"text": title, "font": {"size": 11}},
        xaxis={"range": [0, 100], "title": {"text": "percentile within layer"}},
        margin={"l": 120, "r": 12, "t": 28, "b": 36},
    )
    layout["shapes"] = [
        {
            "type": "line",
            "x0": 50,
            "x1": 50,
            "yref": "paper",
            "y0": 0,
            "y1": 1,
            "line": {"dash": "dot", "color": GREY, "width": 1},
        }
    ]
    return figure(data, layout)


def entropy_curves(roles: RolesPanel) -> dict[str, Any]:
    """Paper Fig. 7: LN scale, entropy, loss and reciprocal rank against the fixed activation, for this neuron and
    the mean of the model's random baseline neurons (2 × 2 small multiples)."""
    own = roles.entropy_interventions
    baseline = roles.entropy_baseline
    fields = (
        ("ln_scale", "final LN scale"),
        ("entropy", "entropy (nats)"),
        ("loss", "loss"),
        ("reciprocal_rank", "reciprocal rank"),
    )
    data: list[dict[str, Any]] = []
    layout = _layout(400, showlegend=True, margin={"l": 48, "r": 12, "t": 64, "b": 36})
    annotations = []
    for i, (field, label) in enumerate(fields):
        axis = "" if i == 0 else str(i + 1)
        row, col = divmod(i, 2)
        x0, x1 = (0.0, 0.44) if col == 0 else (0.56, 1.0)
        y0, y1 = (0.58, 1.0) if row == 0 else (0.0, 0.4)
        layout[f"xaxis{axis}"] = {"domain": [x0, x1], "anchor": f"y{axis}"}
        layout[f"yaxis{axis}"] = {"domain": [y0, y1], "anchor": f"x{axis}"}
        annotations.append(
            {
                "text": label,
                "x": (x0 + x1) / 2,
                "y": y1 + 0.02,
                "xref": "paper",
                "yref": "paper",
                "showarrow": False,
                "xanchor": "center",
                "yanchor": "bottom",
                "font": {"size": 11},
            }
        )
        data.append(
            {
                "type": "scatter",
                "mode": "lines+markers",
                "name": "this neuron",
                "legendgroup": "own",
                "showlegend": i == 0,
                "x": [p.value for p in own],
                "y": [getattr(p, field) for p in own],
                "xaxis": f"x{axis}",
                "yaxis": f"y{axis}",
                "line": {"color": POSITIVE},
            }
        )
        if baseline:
            data.append(
                {
                    "type": "scatter",
                    "mode": "lines",
                    "name": "random baseline neurons (mean)",
                    "legendgroup": "base",
                    "showlegend": i == 0,
                    "x": [p.value for p in baseline],
                    "y": [getattr(p, field) for p in baseline],
                    "xaxis": f"x{axis}",
                    "yaxis": f"y{axis}",
                    "line": {"color": GREY, "dash": "dash"},
                }
            )
    layout["annotations"] = annotations
    layout["legend"] = {"orientation": "h", "y": 1.08, "yanchor": "bottom", "x": 0}
    return figure(data, layout)


def path_ablation(path: PathAblationData) -> dict[str, Any]:
    pts = path.points
    data = [
        {
            "type": "scattergl",
            "mode": "markers",
            "name": "Δ BOS attention",
            "x": [p[0] for p in pts],
            "y": [p[1] for p in pts],
            "marker": {"size": 3, "color": POSITIVE},
        },
        {
            "type": "scattergl",
            "mode": "markers",
            "name": "Δ |z|",
            "x": [p[0] for p in pts],
            "y": [p[2] for p in pts],
            "marker": {"size": 3, "color": "#f58518"},
            "yaxis": "y2",
        },
    ]
    layout = _layout(
        220,
        title={"text": f"ablating the path to L{path.attention_layer}H{path.head}", "font": {"size": 11}},
        xaxis={"title": {"text": "activation"}},
        yaxis2={"overlaying": "y", "side": "right", "showgrid": False},
    )
    return figure(data, layout)


def scatter(data: ScatterData, labels: dict[str, str]) -> dict[str, Any]:
    """The explorer scatter; categorical colours get one trace per category, numeric ones a colour scale."""
    custom = [[layer, neuron] for layer, neuron in zip(data.layer, data.neuron, strict=True)]
    hover = "L%{customdata[0]}N%{customdata[1]}<br>x=%{x:.3f}<br>y=%{y:.3f}<extra></extra>"
    traces: list[dict[str, Any]] = []
    numeric = data.color == "layer"
    if numeric:
        traces.append(
            {
                "type": "scattergl",
                "mode": "markers",
                "x": data.xs,
                "y": data.ys,
                "customdata": custom,
                "hovertemplate": hover,
                "marker": {
                    "size": 5,
                    "color": data.colors,
                    "colorscale": "Viridis",
                    "showscale": True,
                    "colorbar": {"title": {"text": "layer"}},
                },
            }
        )
    else:
        groups: dict[str, list[int]] = {}
        for i, c in enumerate(data.colors):
            groups.setdefault(str(c), []).append(i)
        for k, (name, idx) in enumerate(sorted(groups.items())):
            traces.append(
                {
                    "type": "scattergl",
                    "mode": "markers",
                    "name": name,
                    "x": [data.xs[i] for i in idx],
                    "y": [data.ys[i] for i in idx],
                    "customdata": [custom[i] for i in idx],
                    "hovertemplate": hover,
                    "marker": {"size": 5, "color": PALETTE[k % len(PALETTE)]},
                }
            )
    layout = _layout(
        420,
        xaxis={"title": {"text": labels.get(data.x, data.x)}},
        yaxis={"title": {"text": labels.get(data.y, data.y)}},
        hovermode="closest",
    )
    return figure(traces, layout)
