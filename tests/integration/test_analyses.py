"""End to end through the CLI: the stats, examples and families stages on tiny models (issue 3).

Each test runs its own precompute into a fresh DB and checks the stored results against the models themselves:
moments against SciPy on re-run activations, examples against a re-run of their context, and a first-layer neuron
wired by hand to fire on one token against its family label.
"""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.stats
import torch

from cli.main import main
from precompute.activations import run_mlp_hooks
from precompute.data import DatasetConfig, build_dataset
from precompute.features import normalise
from precompute.models import load_model, resolve_source
from precompute.store import TOKEN_TABLE_KINDS, decode_array, decode_examples
from precompute.training.tokenizer import load_tokenizer

TOKENS, CTX, BATCH = 6000, 64, 8


def query(db: Path, sql: str, *params: object) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql, params).fetchall()


def precompute(db: Path, stages: str, *models: Path) -> None:
    argv = ["precompute", "--db", str(db), "--tokens", str(TOKENS), "--ctx", str(CTX), "--batch-size", str(BATCH)]
    assert main([*argv, "--stages", stages, *map(str, models)]) == 0


def dataset_for(model_dir: Path):
    return build_dataset(DatasetConfig(tokens=TOKENS, ctx=CTX, batch_size=BATCH), load_tokenizer(model_dir), CTX)


