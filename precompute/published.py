"""Import the paper's published per-neuron tables into an atlas as "published runs".

Gurnee et al. (2024) released, for GPT-2-small-a, GPT-2-medium-a and Pythia-160m, one row per universal neuron
(excess correlation ϱ > 0.5, paper-spec §2.4-§3.3) with its correlation scores, weight statistics and
pre-activation moments (`precompute/paper_data/`, shipped unchanged; see its NOTICE.md). Each table becomes one
complete run holding one model, written through `AtlasStore` like any precompute, so the dashboard and
`precompute.compare` can put the paper's own numbers next to a run of ours (issue 7).

What a published run holds, and what it cannot:

- ``neurons``: the table's rows only (the paper released the universal neurons, not all 36,864 / 98,304), so every
  stored neuron is universal; ``dead`` is False (a dead neuron has no correlation, so none is in the table).
- ``weight_stats``: the table's weight columns; ``null_space_fraction`` stays NULL (not published).
- ``activation_stats``: the table's ``mean, var, skew, kurt`` are moments of the PRE-activation (``mlp.hook_pre``,
  paper-spec §3.1) and go to ``pre_*``. The published ``sparsity`` is P(pre > e) with e = -0.0980391 (the edge
  its histogram counts from), not the P(pre > 0) of ``frequency``, which stays NULL: it goes to
  ``frequency_paper`` (revision 0003), the column a precompute fills with the same definition, so comparing a run
  with the paper compares like with like.
  ``n_tokens`` is NOT NULL in the schema but unknown here (the moments come from histograms over the 22 full
  Pile-test subsets): it is 0. Post-activation moments, minima and maxima stay NULL.
- ``layer_summaries``: ``n_neurons`` is the model's real ``d_mlp``; ``n_dead`` is unknown and stored as 0;
  ``n_universal``, ``mean_excess`` and ``max_excess`` describe the published (universal) rows of the layer only,
  so ``mean_excess`` is the mean over universal neurons, not over the whole layer as in a precompute.
- ``distributions``: built by `precompute.universality.distribution_rows` over the published rows only.

Importing is idempotent: a complete run whose configuration hash matches (same model, same table bytes, same
label and threshold) is skipped and its id returned; an interrupted one is cleared and written again.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import platform
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from precompute.correlation import ModelShape
from precompute.store import (
    AtlasStore,
    activation_stats,
    config_hash,
    distributions,
    layer_summaries,
    neurons,
    weight_stats,
)
from precompute.universality import NeuronScores, distribution_rows, layer_summary_rows
from precompute.weights import WEIGHT_STAT_COLUMNS

logger = logging.getLogger(__name__)

#: The paper's universality threshold on the excess correlation (paper-spec §2.4).
PAPER_THRESHOLD = 0.5

#: Where the tables come from; recorded as ``config["published"]`` of every run imported from them.
PAPER_PROVENANCE: Mapping[str, str] = {
    "source": "Gurnee et al. 2024",
    "repository": "wesg52/universal-neurons",
    "commit": "d797aaa",
    "folder": "dataframes/interpretable_neurons/",
    "licence": "MIT",
}

#: The data behind the tables (paper-spec §1.2-§1.3): recorded as the run's ``dataset``.
PAPER_DATASET: Mapping[str, Any] = {
    "source": "the Pile, test split (published)",
    "kind": "published",
    "split": "test",
    "ctx": 512,
    "tokens": 100_000_000,
    # pile.test.all-100m.512: ceil(1e8 / 512) rows of 512 tokens, each starting with BOS (paper-spec §1.2).
    "rows": 195_313,
    "tokens_seen": 195_313 * 512,
    "note": (
        "correlations over 100M tokens of the Pile test split in rows of 512; activation moments and sparsity "
        "over histograms of the 22 full Pile-test subsets; no BOS/pad filtering"
    ),
}

#: HookedTransformer.from_pretrained's default weight processing, which the paper used (paper App. A.1).
PAPER_PROCESSING: Mapping[str, bool] = {"fold_ln": True, "center_writing_weights": True, "center_unembed": True}

#: Columns of universal.csv that go to `neurons` under the same names.
NEURON_COLUMNS = ("max_corr", "mean_corr", "min_corr", "max_baseline", "mean_baseline", "min_baseline", "excess_corr")
#: Columns of universal.csv that go to `weight_stats` under the same names: every weight statistic but the
#: null-space fraction, which the paper's tables do not have.
WEIGHT_COLUMNS = tuple(column for column in WEIGHT_STAT_COLUMNS if column != "null_space_fraction")
#: universal.csv column → `activation_stats` column. The table's moments are of the pre-activation (§3.1).
ACTIVATION_COLUMNS: Mapping[str, str] = {
    "mean": "pre_mean",
    "var": "pre_var",
    "skew": "pre_skew",
    "kurt": "pre_kurt",
    "sparsity": "frequency_paper",  # P(pre > -0.098), the paper's definition (revision 0003, docs/analyses.md)
}
#: Every column a universal.csv must have (paper-spec §3.3); further columns are ignored.
UNIVERSAL_COLUMNS = ("layer", "neuron", *NEURON_COLUMNS, *WEIGHT_COLUMNS, "mean", "var", "skew", "kurt", "sparsity")
PREDICTION_COLUMNS = ("layer", "neuron", "feature", "is_surpress")  # sic: the paper's spelling

#: The tables a published run writes for its model (cleared before an interrupted import is written again).
PUBLISHED_TABLES = (neurons, weight_stats, activation_stats, layer_summaries, distributions)

#: The stage name recorded in ``runs.stages`` for an import.
STAGE = "published"


class PublishedTableError(ValueError):
    """A published table that is missing, malformed, or does not fit its model."""


@dataclass(frozen=True)
class PublishedModel:
    """One model of the paper with its real shapes (paper Table 1, paper-spec §1.1)."""

    name: str  # the TransformerLens name
    n_layers: int
    d_model: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    n_heads: int
    act_fn: str
    partners: tuple[str, ...]  # the seeds the paper correlated it with (the ϱ averages over these)

    @property
    def n_neurons(self) -> int:
        """All MLP neurons of the model.

        >>> PUBLISHED_MODELS["stanford-gpt2-medium-a"].n_neurons
        98304
        """
        return self.n_layers * self.d_mlp

    def record(self) -> dict[str, Any]:
        """The `models` row of this model (``add_model`` keywords, without run, position and reference)."""
        return {
            "name": self.name,
            "source": self.name,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "d_mlp": self.d_mlp,
            "d_vocab": self.d_vocab,
            "n_ctx": self.n_ctx,
            "n_heads": self.n_heads,
            "act_fn": self.act_fn,
            "processing": dict(PAPER_PROCESSING),
            # No tokenizer is loaded for a published table: a fixed text marks that.
            "tokenizer_hash": "published",
        }


_GPT2_SMALL = {"n_layers": 12, "d_model": 768, "d_mlp": 3072, "d_vocab": 50257, "n_ctx": 1024, "n_heads": 12}
_GPT2_MEDIUM = {"n_layers": 24, "d_model": 1024, "d_mlp": 4096, "d_vocab": 50257, "n_ctx": 1024, "n_heads": 16}
_PYTHIA_160M = {"n_layers": 12, "d_model": 768, "d_mlp": 3072, "d_vocab": 50304, "n_ctx": 2048, "n_heads": 12}

#: The three models with a published universal.csv, by TransformerLens name.
PUBLISHED_MODELS: Mapping[str, PublishedModel] = {
    "stanford-gpt2-small-a": PublishedModel(
        "stanford-gpt2-small-a",
        **_GPT2_SMALL,
        act_fn="gelu_new",
        partners=tuple(f"stanford-gpt2-small-{s}" for s in "bcde"),
    ),
    "stanford-gpt2-medium-a": PublishedModel(
        "stanford-gpt2-medium-a",
        **_GPT2_MEDIUM,
        act_fn="gelu_new",
        partners=tuple(f"stanford-gpt2-medium-{s}" for s in "bcde"),
    ),
    "pythia-160m": PublishedModel(
        "pythia-160m",
        **_PYTHIA_160M,
        act_fn="gelu",
        partners=tuple(f"pythia-160m-seed{s}" for s in "123"),
    ),
}

#: The tables shipped in ``precompute/paper_data/`` for each model.
PAPER_TABLES: Mapping[str, tuple[str, ...]] = {
    "stanford-gpt2-small-a": ("universal.csv", "high_excess_correlation.csv", "sub_gaussian_activation_kurtosis.csv"),
    "stanford-gpt2-medium-a": ("universal.csv", "prediction_neurons.csv"),
    "pythia-160m": ("universal.csv",),
}


@dataclass(frozen=True)
class PublishedRow:
    """One row of a universal.csv: a neuron and its published values by column name."""

    layer: int
    neuron: int
    values: Mapping[str, float] = field(repr=False)


class PredictionLabel(NamedTuple):
    """A prediction neuron's label in ``prediction_neurons.csv`` (paper §5.1)."""

    feature: str  # the token class the neuron promotes (or suppresses), e.g. all_caps
    is_suppression: bool  # the table's ``is_surpress``: a suppression neuron


