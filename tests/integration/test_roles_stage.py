"""The ``roles`` stage end to end: a planted model and a random one through the pipeline into real SQLite."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
from transformers import GPT2LMHeadModel

from precompute import pipeline
from precompute.data import DatasetConfig

CTX = 64
TOKENS = [11, 222, 333]


def query(db: Path, sql: str, *params: object) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql, params).fetchall()


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two tiny GPT-2s sharing a tokenizer; the first has a prediction neuron (1.0) and a null-space neuron (1.4)."""
    from tests.factories import tiny_gpt2

    root = tmp_path_factory.mktemp("roles-family")
    planted = tiny_gpt2(root / "planted-a", seed=3, d_model=256, d_mlp=64, n_heads=2, ctx=CTX)
    hf = GPT2LMHeadModel.from_pretrained(planted)
    wte = hf.transformer.wte.weight  # tied to the unembedding
    null = torch.randn(wte.shape[1], generator=torch.Generator().manual_seed(1))
    null = (null - null.mean()) / (null - null.mean()).norm()
    with torch.no_grad():
        wte -= 0.99 * (wte @ null)[:, None] * null  # the unembedding hardly reads `null` any more
        hf.transformer.h[-1].mlp.c_proj.weight[0] = 3 * wte[TOKENS].sum(dim=0)
        hf.transformer.h[-1].mlp.c_proj.weight[4] = 5 * null
    hf.save_pretrained(planted)
    return [planted, tiny_gpt2(root / "random-b", seed=4, d_model=256, d_mlp=64, n_heads=2, ctx=CTX)]


def make_config(db: Path, family: list[Path], **roles: object) -> pipeline.PrecomputeConfig:
    return pipeline.PrecomputeConfig(
        db=db,
        models=tuple(str(m) for m in family),
        dataset=DatasetConfig(tokens=8 * CTX, ctx=CTX, batch_size=4),
        stages=("roles",),
        analysis={"roles": {"n_random_baseline": 4, "ablation_after_pos": 16, **roles}},
    )


def test_roles_stage_writes_every_table(family, tmp_path):
    db = tmp_path / "atlas.db"
    run_id = pipeline.run_precompute(make_config(db, family))
    assert query(db, "SELECT status, stages FROM runs WHERE id = ?", run_id) == [("complete", '["roles"]')]
    ids = dict(query(db, "SELECT name, id FROM models"))
    for model_id in ids.values():
        assert query(db, "SELECT count(*) FROM roles WHERE model_id = ?", model_id) == [(2 * 64,)]
        # 2 entropy candidates and 4 random neurons, 8 values each
        assert query(db, "SELECT count(*) FROM entropy_interventions WHERE model_id = ?", model_id) == [(6 * 8,)]
        # layer-0 neurons keep their top heads of layer 1 (2 heads); last-layer neurons have none
        assert query(db, "SELECT count(*) FROM attention_scores WHERE model_id = ?", model_id) == [(64 * 2,)]
        assert query(db, "SELECT count(*) FROM path_ablations WHERE model_id = ?", model_id) == [(3,)]
    planted = ids["planted-a"]
    assert query(db, "SELECT vocab_role FROM roles WHERE model_id = ? AND layer = 1 AND neuron = 0", planted) == [
        ("prediction",)
    ]
    assert query(db, "SELECT layer, neuron FROM roles WHERE model_id = ? AND entropy_rank = 0", planted) == [(1, 4)]
    curve = query(
        db,
        "SELECT value, ln_scale, entropy, is_baseline, n_tokens FROM entropy_interventions "
        "WHERE model_id = ? AND layer = 1 AND neuron = 4 ORDER BY value",
        planted,
    )
    assert [row[0] for row in curve] == [-0.17, 0, 1, 2, 3, 4, 5, 6]
    assert [row[1] for row in curve[1:]] == sorted(row[1] for row in curve[1:])  # the LN scale rises with v
    assert [row[2] for row in curve[1:]] == sorted(row[2] for row in curve[1:])  # and so does the entropy
    assert {row[3] for row in curve} == {0} and curve[0][4] > 0
    ablations = query(
        db, "SELECT n_points, points, pearson_bos, spearman_bos, pearson_norm, spearman_norm FROM path_ablations"
    )
    for n_points, points, *stored in ablations:
        decoded = np.frombuffer(points, dtype=np.float32).reshape(-1, 3).astype(np.float64)
        assert decoded.shape == (n_points, 3) == (4 * (CTX - 16), 3)  # ablation_rows = 4 rows of the dataset
        # the stored correlations are those of the stored points: the activation against each change (Spearman's
        # is Pearson's of the ranks, ties sharing their mean rank)
        ranks = scipy.stats.rankdata(decoded, axis=0)
        expected = []
        for column in (1, 2):
            expected += [np.corrcoef(decoded[:, 0], decoded[:, column])[0, 1]]
            expected += [np.corrcoef(ranks[:, 0], ranks[:, column])[0, 1]]
        assert all(np.isfinite(expected))  # the changes vary, so every correlation is defined
        assert stored == pytest.approx(expected, abs=1e-5)
    timings = query(db, "SELECT timings FROM runs")[0][0]
    assert '"roles"' in timings


def test_rewriting_is_idempotent_and_reference_only(family, tmp_path):
    from precompute.stages.roles import RolesStage
    from precompute.store import AtlasStore

    config = make_config(tmp_path / "atlas.db", family, models="reference", n_path_ablation_pairs=1)
    models, dataset = pipeline.prepare(config)
    with AtlasStore(config.db) as store:
        run_id = store.create_run(config.record(), {}, dataset.description)
        ids = {
            m.name: store.add_model(run_id, position=i, is_reference=i == 0, **m.record()) for i, m in enumerate(models)
        }
        context = pipeline.RunContext(
            config=config, models=models, dataset=dataset, store=store, run_id=run_id, model_ids=ids
        )
        stage = RolesStage(context)
        pipeline.write_stage(stage, context)
        first = {t: query(config.db, f"SELECT count(*) FROM {t}") for t in ("roles", "path_ablations")}
        pipeline.write_stage(stage, context)
        assert {t: query(config.db, f"SELECT count(*) FROM {t}") for t in first} == first
    assert query(config.db, "SELECT DISTINCT model_id FROM roles") == [(ids["planted-a"],)]
    assert first["path_ablations"] == [(1,)]


@pytest.mark.parametrize(
    ("roles", "message"),
    [
        ({"n_rows": 3}, "unknown roles setting 'n_rows'; settings are"),
        ({"ablation_after_pos": CTX}, "ablation_after_pos must be below the row length"),
        ({"models": "first"}, "one of all, reference"),
    ],
)
def test_bad_roles_settings_are_refused(family, tmp_path, roles, message):
    with pytest.raises(pipeline.ConfigError, match=message):
        pipeline.run_precompute(make_config(tmp_path / "atlas.db", family, **roles))