def activations(model, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Re-run a model on dataset rows: hook name -> [rows, ctx, n_neurons] float64."""
    out: dict[str, list[np.ndarray]] = {"hook_pre": [], "hook_post": []}
    for start in range(0, len(rows), BATCH):
        acts = run_mlp_hooks(model, torch.from_numpy(rows[start : start + BATCH]), ("hook_pre", "hook_post"))
        for hook, value in acts.items():
            out[hook].append(value.reshape(*value.shape[:2], -1).double().numpy())
    return {hook: np.concatenate(parts) for hook, parts in out.items()}


@pytest.fixture(scope="module")
def analysed(tiny_family, tmp_path_factory) -> SimpleNamespace:
    """One precompute of the tiny family, read (never written) by the tests below: correlations and stats first,
    then examples and families alone on the same run; plus the reference model re-run on the dataset."""
    db = tmp_path_factory.mktemp("analyses") / "atlas.db"
    models = (tiny_family["base"], tiny_family["other"])
    precompute(db, "correlations,stats", *models)
    stats_rows = query(db, "SELECT count(*) FROM activation_stats")[0][0]
    precompute(db, "examples,families", *models)
    model = load_model(resolve_source(str(tiny_family["base"])))
    dataset = dataset_for(tiny_family["base"])
    base_id = query(db, "SELECT id FROM models WHERE is_reference")[0][0]
    return SimpleNamespace(
        db=db,
        stats_rows=stats_rows,
        model=model,
        dataset=dataset,
        base_id=base_id,
        acts=activations(model, dataset.rows),
    )


def test_every_model_gets_every_table_and_the_run_records_timings(analysed):
    db = analysed.db
    assert query(db, "SELECT count(*) FROM activation_stats") == [(analysed.stats_rows,)]  # untouched by stage 2
    ((stages, timings),) = query(db, "SELECT stages, timings FROM runs")
    assert set(json.loads(stages)) == {"correlations", "stats", "examples", "families"}
    timings = json.loads(timings)
    assert {"stats", "examples", "families", "forward"} <= set(timings)
    # each part's CPU seconds beside its wall seconds (bench/scale.py fits on them): positive, and at most the wall
    # time of every core, with a little slack for the clocks' reading apart
    cores = os.cpu_count() or 1
    for name in ("forward", "stats", "examples", "families", "stats_write", "examples_write"):
        assert 0 < timings[f"{name}_cpu"] <= timings[name] * cores + 0.05, name
    for name in ("stats", "examples", "families"):  # closing the passes: part of the stage's time, also apart
        assert 0 <= timings[f"{name}_close"] <= timings[name], name
    n_neurons = 2 * 64
    for (model_id,) in query(db, "SELECT id FROM models"):
        for table, per_neuron in [
            ("activation_stats", 1),
            ("histograms", 2),
            ("position_profiles", 2),
            ("weight_stats", 1),
            ("families", 1),
        ]:
            assert query(db, f"SELECT count(*) FROM {table} WHERE model_id = ?", model_id) == [
                (n_neurons * per_neuron,)
            ]
        # one row per (neuron, kind) since revision 0005: its ranked tokens are arrays
        kinds: dict[str, int] = {}
        for kind, token_ids in query(db, "SELECT kind, token_ids FROM token_tables WHERE model_id = ?", model_id):
            name = TOKEN_TABLE_KINDS[kind]
            kinds[name] = kinds.get(name, 0) + len(decode_array(token_ids))
        assert kinds["unembed_top"] == kinds["unembed_bottom"] == kinds["embed_top"] == 20 * n_neurons
        assert 0 < kinds["mean_activation"] <= 20 * n_neurons and kinds["max_activation"] == 20 * n_neurons
        statistics = {
            s for (s,) in query(db, "SELECT statistic FROM percentile_statistics WHERE model_id = ?", model_id)
        }
        assert {"pre_kurt", "frequency", "l2_penalty", "vocab_kurt", "input_bias", "in_out_sim"} <= statistics
        stored = [
            decode_array(b) for (b,) in query(db, "SELECT percentiles FROM percentiles WHERE model_id = ?", model_id)
        ]
        assert len(stored) == n_neurons and all(len(p) == len(statistics) for p in stored)
        low, high = np.nanmin(np.concatenate(stored)), np.nanmax(np.concatenate(stored))
        assert 0 < low < 5 and 95 < high <= 100
        tops = query(db, "SELECT n_examples FROM examples WHERE model_id = ? AND kind = 'top'", model_id)
        assert len(tops) == n_neurons and all(n > 0 for (n,) in tops)
        ranks = query(db, "SELECT count(*) FROM feature_scores WHERE model_id = ? AND rank = 0", model_id)
        assert ranks == [(n_neurons,)]


def test_stored_moments_equal_scipy_on_the_rerun_activations(analysed):
    dataset = analysed.dataset
    stored = query(
        analysed.db,
        "SELECT pre_mean, pre_var, pre_skew, pre_kurt, frequency, post_mean, post_kurt, "
        "n_tokens FROM activation_stats WHERE model_id = ? ORDER BY layer, neuron",
        analysed.base_id,
    )
    got = np.asarray(stored, dtype=np.float64)
    pre, post = analysed.acts["hook_pre"][dataset.counted], analysed.acts["hook_post"][dataset.counted]
    assert (got[:, 7] == dataset.tokens_counted).all()
    np.testing.assert_allclose(got[:, 0], pre.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[:, 1], pre.var(0), rtol=1e-5)
    np.testing.assert_allclose(got[:, 2], scipy.stats.skew(pre, axis=0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[:, 3], scipy.stats.kurtosis(pre, axis=0, fisher=False), rtol=1e-4)
    np.testing.assert_allclose(got[:, 4], (pre > 0).mean(0), atol=2 / len(pre))
    np.testing.assert_allclose(got[:, 5], post.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[:, 6], scipy.stats.kurtosis(post, axis=0, fisher=False), rtol=1e-4)


def test_top_examples_are_the_dataset_maximum_and_rerun_to_the_same_activation(analysed):
    dataset = analysed.dataset
    post = analysed.acts["hook_post"]  # [rows, ctx, n_neurons]
    dataset_max = np.where(dataset.counted[..., None], post, -np.inf).max(axis=(0, 1))
    db = analysed.db
    row_tokens = {
        row: np.frombuffer(ids, dtype=f"<u{itemsize}")
        for row, itemsize, ids in query(
            db, "SELECT dataset_row, itemsize, token_ids FROM example_rows WHERE model_id = ?", analysed.base_id
        )
    }
    top = []
    for layer, neuron, *packed in query(
        db,
        "SELECT layer, neuron, ranks, bins, bin_ranges, dataset_rows, starts, peaks, activations, lengths, snippets "
        "FROM examples WHERE model_id = ? AND kind = 'top' ORDER BY layer, neuron",
        analysed.base_id,
    ):
        first = decode_examples(packed)[0]
        assert first["rank"] == 0
        top.append((layer, neuron, first))
    assert len(top) == 2 * 64
    rerun = set(np.random.default_rng(0).choice(len(top), size=12, replace=False).tolist())
    for index, (layer, neuron, example) in enumerate(top):
        row, start, peak, activation = (example[k] for k in ("dataset_row", "start", "peak", "activation"))
        assert activation == pytest.approx(dataset_max[layer * 64 + neuron], abs=1e-5)
        np.testing.assert_array_equal(row_tokens[row], dataset.rows[row])  # the row's tokens, stored once
        window = example["activations"]  # 8-bit codes: within half a step, 1/508 of the snippet's range
        assert start + len(window) <= dataset.ctx
        tolerance = float(np.nanmax(window) - np.nanmin(window)) / 508 + 1e-6
        assert float(window[peak]) == pytest.approx(activation, abs=tolerance)
        if index in rerun:  # attention is causal: the row's prefix up to the peak is the whole context
            prefix = torch.from_numpy(dataset.rows[row, : start + peak + 1][None])
            again = run_mlp_hooks(analysed.model, prefix, ("hook_post",))["hook_post"][0, -1, layer, neuron]
            assert float(again) == pytest.approx(activation, abs=1e-4)


def planted_unigram_model(source: Path, folder: Path, token: int, neuron: int) -> Path:
    """A copy of a tiny GPT-2 whose first-layer neuron fires on ``token`` only.

    A centred unit direction u is removed from every token and position embedding, and ``token`` gets a large
    component along it; the first attention layer writes nothing. Layer 0's MLP input, LN(embedding + position),
    then has a component along u only at ``token``, and the neuron reads u with a negative bias.
    """
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(source)
    with torch.no_grad():
        u = torch.randn(model.config.n_embd, generator=torch.Generator().manual_seed(0))
        u -= u.mean()
        u /= u.norm()
        for table in (model.transformer.wte.weight, model.transformer.wpe.weight):
            table -= torch.outer(table @ u, u)
        wte = model.transformer.wte.weight
        wte[token] += 4.0 * wte.norm(dim=1).mean() * u
        block = model.transformer.h[0]
        block.attn.c_proj.weight.zero_()
        block.attn.c_proj.bias.zero_()
        block.mlp.c_fc.weight[:, neuron] = 4.0 * u  # Conv1D: [d_model, d_mlp]
        block.mlp.c_fc.bias[neuron] = -2.0
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    load_tokenizer(source).save_pretrained(folder)
    return folder


def test_a_neuron_wired_to_one_token_is_labelled_unigram_for_it(tiny_family, tmp_path):
    dataset = dataset_for(tiny_family["base"])
    tokenizer = load_tokenizer(tiny_family["base"])
    strings = [tokenizer.decode([i]) for i in range(len(tokenizer))]
    norms = [normalise(s) for s in strings]
    counts = np.bincount(dataset.rows[dataset.counted], minlength=len(strings))
    candidates = [t for t in range(len(strings)) if len(norms[t]) > 1 and norms.count(norms[t]) == 1]
    token = max(candidates, key=lambda t: counts[t])
    assert counts[token] >= 40
    planted = planted_unigram_model(tiny_family["base"], tmp_path / "planted", token, neuron=17)
    db = tmp_path / "atlas.db"
    precompute(db, "families", planted, tiny_family["other"])
    planted_id = query(db, "SELECT id FROM models WHERE is_reference")[0][0]
    ((family, feature, vr, evidence),) = query(
        db,
        "SELECT family, best_feature, best_vr, evidence FROM families WHERE model_id = ? AND layer = 0 AND neuron = 17",
        planted_id,
    )
    assert (family, feature) == ("unigram", f"token:{norms[token]}")
    assert vr > 0.5
    assert json.loads(evidence)["best"]["unigram"][0] == feature
    ranked = query(
        db,
        "SELECT f.feature, f.feature_set, s.variance_reduction FROM feature_scores s JOIN feature_names f "
        "ON f.model_id = s.model_id AND f.feature_id = s.feature_id WHERE s.model_id = ? AND "
        "s.layer = 0 AND s.neuron = 17 ORDER BY s.rank",
        planted_id,
    )
    assert ranked[0] == (feature, "unigram", pytest.approx(vr))
    assert all(a[2] >= b[2] for a, b in itertools.pairwise(ranked))