def _model(name: str) -> PublishedModel:
    try:
        return PUBLISHED_MODELS[name]
    except KeyError:
        raise PublishedTableError(
            f"no published table for model {name!r}; published models are {', '.join(PUBLISHED_MODELS)}"
        ) from None


def paper_table(model: str, table: str = "universal.csv") -> Traversable:
    """The shipped copy of one of the paper's tables.

    Raises:
        PublishedTableError: the model or the table is not among the shipped ones (the message lists them).

    >>> paper_table("pythia-160m").name
    'universal.csv'
    """
    _model(model)
    if table not in PAPER_TABLES[model]:
        raise PublishedTableError(f"no table {table!r} for {model}; shipped are {', '.join(PAPER_TABLES[model])}")
    return files("precompute").joinpath("paper_data", model, table)


def _check_header(header: Sequence[str] | None, expected: Sequence[str], source: str) -> None:
    present = set(header or ())
    missing = [column for column in expected if column not in present]
    if missing:
        raise PublishedTableError(
            f"{source}: missing column {missing[0]!r}"
            + (f" (and {', '.join(map(repr, missing[1:]))})" if missing[1:] else "")
            + f"; expected columns are {', '.join(expected)}"
        )


def _parse(value: str, column: str, line: int, source: str, kind: type[int] | type[float]) -> Any:
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise PublishedTableError(f"{source}, line {line}: column {column!r} holds {value!r}, not a number") from None


