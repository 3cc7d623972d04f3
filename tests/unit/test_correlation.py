"""The streaming correlation engine against NumPy float64 on the concatenated data (paper-spec §9.1-9.3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from precompute.activations import ActivationBatch
from precompute.correlation import (
    CUDA_OPERAND_CHUNK_BYTES,
    FP8_MAX,
    OPERAND_ITEMSIZE,
    CorrelationConfig,
    CorrelationEngine,
    CorrelationError,
    ModelShape,
    ScaledOperand,
    divided_into_fp8,
    fp8_matmul_fp32,
    layer_rotation_seed,
    operand_token_bytes,
    plan_correlations,
    rotation_matrix,
)
from precompute.memory import CHUNK_BYTES
from tests.factories import make_batches


def run_engine(shapes, acts, counted, splits, **config) -> CorrelationEngine:
    engine = CorrelationEngine(shapes, CorrelationConfig(**config))
    batches = make_batches(acts, counted, splits)
    while not engine.done:
        for batch in batches:
            engine.update(batch)
        engine.finish_pass()
    return engine


def numpy_corr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation of every column of x with every column of y, float64."""
    full = np.corrcoef(x.astype(np.float64).T, y.astype(np.float64).T)
    return full[: x.shape[1], x.shape[1] :]


def random_activations(rng, rows, pos, layers, d, offset=0.0, scale=1.0):
    pre = rng.standard_normal((rows, pos, layers, d)).astype(np.float32)
    return (np.maximum(pre, 0) * scale + offset + 0.05 * pre).astype(np.float32)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**16),
    rows=st.integers(3, 12),
    splits=st.lists(st.integers(0, 12), max_size=4),
    offset=st.floats(-50, 50),
    scale=st.floats(0.01, 100),
    precision=st.sampled_from(["float32", "float64"]),
)
def test_streaming_matches_numpy_for_any_batch_split(seed, rows, splits, offset, scale, precision):
    rng = np.random.default_rng(seed)
    pos, layers, d = 7, 2, 5
    acts = {
        "a": random_activations(rng, rows, pos, layers, d, offset, scale),
        "b": random_activations(rng, rows, pos, 3, 4),
    }
    acts["b"][..., 0, 0] += acts["a"][..., 1, 2] * 2.0  # one strongly related pair
    counted = rng.random((rows, pos)) > 0.2
    counted[0, :2] = True
    shapes = [ModelShape("a", layers, d), ModelShape("b", 3, 4)]
    engine = run_engine(shapes, acts, counted, sorted(s for s in splits if s < rows), precision=precision, top_k=3)

    x = acts["a"][counted].reshape(-1, layers * d)
    y = acts["b"][counted].reshape(-1, 12)
    expected = numpy_corr(x, y)
    result = engine.results[(0, 1)]
    np.testing.assert_allclose(result.top_corr[:, 0].numpy(), expected.max(axis=1), atol=1e-6)
    np.testing.assert_array_equal(result.top_index[:, 0].numpy(), expected.argmax(axis=1))
    np.testing.assert_allclose(result.top_corr.numpy(), -np.sort(-expected, axis=1)[:, :3], atol=1e-6)
    reverse = engine.results[(1, 0)]
    np.testing.assert_allclose(reverse.top_corr[:, 0].numpy(), expected.max(axis=0), atol=1e-6)
    assert engine.moments[0].count == counted.sum()


def test_rotated_baseline_matches_explicit_rotation():
    rng = np.random.default_rng(1)
    rows, pos, d = 6, 16, 8
    acts = {"a": random_activations(rng, rows, pos, 2, d), "b": random_activations(rng, rows, pos, 2, d)}
    counted = np.ones((rows, pos), dtype=bool)
    shapes = [ModelShape("a", 2, d), ModelShape("b", 2, d)]
    for kind in ("gaussian", "haar"):
        engine = run_engine(shapes, acts, counted, [2, 4], baseline=kind, baseline_seed=7)
        x = acts["a"].reshape(-1, 2 * d).astype(np.float64)
        y = acts["b"].reshape(-1, 2, d).astype(np.float64)
        rotated = np.concatenate(
            [y[:, layer] @ engine._rotation(1, layer).cpu().numpy().T for layer in range(2)], axis=1
        )
        expected = numpy_corr(x, rotated)
        np.testing.assert_allclose(engine.results[(0, 1)].baseline_corr.numpy(), expected.max(axis=1), atol=1e-6)
        np.testing.assert_array_equal(engine.results[(0, 1)].baseline_index.numpy(), expected.argmax(axis=1))


