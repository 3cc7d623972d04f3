"""Models of a run and their write-time aggregates (layer summaries, distributions, top neurons)."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

from app.queries.neurons import nullable_flag, universal_column

#: Analysis tables (revision 0002) whose presence turns panels on; filled by stages that may not have run.
ANALYSIS_TABLES = (
    "activation_stats",
    "histograms",
    "position_profiles",
    "weight_stats",
    "percentiles",
    "token_tables",
    "examples",
    "families",
    "feature_scores",
    "roles",
    "entropy_interventions",
    "attention_scores",
    "path_ablations",
)


#: The tokenizer fingerprint of a model imported from the paper's published tables: no tokenizer and no weights
#: come with them (`precompute.published.PublishedModel.record`).
PUBLISHED_TOKENIZER = "published"


@dataclass(frozen=True, slots=True)
class Model:
    id: int
    run_id: int
    name: str
    source: str
    position: int
    is_reference: bool
    n_layers: int
    d_model: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    n_heads: int
    act_fn: str
    tokenizer_hash: str
    processing: dict[str, Any] = field(repr=False)

    @property
    def n_neurons(self) -> int:
        return self.n_layers * self.d_mlp

    @property
    def published(self) -> bool:
        """A model of a run imported from the paper's tables: its numbers only, no weights to run live."""
        return self.tokenizer_hash == PUBLISHED_TOKENIZER

    @property
    def public_source(self) -> str:
        """What was loaded, as the API may show it: `public_source` of `source` (which stays server-side)."""
        return public_source(self.source)


def public_source(source: str) -> str:
    """A model or dataset source without the server's folders: a path becomes its last component (issue 8).

    TransformerLens and Hugging Face names (``gpt2``, ``stanford-crfm/alias-gpt2-small-x21``, ``hf:org/set``)
    are relative and kept; the precompute stores a local folder as its absolute, resolved path.

    >>> public_source("/srv/models/seed-1"), public_source("C:\\models\\seed-2"), public_source("gpt2")
    ('seed-1', 'seed-2', 'gpt2')
    >>> public_source("stanford-crfm/alias-gpt2-small-x21"), public_source("~/corpus.txt")
    ('stanford-crfm/alias-gpt2-small-x21', 'corpus.txt')
    """
    windows = PureWindowsPath(source)
    if source.startswith(("/", "~", "./", "../")) or (windows.drive and windows.root):
        name = (windows if windows.drive else PurePosixPath(source)).name
        return name or source.strip("/\\") or "?"
    return source


def _model(row: sqlite3.Row) -> Model:
    return Model(
        id=row["id"],
        run_id=row["run_id"],
        name=row["name"],
        source=row["source"],
        position=row["position"],
        is_reference=bool(row["is_reference"]),
        n_layers=row["n_layers"],
        d_model=row["d_model"],
        d_mlp=row["d_mlp"],
        d_vocab=row["d_vocab"],
        n_ctx=row["n_ctx"],
        n_heads=row["n_heads"],
        act_fn=row["act_fn"],
        tokenizer_hash=row["tokenizer_hash"],
        processing=json.loads(row["processing"] or "{}"),
    )


_COLUMNS = (
    "id, run_id, name, source, position, is_reference, n_layers, d_model, d_mlp, d_vocab, n_ctx, n_heads, "
    "act_fn, tokenizer_hash, processing"
)


def models_of_run(conn: sqlite3.Connection, run_id: int) -> list[Model]:
    """The family of a run in command-line order (the reference model first)."""
    rows = conn.execute(f"SELECT {_COLUMNS} FROM models WHERE run_id = ? ORDER BY position", (run_id,))
    return [_model(row) for row in rows]


def analysis_tables(conn: sqlite3.Connection, model_id: int) -> frozenset[str]:
    """The analysis tables that hold at least one row for this model (each an indexed probe)."""
    present = []
    for table in ANALYSIS_TABLES:
        if conn.execute(f"SELECT 1 FROM {table} WHERE model_id = ? LIMIT 1", (model_id,)).fetchone():
            present.append(table)
    return frozenset(present)


