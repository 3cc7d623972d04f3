"""The SQLite store: table definitions and the only writer.

The SQLite file is the product (Datasette's lesson): `precompute/` writes it through this module alone and
`app/` only reads it. This module deliberately imports no torch so that the web app and Alembic can use the
table definitions cheaply.

Every write commits per chunk, and a run stays ``status='running'`` until `AtlasStore.finish_run` marks it
``complete`` in the same transaction that records its content hash, so an interrupted precompute never leaves
a file that looks complete. The schema is created and changed only by Alembic revisions (`upgrade`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    insert,
    select,
    update,
)

logger = logging.getLogger(__name__)

#: Where the Alembic environment lives (the repository's top-level ``alembic/`` folder).
ALEMBIC_DIR = Path(__file__).resolve().parent.parent / "alembic"

#: Rows per INSERT transaction: small enough that an interruption loses little, large enough to be fast.
WRITE_CHUNK_ROWS = 20_000

RUN_STATUSES = ("running", "complete", "failed")

metadata = MetaData()

# --- revision 0001: the precompute core -------------------------------------------------------------------

runs = Table(
    "runs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("created_at", String, nullable=False, comment="UTC ISO-8601 time the run started"),
    Column("finished_at", String, comment="UTC ISO-8601 time the run was marked complete or failed"),
    Column("status", String, nullable=False, comment="running | complete | failed"),
    Column("config_hash", String, nullable=False, comment="sha256 of `config`; a re-run with it resumes"),
    Column("config", JSON, nullable=False, comment="the run's full configuration: every stage's config"),
    Column("environment", JSON, nullable=False, comment="versions of Python, torch, transformers, ..."),
    Column("dataset", JSON, nullable=False, comment="source, ctx, rows, token filter, corpus fingerprint"),
    Column("tokens_seen", Integer, comment="tokens run through the models"),
    Column("tokens_counted", Integer, comment="tokens left after the BOS/EOS/pad/newline filter"),
    Column("timings", JSON, comment="seconds per stage"),
    Column("stages", JSON, comment="stages completed, in order"),
    Column("error", Text, comment="why the run failed"),
    Column("content_hash", String, comment="hash of the finished results; the ETag of every page"),
)

models = Table(
    "models",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("name", String, nullable=False, comment="TransformerLens name or local folder basename"),
    Column("source", String, nullable=False, comment="what was loaded: a TransformerLens name or a path"),
    Column("position", Integer, nullable=False, comment="order of the model on the command line"),
    Column("is_reference", Boolean, nullable=False, comment="first model of the family"),
    Column("n_layers", Integer, nullable=False),
    Column("d_model", Integer, nullable=False),
    Column("d_mlp", Integer, nullable=False),
    Column("d_vocab", Integer, nullable=False),
    Column("n_ctx", Integer, nullable=False),
    Column("n_heads", Integer, nullable=False),
    Column("act_fn", String, nullable=False),
    Column("processing", JSON, nullable=False, comment="weight processing flags (fold_ln, center_*)"),
    Column("tokenizer_hash", String, nullable=False),
    UniqueConstraint("run_id", "name"),
)

vocab = Table(
    "vocab",
    metadata,
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    Column("token_id", Integer, primary_key=True),
    Column("text", Text, nullable=False, comment="decoded text of the token (' the', not 'Ġthe')"),
)

neurons = Table(
    "neurons",
    metadata,
    Column("model_id", Integer, ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
    Column("layer", Integer, primary_key=True),
    Column("neuron", Integer, primary_key=True),
    Column("dead", Boolean, nullable=False, comment="zero variance over the counted tokens"),
    Column("max_corr", Float, comment="max over partners of the partner's max correlation"),
    Column("mean_corr", Float, comment="mean over partners of the max correlation"),
    Column("min_corr", Float, comment="min over partners of the max correlation"),
    Column("max_baseline", Float, comment="max over partners of the max rotated-baseline correlation"),
    Column("mean_baseline", Float, comment="mean over partners of the max rotated-baseline correlation"),
    Column("min_baseline", Float, comment="min over partners of the max rotated-baseline correlation"),
    Column("excess_corr", Float, comment="mean_corr - mean_baseline (paper eq. 3)"),
    Column("universal", Boolean, comment="excess_corr > the run's threshold"),
)
Index("ix_neurons_model_excess", neurons.c.model_id, neurons.c.excess_corr)

partner_scores = Table(
    "partner_scores",
    metadata,
    Column("model_id", Integer, ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
    Column("layer", Integer, primary_key=True),
    Column("neuron", Integer, primary_key=True),
    Column("partner_model_id", Integer, ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
    Column("max_corr", Float, nullable=False, comment="max correlation with any partner neuron"),
    Column("max_layer", Integer, nullable=False),
    Column("max_neuron", Integer, nullable=False),
    Column("baseline_corr", Float, nullable=False, comment="max correlation with any rotated partner unit"),
    Column("baseline_layer", Integer, nullable=False),
    Column("baseline_unit", Integer, nullable=False),
)

matches = Table(
    "matches",
    metadata,
    Column("model_id", Integer, ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
    Column("layer", Integer, primary_key=True),
    Column("neuron", Integer, primary_key=True),
    Column("partner_model_id", Integer, ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
    Column("rank", Integer, primary_key=True, comment="0 = best match"),
    Column("partner_layer", Integer, nullable=False),
    Column("partner_neuron", Integer, nullable=False),
    Column("corr", Float, nullable=False),
)
Index("ix_matches_partner", matches.c.partner_model_id, matches.c.partner_layer, matches.c.partner_neuron)

layer_summaries = Table(
    "layer_summaries",
    metadata,
    Column("model_id", Integer, ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
    Column("layer", Integer, primary_key=True),
    Column("n_neurons", Integer, nullable=False),
    Column("n_dead", Integer, nullable=False),
    Column("n_universal", Integer, comment="excess_corr > the run's threshold"),
    Column("mean_excess", Float),
    Column("max_excess", Float),
)

distributions = Table(
    "distributions",
    metadata,
    Column("model_id", Integer, ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
    Column("quantity", String, primary_key=True, comment="e.g. mean_corr, mean_baseline, excess_corr"),
    Column("bin_edges", JSON, nullable=False),
    Column("counts", JSON, nullable=False),
    Column("quantiles", JSON, nullable=False, comment="{'0.5': ..., '0.9': ..., ...}"),
)

#: Tables holding per-model results, deleted before a stage rewrites them (idempotent resume).
CORRELATION_TABLES = (neurons, partner_scores, matches, layer_summaries, distributions)


def utc_now() -> str:
    """The current UTC time as ISO-8601 text."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def config_hash(config: Mapping[str, Any]) -> str:
    """A stable hash of a JSON-able configuration.

    >>> config_hash({"b": 1, "a": [1, 2]}) == config_hash({"a": [1, 2], "b": 1})
    True
    """
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def sqlite_url(path: Path | str) -> str:
    return f"sqlite:///{Path(path)}"