def test_baseline_ignores_row_scaling_of_the_rotation():
    """Scaling rows of R scales each rotated unit: its correlation, hence the baseline, is unchanged."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((500, 3))
    y = rng.standard_normal((500, 4))
    rotation = rotation_matrix(4, "gaussian", seed=3).numpy()
    scaled = rotation * np.array([[0.5], [2.0], [3.0], [10.0]])
    np.testing.assert_allclose(numpy_corr(x, y @ rotation.T), numpy_corr(x, y @ scaled.T), atol=1e-12)


def test_invariant_to_positive_affine_maps_and_self_correlation_is_one():
    rng = np.random.default_rng(3)
    rows, pos, d = 5, 20, 6
    base = random_activations(rng, rows, pos, 1, d)
    acts = {"a": base, "b": (base * 3.5 + 11.0).astype(np.float32)}
    counted = np.ones((rows, pos), dtype=bool)
    engine = run_engine([ModelShape("a", 1, d), ModelShape("b", 1, d)], acts, counted, [1, 3])
    result = engine.results[(0, 1)]
    np.testing.assert_allclose(result.top_corr[:, 0].numpy(), 1.0, atol=1e-6)
    np.testing.assert_array_equal(result.top_index[:, 0].numpy(), np.arange(d))
    negated = {"a": base, "b": (-base).astype(np.float32)}
    engine = run_engine([ModelShape("a", 1, d), ModelShape("b", 1, d)], negated, counted, [])
    # every correlation with a negated copy: the twin is at -1
    x = base.reshape(-1, d)
    np.testing.assert_allclose(numpy_corr(x, -x).diagonal(), -1.0, atol=1e-12)
    assert (engine.results[(0, 1)].top_corr[:, 0].numpy() < 1.0 - 1e-3).all()


def test_dead_neurons_are_never_matched():
    rng = np.random.default_rng(4)
    acts = {"a": random_activations(rng, 4, 10, 1, 3), "b": random_activations(rng, 4, 10, 1, 3)}
    acts["a"][..., 0, 1] = 0.25  # constant
    acts["b"][..., 0, 2] = -0.1
    counted = np.ones((4, 10), dtype=bool)
    engine = run_engine([ModelShape("a", 1, 3), ModelShape("b", 1, 3)], acts, counted, [2])
    assert engine.dead_neurons(0).tolist() == [False, True, False]
    assert torch.isinf(engine.results[(0, 1)].top_corr[1]).all()
    assert 2 not in engine.results[(0, 1)].top_index[:, 0].tolist()


def test_memory_budget_splits_into_passes_with_identical_results():
    rng = np.random.default_rng(5)
    acts = {name: random_activations(rng, 6, 12, 3, 4) for name in "abc"}
    counted = np.ones((6, 12), dtype=bool)
    shapes = [ModelShape(name, 3, 4) for name in "abc"]
    whole = run_engine(shapes, acts, counted, [3])
    split = run_engine(shapes, acts, counted, [3], memory_budget_gb=4 * 12 * 8 / 2**30)
    assert split.n_passes > whole.n_passes == 1
    for key, result in whole.results.items():
        torch.testing.assert_close(split.results[key].top_corr, result.top_corr)
        torch.testing.assert_close(split.results[key].baseline_corr, result.baseline_corr)


@pytest.mark.parametrize("budget_gb", [None, 4 * 12 * 8 / 2**30])
def test_rotations_drawn_ahead_in_threads_give_the_same_results(monkeypatch, budget_gb):
    """CUDA runs draw the baseline's rotations in CPU threads ahead of use (`draw_ahead`): forced here on the CPU,
    in one pass (rotations kept) and in several (drawn again per block), with fewer threads than rotations so the
    window slides. Each rotation must still meet its own layer: the results equal the sequential draws'."""
    import precompute.correlation as correlation

    monkeypatch.setattr(correlation, "ROTATION_DRAW_THREADS", 2)
    rng = np.random.default_rng(8)
    acts = {name: random_activations(rng, 6, 12, 3, 4) for name in "abc"}
    counted = np.ones((6, 12), dtype=bool)
    shapes = [ModelShape(name, 3, 4) for name in "abc"]
    sequential = run_engine(shapes, acts, counted, [3], memory_budget_gb=budget_gb)
    ahead = CorrelationEngine(shapes, CorrelationConfig(memory_budget_gb=budget_gb))
    ahead.draw_ahead = True
    drawn: list[tuple[int, int]] = []
    original = ahead._drawn
    monkeypatch.setattr(ahead, "_drawn", lambda index, layer: drawn.append((index, layer)) or original(index, layer))
    while not ahead.done:
        for batch in make_batches(acts, counted, [3]):
            ahead.update(batch)
        ahead.finish_pass()
    assert len(drawn) >= 9  # every layer of every model, at least once
    for key, result in sequential.results.items():
        torch.testing.assert_close(ahead.results[key].top_corr, result.top_corr, rtol=0, atol=0)
        torch.testing.assert_close(ahead.results[key].baseline_corr, result.baseline_corr, rtol=0, atol=0)
        torch.testing.assert_close(ahead.results[key].baseline_index, result.baseline_index, rtol=0, atol=0)


