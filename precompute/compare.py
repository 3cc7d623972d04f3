"""Compare two runs of the same model: their universal sets and how well their per-neuron statistics agree.

The use (issue 7) is putting a run of ours next to the paper's published table (`precompute.published`) or next
to another of our runs (other data, other seeds, other precision): which neurons both call universal (Jaccard,
precision, recall), per layer, how the shared statistics correlate, and where they disagree most.

The atlas is read read-only with plain `sqlite3` (``mode=ro`` + ``PRAGMA query_only``), never through the web app.
Every query is an aggregate, a ``GROUP BY layer`` or a ``LIMIT``-ed top-k, so the answer stays small whatever the
size of the models; SQLite does the joins on the tables' (model_id, layer, neuron) primary keys.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Float

from precompute.store import activation_stats, neurons, weight_stats

#: The universality threshold of a run whose configuration records none (the paper's, paper-spec §2.4).
DEFAULT_THRESHOLD = 0.5
#: How many of the largest excess-correlation disagreements a comparison lists by default.
DEFAULT_TOP_K = 20

#: The per-neuron tables whose floating-point columns are compared (keys excluded); from the store's schema so
#: that a column added by a migration is compared too, when both files have it.
STATISTIC_TABLES: dict[str, tuple[str, ...]] = {
    table.name: tuple(c.name for c in table.columns if isinstance(c.type, Float))
    for table in (neurons, weight_stats, activation_stats)
}


class ComparisonError(ValueError):
    """Two models that cannot be compared, or one that is not in the atlas."""


@dataclass(frozen=True)
class RunSide:
    """One of the two compared models."""

    model_id: int
    run_id: int
    model: str  # the model's name in its run
    threshold: float  # universal ⇔ excess_corr > threshold
    n_neurons: int  # rows in `neurons` (a published run holds its universal neurons only)
    n_universal: int


@dataclass(frozen=True)
class SetAgreement:
    """Agreement of two universal sets A and B, with B as the reference; None where a ratio is 0/0."""

    n_a: int
    n_b: int
    n_both: int
    jaccard: float | None  # |A ∩ B| / |A ∪ B|
    precision: float | None  # |A ∩ B| / |A|: the share of A's universal neurons that B confirms
    recall: float | None  # |A ∩ B| / |B|: the share of B's universal neurons that A finds


@dataclass(frozen=True)
class LayerCount:
    """Universal neurons of one layer in each run, and in both."""

    layer: int
    universal_a: int
    universal_b: int
    universal_both: int


@dataclass(frozen=True)
class StatisticCorrelation:
    """Pearson correlation of one statistic over the neurons both runs have a value for."""

    table: str  # neurons | weight_stats | activation_stats
    statistic: str
    n_shared: int  # neurons with a non-NULL value in both runs
    pearson: float | None  # None with fewer than two shared values or a constant one


@dataclass(frozen=True)
class Disagreement:
    """A neuron whose excess correlation differs between the runs."""

    layer: int
    neuron: int
    excess_a: float
    excess_b: float
    universal_a: bool
    universal_b: bool

    @property
    def difference(self) -> float:
        return self.excess_a - self.excess_b


@dataclass(frozen=True)
class RunComparison:
    """Everything `compare_runs` finds about two runs of one model."""

    a: RunSide
    b: RunSide
    agreement: SetAgreement
    layers: tuple[LayerCount, ...]
    n_shared_neurons: int  # neurons with a `neurons` row in both runs
    correlations: tuple[StatisticCorrelation, ...]
    disagreements: tuple[Disagreement, ...]  # largest |excess_a - excess_b| first

    def correlation(self, statistic: str) -> StatisticCorrelation:
        """The correlation of one statistic by its column name (e.g. ``excess_corr``)."""
        for item in self.correlations:
            if item.statistic == statistic:
                return item
        names = ", ".join(item.statistic for item in self.correlations)
        raise KeyError(f"no statistic {statistic!r}; compared are {names}")


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def set_agreement(n_a: int, n_b: int, n_both: int) -> SetAgreement:
    """Jaccard, precision and recall of A with respect to the reference B from the three counts.

    >>> s = set_agreement(n_a=1533, n_b=1483, n_both=1433)
    >>> round(s.jaccard, 4), round(s.precision, 4), round(s.recall, 4)
    (0.9052, 0.9348, 0.9663)
    >>> set_agreement(0, 0, 0).jaccard is None
    True
    """
    if not 0 <= n_both <= min(n_a, n_b):
        raise ValueError(f"an intersection of {n_both} is impossible for sets of {n_a} and {n_b}")
    return SetAgreement(
        n_a=n_a,
        n_b=n_b,
        n_both=n_both,
        jaccard=_ratio(n_both, n_a + n_b - n_both),
        precision=_ratio(n_both, n_a),
        recall=_ratio(n_both, n_b),
    )


@contextmanager
def _connection(db: str | Path | sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A given connection as it is; a path opened read-only and closed afterwards."""
    if isinstance(db, sqlite3.Connection):
        yield db
        return
    path = Path(db)
    if not path.is_file():
        raise ComparisonError(f"no atlas at {path}")
    # as_uri() percent-encodes the path, so a '?' or '#' in a folder name cannot turn into URI parameters.
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        conn.execute("PRAGMA query_only = ON")
        yield conn
    finally:
        conn.close()


