"""Neurons: one neuron's universality rows, and filtered, sorted, capped lists of a model's neurons.

Column expressions come only from the fixed `STATISTICS` catalog (never from request text), so they can be
placed in SQL; every value from a request is a bound parameter.

"Universal" depends on the threshold the request looks at: at the run's own threshold it is the flag stored at
write time (``neurons.universal``), at another one ``excess_corr > ?`` (`universal_column`).
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from app.db import Capped, fetch_capped


@dataclass(frozen=True, slots=True)
class Statistic:
    """A per-neuron number the explorer can filter, sort and plot."""

    name: str
    column: str  # SQL expression over the aliases n, a, w, f, r
    table: str  # the table that holds it (to know whether it is present)
    label: str
    description: str


def _stat(name: str, alias: str, table: str, label: str, description: str) -> Statistic:
    return Statistic(name, f"{alias}.{name}", table, label, description)


STATISTICS: dict[str, Statistic] = {
    s.name: s
    for s in (
        Statistic("layer", "n.layer", "neurons", "layer", "Layer index"),
        Statistic("neuron", "n.neuron", "neurons", "neuron", "Neuron index in its layer"),
        _stat("excess_corr", "n", "neurons", "excess correlation", "mean_corr − mean_baseline (paper eq. 3)"),
        _stat("max_corr", "n", "neurons", "max corr", "max over partners of the best-match correlation"),
        _stat("mean_corr", "n", "neurons", "mean corr", "mean over partners of the best-match correlation"),
        _stat("min_corr", "n", "neurons", "min corr", "min over partners of the best-match correlation"),
        _stat("max_baseline", "n", "neurons", "max baseline", "max over partners of the rotated-baseline correlation"),
        _stat("mean_baseline", "n", "neurons", "mean baseline", "mean over partners of the rotated baseline"),
        _stat("min_baseline", "n", "neurons", "min baseline", "min over partners of the rotated baseline"),
        _stat("frequency", "a", "activation_stats", "activation frequency", "P(hook_pre > 0)"),
        _stat("pre_mean", "a", "activation_stats", "pre-act mean", "mean of mlp.hook_pre"),
        _stat("pre_var", "a", "activation_stats", "pre-act variance", "variance of mlp.hook_pre"),
        _stat("pre_skew", "a", "activation_stats", "pre-act skew", "skewness of mlp.hook_pre"),
        _stat("pre_kurt", "a", "activation_stats", "pre-act kurtosis", "kurtosis of mlp.hook_pre (Gaussian: 3)"),
        _stat("post_mean", "a", "activation_stats", "post-act mean", "mean of mlp.hook_post"),
        _stat("post_max", "a", "activation_stats", "post-act max", "largest mlp.hook_post"),
        _stat("w_in_norm", "w", "weight_stats", "|w_in|", "norm of the input weights"),
        _stat("w_out_norm", "w", "weight_stats", "|w_out|", "norm of the output weights"),
        _stat("input_bias", "w", "weight_stats", "input bias", "b_in after folding LN"),
        _stat("in_out_sim", "w", "weight_stats", "cos(w_in, w_out)", "cosine of input and output weights"),
        _stat("l2_penalty", "w", "weight_stats", "L2 penalty", "|w_in|² + |w_out|²"),
        _stat("vocab_mean", "w", "weight_stats", "vocab mean", "mean of cos(W_U, w_out) over the vocabulary"),
        _stat("vocab_var", "w", "weight_stats", "vocab variance", "variance of cos(W_U, w_out)"),
        _stat("vocab_skew", "w", "weight_stats", "vocab skew", "skewness of cos(W_U, w_out)"),
        _stat("vocab_kurt", "w", "weight_stats", "vocab kurtosis", "kurtosis of cos(W_U, w_out) (random: ~3)"),
        _stat(
            "null_space_fraction", "w", "weight_stats", "null-space fraction", "share of |w_out|² in W_U's null space"
        ),
        _stat("best_vr", "f", "families", "best variance reduction", "variance reduction of the best feature"),
        _stat("position_mi", "f", "families", "position MI", "mutual information of firing with position"),
        _stat("attention_score", "r", "roles", "attention score", "BOS attention score of the strongest head"),
        _stat("entropy_rank", "r", "roles", "entropy rank", "rank among entropy-neuron candidates"),
    )
}


def universal_column(threshold: float | None, table: str = "n") -> tuple[str, tuple[float, ...]]:
    """The SQL expression for "universal" and its parameters.

    None means the run's threshold: the flag stored at write time. Another threshold compares the excess
    correlation, which is NULL exactly where the stored flag is (dead neurons, models without aggregates), so
    the expression is NULL there too.

    >>> universal_column(None), universal_column(0.3, "neurons")
    (('n.universal', ()), ('(neurons.excess_corr > ?)', (0.3,)))
    """
    if threshold is None:
        return f"{table}.universal", ()
    return f"({table}.excess_corr > ?)", (threshold,)


#: Columns that colour the explorer scatter (categorical or numeric); "universal" goes through `universal_column`.
COLOR_COLUMNS = {
    "layer": ("n.layer", "neurons"),
    "universal": ("n.universal", "neurons"),
    "family": ("f.family", "families"),
    "vocab_role": ("r.vocab_role", "roles"),
}

_JOINS = {
    "a": "LEFT JOIN activation_stats a ON a.model_id = n.model_id AND a.layer = n.layer AND a.neuron = n.neuron",
    "w": "LEFT JOIN weight_stats w ON w.model_id = n.model_id AND w.layer = n.layer AND w.neuron = n.neuron",
    "f": "LEFT JOIN families f ON f.model_id = n.model_id AND f.layer = n.layer AND f.neuron = n.neuron",
    "r": "LEFT JOIN roles r ON r.model_id = n.model_id AND r.layer = n.layer AND r.neuron = n.neuron",
}


@dataclass(frozen=True, slots=True)
class Range:
    statistic: str
    low: float | None
    high: float | None


@dataclass(frozen=True, slots=True)
class NeuronFilter:
    """What the explorer, the list endpoint, the scatter and the CSV export filter on."""

    layer: int | None = None
    universal: bool | None = None
    dead: bool | None = None
    family: str | None = None
    role: str | None = None
    ranges: tuple[Range, ...] = ()
    threshold: float | None = None  # what `universal` means: None the run's threshold, else excess_corr > threshold

    def where(self) -> tuple[list[str], list[object], set[str]]:
        """SQL conditions, their parameters and the table aliases they need."""
        conditions: list[str] = []
        params: list[object] = []
        aliases: set[str] = set()
        if self.layer is not None:
            conditions.append("n.layer = ?")
            params.append(self.layer)
        if self.universal is not None and self.threshold is None:
            conditions.append("n.universal = ?")
            params.append(int(self.universal))
        elif self.universal is not None:  # a range of the (model_id, excess_corr) index; NULL excess is neither
            conditions.append("n.excess_corr > ?" if self.universal else "n.excess_corr <= ?")
            params.append(self.threshold)
        if self.dead is not None:
            conditions.append("n.dead = ?")
            params.append(int(self.dead))
        if self.family is not None:
            conditions.append("f.family = ?")
            params.append(self.family)
            aliases.add("f")
        if self.role is not None:
            if self.role == "entropy":
                conditions.append("r.entropy_rank IS NOT NULL")
            else:
                conditions.append("(r.vocab_role = ? OR r.attention_role = ?)")
                params.extend([self.role, self.role])
            aliases.add("r")
        for item in self.ranges:
            stat = STATISTICS[item.statistic]
            aliases.add(stat.column.split(".")[0])
            if item.low is not None:
                conditions.append(f"{stat.column} >= ?")
                params.append(item.low)
            if item.high is not None:
                conditions.append(f"{stat.column} <= ?")
                params.append(item.high)
        return conditions, params, aliases


def _from(aliases: set[str]) -> str:
    joins = " ".join(_JOINS[alias] for alias in ("a", "w", "f", "r") if alias in aliases)
    return f"FROM neurons n {joins}"


def _alias(column: str) -> str:
    return column.split(".")[0]


#: What every list row carries, besides the requested extra statistics (and `universal`).
SUMMARY_COLUMNS = (
    "n.layer",
    "n.neuron",
    "n.dead",
    "n.excess_corr",
    "n.mean_corr",
    "n.max_corr",
    "n.min_corr",
    "n.mean_baseline",
)


@dataclass(frozen=True, slots=True)
class NeuronListRow:
    """One neuron of a list page: its universality summary, labels when joined, and the extra statistics."""

    layer: int
    neuron: int
    dead: bool
    excess_corr: float | None
    mean_corr: float | None
    max_corr: float | None
    min_corr: float | None
    mean_baseline: float | None
    universal: bool | None
    family: str | None
    vocab_role: str | None
    attention_role: str | None
    values: dict[str, float | None]  # the `extra` statistics by name


def nullable_flag(value: int | None) -> bool | None:
    """A nullable 0/1 column as a bool (NULL: unknown)."""
    return None if value is None else bool(value)


def _list_row(row: Sequence[Any], extra: tuple[str, ...]) -> NeuronListRow:
    """A row of `list_neurons`: `SUMMARY_COLUMNS`, universal, the three labels, then the `extra` statistics."""
    layer, neuron, dead, excess, mean_corr, max_corr, min_corr, mean_baseline, flag, family, vocab, attention = row[:12]
    return NeuronListRow(
        layer,
        neuron,
        bool(dead),
        excess,
        mean_corr,
        max_corr,
        min_corr,
        mean_baseline,
        nullable_flag(flag),
        family,
        vocab,
        attention,
        values=dict(zip(extra, row[12:], strict=True)),
    )


def list_neurons(
    conn: sqlite3.Connection,
    model_id: int,
    where: NeuronFilter,
    sort: str,
    order: Literal["asc", "desc"],
    limit: int,
    offset: int,
    extra: tuple[str, ...] = (),
    with_labels: tuple[str, ...] = (),
) -> list[NeuronListRow]:
    """One page of neurons, sorted; NULLs last in either order; ties broken by (layer, neuron).

    Args:
        extra: statistics to return in `NeuronListRow.values` (the explorer's axes, the sort key).
        with_labels: aliases of label tables to join ("f" for family, "r" for roles) for display.
    """
    conditions, params, aliases = where.where()
    sort_column = STATISTICS[sort].column
    universal, universal_params = universal_column(where.threshold)
    family = "f.family" if "f" in with_labels else "NULL"
    roles = "r.vocab_role, r.attention_role" if "r" in with_labels else "NULL, NULL"
    columns = [*SUMMARY_COLUMNS, universal, family, roles, *(STATISTICS[name].column for name in extra)]
    aliases |= {_alias(sort_column)} | set(with_labels) | {_alias(STATISTICS[name].column) for name in extra}
    direction = "DESC" if order == "desc" else "ASC"
    # DESC already puts NULLs last in SQLite; ASC needs the IS NULL key (which also keeps index use for DESC).
    order_by = f"{sort_column} {direction}" if order == "desc" else f"{sort_column} IS NULL, {sort_column} ASC"
    sql = (
        f"SELECT {', '.join(columns)} {_from(aliases)} WHERE n.model_id = ? "
        f"{''.join(' AND ' + c for c in conditions)} ORDER BY {order_by}, n.layer, n.neuron LIMIT ? OFFSET ?"
    )
    rows = conn.execute(sql, (*universal_params, model_id, *params, limit, offset)).fetchall()
    return [_list_row(row, extra) for row in rows]


def count_neurons(conn: sqlite3.Connection, model_id: int, where: NeuronFilter) -> int:
    conditions, params, aliases = where.where()
    sql = f"SELECT count(*) {_from(aliases)} WHERE n.model_id = ?{''.join(' AND ' + c for c in conditions)}"
    return int(conn.execute(sql, (model_id, *params)).fetchone()[0])


#: The columns every CSV row starts with, before the chosen statistics.
EXPORT_LEADING = ("layer", "neuron", "dead", "universal", "family", "vocab_role")


def export_rows(
    conn: sqlite3.Connection,
    model_id: int,
    where: NeuronFilter,
    sort: str,
    order: Literal["asc", "desc"],
    columns: tuple[str, ...],
    cap: int,
) -> Capped[tuple[Any, ...]]:
    """Every filtered neuron (up to `cap`) for the CSV export: `EXPORT_LEADING`, then the statistics `columns`
    (``layer`` and ``neuron`` left out, being leading already), as plain tuples."""
    conditions, params, aliases = where.where()
    aliases |= {"f", "r"} | {_alias(STATISTICS[c].column) for c in (*columns, sort)}
    sort_column = STATISTICS[sort].column
    direction = "DESC" if order == "desc" else "ASC"
    universal, universal_params = universal_column(where.threshold)
    selected = ", ".join(
        ["n.layer", "n.neuron", "n.dead", universal, "f.family", "r.vocab_role"]
        + [STATISTICS[c].column for c in export_statistics(columns)]
    )
    sql = (
        f"SELECT {selected} {_from(aliases)} WHERE n.model_id = ?{''.join(' AND ' + c for c in conditions)} "
        f"ORDER BY {sort_column} IS NULL, {sort_column} {direction}, n.layer, n.neuron"
    )
    return fetch_capped(conn, sql, (*universal_params, model_id, *params), cap)


def export_statistics(columns: tuple[str, ...]) -> tuple[str, ...]:
    """The statistics columns of an export row (those not among `EXPORT_LEADING`)."""
    return tuple(c for c in columns if c not in EXPORT_LEADING)


class ScatterPoint(NamedTuple):
    layer: int
    neuron: int
    x: float | None
    y: float | None
    color: str | float | None  # a label, a layer, or 0/1/NULL for universal


@dataclass(frozen=True, slots=True)
class ScatterRows:
    rows: list[ScatterPoint]
    total: int
    sampled: bool


def scatter_rows(
    conn: sqlite3.Connection, model_id: int, where: NeuronFilter, x: str, y: str, color: str, cap: int
) -> ScatterRows:
    """(layer, neuron, x, y, colour) of the filtered neurons with both coordinates; a fixed sample beyond `cap`."""
    conditions, params, aliases = where.where()
    x_col, y_col = STATISTICS[x].column, STATISTICS[y].column
    color_col: str = COLOR_COLUMNS[color][0]
    color_params: tuple[float, ...] = ()
    if color == "universal":
        color_col, color_params = universal_column(where.threshold)
    aliases |= {_alias(x_col), _alias(y_col), _alias(COLOR_COLUMNS[color][0])}
    conditions += [f"{x_col} IS NOT NULL", f"{y_col} IS NOT NULL"]
    base = f"{_from(aliases)} WHERE n.model_id = ?{''.join(' AND ' + c for c in conditions)}"
    total = int(conn.execute(f"SELECT count(*) {base}", (model_id, *params)).fetchone()[0])
    # Beyond the cap, a deterministic pseudo-random sample (a multiplicative hash of the neuron id).
    order = "" if total <= cap else " ORDER BY ((n.layer * 1000003 + n.neuron) * 2654435761) % 4294967291"
    rows = conn.execute(
        f"SELECT n.layer, n.neuron, {x_col}, {y_col}, {color_col} {base}{order} LIMIT ?",
        (*color_params, model_id, *params, cap),
    )
    return ScatterRows([ScatterPoint(*row) for row in rows], total, total > cap)


# --- one neuron -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NeuronScores:
    """One neuron's universality row (paper eq. 3): correlations with its partners and the rotated baselines."""

    dead: bool
    max_corr: float | None
    mean_corr: float | None
    min_corr: float | None
    max_baseline: float | None
    mean_baseline: float | None
    min_baseline: float | None
    excess_corr: float | None
    universal: bool | None  # None where there are no aggregates (dead, --reference-only)


def get_neuron(
    conn: sqlite3.Connection, model_id: int, layer: int, neuron: int, threshold: float | None = None
) -> NeuronScores | None:
    """One neuron's universality row; ``universal`` at `threshold` (None: the run's)."""
    universal, universal_params = universal_column(threshold, "neurons")
    row = conn.execute(
        "SELECT dead, max_corr, mean_corr, min_corr, max_baseline, mean_baseline, min_baseline, excess_corr, "
        f"{universal} FROM neurons WHERE model_id = ? AND layer = ? AND neuron = ?",
        (*universal_params, model_id, layer, neuron),
    ).fetchone()
    if row is None:
        return None
    dead, max_corr, mean_corr, min_corr, max_baseline, mean_baseline, min_baseline, excess_corr, flag = row
    return NeuronScores(
        dead=bool(dead),
        max_corr=max_corr,
        mean_corr=mean_corr,
        min_corr=min_corr,
        max_baseline=max_baseline,
        mean_baseline=mean_baseline,
        min_baseline=min_baseline,
        excess_corr=excess_corr,
        universal=nullable_flag(flag),
    )


@dataclass(frozen=True, slots=True)
class PartnerRow:
    """Against one partner model: the best partner neuron (the twin) and the best rotated unit."""

    partner: str  # the partner model's name
    max_corr: float
    max_layer: int
    max_neuron: int
    baseline_corr: float
    baseline_layer: int
    baseline_unit: int


def partner_scores(conn: sqlite3.Connection, model_id: int, layer: int, neuron: int) -> list[PartnerRow]:
    """Per partner model: the best partner neuron and the best rotated unit, in family order."""
    rows = conn.execute(
        "SELECT m.name, p.max_corr, p.max_layer, p.max_neuron, p.baseline_corr, p.baseline_layer, "
        "p.baseline_unit FROM partner_scores p JOIN models m ON m.id = p.partner_model_id "
        "WHERE p.model_id = ? AND p.layer = ? AND p.neuron = ? ORDER BY m.position",
        (model_id, layer, neuron),
    )
    return [PartnerRow(*row) for row in rows]


@dataclass(frozen=True, slots=True)
class MatchRow:
    """A neuron of another model among the best matches (in either direction: see `matches`, `matched_by`)."""

    model: str
    layer: int
    neuron: int
    rank: int  # 0 = the best match
    corr: float


def matches(conn: sqlite3.Connection, model_id: int, layer: int, neuron: int) -> list[MatchRow]:
    """The top-k partner neurons per partner model, each partner's best first."""
    rows = conn.execute(
        "SELECT m.name, t.partner_layer, t.partner_neuron, t.rank, t.corr FROM matches t "
        "JOIN models m ON m.id = t.partner_model_id WHERE t.model_id = ? AND t.layer = ? AND t.neuron = ? "
        "ORDER BY m.position, t.rank",
        (model_id, layer, neuron),
    )
    return [MatchRow(*row) for row in rows]


def matched_by(conn: sqlite3.Connection, model_id: int, layer: int, neuron: int, limit: int) -> list[MatchRow]:
    """Neurons of other models that list this neuron among their best matches (reverse lookup by index)."""
    rows = conn.execute(
        "SELECT m.name, t.layer, t.neuron, t.rank, t.corr FROM matches t JOIN models m ON m.id = t.model_id "
        "WHERE t.partner_model_id = ? AND t.partner_layer = ? AND t.partner_neuron = ? "
        "ORDER BY t.rank, t.corr DESC LIMIT ?",
        (model_id, layer, neuron, limit),
    )
    return [MatchRow(*row) for row in rows]


def neighbour_universal(
    conn: sqlite3.Connection,
    model_id: int,
    layer: int,
    neuron: int,
    direction: Literal["next", "prev"],
    threshold: float | None = None,
) -> tuple[int, int] | None:
    """The next (or previous) universal neuron at `threshold` (None: the run's) in (layer, neuron) order."""
    # Row values keep this a range scan of the primary-key index from (layer, neuron) on.
    universal, universal_params = universal_column(threshold, "neurons")
    if direction == "next":
        sql = (
            f"SELECT layer, neuron FROM neurons WHERE model_id = ? AND (layer, neuron) > (?, ?) AND {universal} = 1 "
            "ORDER BY layer, neuron LIMIT 1"
        )
    else:
        sql = (
            f"SELECT layer, neuron FROM neurons WHERE model_id = ? AND (layer, neuron) < (?, ?) AND {universal} = 1 "
            "ORDER BY layer DESC, neuron DESC LIMIT 1"
        )
    row = conn.execute(sql, (model_id, layer, neuron, *universal_params)).fetchone()
    return (row[0], row[1]) if row else None


def random_neuron(conn: sqlite3.Connection, model_id: int, where: NeuronFilter) -> tuple[int, int] | None:
    conditions, params, aliases = where.where()
    base = f"{_from(aliases)} WHERE n.model_id = ?{''.join(' AND ' + c for c in conditions)}"
    total = int(conn.execute(f"SELECT count(*) {base}", (model_id, *params)).fetchone()[0])
    if total == 0:
        return None
    row = conn.execute(
        f"SELECT n.layer, n.neuron {base} ORDER BY n.layer, n.neuron LIMIT 1 OFFSET ?",
        (model_id, *params, random.randrange(total)),
    ).fetchone()
    return (row[0], row[1]) if row else None