@pytest.mark.parametrize("budget_gb", [None, 4 * 12 * 8 / 2**30, 4 * 4 * 8 / 2**30], ids=["one", "layers", "tiles"])
def test_memory_plan_is_the_state_the_engine_holds(budget_gb):
    from tests.factories import tensor_bytes

    rng = np.random.default_rng(7)
    acts = {name: random_activations(rng, 6, 12, 3, 4) for name in "abc"}
    shapes = [ModelShape(name, 3, 4) for name in "abc"]
    config = CorrelationConfig(memory_budget_gb=budget_gb, top_k=2)
    engine = CorrelationEngine(shapes, config)
    memory = engine.plan.memory(batch_tokens=6 * 12)
    n_all = sum(shape.n_neurons for shape in shapes)
    largest = 0
    while not engine.done:  # every pass's accumulators with the Gram matrices it gathers
        for batch in make_batches(acts, np.ones((6, 12), dtype=bool), [3]):
            engine.update(batch)
        results = [vars(result) for result in engine.results.values()]
        moments = [(m.shift, m.total, m.gram) for m in engine.moments]
        largest = max(largest, tensor_bytes(engine.accumulators, moments, results))
        engine.finish_pass()
    assert (engine.n_passes == 1) == (budget_gb is None)
    assert not any(m.gram for m in engine.moments) and not engine._rotations and not engine.accumulators
    # the sums of squares and the rotated spreads: 8 bytes a neuron each
    assert memory.state == largest + 16 * n_all
    rest = [(m.shift, m.total, m.squares) for m in engine.moments]
    assert memory.rest == tensor_bytes(rest, engine.rotated_std, [vars(r) for r in engine.results.values()])


def test_state_dict_round_trip_resumes_mid_pass():
    rng = np.random.default_rng(6)
    acts = {name: random_activations(rng, 6, 12, 2, 4) for name in "ab"}
    counted = np.ones((6, 12), dtype=bool)
    shapes = [ModelShape(name, 2, 4) for name in "ab"]
    batches = make_batches(acts, counted, [2, 4])
    reference = run_engine(shapes, acts, counted, [2, 4])
    first = CorrelationEngine(shapes, CorrelationConfig())
    first.update(batches[0])
    resumed = CorrelationEngine(shapes, CorrelationConfig())
    resumed.load_state_dict(first.state_dict())
    for batch in batches[1:]:
        resumed.update(batch)
    resumed.finish_pass()
    torch.testing.assert_close(resumed.results[(0, 1)].top_corr, reference.results[(0, 1)].top_corr)