@dataclass(frozen=True, slots=True)
class LayerSummary:
    layer: int
    n_neurons: int
    n_dead: int
    n_universal: int | None
    mean_excess: float | None
    max_excess: float | None


def layer_summaries(conn: sqlite3.Connection, model_id: int) -> list[LayerSummary]:
    rows = conn.execute(
        "SELECT layer, n_neurons, n_dead, n_universal, mean_excess, max_excess FROM layer_summaries "
        "WHERE model_id = ? ORDER BY layer",
        (model_id,),
    )
    return [LayerSummary(*row) for row in rows]


@dataclass(frozen=True, slots=True)
class Distribution:
    quantity: str
    bin_edges: list[float]
    counts: list[int]
    quantiles: dict[str, float]


def distributions(conn: sqlite3.Connection, model_id: int) -> dict[str, Distribution]:
    rows = conn.execute(
        "SELECT quantity, bin_edges, counts, quantiles FROM distributions WHERE model_id = ?", (model_id,)
    )
    return {
        row["quantity"]: Distribution(
            row["quantity"], json.loads(row["bin_edges"]), json.loads(row["counts"]), json.loads(row["quantiles"])
        )
        for row in rows
    }


@dataclass(frozen=True, slots=True)
class TopNeuron:
    layer: int
    neuron: int
    excess_corr: float
    mean_corr: float | None
    mean_baseline: float | None
    universal: bool | None


def top_neurons(conn: sqlite3.Connection, model_id: int, limit: int, threshold: float | None = None) -> list[TopNeuron]:
    """The neurons with the highest excess correlation (the index on (model_id, excess_corr) serves this), with
    ``universal`` at `threshold` (None: the run's)."""
    universal, universal_params = universal_column(threshold, "neurons")
    rows = conn.execute(
        f"SELECT layer, neuron, excess_corr, mean_corr, mean_baseline, {universal} FROM neurons "
        "WHERE model_id = ? AND excess_corr IS NOT NULL ORDER BY excess_corr DESC LIMIT ?",
        (*universal_params, model_id, limit),
    )
    return [
        TopNeuron(layer, neuron, excess_corr, mean_corr, mean_baseline, nullable_flag(flag))
        for layer, neuron, excess_corr, mean_corr, mean_baseline, flag in rows
    ]


#: Neurons above a threshold per layer: a range of the (model_id, excess_corr) index (ix_neurons_model_excess).
ABOVE_BY_LAYER_SQL = (
    "SELECT layer, count(*) FROM neurons WHERE model_id = ? AND excess_corr > ? GROUP BY layer ORDER BY layer"
)
#: Their total: the same range, answered from the index alone.
ABOVE_SQL = "SELECT count(*) FROM neurons WHERE model_id = ? AND excess_corr > ?"


def count_above_by_layer(conn: sqlite3.Connection, model_id: int, threshold: float) -> dict[int, int]:
    """Neurons with excess_corr > threshold, per layer (layers without any are left out).

    The aggregates written at the run's threshold (`layer_summaries`) cannot answer another threshold; this reads
    only the index entries above it, so it costs at most one lookup per counted neuron.
    """
    return {layer: n for layer, n in conn.execute(ABOVE_BY_LAYER_SQL, (model_id, threshold))}


def count_above(conn: sqlite3.Connection, model_id: int, threshold: float) -> int:
    """Neurons with excess_corr > threshold (a covering-index range count)."""
    return int(conn.execute(ABOVE_SQL, (model_id, threshold)).fetchone()[0])


def count_universal(conn: sqlite3.Connection, model_id: int) -> int | None:
    """Neurons above the run's threshold, from the write-time aggregates (None: the model has none)."""
    row = conn.execute(
        "SELECT sum(n_universal), count(n_universal) FROM layer_summaries WHERE model_id = ?", (model_id,)
    ).fetchone()
    return int(row[0]) if row and row[1] else None
