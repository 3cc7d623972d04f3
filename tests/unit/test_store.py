"""The store: Alembic migrations build exactly the declared schema; runs are complete only when marked so."""

from __future__ import annotations

import math
import sqlite3

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from precompute.store import AtlasStore, make_engine, metadata, models, neurons, upgrade


# Alembic cannot reflect SQLite expression indexes (ix_examples_top_peak before revision 0005): it skips them with a
# warning, and `test_migrations_create_exactly_the_declared_indexes` compares them instead.
@pytest.mark.filterwarnings("ignore:.*expression-based index")
def test_migrations_create_exactly_the_declared_tables(tmp_path):
    db = tmp_path / "schema.db"
    upgrade(db)
    engine = make_engine(db)
    with engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), metadata)
    engine.dispose()
    assert differences == []


def test_migrations_create_exactly_the_declared_indexes(tmp_path):
    """Every index's SQL (expression and partial indexes too) as the declarations would create it."""
    upgrade(tmp_path / "migrated.db")
    engine = make_engine(tmp_path / "declared.db")
    metadata.create_all(engine)
    engine.dispose()
    sql = "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL ORDER BY name"
    with sqlite3.connect(tmp_path / "migrated.db") as migrated, sqlite3.connect(tmp_path / "declared.db") as declared:
        assert migrated.execute(sql).fetchall() == declared.execute(sql).fetchall()


def test_migrations_make_exactly_the_declared_tables_without_rowid(tmp_path):
    """Revision 0005: the tables declared WITHOUT ROWID are so in a migrated file, and only those (Alembic's
    comparison does not look at it)."""
    upgrade(tmp_path / "migrated.db")
    with sqlite3.connect(tmp_path / "migrated.db") as conn:
        tables = dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table' AND sql IS NOT NULL"))
    declared = {t.name for t in metadata.tables.values() if t.dialect_options["sqlite"]["with_rowid"] is False}
    assert {name for name, sql in tables.items() if sql.rstrip().endswith("WITHOUT ROWID")} == declared
    assert {"token_tables", "percentiles", "feature_scores", "matches"} <= declared
    assert not {"examples", "token_postings", "neurons"} & declared  # rowid tables, on purpose


def test_a_run_is_complete_only_once_marked_and_nan_becomes_null(tmp_path):
    db = tmp_path / "atlas.db"
    with AtlasStore(db) as store:
        run_id = store.create_run({"models": ["a", "b"]}, {"python": "3"}, {"source": "stdlib"})
        model_id = store.add_model(
            run_id,
            name="a",
            source="/a",
            position=0,
            is_reference=True,
            n_layers=1,
            d_model=4,
            d_mlp=2,
            d_vocab=10,
            n_ctx=8,
            n_heads=1,
            act_fn="gelu_new",
            processing={},
            tokenizer_hash="x",
        )
        assert (
            store.add_model(
                run_id,
                **{c.name: 0 for c in models.columns if c.name not in ("id", "run_id")}
                | {"name": "a", "processing": {}},
            )
            == model_id
        )  # idempotent on resume
        written = store.insert_rows(
            neurons,
            [
                {"model_id": model_id, "layer": 0, "neuron": i, "dead": False, "excess_corr": v}
                for i, v in enumerate([0.7, math.nan])
            ],
            chunk=1,
        )
        assert written == 2
        assert store.get_run(run_id)["status"] == "running"
        digest = store.finish_run(run_id)
        assert store.get_run(run_id)["status"] == "complete"
        assert store.get_run(run_id)["content_hash"] == digest
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT neuron, excess_corr FROM neurons ORDER BY neuron").fetchall() == [
            (0, 0.7),
            (1, None),
        ]