def test_bad_configuration_is_refused_with_the_choices():
    with pytest.raises(CorrelationError, match="gaussian, haar"):
        CorrelationConfig(baseline="orthogonal")  # type: ignore[arg-type]
    with pytest.raises(CorrelationError, match="float64, float32, tf32, bfloat16"):
        CorrelationConfig(precision="float16")  # type: ignore[arg-type]


@pytest.mark.parametrize("precision", ["bfloat16", "tf32", "fp8", "fp8-fast"])
def test_gpu_precisions_agree_with_float64(precision):
    """The CUDA code paths (bf16, TF32 or fp8 products, float32 accumulators), run on the CPU (fp8 through the
    CPU's `torch._scaled_mm`; measured error ~6e-3 here, bf16 ~5e-4)."""
    rng = np.random.default_rng(7)
    acts = {name: random_activations(rng, 8, 32, 2, 16, offset=3.0) for name in "ab"}
    acts["b"][..., 1, :] += acts["a"][..., 0, :]
    counted = np.ones((8, 32), dtype=bool)
    shapes = [ModelShape(name, 2, 16) for name in "ab"]
    exact = run_engine(shapes, acts, counted, [3, 6], precision="float64")
    fast = run_engine(shapes, acts, counted, [3, 6], precision=precision)
    assert fast.accumulator_dtype == torch.float32
    tolerance = 2e-2 if precision in ("bfloat16", "fp8", "fp8-fast") else 1e-5
    for key, result in exact.results.items():
        np.testing.assert_allclose(fast.results[key].top_corr[:, 0], result.top_corr[:, 0], atol=tolerance)
        np.testing.assert_allclose(fast.results[key].baseline_corr, result.baseline_corr, atol=tolerance)