def _side_info(conn: sqlite3.Connection, model_id: int) -> tuple[int, str, int, int, float]:
    row = conn.execute(
        "SELECT m.run_id, m.name, m.n_layers, m.d_mlp, r.config FROM models m JOIN runs r ON r.id = m.run_id "
        "WHERE m.id = ?",
        (model_id,),
    ).fetchone()
    if row is None:
        known = conn.execute("SELECT id, run_id, name FROM models ORDER BY id LIMIT 50").fetchall()
        listed = "; ".join(f"{i} (run {r}, {n})" for i, r, n in known) or "none"
        raise ComparisonError(f"no model with id {model_id}; models are {listed}")
    run_id, name, n_layers, d_mlp, config_text = row
    try:
        config = json.loads(config_text) if config_text else {}
    except ValueError:
        config = {}
    threshold = float(config.get("threshold", DEFAULT_THRESHOLD)) if isinstance(config, dict) else DEFAULT_THRESHOLD
    return int(run_id), str(name), int(n_layers), int(d_mlp), threshold


def resolve_model(db: str | Path | sqlite3.Connection, run_id: int, model: str | None = None) -> int:
    """The model id of `model` in run `run_id`, or of the run's reference model when `model` is None.

    Raises:
        ComparisonError: no such run, or no such model in it (the message lists the run's models).
    """
    with _connection(db) as conn:
        rows = conn.execute(
            "SELECT id, name, is_reference FROM models WHERE run_id = ? ORDER BY position", (run_id,)
        ).fetchall()
        if not rows:
            runs = [r[0] for r in conn.execute("SELECT id FROM runs ORDER BY id LIMIT 50")]
            raise ComparisonError(f"run {run_id} has no models; runs are {', '.join(map(str, runs)) or 'none'}")
        for model_id, name, is_reference in rows:
            if (model is None and is_reference) or name == model:
                return int(model_id)
        if model is None:
            return int(rows[0][0])
        raise ComparisonError(f"run {run_id} has no model {model!r}; its models are {', '.join(r[1] for r in rows)}")


#: ``MODEL`` or ``MODEL@RUN``: a model's name (as in its run: a TransformerLens name or a folder's name) and,
#: optionally, the id of the run to take it from. Without a run it means the newest complete run that has a model of
#: that name, as the dashboard's model URLs do.
SPEC_PATTERN = r"^[^@]{1,200}(?:@[1-9][0-9]{0,9})?$"
_SPEC = re.compile(SPEC_PATTERN)


def parse_spec(text: str) -> tuple[str, int | None]:
    """Split ``MODEL[@RUN]`` into the model's name and the run id (None when not given).

    >>> parse_spec("stanford-gpt2-small-a@3"), parse_spec("seed-0")
    (('stanford-gpt2-small-a', 3), ('seed-0', None))

    Raises:
        ComparisonError: not ``MODEL`` or ``MODEL@RUN`` (a name of 1 to 200 characters without ``@``).
    """
    if not _SPEC.fullmatch(text):
        raise ComparisonError(f"{text!r} is not MODEL or MODEL@RUN (e.g. stanford-gpt2-small-a@3)")
    name, at, run = text.partition("@")
    return name, int(run) if at else None