def parse_universal_table(text: str, source: str = "universal.csv") -> list[PublishedRow]:
    """Parse a universal.csv, checking its header and every value.

    Args:
        text: the CSV text.
        source: the file's name, for error messages.

    Returns:
        One `PublishedRow` per line, in file order.

    Raises:
        PublishedTableError: a missing column, a value that is not a number, or a neuron listed twice.

    >>> header = ",".join(UNIVERSAL_COLUMNS)
    >>> rows = parse_universal_table(header + "\\n" + ",".join(["0", "7"] + ["0.5"] * 21))
    >>> rows[0].layer, rows[0].neuron, rows[0].values["sparsity"]
    (0, 7, 0.5)
    >>> try:
    ...     parse_universal_table(header.replace(",kurt,", ",kurtosis,") + "\\n")
    ... except PublishedTableError as error:
    ...     print(error)  # doctest: +ELLIPSIS
    universal.csv: missing column 'kurt'; expected columns are layer, neuron, max_corr, ...
    """
    reader = csv.DictReader(io.StringIO(text))
    _check_header(reader.fieldnames, UNIVERSAL_COLUMNS, source)
    rows: list[PublishedRow] = []
    seen: set[tuple[int, int]] = set()
    for line, record in enumerate(reader, start=2):
        layer = _parse(record["layer"], "layer", line, source, int)
        neuron = _parse(record["neuron"], "neuron", line, source, int)
        if (layer, neuron) in seen:
            raise PublishedTableError(f"{source}, line {line}: neuron L{layer}.{neuron} is listed twice")
        seen.add((layer, neuron))
        values = {c: _parse(record[c], c, line, source, float) for c in UNIVERSAL_COLUMNS[2:]}
        rows.append(PublishedRow(layer, neuron, values))
    return rows


def read_universal_table(csv_path: str | Path | Traversable) -> list[PublishedRow]:
    """Read and check a universal.csv file (see `parse_universal_table`)."""
    path = Path(csv_path) if isinstance(csv_path, str) else csv_path
    return parse_universal_table(path.read_bytes().decode("utf-8"), source=str(path))


