"""The stats stage against NumPy/SciPy on the concatenated data (issue 3 part 1; paper-spec §3.1, §9.8)."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from precompute.activations import ActivationBatch
from precompute.data import DatasetConfig, TokenDataset
from precompute.moments import StreamingMoments, histogram_update, within_layer_percentiles
from precompute.pipeline import ConfigError
from precompute.stage_config import stage_config
from precompute.stages.stats import StatsConfig, StatsStage
from precompute.store import token_kind_code


def synthetic_run(
    n_models: int = 2,
    n_layers: int = 2,
    d_mlp: int = 5,
    n_rows: int = 9,
    ctx: int = 12,
    vocab: int = 30,
    seed: int = 0,
    analysis: dict | None = None,
) -> tuple[SimpleNamespace, list[ActivationBatch]]:
    """A run context made of real dataclasses and heavy-tailed activations, in batches of 4 rows (last one short)."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(1, vocab, size=(n_rows, ctx))
    rows[:, 0] = 0  # BOS
    counted = (rows != 0) & (rng.random(rows.shape) > 0.15)
    dataset = TokenDataset(rows, counted, DatasetConfig(batch_size=4), ctx, {})
    models = [
        SimpleNamespace(
            name=f"m{i}", n_layers=n_layers, d_mlp=d_mlp, n_neurons=n_layers * d_mlp, d_vocab=vocab, d_model=4
        )
        for i in range(n_models)
    ]
    config = SimpleNamespace(analysis=analysis or {}, device="cpu")
    context = SimpleNamespace(
        config=config, dataset=dataset, models=models, model_ids={m.name: i for i, m in enumerate(models)}
    )
    batches = []
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, n_rows, 4):
        tokens = torch.from_numpy(rows[start : start + 4])
        shape = (*tokens.shape, n_layers, d_mlp)
        pre = {m.name: torch.randn(shape, generator=generator).pow(3) - 1.5 for m in models}  # skewed, heavy tails
        post = {name: torch.nn.functional.gelu(value, approximate="tanh") for name, value in pre.items()}
        batches.append(ActivationBatch(start, tokens, torch.from_numpy(counted[start : start + 4]), post, pre))
    return context, batches


def concatenated(batches: list[ActivationBatch], model: str, hook: str) -> np.ndarray:
    """[counted tokens, n_neurons] of one model over all batches, in float64."""
    return np.concatenate([b.counted_activations(model, hook).x.double().numpy() for b in batches])


def column_rows(tables: list[dict]) -> list[dict]:
    """Rows from tables given column by column (`precompute.store.AtlasStore.insert_columns`)."""
    rows = []
    for columns in tables:
        length = max(len(v) for v in columns.values() if isinstance(v, np.ndarray | list))
        rows += [
            {k: (v[i].item() if isinstance(v, np.ndarray) else v) for k, v in columns.items()} for i in range(length)
        ]
    return rows


def run_stage(context, batches) -> StatsStage:
    stage = StatsStage(context)
    for batch in batches:
        stage.update(batch)
    stage.finish_pass()
    assert stage.done_streaming
    return stage


def test_moments_equal_scipy_on_the_concatenated_data():
    context, batches = synthetic_run()
    stage = run_stage(context, batches)
    for model in ("m0", "m1"):
        columns = stage.activation_columns(model)
        for hook in ("pre", "post"):
            x = concatenated(batches, model, f"hook_{hook}")
            np.testing.assert_allclose(columns[f"{hook}_mean"], x.mean(0), rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(columns[f"{hook}_var"], x.var(0), rtol=1e-9)
            np.testing.assert_allclose(columns[f"{hook}_skew"], scipy.stats.skew(x, axis=0), rtol=1e-8, atol=1e-10)
            kurt = scipy.stats.kurtosis(x, axis=0, fisher=False)  # non-excess: a Gaussian gives 3
            np.testing.assert_allclose(columns[f"{hook}_kurt"], kurt, rtol=1e-8)
            np.testing.assert_array_equal(columns[f"{hook}_min"], x.min(0).astype(np.float32))
            np.testing.assert_array_equal(columns[f"{hook}_max"], x.max(0).astype(np.float32))
        np.testing.assert_allclose(columns["frequency"], (concatenated(batches, model, "hook_pre") > 0).mean(0))


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-50, 50, allow_nan=False, width=32), min_size=2, max_size=60),
    st.lists(st.integers(1, 7), min_size=1, max_size=10),
    st.floats(-1e3, 1e3),
)
def test_moments_do_not_depend_on_how_the_data_is_cut(values, cuts, shift):
    x = np.asarray(values, dtype=np.float64) + shift
    moments = StreamingMoments(1, torch.device("cpu"))
    start = 0
    for size in [*cuts, len(x)]:
        part = torch.from_numpy(x[start : start + size])[:, None]
        if len(part):
            moments.update(len(part), torch.cat([(part**k).sum(0) for k in range(1, 5)])[:, None])
        start += size
    assert moments.n == len(x)
    assert float(moments.mean()[0]) == pytest.approx(x.mean(), rel=1e-9, abs=1e-9)
    scale = max(x.var(), 1e-12)
    assert float(moments.variance()[0]) == pytest.approx(x.var(), rel=1e-6, abs=1e-9 * (1 + x.mean() ** 2))
    # The fourth central moment comes from raw power sums: float64 loses about eps * mean^4 of it, so kurtosis
    # (m4 / var^2) is only good to eps * mean^4 / var^2; compare only where that is far below the tolerance.
    if x.var() > 1e-6 * (1 + x.mean() ** 2) and 1e-15 * (1 + x.mean() ** 4) / x.var() ** 2 < 1e-6:
        assert float(moments.kurtosis()[0]) == pytest.approx(scipy.stats.kurtosis(x, fisher=False), rel=1e-4)
        assert float(moments.skew()[0]) == pytest.approx(scipy.stats.skew(x), rel=1e-4, abs=1e-4 / scale**0.5)