def resolve_spec(db: str | Path | sqlite3.Connection, text: str) -> int:
    """The model id that ``MODEL[@RUN]`` names: that run's model, or the newest complete run's with that name.

    Raises:
        ComparisonError: a malformed text, no such run, a run that is not complete, or no such model (the message
            lists what there is).
    """
    name, run_id = parse_spec(text)
    with _connection(db) as conn:
        if run_id is None:
            row = conn.execute(
                "SELECT max(m.run_id) FROM models m JOIN runs r ON r.id = m.run_id "
                "WHERE r.status = 'complete' AND m.name = ?",
                (name,),
            ).fetchone()
            if row is None or row[0] is None:
                names = [
                    n
                    for (n,) in conn.execute(
                        "SELECT DISTINCT m.name FROM models m JOIN runs r ON r.id = m.run_id "
                        "WHERE r.status = 'complete' ORDER BY m.name LIMIT 50"
                    )
                ]
                raise ComparisonError(
                    f"no complete run has a model {name!r}; models of complete runs: {', '.join(names) or 'none'}"
                )
            run_id = int(row[0])
        status = conn.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()
        if status is None:
            raise ComparisonError(f"no run {run_id}")
        if status[0] != "complete":
            raise ComparisonError(f"run {run_id} is {status[0]}; only complete runs can be compared")
        return resolve_model(conn, run_id, name)


# ``a.layer >= 0`` (always true) steers SQLite to the primary key for ``a``: with ``model_id = ?`` alone it takes
# ix_neurons_model_excess, which visits the rows in excess order (a random read each; 2-3x slower on 98,304 neurons).
_JOIN = (
    "FROM {t} a JOIN {t} b ON b.model_id = ? AND b.layer = a.layer AND b.neuron = a.neuron "
    "WHERE a.model_id = ? AND a.layer >= 0"
)


def _columns_in_file(conn: sqlite3.Connection, table: str, wanted: Sequence[str]) -> list[str]:
    """The wanted columns that this file's table has (an older file may lack a newer column)."""
    present = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
    return [column for column in wanted if column in present]


def _correlations(
    conn: sqlite3.Connection, table: str, columns: Sequence[str], ids: tuple[int, int]
) -> list[StatisticCorrelation]:
    """Pearson r of each column over the neurons with a value in both runs, in two aggregate passes.

    Means first, then centred sums: the one-pass raw-moment formula cancels badly for statistics with a large
    mean and a small spread (e.g. an L2 penalty), the pitfall of paper-spec §7.3.
    """
    if not columns:
        return []
    both = "a.{c} IS NOT NULL AND b.{c} IS NOT NULL"
    means_sql = ", ".join(
        f"count(CASE WHEN {both} THEN 1 END), avg(CASE WHEN {both} THEN a.{{c}} END), "
        f"avg(CASE WHEN {both} THEN b.{{c}} END)".format(c=c)
        for c in columns
    )
    means = conn.execute(f"SELECT {means_sql} " + _JOIN.format(t=table), (ids[1], ids[0])).fetchone()
    sums_sql = ", ".join(
        f"total(CASE WHEN {both} THEN (a.{{c}} - ?) * (b.{{c}} - ?) END), "
        f"total(CASE WHEN {both} THEN (a.{{c}} - ?) * (a.{{c}} - ?) END), "
        f"total(CASE WHEN {both} THEN (b.{{c}} - ?) * (b.{{c}} - ?) END)".format(c=c)
        for c in columns
    )
    params: list[float] = []
    for i in range(len(columns)):
        mean_a, mean_b = means[3 * i + 1] or 0.0, means[3 * i + 2] or 0.0
        params += [mean_a, mean_b, mean_a, mean_a, mean_b, mean_b]
    sums = conn.execute(f"SELECT {sums_sql} " + _JOIN.format(t=table), (*params, ids[1], ids[0])).fetchone()
    out = []
    for i, column in enumerate(columns):
        n = int(means[3 * i])
        sxy, sxx, syy = sums[3 * i : 3 * i + 3]
        pearson = None
        if n >= 2 and sxx > 0 and syy > 0:
            pearson = max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))
        out.append(StatisticCorrelation(table, column, n, pearson))
    return out