def prediction_labels(model: str = "stanford-gpt2-medium-a") -> dict[tuple[int, int], tuple[PredictionLabel, ...]]:
    """The paper's prediction/suppression neuron labels, by (layer, neuron), in the table's order.

    Only GPT-2-medium-a has them (``prediction_neurons.csv``): 136 labels of 130 neurons, since six neurons carry
    two token classes each (e.g. L23.5: contains_open_bracket and contains_open_paren), hence a tuple per neuron.
    The dashboard shows them next to the published run's neurons.

    Raises:
        PublishedTableError: no labels were published for `model`, or the table is malformed.

    >>> labels = prediction_labels()
    >>> len(labels), sum(map(len, labels.values())), labels[(20, 13)], labels[(23, 3440)][0].is_suppression
    (130, 136, (PredictionLabel(feature='all_caps', is_suppression=False),), True)
    >>> [label.feature for label in labels[(23, 5)]]
    ['contains_open_bracket', 'contains_open_paren']
    """
    table = paper_table(model, "prediction_neurons.csv")
    source = f"{model}/prediction_neurons.csv"
    reader = csv.DictReader(io.StringIO(table.read_text(encoding="utf-8")))
    _check_header(reader.fieldnames, PREDICTION_COLUMNS, source)
    labels: dict[tuple[int, int], tuple[PredictionLabel, ...]] = {}
    for line, record in enumerate(reader, start=2):
        flag = record["is_surpress"]
        if flag not in ("True", "False"):
            raise PublishedTableError(f"{source}, line {line}: is_surpress holds {flag!r}, not True or False")
        key = (
            _parse(record["layer"], "layer", line, source, int),
            _parse(record["neuron"], "neuron", line, source, int),
        )
        labels[key] = (*labels.get(key, ()), PredictionLabel(record["feature"], flag == "True"))
    return labels


# --- rows for the store -----------------------------------------------------------------------------------


def _check_fits(rows: Iterable[PublishedRow], model: PublishedModel, source: str) -> None:
    for row in rows:
        if not (0 <= row.layer < model.n_layers and 0 <= row.neuron < model.d_mlp):
            raise PublishedTableError(
                f"{source}: neuron L{row.layer}.{row.neuron} is outside {model.name} "
                f"({model.n_layers} layers of {model.d_mlp} neurons)"
            )


def _scores(rows: Sequence[PublishedRow], model: PublishedModel) -> NeuronScores:
    """Full-size score arrays, NaN for every neuron the table does not list (its values were not published).

    This is the shape `precompute.universality` summarises, so layer summaries and distributions are built by
    the same code as a precompute's, over the published rows only (NaN is skipped there).
    """
    flat = np.array([row.layer * model.d_mlp + row.neuron for row in rows], dtype=np.int64)
    arrays = {}
    for column in NEURON_COLUMNS:
        values = np.full(model.n_neurons, np.nan)  # [n_layers * d_mlp]
        values[flat] = [row.values[column] for row in rows]
        arrays[column] = values
    return NeuronScores(**arrays, dead=np.zeros(model.n_neurons, dtype=bool))


def _neuron_rows(model_id: int, rows: Iterable[PublishedRow], threshold: float) -> Iterator[dict[str, Any]]:
    for row in rows:
        yield {
            "model_id": model_id,
            "layer": row.layer,
            "neuron": row.neuron,
            "dead": False,
            **{column: row.values[column] for column in NEURON_COLUMNS},
            "universal": row.values["excess_corr"] > threshold,
        }


def _weight_rows(model_id: int, rows: Iterable[PublishedRow]) -> Iterator[dict[str, Any]]:
    for row in rows:
        yield {
            "model_id": model_id,
            "layer": row.layer,
            "neuron": row.neuron,
            **{column: row.values[column] for column in WEIGHT_COLUMNS},
        }


def _activation_rows(model_id: int, rows: Iterable[PublishedRow]) -> Iterator[dict[str, Any]]:
    for row in rows:
        yield {
            "model_id": model_id,
            "layer": row.layer,
            "neuron": row.neuron,
            "n_tokens": 0,  # NOT NULL, but the paper's token count for the moments is unknown: see the module doc
            **{stored: row.values[column] for column, stored in ACTIVATION_COLUMNS.items()},
        }


def published_config(
    model: PublishedModel,
    table: str,
    sha256: str,
    label: str,
    provenance: Mapping[str, str],
    threshold: float,
) -> dict[str, Any]:
    """The run configuration of an imported table; its hash identifies the import (a re-import is skipped)."""
    return {
        "published": {**provenance, "table": table, "sha256": sha256, "label": label},
        "models": [model.name],
        "partners": list(model.partners),
        "threshold": threshold,
    }