def test_histograms_position_profiles_and_token_tables_match_numpy():
    context, batches = synthetic_run(analysis={"stats": {"bins": 7, "pre_range": [-3, 4], "token_min_count": 2}})
    stage = run_stage(context, batches)
    state, dataset = stage.state["m1"], context.dataset
    pre = concatenated(batches, "m1", "hook_pre").astype(np.float32)
    edges = np.linspace(-3, 4, 8, dtype=np.float32)
    for n in range(pre.shape[1]):
        expected = np.bincount(np.searchsorted(edges, pre[:, n], side="right"), minlength=9)
        np.testing.assert_array_equal(state["pre_hist"].numpy().reshape(-1, 9)[n], expected)
    positions = np.nonzero(dataset.counted)[1]
    post = concatenated(batches, "m1", "hook_post")
    mean, std = stage.position_profile("m1", "post")
    for p in range(dataset.ctx):
        here = post[positions == p]
        if len(here):
            np.testing.assert_allclose(mean[p], here.mean(0), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(std[p], here.std(0), rtol=1e-4, atol=1e-5)
        else:
            assert np.isnan(mean[p]).all()
    tokens = dataset.rows[dataset.counted]
    rows = column_rows(stage.token_columns("m1", 7, 5))
    for row in rows:
        flat = row["layer"] * 5 + row["neuron"]
        values = post[tokens == row["token_id"], flat]
        assert row["count"] == len(values)
        expected = values.mean() if row["kind"] == token_kind_code("mean_activation") else values.max()
        assert row["value"] == pytest.approx(expected, rel=1e-6)
    means = [
        r for r in rows if r["kind"] == token_kind_code("mean_activation") and r["layer"] == 0 and r["neuron"] == 2
    ]
    assert [r["rank"] for r in means] == list(range(len(means)))
    assert all(a["value"] >= b["value"] for a, b in itertools.pairwise(means))
    assert all(r["count"] >= 2 for r in means)


def test_state_dict_resumes_to_the_same_result():
    context, batches = synthetic_run(n_models=1)
    whole = run_stage(context, batches)
    first = StatsStage(context)
    first.update(batches[0])
    resumed = StatsStage(context)
    resumed.load_state_dict(first.state_dict())
    for batch in batches[1:]:
        resumed.update(batch)
    for name, value in whole.activation_columns("m0").items():
        np.testing.assert_allclose(resumed.activation_columns("m0")[name], value, rtol=1e-12)


def test_memory_estimate_is_the_state_the_stage_holds():
    from tests.factories import tensor_bytes

    for analysis in (None, {"stats": {"bins": 7, "max_vocab": 5}}):
        context, batches = synthetic_run(analysis=analysis)
        stage = StatsStage(context)
        for batch in batches:
            stage.update(batch)
        streaming = tensor_bytes(stage.state, stage.shared, stage.slot, stage.tracked, stage.token_block)
        stage.finish_pass()
        memory = StatsStage.memory_bytes(context)
        assert memory.state == streaming
        assert memory.rest == tensor_bytes(stage.state, stage.shared, stage.slot, stage.tracked)


def test_token_tables_split_over_passes_are_the_same():
    """With the memory plan's split, each pass keeps the token tables of one block of neurons: same tables."""
    from precompute.memory import Split

    context, batches = synthetic_run(analysis={"stats": {"token_min_count": 2}})
    whole = run_stage(context, batches)
    split_context = SimpleNamespace(**vars(context), split=Split({"stats": 3}))
    split = StatsStage(split_context)
    passes = 0
    while not split.done_streaming:
        for batch in batches:
            split.update(batch)
        split.finish_pass()
        passes += 1
    assert passes == 3
    for model in context.models:
        assert column_rows(split.token_columns(model.name, 1, 5)) == column_rows(whole.token_columns(model.name, 1, 5))
        for name, value in whole.activation_columns(model.name).items():
            np.testing.assert_array_equal(split.activation_columns(model.name)[name], value)


def test_histogram_update_puts_edges_in_the_upper_bin():
    counts = torch.zeros(5, dtype=torch.int64)
    histogram_update(counts, torch.tensor([[-5.0], [0.0], [0.999], [1.0], [3.0]]), 0.0, 3.0, 3)
    assert counts.tolist() == [1, 2, 1, 0, 1]  # (-inf, 0) [0, 1) [1, 2) [2, 3) [3, inf)


def test_within_layer_percentiles_equal_scipy():
    rng = np.random.default_rng(3)
    values = np.round(rng.normal(size=(3, 50)), 1)  # ties on purpose
    values[1, 4] = np.nan
    got = within_layer_percentiles(values)
    for layer in range(3):
        finite = values[layer][np.isfinite(values[layer])]
        for n in range(50):
            if np.isnan(values[layer, n]):
                assert np.isnan(got[layer, n])
            else:
                expected = scipy.stats.percentileofscore(finite, values[layer, n], kind="rank")  # the paper's
                assert got[layer, n] == pytest.approx(expected)


def test_stage_config_refuses_unknown_keys_and_bad_values():
    assert stage_config(StatsConfig, {"pre_range": [-1, 2], "max_vocab": None}, "stats").pre_range == (-1.0, 2.0)
    with pytest.raises(ConfigError, match="settings are bins, pre_range"):
        stage_config(StatsConfig, {"bin": 3}, "stats")
    with pytest.raises(ConfigError, match=r"stats\.bins must be int"):
        stage_config(StatsConfig, {"bins": "many"}, "stats")
    with pytest.raises(ConfigError, match="low < high"):
        stage_config(StatsConfig, {"post_range": [2, 1]}, "stats")


def test_moments_of_one_row_a_small_spread_and_constant_columns():
    """Edges the random test above rarely draws: a single row, a variance below 1, a constant column (NaN shape)."""
    x = np.array([[2.0, 0.1, -5.0], [2.0, 0.3, -5.0], [2.0, -0.2, -5.0], [2.0, 0.45, -5.0]])
    moments = StreamingMoments(3, torch.device("cpu"))
    moments.update(len(x), torch.from_numpy(np.stack([(x**k).sum(0) for k in range(1, 5)])))
    np.testing.assert_allclose(moments.mean().numpy(), x.mean(0))
    np.testing.assert_allclose(moments.variance().numpy(), x.var(0), atol=1e-12)
    assert 0 < x[:, 1].var() < 1
    assert float(moments.skew()[1]) == pytest.approx(scipy.stats.skew(x[:, 1]), rel=1e-9)
    assert float(moments.kurtosis()[1]) == pytest.approx(scipy.stats.kurtosis(x[:, 1], fisher=False), rel=1e-9)
    for column in (0, 2):  # constant: no shape
        assert np.isnan(float(moments.skew()[column])) and np.isnan(float(moments.kurtosis()[column]))
    one = StreamingMoments(1, torch.device("cpu"))
    one.update(1, torch.tensor([[3.0], [9.0], [27.0], [81.0]], dtype=torch.float64))
    assert float(one.mean()[0]) == 3.0 and float(one.variance()[0]) == 0.0


def test_histogram_update_matches_numpy_off_zero_and_off_unit_scale():
    """A range that starts below zero with bins of width 0.5: the edges are ``low + i / scale``, not ``i / scale``."""
    x = torch.from_numpy(np.random.default_rng(3).uniform(-3.2, 4.1, size=(500, 2)))
    low, high, bins = -2.0, 3.0, 10
    counts = torch.zeros(2 * (bins + 2), dtype=torch.int64)
    histogram_update(counts, x, low, high, bins)
    for column in range(2):
        values = x[:, column].numpy()
        inside = np.histogram(values[(values >= low) & (values < high)], bins=np.linspace(low, high, bins + 1))[0]
        expected = [int((values < low).sum()), *inside.tolist(), int((values >= high).sum())]
        assert counts[column * (bins + 2) : (column + 1) * (bins + 2)].tolist() == expected