@pytest.mark.parametrize("fused", [True, False])
@settings(max_examples=40, deadline=None)
@given(
    tokens=st.integers(1, 40),
    n=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    magnitude=st.sampled_from([1e-38, 1e-3, 1.0, 1e4]),
)
def test_fp8_operands_are_the_division_rounded_by_the_cast_bit_for_bit(fused, tokens, n, seed, magnitude):
    """`ScaledOperand.quantize` is x / scale cast to float8 (`divided_into_fp8`, whether the division writes float8
    itself or a float32 quotient is cast), transposed neuron-major, the padding zero, bit for bit; x is untouched
    when the division writes float8."""
    import precompute.correlation as correlation

    x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(seed)) * magnitude
    x[0, 0] = 0.0  # a zero, and (n = 1) perhaps a neuron that never fires
    scales = x.abs().amax(dim=0).clamp_min(torch.finfo(torch.float32).tiny) / FP8_MAX
    expected = torch.zeros(n, -(-tokens // 16) * 16, dtype=torch.float8_e4m3fn)
    expected[:, :tokens] = (x / scales).to(torch.float8_e4m3fn).T
    given_x = x.clone()
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(correlation._DIVIDE_INTO_FP8, "cpu", fused)
        operand = ScaledOperand.quantize(given_x)
    assert torch.equal(operand.values.view(torch.uint8), expected.view(torch.uint8))
    assert torch.equal(operand.scales.squeeze(1), scales)
    if fused:
        assert torch.equal(given_x, x)


def test_the_division_writes_float8_on_this_cpu():
    """The CPU's division writes float8 (``out=``) exactly as the cast of its float32 quotient: the first use
    checks it and remembers (so the test above covers the path a GPU takes, not only the fallback)."""
    import precompute.correlation as correlation

    correlation._DIVIDE_INTO_FP8.pop("cpu", None)
    x = torch.randn(9, 3)
    codes = divided_into_fp8(x, torch.ones(3))
    assert correlation._DIVIDE_INTO_FP8["cpu"] is True and codes.dtype == torch.float8_e4m3fn


@pytest.mark.parametrize(("tokens", "padded"), [(37, 48), (300, 304), (16, 16)])
def test_fp8_operands_round_trip_with_a_scale_per_neuron(tokens, padded):
    """Each neuron's largest magnitude maps to e4m3's largest value; values times scales give the input back to
    e4m3's precision (3 mantissa bits: relative error at most 2^-4); the tokens are padded with zeros to 16."""
    generator = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 5, generator=generator) * torch.tensor([1e-3, 1.0, 30.0, 1e4, 0.5])
    operand = ScaledOperand.quantize(x.clone())
    assert operand.values.shape == (5, padded) and operand.values.dtype == torch.float8_e4m3fn
    assert operand.values[:, tokens:].float().abs().sum() == 0
    np.testing.assert_allclose(operand.values.float().abs().amax(dim=1), FP8_MAX)
    back = (operand.values[:, :tokens].float() * operand.scales).T
    # 3 mantissa bits: 2^-4 relative for normal values; below e4m3's smallest normal the subnormal step is 2^-9 of
    # the scale, so half of it absolute (the bound without it failed on ~6% of unseeded draws)
    assert ((back - x).abs() <= x.abs() * 2**-4 + operand.scales.T * 2**-10).all()
    exact = x.double().T @ x.double()
    product = fp8_matmul_fp32(operand, operand).double()
    assert (product - exact).norm() / exact.norm() < 0.05  # e4m3 rounding; a wrong scale would be off by orders


@pytest.mark.parametrize("precision", ["float32", "tf32", "bfloat16", "fp8", "fp8-fast"])
def test_operands_are_in_the_engines_precision(precision):
    """The products' operands: float32 as they come (float32, TF32), bf16, or fp8 with scales; float64 is made in
    `update`. A more precise operand would pass every tolerance test, so the dtype itself is checked."""
    engine = CorrelationEngine([ModelShape("a", 1, 4), ModelShape("b", 1, 4)], CorrelationConfig(precision=precision))
    x = torch.randn(5, 4)
    operand = engine._operand(x)
    if precision.startswith("fp8"):
        assert isinstance(operand, ScaledOperand) and operand.values.dtype == torch.float8_e4m3fn
    else:
        assert isinstance(operand, torch.Tensor)
        assert operand.dtype == (torch.bfloat16 if precision == "bfloat16" else torch.float32)


def test_fp8_products_reach_the_accumulator_in_blocks_of_the_operand_budget(monkeypatch):
    """fp8 products come out as float32 blocks that are added to the accumulator: each block is at most the plan's
    operand bytes, and as few blocks are made as that allows (the bytes are the memory plan's; the count, the
    speed). The sum is the same either way."""
    import dataclasses

    import precompute.correlation as correlation

    shapes = [ModelShape("a", 2, 8), ModelShape("b", 2, 8)]
    engine = CorrelationEngine(shapes, CorrelationConfig(precision="fp8"))
    engine.plan = dataclasses.replace(engine.plan, operand_chunk=5 * 16 * 4)  # 5 rows of 16 float32 products
    blocks: list[int] = []
    fast_flags: list[bool] = []
    original = correlation.fp8_matmul_fp32

    def recorded(left, right, fast_accum=False):
        blocks.append(left.values.shape[0])
        fast_flags.append(fast_accum)
        return original(left, right)

    monkeypatch.setattr(correlation, "fp8_matmul_fp32", recorded)
    x = ScaledOperand.quantize(torch.randn(20, 16))
    out = torch.zeros(16, 16)
    engine._products(x, x, out)
    assert blocks == [5, 5, 5, 1]
    np.testing.assert_allclose(out, original(x, x), rtol=1e-6, atol=1e-6)
    assert fast_flags == [False] * 4  # fp8 asks for the GEMM's exact accumulation, fp8-fast for the fast one
    fast = CorrelationEngine(shapes, CorrelationConfig(precision="fp8-fast"))
    fast._products(x, x, torch.zeros(16, 16))
    assert fast_flags[4:] == [True]


def test_cuda_plan_works_a_whole_batch_at_once():
    """On CUDA the operands of a 12,288-token batch are one chunk (the token count is the GEMM's inner size), and
    the plan counts them; the CPU keeps chunks of `CHUNK_BYTES`. (Planned only: nothing runs on a GPU here.)"""
    shapes = [ModelShape(name, 12, 3072) for name in "ab"]
    cuda = plan_correlations(shapes, CorrelationConfig(), torch.device("cuda"), n_passes=1)
    cpu = plan_correlations(shapes, CorrelationConfig(), torch.device("cpu"), n_passes=1)
    assert cuda.precision == "bfloat16" and cuda.operand_chunk == CUDA_OPERAND_CHUNK_BYTES
    assert cpu.operand_chunk == CHUNK_BYTES
    n_all, n_model = 2 * 12 * 3072, 12 * 3072
    # every model's bf16 operand and one model's float32 copy at a time (`operand_token_bytes`)
    assert cuda.memory(12_288).update >= 12_288 * (n_all * 2 + n_model * 4)
    assert cpu.memory(12_288).update < 12_288 * n_all * 4 / 10
    # fp8: the float8 operands, one model's float32 copy and its float8 rounding, and the whole float32 product
    # block that `_products` makes in one GEMM (the plan used to count a `CHUNK_BYTES` block of it)
    fp8 = plan_correlations(shapes, CorrelationConfig(precision="fp8"), torch.device("cuda"), n_passes=1)
    assert fp8.memory(12_288).update >= 12_288 * (n_all + n_model * 5) + n_model * n_model * 4


@pytest.mark.parametrize("precision", ["bfloat16", "fp8", "float64"])
def test_a_batch_is_cut_by_the_operands_it_holds_at_once(monkeypatch, precision):
    """Each chunk of a batch costs a pass over the pair's accumulator (fp8 adds a float32 product block), so the
    chunks are as long as the operand budget allows. The budget counts every model's operand and one model's
    float32 copy (the copies are made and freed one model at a time): with a budget of exactly that for 24 tokens
    a batch of 24 is one chunk of 24 tokens a model (the old count, every model's float32 copy at once, made two),
    and 25 tokens are two even chunks."""
    import dataclasses

    shapes = [ModelShape(name, 2, 8) for name in "abc"]
    engine = CorrelationEngine(shapes, CorrelationConfig(precision=precision))
    budget = 24 * operand_token_bytes(engine.precision, shapes)
    assert 24 * 3 * 16 * (4 + OPERAND_ITEMSIZE[precision]) > budget  # the old count: two chunks
    engine.plan = dataclasses.replace(engine.plan, operand_chunk=budget)
    read: list[int] = []
    original = ActivationBatch.counted_rows

    def recorded(self, model, hook, tokens, columns=None):
        rows = original(self, model, hook, tokens, columns)
        read.append(rows.shape[0])
        return rows

    monkeypatch.setattr(ActivationBatch, "counted_rows", recorded)
    rng = np.random.default_rng(0)
    acts = {shape.name: rng.random((7, 4, 2, 8), dtype=np.float32) for shape in shapes}
    counted = np.zeros((7, 4), dtype=bool)
    counted[:6] = True  # 24 tokens, then 25
    engine.update(make_batches(acts, counted, [])[0])
    assert read[-3:] == [24, 24, 24]
    counted[6, 0] = True
    read.clear()
    engine.update(make_batches(acts, counted, [])[0])
    assert read == [12, 12, 12, 13, 13, 13]
    assert engine.plan.memory(24).update >= budget


# --- mutation testing (docs/testing.md): checks that killed mutmut's survivors ---------------------------------


def _reloaded(engine: CorrelationEngine, shapes, config: CorrelationConfig) -> CorrelationEngine:
    """The pipeline's checkpoint: torch.save of the state dict, loaded into a fresh engine."""
    import io

    saved = io.BytesIO()
    torch.save(engine.state_dict(), saved)
    saved.seek(0)
    fresh = CorrelationEngine(shapes, config)
    fresh.load_state_dict(torch.load(saved, weights_only=False))
    return fresh


@pytest.mark.parametrize(
    ("checkpoint", "budget_entries", "n_passes"),
    [((0, 2), 4 * 12, 3), ((1, 0), 4 * 12, 3), ((1, 1), 4 * 12, 3), ((0, 2), 4 * 4, 9), ((4, 1), 4 * 8, 6)],
    ids=["pass0-batch2", "between-passes", "pass1-batch1", "tiles-pass0-batch2", "two-tiles-pass4-batch1"],
)
def test_split_run_resumed_from_any_checkpoint_matches_numpy(checkpoint, budget_entries, n_passes):
    """A split run stopped after two batches of pass 0 (the sums of moments are no longer ~0 in the shifted
    basis), between passes (no accumulator saved; the rotated spreads of pass 0 are needed later) or inside a later
    pass, then resumed, gives the uninterrupted run's results, and those are NumPy's. Split by whole layers of a
    (one a pass), or, under a budget below one layer of a against all of b, by tiles: one layer of a against one
    or two layers of b a pass (the baselines of a tile need its whole rows and columns)."""
    rng = np.random.default_rng(11)
    acts = {name: random_activations(rng, 6, 12, 3, 4, offset=2.0) for name in "ab"}
    acts["b"][..., 2, 1] += 3.0 * acts["a"][..., 0, 3]
    counted = rng.random((6, 12)) > 0.1
    shapes = [ModelShape(name, 3, 4) for name in "ab"]
    config = CorrelationConfig(memory_budget_gb=budget_entries * 8 / 2**30, top_k=2)
    batches = make_batches(acts, counted, [2, 4])
    reference = run_engine(shapes, acts, counted, [2, 4], memory_budget_gb=config.memory_budget_gb, top_k=2)
    assert reference.n_passes == n_passes
    whole = run_engine(shapes, acts, counted, [2, 4], top_k=2)
    for key, result in whole.results.items():  # the split changes nothing, baselines included
        for name, value in vars(result).items():
            torch.testing.assert_close(getattr(reference.results[key], name), value, msg=f"{key} {name}")

    engine = CorrelationEngine(shapes, config)
    while not engine.done:
        for index, batch in enumerate(batches):
            if (engine.pass_index, index) == checkpoint:
                engine = _reloaded(engine, shapes, config)
            engine.update(batch)
        engine.finish_pass()
    for key, result in reference.results.items():
        for name, value in vars(result).items():
            torch.testing.assert_close(getattr(engine.results[key], name), value, msg=f"{key} {name}")

    x, y = acts["a"][counted].reshape(-1, 12), acts["b"][counted].reshape(-1, 12)
    expected = numpy_corr(x, y)
    np.testing.assert_allclose(engine.results[(0, 1)].top_corr.numpy(), -np.sort(-expected, axis=1)[:, :2], atol=1e-6)
    np.testing.assert_allclose(engine.results[(1, 0)].top_corr.numpy(), -np.sort(-expected.T, axis=1)[:, :2], atol=1e-6)
    assert [m.count for m in engine.moments] == [int(counted.sum())] * 2


def test_every_layer_of_every_model_gets_its_own_rotation_seed():
    """Seeds of (run seed, model, layer) are distinct 62-bit numbers, so no two layers share a rotation."""
    keys = [(seed, name, layer) for seed in (0, 1) for name in ("a", "b", "gpt2-seed-3") for layer in range(12)]
    seeds = [layer_rotation_seed(*key) for key in keys]
    assert len(set(seeds)) == len(keys)
    assert all(0 <= seed < 2**62 for seed in seeds)