def _enable_foreign_keys(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    # WAL keeps readers (the dashboard) working while a precompute writes; NORMAL sync is safe with WAL.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_engine(path: Path | str) -> Engine:
    engine = create_engine(sqlite_url(path))
    event.listen(engine, "connect", _enable_foreign_keys)
    return engine


def upgrade(path: Path | str, revision: str = "head") -> None:
    """Create or migrate the SQLite file at `path` with Alembic (``alembic upgrade head``)."""
    from alembic.config import Config

    from alembic import command

    cfg = Config()
    cfg.set_main_option("script_location", str(ALEMBIC_DIR))
    cfg.set_main_option("sqlalchemy.url", sqlite_url(path))
    cfg.attributes["configure_logger"] = False
    command.upgrade(cfg, revision)


def current_revision(path: Path | str) -> str | None:
    """The Alembic revision a file is at, or None for a file Alembic never touched."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        try:
            row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        except sqlite3.OperationalError:
            return None
    return row[0] if row else None


def _json_safe(value: Any) -> Any:
    """Turn NaN/inf floats into None: SQLite stores them badly and JSON cannot hold them."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    return value


class AtlasStore:
    """The one writer of an atlas SQLite file.

    Opening a store applies the Alembic migrations first, so a file is always at the newest schema before
    anything is written to it.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        upgrade(self.path)
        self.engine = make_engine(self.path)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> AtlasStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- runs ---------------------------------------------------------------------------------------------

    def find_run(self, config_digest: str) -> Mapping[str, Any] | None:
        """The newest run with this configuration hash, if any."""
        with self.engine.connect() as conn:
            row = (
                conn.execute(
                    select(runs).where(runs.c.config_hash == config_digest).order_by(runs.c.id.desc()).limit(1)
                )
                .mappings()
                .first()
            )
        return dict(row) if row else None

    def create_run(self, config: Mapping[str, Any], environment: Mapping[str, Any], dataset: Mapping[str, Any]) -> int:
        with self.engine.begin() as conn:
            result = conn.execute(
                insert(runs).values(
                    created_at=utc_now(),
                    status="running",
                    config_hash=config_hash(config),
                    config=dict(config),
                    environment=dict(environment),
                    dataset=dict(dataset),
                    timings={},
                    stages=[],
                )
            )
            return int(result.inserted_primary_key[0])

    def update_run(self, run_id: int, **values: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(runs).where(runs.c.id == run_id).values(**values))

    def get_run(self, run_id: int) -> dict[str, Any]:
        with self.engine.connect() as conn:
            row = conn.execute(select(runs).where(runs.c.id == run_id)).mappings().one()
        return dict(row)

    def mark_stage_done(self, run_id: int, stage: str, seconds: float) -> None:
        run = self.get_run(run_id)
        stages = [s for s in (run["stages"] or []) if s != stage] + [stage]
        timings = dict(run["timings"] or {})
        timings[stage] = round(seconds, 3)
        self.update_run(run_id, stages=stages, timings=timings)

    def finish_run(self, run_id: int) -> str:
        """Mark a run complete, recording a content hash of its results (used as the ETag)."""
        digest = self.content_hash(run_id)
        self.update_run(run_id, status="complete", finished_at=utc_now(), content_hash=digest, error=None)
        return digest

    def fail_run(self, run_id: int, error: str) -> None:
        self.update_run(run_id, status="failed", finished_at=utc_now(), error=error)

    def content_hash(self, run_id: int) -> str:
        """Hash of the run's configuration, stage list and per-model result counts and sums."""
        digest = hashlib.sha256()
        run = self.get_run(run_id)
        digest.update(run["config_hash"].encode())
        digest.update(json.dumps(run["stages"], sort_keys=True).encode())
        with self.engine.connect() as conn:
            model_ids = [r[0] for r in conn.execute(select(models.c.id).where(models.c.run_id == run_id))]
            for table in [t for t in metadata.sorted_tables if "model_id" in t.c]:
                for model_id in model_ids:
                    count = conn.exec_driver_sql(
                        f"SELECT count(*) FROM {table.name} WHERE model_id = ?", (model_id,)
                    ).scalar()
                    digest.update(f"{table.name}:{model_id}:{count};".encode())
            excess_sum = conn.exec_driver_sql(
                "SELECT total(excess_corr) FROM neurons JOIN models ON models.id = neurons.model_id "
                "WHERE models.run_id = ?",
                (run_id,),
            ).scalar()
            digest.update(f"{excess_sum:.9g}".encode())
        return digest.hexdigest()[:16]

    # --- models and vocab ---------------------------------------------------------------------------------

    def add_model(self, run_id: int, **values: Any) -> int:
        """Insert a model row, or return the id of the existing one with the same name (resume)."""
        with self.engine.begin() as conn:
            existing = conn.execute(
                select(models.c.id).where(models.c.run_id == run_id, models.c.name == values["name"])
            ).scalar()
            if existing is not None:
                return int(existing)
            result = conn.execute(insert(models).values(run_id=run_id, **values))
            return int(result.inserted_primary_key[0])

    def model_ids(self, run_id: int) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(models.c.name, models.c.id).where(models.c.run_id == run_id))
            return {name: model_id for name, model_id in rows}

    def write_vocab(self, run_id: int, token_texts: Sequence[str]) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(vocab).where(vocab.c.run_id == run_id))
        self.insert_rows(vocab, ({"run_id": run_id, "token_id": i, "text": text} for i, text in enumerate(token_texts)))

    # --- results ------------------------------------------------------------------------------------------

    def clear_model_tables(self, model_ids: Iterable[int], tables: Iterable[Table]) -> None:
        """Delete a stage's earlier rows for these models, so that re-running a stage is idempotent."""
        ids = list(model_ids)
        with self.engine.begin() as conn:
            for table in tables:
                conn.execute(delete(table).where(table.c.model_id.in_(ids)))

    def insert_rows(self, table: Table, rows: Iterable[Mapping[str, Any]], chunk: int = WRITE_CHUNK_ROWS) -> int:
        """Insert rows in chunks, one transaction per chunk. Returns the number of rows written."""
        written = 0
        buffer: list[dict[str, Any]] = []
        for row in rows:
            buffer.append({key: _json_safe(value) for key, value in row.items()})
            if len(buffer) >= chunk:
                written += self._insert_chunk(table, buffer)
                buffer = []
        if buffer:
            written += self._insert_chunk(table, buffer)
        return written

    def _insert_chunk(self, table: Table, rows: list[dict[str, Any]]) -> int:
        with self.engine.begin() as conn:
            conn.execute(insert(table), rows)
        return len(rows)


def blob(array: Any) -> bytes:
    """Serialise a NumPy array's raw bytes for a BLOB column (dtype recorded by the column's contract)."""
    return bytes(memoryview(array).cast("B"))


__all__ = [
    "ALEMBIC_DIR",
    "CORRELATION_TABLES",
    "AtlasStore",
    "LargeBinary",
    "blob",
    "config_hash",
    "current_revision",
    "distributions",
    "layer_summaries",
    "make_engine",
    "matches",
    "metadata",
    "models",
    "neurons",
    "partner_scores",
    "runs",
    "upgrade",
    "vocab",
]