def compare_runs(
    db: str | Path | sqlite3.Connection,
    model_a_id: int,
    model_b_id: int,
    threshold_a: float | None = None,
    threshold_b: float | None = None,
    top_k: int = DEFAULT_TOP_K,
) -> RunComparison:
    """Compare model `model_a_id` of one run with model `model_b_id` of another (B is the reference).

    Args:
        db: the atlas file (opened read-only) or an open connection to it.
        model_a_id: ``models.id`` of the model under test.
        model_b_id: ``models.id`` of the reference (e.g. the paper's published run).
        threshold_a: universality threshold for A; None takes A's run's ``config["threshold"]`` (0.5 without one).
        threshold_b: the same for B.
        top_k: how many of the largest excess-correlation disagreements to list.

    Returns:
        The universal sets' agreement, per-layer counts, the correlation of every per-neuron statistic over the
        neurons both runs hold, and the largest disagreements.

    Raises:
        ComparisonError: a model id not in the atlas, or two models whose layers or widths differ (their neuron
            indices would not name the same neurons).
    """
    if top_k < 0:
        raise ComparisonError(f"top_k must be at least 0, got {top_k}")
    with _connection(db) as conn:
        run_a, name_a, layers_a, width_a, default_a = _side_info(conn, model_a_id)
        run_b, name_b, layers_b, width_b, default_b = _side_info(conn, model_b_id)
        if (layers_a, width_a) != (layers_b, width_b):
            raise ComparisonError(
                f"{name_a} (run {run_a}) has {layers_a} layers of {width_a} neurons and {name_b} (run {run_b}) "
                f"{layers_b} of {width_b}: only runs of the same model can be compared"
            )
        t_a = default_a if threshold_a is None else float(threshold_a)
        t_b = default_b if threshold_b is None else float(threshold_b)
        ids = (model_a_id, model_b_id)

        # Per layer: universal in A, in B, and in both (the joined rows' counts).
        per_layer: dict[int, list[int]] = {layer: [0, 0, 0] for layer in range(layers_a)}
        for side, (model_id, threshold) in enumerate(((model_a_id, t_a), (model_b_id, t_b))):
            for layer, count in conn.execute(
                "SELECT layer, count(*) FROM neurons WHERE model_id = ? AND excess_corr > ? GROUP BY layer",
                (model_id, threshold),
            ):
                per_layer.setdefault(layer, [0, 0, 0])[side] = count
        for layer, count in conn.execute(
            "SELECT a.layer, count(*) "
            + _JOIN.format(t="neurons")
            + " AND a.excess_corr > ? AND b.excess_corr > ? GROUP BY a.layer",
            (model_b_id, model_a_id, t_a, t_b),
        ):
            per_layer.setdefault(layer, [0, 0, 0])[2] = count
        layers = tuple(LayerCount(layer, *counts) for layer, counts in sorted(per_layer.items()))
        n_a, n_b, n_both = (sum(c[i] for c in per_layer.values()) for i in range(3))

        rows = dict(
            conn.execute("SELECT model_id, count(*) FROM neurons WHERE model_id IN (?, ?) GROUP BY model_id", ids)
        )
        (n_shared,) = conn.execute("SELECT count(*) " + _JOIN.format(t="neurons"), (model_b_id, model_a_id)).fetchone()

        correlations = [
            item
            for table, columns in STATISTIC_TABLES.items()
            for item in _correlations(conn, table, _columns_in_file(conn, table, columns), ids)
        ]
        disagreements = tuple(
            Disagreement(layer, neuron, excess_a, excess_b, excess_a > t_a, excess_b > t_b)
            for layer, neuron, excess_a, excess_b in conn.execute(
                "SELECT a.layer, a.neuron, a.excess_corr, b.excess_corr "
                + _JOIN.format(t="neurons")
                + " AND a.excess_corr IS NOT NULL AND b.excess_corr IS NOT NULL "
                "ORDER BY abs(a.excess_corr - b.excess_corr) DESC, a.layer, a.neuron LIMIT ?",
                (model_b_id, model_a_id, top_k),
            )
        )
    return RunComparison(
        a=RunSide(model_a_id, run_a, name_a, t_a, int(rows.get(model_a_id, 0)), n_a),
        b=RunSide(model_b_id, run_b, name_b, t_b, int(rows.get(model_b_id, 0)), n_b),
        agreement=set_agreement(n_a, n_b, n_both),
        layers=layers,
        n_shared_neurons=int(n_shared),
        correlations=tuple(correlations),
        disagreements=disagreements,
    )


__all__ = [
    "ComparisonError",
    "Disagreement",
    "LayerCount",
    "RunComparison",
    "RunSide",
    "SetAgreement",
    "StatisticCorrelation",
    "compare_runs",
    "parse_spec",
    "resolve_model",
    "resolve_spec",
    "set_agreement",
]