def import_table(
    store: AtlasStore,
    model: PublishedModel,
    csv_path: str | Path | Traversable,
    label: str = "published",
    *,
    provenance: Mapping[str, str] = PAPER_PROVENANCE,
    dataset: Mapping[str, Any] = PAPER_DATASET,
    threshold: float = PAPER_THRESHOLD,
) -> int:
    """Import one universal.csv as a complete run of one model; return the run id.

    The whole table is read and checked before anything is written. A complete run with the same configuration
    (model, table name and bytes, label, provenance, threshold) is skipped: its id is returned and nothing is
    written. A run with that configuration left ``running`` or ``failed`` by an interrupted import is cleared and
    written again.

    Args:
        store: the atlas to write to (already migrated by `AtlasStore`).
        model: the model the table describes; its shapes bound the table's layers and neurons.
        csv_path: the table; a file with the columns of `UNIVERSAL_COLUMNS` (more are ignored).
        label: a name for the import, recorded in ``config["published"]["label"]``.
        provenance: where the table comes from, recorded in ``config["published"]``.
        dataset: the data the table was computed on, recorded as the run's dataset.
        threshold: the universality threshold recorded for the run and applied to ``neurons.universal``.

    Raises:
        PublishedTableError: the table is malformed or lists a neuron the model does not have.
    """
    path = Path(csv_path) if isinstance(csv_path, str) else csv_path
    data = path.read_bytes()
    rows = parse_universal_table(data.decode("utf-8"), source=str(path))
    _check_fits(rows, model, str(path))
    table = provenance.get("table", path.name)
    config = published_config(model, table, hashlib.sha256(data).hexdigest(), label, provenance, threshold)

    existing = store.find_run(config_hash(config))
    if existing is not None and existing["status"] == "complete":
        logger.info("%s (%s) is already imported as run %s: skipped", table, label, existing["id"])
        return int(existing["id"])
    started = time.perf_counter()
    if existing is not None:
        run_id = int(existing["id"])
        logger.info("re-importing %s into unfinished run %s", table, run_id)
        store.update_run(run_id, status="running", error=None)
    else:
        environment = {"importer": __name__, "python": platform.python_version()}
        run_id = store.create_run(config, environment, dataset)
    store.update_run(run_id, tokens_seen=dataset.get("tokens_seen"))
    model_id = store.add_model(run_id, position=0, is_reference=True, **model.record())
    store.clear_model_tables([model_id], PUBLISHED_TABLES)
    try:
        store.insert_rows(neurons, _neuron_rows(model_id, rows, threshold))
        store.insert_rows(weight_stats, _weight_rows(model_id, rows))
        store.insert_rows(activation_stats, _activation_rows(model_id, rows))
        scores = _scores(rows, model)
        shape = ModelShape(model.name, model.n_layers, model.d_mlp)
        store.insert_rows(layer_summaries, layer_summary_rows(model_id, shape, scores, threshold))
        store.insert_rows(distributions, distribution_rows(model_id, scores))
    except BaseException as exc:
        store.fail_run(run_id, f"{type(exc).__name__}: {exc}")
        raise
    store.mark_stage_done(run_id, STAGE, time.perf_counter() - started)
    store.finish_run(run_id)
    logger.info("imported %s rows of %s as run %s", len(rows), table, run_id)
    return run_id


def import_paper(db_path: str | Path, models: Sequence[str] | None = None) -> list[int]:
    """Import the paper's universal.csv tables into the atlas at `db_path`, one run per model.

    Opening the store creates the file or migrates it first. Runs already in the file are not touched; a table
    imported before is skipped (its existing run id is returned).

    Args:
        db_path: the SQLite atlas.
        models: TransformerLens names among `PUBLISHED_MODELS`; None imports all three.

    Returns:
        The run id of each model's import, in the order of `models`.

    Raises:
        PublishedTableError: an unknown model name (the message lists the published ones).
    """
    chosen = [_model(name) for name in (models if models is not None else list(PUBLISHED_MODELS))]
    with AtlasStore(db_path) as store:
        return [
            import_table(
                store,
                model,
                paper_table(model.name),
                provenance={**PAPER_PROVENANCE, "table": f"{model.name}/universal.csv"},
            )
            for model in chosen
        ]


__all__ = [
    "ACTIVATION_COLUMNS",
    "PAPER_DATASET",
    "PAPER_PROVENANCE",
    "PAPER_TABLES",
    "PAPER_THRESHOLD",
    "PUBLISHED_MODELS",
    "UNIVERSAL_COLUMNS",
    "PredictionLabel",
    "PublishedModel",
    "PublishedRow",
    "PublishedTableError",
    "import_paper",
    "import_table",
    "paper_table",
    "parse_universal_table",
    "prediction_labels",
    "read_universal_table",
]
