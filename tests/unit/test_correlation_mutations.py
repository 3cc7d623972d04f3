"""The correlation engine's closing (correlations, rotated baseline, moments) against independent NumPy oracles.

Written for mutation round 6 (docs/testing.md): `CorrelationEngine._finish_tile`, `_rotated_spreads`, `_add_sums`,
`_update_grams`, `_finish_block`, `rotation_matrix` and `plan_passes` (blocks and passes worked out by hand). The
oracles do not use the engine's formulas: Pearson correlations are computed in float64 on the concatenated counted
tokens, each rotation is built in NumPy from the seeded Gaussian draw (row-normalised, or NumPy's QR with the sign
fix for Haar) and applied to the activations themselves, so the baseline is the best Pearson correlation with the
rotated units x_l @ R_lᵀ (paper-spec §2.3-2.4). The activations are built by hand: planted twins (a neuron that is
an affine map of a neuron of another model, a different twin for each of three models), an anti-twin, dead
(constant) neurons, neurons that are exactly one rotated unit of another model's layer, and a layer with a tiny
spread, on models whose layer counts and widths all differ.
"""

from __future__ import annotations

import itertools
from typing import Any, TypeVar

import numpy as np
import pytest
import torch

from precompute.correlation import (
    DEAD_VARIANCE,
    CorrelationConfig,
    CorrelationEngine,
    CorrelationError,
    ModelShape,
    layer_rotation_seed,
    model_pairs,
    plan_correlations,
    plan_passes,
    rotation_matrix,
)
from tests.factories import TwoRanks, make_batches

T = TypeVar("T")

SHAPES = [ModelShape("a", 2, 5), ModelShape("b", 3, 4), ModelShape("c", 2, 3)]
ROWS, POS = 9, 16
SEED = 11

# Budgets in bytes of float64 accumulator entries: one pass; blocks of whole layers of a (a layer of a against all
# of b is 5 * 12 * 8 = 480 bytes); single [d_a, d_b] tiles (the largest is 5 * 4 * 8 = 160 bytes).
BUDGETS = {"one": None, "layers": 480 / 2**30, "tiles": 160 / 2**30}


def gaussian_draw(d: int, seed: int) -> np.ndarray:
    """The seeded N(0, 1) draw every rotation starts from (torch's generator: the run's documented seeding)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(d, d, generator=generator, dtype=torch.float64).numpy()


def numpy_rotation(d: int, kind: str, seed: int) -> np.ndarray:
    """The rotation built in NumPy: rows normalised to unit length, or the Haar Q of a QR with R's diagonal > 0."""
    draw = gaussian_draw(d, seed)
    if kind == "gaussian":
        return draw / np.sqrt((draw**2).sum(axis=1, keepdims=True))
    q, r = np.linalg.qr(draw)
    return q * np.sign(np.diag(r))[None, :]


def layer_rotation(shape: ModelShape, layer: int, kind: str, seed: int) -> np.ndarray:
    return numpy_rotation(shape.d_mlp, kind, layer_rotation_seed(seed, shape.name, layer))


def planted_activations(kind: str, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """[rows, pos, layers, d] float32 activations of models a, b, c with known structure, and the counted mask."""
    rng = np.random.default_rng(5)
    acts = {}
    for shape in SHAPES:
        pre = rng.standard_normal((ROWS, POS, shape.n_layers, shape.d_mlp))
        acts[shape.name] = (np.maximum(pre, 0) + 0.1 * pre + 3.0).astype(np.float32)
    a, b, c = acts["a"], acts["b"], acts["c"]

    def unit(x: np.ndarray, model: int, layer: int, m: int) -> np.ndarray:
        """Rotated unit m of a model's layer on these activations: (x_l @ R_lᵀ)[m]."""
        return (x[..., layer, :].astype(np.float64) @ layer_rotation(SHAPES[model], layer, kind, seed).T)[..., m]

    a[..., 1, 2] = 0.7  # dead neurons: constant
    b[..., 0, 3] = -1.25
    b[..., 2, :] = b[..., 2, :] * 1e-3 + 0.5  # a layer whose units spread by less than 1 (times the token count)
    c[..., 0, 2] = 3.0 * a[..., 1, 3] - 1.0  # twins, a different one for every pair of models
    b[..., 1, 1] = 2.0 * a[..., 0, 4] + 0.5
    c[..., 1, 1] = 0.5 * b[..., 1, 0] + 2.0
    c[..., 1, 0] = -4.0 * a[..., 0, 0]  # an anti-twin (correlation -1)
    # neurons that are exactly one rotated unit of another model's layer (baseline 1 at a known unit); each
    # after the layer it is made from is final
    b[..., 1, 3] = 10.0 * unit(c, 2, 0, 1) + 7.0
    a[..., 1, 4] = 5.0 * unit(b, 1, 1, 2) - 2.0
    a[..., 1, 0] = unit(c, 2, 1, 2)
    b[..., 0, 1] = 3.0 * unit(c, 2, 1, 0) + 1.0
    b[..., 0, 2] = unit(a, 0, 1, 0)
    a[..., 0, 1] = unit(b, 1, 2, 3)
    counted = rng.random((ROWS, POS)) > 0.25
    counted[0, 0] = True
    return acts, counted


def run(acts, counted, splits=(3, 7), **config) -> CorrelationEngine:
    engine = CorrelationEngine(SHAPES, CorrelationConfig(**config))
    batches = make_batches(acts, counted, list(splits))
    while not engine.done:
        for batch in batches:
            engine.update(batch)
        engine.finish_pass()
    return engine


def flat(acts: dict[str, np.ndarray], counted: np.ndarray, shape: ModelShape) -> np.ndarray:
    return acts[shape.name][counted].reshape(-1, shape.n_neurons).astype(np.float64)


def pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlations of every column of x with every column of y; -inf where either is constant."""
    xc, yc = x - x.mean(axis=0), y - y.mean(axis=0)
    sx, sy = np.sqrt((xc**2).sum(axis=0)), np.sqrt((yc**2).sum(axis=0))
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = (xc.T @ yc) / np.outer(sx, sy)
    dead_x = sx**2 / len(x) <= 1e-20
    dead_y = sy**2 / len(y) <= 1e-20
    corr[dead_x, :] = -np.inf
    corr[:, dead_y] = -np.inf
    return corr


def rotated_units(acts, counted, shape: ModelShape, kind: str, seed: int) -> np.ndarray:
    """Every rotated unit of the model, layer by layer: x_l @ R_lᵀ on the counted tokens."""
    x = acts[shape.name][counted].astype(np.float64)
    return np.concatenate(
        [x[:, layer] @ layer_rotation(shape, layer, kind, seed).T for layer in range(shape.n_layers)], axis=1
    )


def check_direction(engine, acts, counted, x: int, y: int, kind: str, seed: int, atol: float) -> None:
    """Top-k partners and the best rotated unit of every neuron of model x in model y, against NumPy."""
    sx, sy = SHAPES[x], SHAPES[y]
    result = engine.results[(x, y)]
    k = engine.config.top_k
    corr = pearson(flat(acts, counted, sx), flat(acts, counted, sy))
    order = np.argsort(-corr, axis=1, kind="stable")[:, :k]
    expected = np.take_along_axis(corr, order, axis=1)
    # a partner with fewer than top_k neurons leaves the empty result's -inf at the end
    pad = k - expected.shape[1]
    expected = np.pad(expected, ((0, 0), (0, pad)), constant_values=-np.inf)
    order = np.pad(order, ((0, 0), (0, pad)), constant_values=-1)
    top = result.top_corr.numpy()
    np.testing.assert_allclose(top, expected, atol=atol, rtol=0)
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(result.top_index.numpy()[finite], order[finite])
    base = pearson(flat(acts, counted, sx), rotated_units(acts, counted, sy, kind, seed))
    np.testing.assert_allclose(result.baseline_corr.numpy(), base.max(axis=1), atol=atol, rtol=0)
    live = np.isfinite(base.max(axis=1))
    np.testing.assert_array_equal(result.baseline_index.numpy()[live], base.argmax(axis=1)[live])
    # correlations are clamped to [-1, 1]: a twin's 1 (or an anti-twin's -1) never comes out beyond it
    assert (top[np.isfinite(top)] <= 1).all() and (top[np.isfinite(top)] >= -1).all()
    baseline = result.baseline_corr.numpy()
    assert (baseline[np.isfinite(baseline)] <= 1).all() and (baseline[np.isfinite(baseline)] >= -1).all()


@pytest.mark.parametrize("budget", list(BUDGETS), ids=list(BUDGETS))
@pytest.mark.parametrize("kind", ["gaussian", "haar"])
@pytest.mark.parametrize(("precision", "atol"), [("float64", 2e-8), ("float32", 2e-6)])
def test_every_direction_matches_numpy_with_an_explicit_rotation(budget, kind, precision, atol):
    seed = SEED + (kind == "haar")
    acts, counted = planted_activations(kind, seed)
    top_k = max(s.n_neurons for s in SHAPES)  # every partner comes back, sorted: the whole correlation matrix
    engine = run(
        acts,
        counted,
        baseline=kind,
        baseline_seed=seed,
        precision=precision,
        top_k=top_k,
        memory_budget_gb=BUDGETS[budget],
    )
    for x, y in itertools.permutations(range(len(SHAPES)), 2):
        check_direction(engine, acts, counted, x, y, kind, seed, atol)


@pytest.mark.parametrize("top_k", [1, 3, 4, 5])
def test_top_k_between_the_layer_widths_keeps_every_layers_candidates(top_k):
    """top_k below, equal to and above the widths 3, 4 and 5: each tile offers min(top_k, width) candidates."""
    acts, counted = planted_activations("gaussian", SEED)
    engine = run(acts, counted, baseline_seed=SEED, precision="float64", top_k=top_k, memory_budget_gb=BUDGETS["tiles"])
    for x, y in itertools.permutations(range(len(SHAPES)), 2):
        check_direction(engine, acts, counted, x, y, "gaussian", SEED, 2e-8)


def test_planted_twins_baselines_and_dead_neurons_by_hand():
    """What the construction puts there, read off directly (no oracle): twins at 1, the anti-twin at -1, the
    planted rotated units at 1 with their flat index, dead neurons matched with nothing."""
    acts, counted = planted_activations("gaussian", SEED)
    engine = run(acts, counted, baseline_seed=SEED, precision="float64", top_k=2)
    r = engine.results
    # twin a L0.4 <-> b L1.1 (flat 4 + 1 = 5 in b, 4 in a)
    assert r[(0, 1)].top_corr[4, 0].item() == pytest.approx(1, abs=1e-9) and r[(0, 1)].top_index[4, 0] == 5
    assert r[(1, 0)].top_corr[5, 0].item() == pytest.approx(1, abs=1e-9) and r[(1, 0)].top_index[5, 0] == 4
    # twin a L1.3 <-> c L0.2 (a flat 8, c flat 2); b L1.0 <-> c L1.1 (b flat 4, c flat 4)
    assert r[(0, 2)].top_index[8, 0] == 2 and r[(2, 0)].top_index[2, 0] == 8
    assert r[(1, 2)].top_index[4, 0] == 4 and r[(2, 1)].top_index[4, 0] == 4
    # the anti-twin: c L1.0 (flat 3) has -1 with a L0.0 (flat 0), which is therefore among neither's top matches
    assert not (r[(2, 0)].top_index[3] == 0).any() and not (r[(0, 2)].top_index[0] == 3).any()
    # planted rotated units: (model, neuron) -> (partner, its flat rotated unit)
    planted = {
        (0, 1): (1, 11),  # a L0.1: unit 3 of b's layer 2
        (0, 9): (1, 6),  # a L1.4: unit 2 of b's layer 1
        (0, 5): (2, 5),  # a L1.0: unit 2 of c's layer 1
        (1, 2): (0, 5),  # b L0.2: unit 0 of a's layer 1
        (1, 7): (2, 1),  # b L1.3: unit 1 of c's layer 0
        (1, 1): (2, 3),  # b L0.1: unit 0 of c's layer 1
    }
    for (x, neuron), (y, rotated) in planted.items():
        assert r[(x, y)].baseline_corr[neuron].item() == pytest.approx(1, abs=1e-9)
        assert r[(x, y)].baseline_index[neuron] == rotated
    # dead: a L1.2 (flat 7), b L0.3 (flat 3)
    for key, row in (((0, 1), 7), ((0, 2), 7), ((1, 0), 3), ((1, 2), 3)):
        assert torch.isneginf(r[key].top_corr[row]).all() and torch.isneginf(r[key].baseline_corr[row])
    for key, dead in (((1, 0), 7), ((2, 0), 7), ((0, 1), 3), ((2, 1), 3)):
        finite = torch.isfinite(r[key].top_corr)
        assert not (r[key].top_index[finite] == dead).any()
    assert engine.dead_neurons(0).nonzero().flatten().tolist() == [7]
    assert engine.dead_neurons(1).nonzero().flatten().tolist() == [3]
    assert not engine.dead_neurons(2).any()


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("budget", list(BUDGETS), ids=list(BUDGETS))
def test_moments_and_spreads_match_numpy(precision, budget):
    """Counts, shifted sums, sums of squares and the rotated units' spreads (times sqrt(n)), after the run; the
    Gram matrices are freed as soon as their spreads are known, and squares stay NaN until then."""
    acts, counted = planted_activations("gaussian", SEED)
    engine = CorrelationEngine(
        SHAPES, CorrelationConfig(baseline_seed=SEED, precision=precision, memory_budget_gb=BUDGETS[budget])
    )
    batches = make_batches(acts, counted, [3, 7])
    seen: set[tuple[int, int]] = set()
    while not engine.done:
        for batch in batches:
            engine.update(batch)
        for index, moments in enumerate(engine.moments):
            assert moments.squares is not None
            d = SHAPES[index].d_mlp
            for layer in range(SHAPES[index].n_layers):
                gathered = (index, layer) in seen
                assert (layer in moments.gram) == (engine.gram_passes[(index, layer)] == engine.pass_index)
                assert bool(moments.squares[layer * d : (layer + 1) * d].isnan().all()) != gathered
        engine.finish_pass()
        assert all(not moments.gram for moments in engine.moments)
        seen = set(engine.rotated_std)
    atol = 1e-5 if precision == "float64" else 1e-3  # the shifted values are float32 (`update`)
    n = int(counted.sum())
    for index, shape in enumerate(SHAPES):
        x = flat(acts, counted, shape)
        moments = engine.moments[index]
        assert moments.count == n
        assert moments.total is not None and moments.squares is not None and moments.shift is not None
        assert moments.total.dtype == moments.squares.dtype == torch.float64
        shift = moments.shift.double().numpy()
        np.testing.assert_allclose(moments.total.numpy(), (x - shift).sum(axis=0), atol=atol, rtol=0)
        np.testing.assert_allclose(moments.squares.numpy(), ((x - shift) ** 2).sum(axis=0), atol=atol, rtol=1e-6)
        for layer in range(shape.n_layers):
            rotation = layer_rotation(shape, layer, "gaussian", SEED)
            units = x[:, layer * shape.d_mlp : (layer + 1) * shape.d_mlp] @ rotation.T
            spread = np.sqrt(((units - units.mean(axis=0)) ** 2).sum(axis=0))
            std = engine.rotated_std[(index, layer)]
            assert std.dtype == torch.float64  # the memory plan's 8 bytes a neuron (`CorrelationPlan.memory`)
            np.testing.assert_allclose(std.numpy(), spread, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("d", [1, 3, 6])
@pytest.mark.parametrize("kind", ["gaussian", "haar"])
def test_rotation_matrix_is_the_numpy_construction(d, kind):
    """The same seeded draw, made into a rotation in NumPy: float64 on the CPU, row m mixing neurons into unit m."""
    rotation = rotation_matrix(d, kind, seed=1234)
    assert rotation.dtype == torch.float64 and rotation.device.type == "cpu"
    np.testing.assert_allclose(rotation.numpy(), numpy_rotation(d, kind, 1234), atol=1e-12, rtol=0)
    assert not np.allclose(rotation_matrix(d, kind, seed=1235).numpy(), rotation.numpy())
    np.testing.assert_array_equal(rotation_matrix(d, kind, seed=1234).numpy(), rotation.numpy())
    if kind == "haar":
        np.testing.assert_allclose(rotation.numpy() @ rotation.numpy().T, np.eye(d), atol=1e-12)
        # the sign fix scales Q's columns (not its rows): Qᵀ·draw is upper triangular with a positive diagonal
        upper = rotation.numpy().T @ gaussian_draw(d, 1234)
        np.testing.assert_allclose(np.tril(upper, -1), 0, atol=1e-12)
        assert (np.diag(upper) > 0).all()
    else:
        np.testing.assert_allclose(np.linalg.norm(rotation.numpy(), axis=1), np.ones(d), atol=1e-12)


# --- plan_passes: blocks and passes worked out by hand -------------------------------------------------------

# 2 bytes an entry: a (3 layers of 2) against b (4 layers of 3) is a 12-byte tile and a 48-byte layer of a; against
# c (2 layers of 1) a 4-byte tile and an 8-byte layer (24 bytes for all of a).
PLAN_SHAPES = [ModelShape("a", 3, 2), ModelShape("b", 4, 3), ModelShape("c", 2, 1)]


def blocks_of(passes):
    return [[block.key() for block in p] for p in passes]


@pytest.mark.parametrize(
    ("pairs", "budget", "expected"),
    [
        # a layer of a against all of b fits exactly: one layer a block, one block a pass
        ([(0, 1)], 48, [[(0, 1, 0, 1, 0, None)], [(0, 1, 1, 2, 0, None)], [(0, 1, 2, 3, 0, None)]]),
        ([(0, 1)], 96, [[(0, 1, 0, 2, 0, None)], [(0, 1, 2, 3, 0, None)]]),
        ([(0, 1)], 144, [[(0, 1, 0, 3, 0, None)]]),
        ([(0, 1)], 10**9, [[(0, 1, 0, 3, 0, None)]]),
        # a's layers one at a time, then all of a against c fills the last pass exactly (48 + 24 = 72)
        (
            [(0, 1), (0, 2)],
            72,
            [[(0, 1, 0, 1, 0, None)], [(0, 1, 1, 2, 0, None)], [(0, 1, 2, 3, 0, None), (0, 2, 0, 3, 0, None)]],
        ),
        # 36 < 48: a layer of a against groups of 3 of b's layers (36 bytes) and the last one (12 bytes); the
        # a-c block (24 bytes) joins the last group (12 + 24 = 36)
        (
            [(0, 1), (0, 2)],
            36,
            [
                [(0, 1, 0, 1, 0, 3)],
                [(0, 1, 0, 1, 3, 4)],
                [(0, 1, 1, 2, 0, 3)],
                [(0, 1, 1, 2, 3, 4)],
                [(0, 1, 2, 3, 0, 3)],
                [(0, 1, 2, 3, 3, 4), (0, 2, 0, 3, 0, None)],
            ],
        ),
        # exactly one tile: every tile its own block and pass
        ([(0, 1)], 12, [[(0, 1, layer, layer + 1, s, s + 1)] for layer in range(3) for s in range(4)]),
    ],
)
def test_plan_passes_by_hand(pairs, budget, expected):
    assert blocks_of(plan_passes(PLAN_SHAPES, pairs, budget, bytes_per_entry=2)) == expected


def test_plan_passes_packs_several_blocks_into_a_pass():
    shapes = [ModelShape("x", 1, 2), ModelShape("y", 1, 2), ModelShape("z", 1, 2)]  # every block 8 bytes
    pairs = [(0, 1), (0, 2), (1, 2)]
    assert blocks_of(plan_passes(shapes, pairs, 16, 2)) == [
        [(0, 1, 0, 1, 0, None), (0, 2, 0, 1, 0, None)],
        [(1, 2, 0, 1, 0, None)],
    ]
    assert blocks_of(plan_passes(shapes, pairs, 24, 2)) == [
        [(0, 1, 0, 1, 0, None), (0, 2, 0, 1, 0, None), (1, 2, 0, 1, 0, None)]
    ]
    # one-byte tiles under a one-byte budget
    ones = [ModelShape("p", 2, 1), ModelShape("q", 2, 1)]
    assert blocks_of(plan_passes(ones, [(0, 1)], 1, 1)) == [
        [(0, 1, layer, layer + 1, s, s + 1)] for layer in range(2) for s in range(2)
    ]


def test_plan_passes_refuses_a_budget_below_one_tile_with_its_size():
    with pytest.raises(CorrelationError, match=r"one layer of a against one layer of b needs 0\.00 GiB"):
        plan_passes(PLAN_SHAPES, [(0, 1)], 11, 2)
    big = [ModelShape("big", 1, 2**14), ModelShape("other", 1, 2**14)]  # a 2**29-byte tile: half a GiB
    with pytest.raises(CorrelationError, match=r"big against one layer of other needs 0\.50 GiB; raise"):
        plan_passes(big, [(0, 1)], 2**29 - 1, 2)
    assert blocks_of(plan_passes(big, [(0, 1)], 2**29, 2)) == [[(0, 1, 0, 1, 0, None)]]


# --- the streaming update (round 7): pilot shift, counted tokens, chunks, precisions, blocks, ranks -------------

#: The shapes' neurons together (a 10, b 12, c 6): every model's operands of one token.
N_ALL = sum(s.n_neurons for s in SHAPES)


def streamed_activations() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The planted activations with poison at the tokens that are not counted (a leak moves every sum by 100s),
    a first row with no counted token and a second with one (the pilot is that token)."""
    acts, counted = planted_activations("gaussian", SEED)
    counted = counted.copy()
    counted[0] = False
    counted[1] = False
    counted[1, 3] = True  # the pilot's batch has a single counted token
    acts = {
        name: np.where(counted[..., None, None], x, np.float32(100.0)).astype(np.float32) for name, x in acts.items()
    }
    return acts, counted


#: batches of 1 (nothing counted), 1, 4 and 3 rows
UPDATE_SPLITS = [1, 2, 6]


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of at most 3 rows everywhere the engine or a batch cuts its work (`chunk_rows`): the tokens of a batch
    in update and in the pilot, and the rows of a product block, each in several chunks."""
    import precompute.activations
    import precompute.correlation
    from precompute.memory import chunk_rows

    def three(n_columns: int, itemsize: int = 8, budget: int = 2**30) -> int:
        return chunk_rows(n_columns, itemsize, min(budget, 3 * n_columns * itemsize))

    monkeypatch.setattr(precompute.correlation, "chunk_rows", three)
    monkeypatch.setattr(precompute.activations, "chunk_rows", three)


@pytest.fixture
def keep_tf32():
    """--precision tf32 turns on TF32 matmuls for the process (`CorrelationEngine.__init__`): put the flag back."""
    before = torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def shifted_numpy(acts, counted, precision: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each model's pilot (the float64 mean of the first batch with counted tokens, as float32) and its shifted
    counted activations (float32 values minus the pilot in float32, rounded to bf16 for bfloat16, through float8
    for fp8), float64."""
    first = np.zeros_like(counted)
    first[UPDATE_SPLITS[0] : UPDATE_SPLITS[1]] = counted[UPDATE_SPLITS[0] : UPDATE_SPLITS[1]]
    assert first.any() and not counted[: UPDATE_SPLITS[0]].any()
    shifts, shifted = [], []
    for shape in SHAPES:
        x = acts[shape.name][counted].reshape(-1, shape.n_neurons)
        shift = acts[shape.name][first].reshape(-1, shape.n_neurons).astype(np.float64).mean(axis=0).astype(np.float32)
        values = x - shift  # float32, as the engine subtracts
        if precision == "bfloat16":
            values = torch.from_numpy(values).bfloat16().double().numpy()
        elif precision.startswith("fp8"):
            values = fp8_dequantized(values, counted)
        shifts.append(shift)
        shifted.append(values.astype(np.float64))
    return shifts, shifted


def fp8_dequantized(values: np.ndarray, counted: np.ndarray) -> np.ndarray:
    """What the fp8 products see of shifted float32 values [tokens, n]: each chunk of a batch (at most 3 tokens,
    `small_chunks`, the batch cut into the fewest such chunks of sizes within one of each other) scaled per neuron
    so that its largest magnitude is 448, rounded to float8 e4m3 (torch's cast) and scaled back."""
    out = np.empty(values.shape, dtype=np.float64)
    bounds = [0, *UPDATE_SPLITS, counted.shape[0]]
    start = 0
    for first_row, stop_row in itertools.pairwise(bounds):
        n_batch = int(counted[first_row:stop_row].sum())
        n_chunks = -(-n_batch // 3)
        for chunk in range(n_chunks):
            low, high = start + n_batch * chunk // n_chunks, start + n_batch * (chunk + 1) // n_chunks
            part = values[low:high]
            scale = np.maximum(np.abs(part).max(axis=0), np.finfo(np.float32).tiny).astype(np.float32) / np.float32(448)
            codes = torch.from_numpy((part / scale).astype(np.float32)).to(torch.float8_e4m3fn).double().numpy()
            out[low:high] = codes * scale.astype(np.float64)
        start += n_batch
    return out


def block_slices(key: tuple) -> tuple[int, int, slice, slice]:
    """A block's models and flat neurons, worked out from its key (layers of a; layers of b, None: to the last)."""
    a, b, start, stop, b_start, b_stop = key
    d_a, d_b = SHAPES[a].d_mlp, SHAPES[b].d_mlp
    b_stop = SHAPES[b].n_layers if b_stop is None else b_stop
    return a, b, slice(start * d_a, stop * d_a), slice(b_start * d_b, b_stop * d_b)


#: precision -> accumulator dtype on the CPU, absolute and relative tolerance of a product sum over ~90 tokens
UPDATE_PRECISIONS = {
    "float64": (torch.float64, 1e-9, 1e-12),
    "float32": (torch.float64, 1e-4, 1e-6),
    "bfloat16": (torch.float32, 1e-3, 1e-5),
    "tf32": (torch.float32, 1e-3, 1e-6),
    "fp8": (torch.float32, 1e-3, 1e-5),
    "fp8-fast": (torch.float32, 1e-3, 1e-5),
}


@pytest.mark.parametrize("budget", ["one", "layers", "tiles"])
@pytest.mark.parametrize("precision", list(UPDATE_PRECISIONS))
def test_update_accumulates_shifted_products_of_counted_tokens_into_each_block(
    small_chunks, keep_tf32, precision, budget
):
    """Before each pass closes, every block's accumulator is Σ (x − shift)(y − shift)ᵀ over the counted tokens of
    its rows of a and columns of b (NumPy float64 of the engine's operands), in the precision's accumulator dtype;
    the pilot is the first batch with counted tokens; the count and sums come from float32 values in every
    precision (not from bf16 operands) and only in the first pass."""
    acts, counted = streamed_activations()
    dtype, atol, rtol = UPDATE_PRECISIONS[precision]
    engine = CorrelationEngine(
        SHAPES, CorrelationConfig(baseline_seed=SEED, precision=precision, memory_budget_gb=BUDGETS[budget])
    )
    assert engine.accumulator_dtype == dtype
    assert (engine.n_passes > 1) == (budget != "one")
    batches = make_batches(acts, counted, UPDATE_SPLITS)
    assert [b.n_counted > 0 for b in batches] == [False, True, True, True]
    shifts, shifted = shifted_numpy(acts, counted, precision)
    _, exact = shifted_numpy(acts, counted, "float32")
    n = int(counted.sum())
    closed: list[tuple] = []
    while not engine.done:
        for batch in batches:
            engine.update(batch)
        assert engine._pass_rows == n
        for block, accumulator in engine.accumulators.items():
            a, b, rows, columns = block_slices(block.key())
            assert accumulator.dtype == dtype
            expected = shifted[a][:, rows].T @ shifted[b][:, columns]
            np.testing.assert_allclose(accumulator.double().numpy(), expected, atol=atol, rtol=rtol)
            closed.append(block.key())
        for index, moments in enumerate(engine.moments):
            assert moments.shift is not None and moments.total is not None
            np.testing.assert_array_equal(moments.shift.numpy(), shifts[index])
            assert moments.count == n  # added in the first pass only
            np.testing.assert_allclose(moments.total.numpy(), exact[index].sum(axis=0), atol=2e-5, rtol=0)
        engine.finish_pass()
    # every tile of every pair was accumulated in exactly one pass
    tiles = [
        (a, b, layer, layer_b)
        for a, b, start, stop, b_start, b_stop in closed
        for layer in range(start, stop)
        for layer_b in range(b_start, SHAPES[b].n_layers if b_stop is None else b_stop)
    ]
    expected_tiles = [
        (a, b, layer, layer_b)
        for a, b in itertools.combinations(range(3), 2)
        for layer in range(SHAPES[a].n_layers)
        for layer_b in range(SHAPES[b].n_layers)
    ]
    assert sorted(tiles) == expected_tiles
    with pytest.raises(CorrelationError, match=r"^all passes are finished$"):
        engine.update(batches[1])


def test_update_in_small_chunks_equals_one_chunk_and_the_correlations_match_numpy(monkeypatch):
    """The same batches worked in 3-token chunks (a batch's tokens, the pilot's and a product block's rows) give the
    results of whole-batch chunks, and both match the NumPy Pearson correlations of the counted tokens."""
    acts, counted = streamed_activations()
    config: dict[str, Any] = {
        "baseline_seed": SEED,
        "precision": "float32",
        "top_k": 12,
        "memory_budget_gb": BUDGETS["layers"],
    }
    whole = CorrelationEngine(SHAPES, CorrelationConfig(**config))
    batches = make_batches(acts, counted, UPDATE_SPLITS)
    while not whole.done:
        for batch in batches:
            whole.update(batch)
        whole.finish_pass()
    import precompute.activations
    import precompute.correlation
    from precompute.memory import chunk_rows

    def three(n_columns: int, itemsize: int = 8, budget: int = 2**30) -> int:
        return chunk_rows(n_columns, itemsize, min(budget, 3 * n_columns * itemsize))

    monkeypatch.setattr(precompute.correlation, "chunk_rows", three)
    monkeypatch.setattr(precompute.activations, "chunk_rows", three)
    chunked = CorrelationEngine(SHAPES, CorrelationConfig(**config))
    batches = make_batches(acts, counted, UPDATE_SPLITS)  # no cached chunks of the first run
    while not chunked.done:
        for batch in batches:
            chunked.update(batch)
        chunked.finish_pass()
    for key, result in whole.results.items():
        other = chunked.results[key]
        np.testing.assert_allclose(other.top_corr.numpy(), result.top_corr.numpy(), atol=1e-6, rtol=0)
        np.testing.assert_allclose(other.baseline_corr.numpy(), result.baseline_corr.numpy(), atol=1e-6, rtol=0)
    for x, y in itertools.permutations(range(len(SHAPES)), 2):
        sx, sy = SHAPES[x], SHAPES[y]
        corr = pearson(flat(acts, counted, sx), flat(acts, counted, sy))
        top = chunked.results[(x, y)].top_corr.numpy()[:, : sy.n_neurons]
        np.testing.assert_allclose(top, -np.sort(-corr, axis=1), atol=2e-6, rtol=0)


def _reduced_pair(acts, counted, splits, rank_rows: int, budget: str, precision: Any = "float64"):
    """Rank 0 streams the batches of rows [0, rank_rows), rank 1 the rest; both share rank 0's pilot and add their
    sums in `reduce` before every pass closes. Returns both engines once done."""
    config = CorrelationConfig(baseline_seed=SEED, precision=precision, top_k=12, memory_budget_gb=BUDGETS[budget])
    engines = [CorrelationEngine(SHAPES, config), CorrelationEngine(SHAPES, config)]
    batches = make_batches(acts, counted, splits)
    mine = [[b for b in batches if b.row_start < rank_rows], [b for b in batches if b.row_start >= rank_rows]]
    group = TwoRanks()
    first = next(b for b in batches if b.n_counted)
    engines[0].share_pilot(group.view(0, "record"), first)
    # rank 1 passes its own first batch: only the main rank's is used
    engines[1].share_pilot(group.view(1, "record"), mine[1][0] if mine[1] else None)
    while not engines[0].done:
        group.run_pass(engines, mine)
    assert engines[1].done
    return engines


def _one_process(acts, counted, splits, budget: str, precision: Any = "float64") -> CorrelationEngine:
    config = CorrelationConfig(baseline_seed=SEED, precision=precision, top_k=12, memory_budget_gb=BUDGETS[budget])
    engine = CorrelationEngine(SHAPES, config)
    batches = make_batches(acts, counted, splits)
    while not engine.done:
        for batch in batches:
            engine.update(batch)
        engine.finish_pass()
    return engine


def _assert_same_engine(got: CorrelationEngine, expected: CorrelationEngine, atol: float) -> None:
    for key, result in expected.results.items():
        other = got.results[key]
        np.testing.assert_allclose(other.top_corr.numpy(), result.top_corr.numpy(), atol=atol, rtol=0)
        np.testing.assert_allclose(other.baseline_corr.numpy(), result.baseline_corr.numpy(), atol=atol, rtol=0)
        live = torch.isfinite(result.baseline_corr)
        assert torch.equal(other.baseline_index[live], result.baseline_index[live])
    for mine, theirs in zip(got.moments, expected.moments, strict=True):
        assert mine.count == theirs.count
        assert mine.shift is not None and theirs.shift is not None and torch.equal(mine.shift, theirs.shift)
        assert mine.total is not None and theirs.total is not None and mine.squares is not None
        assert theirs.squares is not None
        np.testing.assert_allclose(mine.total.numpy(), theirs.total.numpy(), atol=1e-9, rtol=0)
        np.testing.assert_allclose(mine.squares.numpy(), theirs.squares.numpy(), atol=1e-9, rtol=1e-12)
    assert set(got.rotated_std) == set(expected.rotated_std)
    for key, std in expected.rotated_std.items():
        np.testing.assert_allclose(got.rotated_std[key].numpy(), std.numpy(), atol=1e-9, rtol=1e-12)


@pytest.mark.parametrize("budget", ["one", "layers"])
@pytest.mark.parametrize("rank_rows", [4, 9])
def test_reduce_over_two_ranks_equals_one_process(budget, rank_rows):
    """Two ranks splitting the rows (rank 1 with none of them when rank_rows = 9: it adds zeros), in one pass or in
    several: after `share_pilot` and a `reduce` before each pass closes, both ranks hold one process's results,
    moments and rotated spreads."""
    acts, counted = streamed_activations()
    splits = [1, 2, 4, 6]
    expected = _one_process(acts, counted, splits, budget)
    for engine in _reduced_pair(acts, counted, splits, rank_rows, budget):
        _assert_same_engine(engine, expected, atol=1e-9)


def test_a_rank_without_rows_adds_zero_sums_and_nan_squares():
    """Rank 1 streams nothing: its `reduce` makes zero sums, NaN squares and zero Gram matrices of the accumulator
    dtype to add, and takes rank 0's count; the pass's Gram matrices only, nothing after the first pass."""
    acts, counted = streamed_activations()
    config = CorrelationConfig(baseline_seed=SEED, precision="float64", memory_budget_gb=BUDGETS["layers"])
    idle = CorrelationEngine(SHAPES, config)
    busy = CorrelationEngine(SHAPES, config)
    group = TwoRanks()
    busy.share_pilot(group.view(0, "record"), None)  # no batch on the main rank: no pilot anywhere
    idle.share_pilot(group.view(1, "record"), None)
    assert all(m.shift is None for m in idle.moments + busy.moments)
    for batch in make_batches(acts, counted, UPDATE_SPLITS):
        busy.update(batch)
    idle.reduce(group.view(1, "record"))
    for index, (moments, shape) in enumerate(zip(idle.moments, SHAPES, strict=True)):
        assert moments.total is not None and moments.squares is not None
        assert moments.total.dtype == moments.squares.dtype == torch.float64
        assert not moments.total.any() and moments.squares.isnan().all()
        assert moments.total.shape == moments.squares.shape == (shape.n_neurons,)
        assert moments.count == 0
        gathered = {layer for layer in range(shape.n_layers) if idle.gram_passes[(index, layer)] == 0}
        assert set(moments.gram) == gathered
        for gram in moments.gram.values():
            assert gram.dtype == torch.float64 and gram.shape == (shape.d_mlp, shape.d_mlp) and not gram.any()
    ops = [op for op, _ in group.records[1]]
    # per model: the count, the sums, then this pass's Gram matrices; then every accumulator
    expected_ops = []
    for index, shape in enumerate(SHAPES):
        expected_ops += ["sum", "sum"] + ["sum"] * sum(
            idle.gram_passes[(index, layer)] == 0 for layer in range(shape.n_layers)
        )
    expected_ops += ["sum"] * len(idle.accumulators)
    assert ops == expected_ops
    assert group.records[1][0] == ("sum", 0)  # the first collective: model a's token count


def test_reduce_does_nothing_when_the_ranks_split_the_passes():
    """Several passes and two ranks: each rank makes its own passes over every row, so `reduce` adds nothing."""
    acts, counted = streamed_activations()
    config = CorrelationConfig(baseline_seed=SEED, precision="float64", memory_budget_gb=BUDGETS["layers"])
    engine = CorrelationEngine(SHAPES, config, rank=0, world_size=2)
    assert engine.ranks_split_passes and engine.n_passes > 1
    for batch in make_batches(acts, counted, UPDATE_SPLITS):
        engine.update(batch)
    before = {block: t.clone() for block, t in engine.accumulators.items()}
    total = engine.moments[0].total.clone()  # type: ignore[union-attr]
    group = TwoRanks()
    engine.reduce(group.view(0, "record"))
    assert group.records[0] == []
    assert torch.equal(engine.moments[0].total, total)  # type: ignore[arg-type]
    for block, tensor in engine.accumulators.items():
        assert torch.equal(tensor, before[block])


def test_share_pilot_gives_every_rank_the_main_ranks_first_batch_mean():
    acts, counted = streamed_activations()
    batches = make_batches(acts, counted, UPDATE_SPLITS)
    config = CorrelationConfig(baseline_seed=SEED, precision="float64")
    main, other = CorrelationEngine(SHAPES, config), CorrelationEngine(SHAPES, config)
    group = TwoRanks()
    main.share_pilot(group.view(0, "record"), batches[1])
    other.share_pilot(group.view(1, "record"), batches[3])  # ignored: not the main rank
    shifts, _ = shifted_numpy(acts, counted, "float64")
    for index in range(len(SHAPES)):
        for engine in (main, other):
            shift = engine.moments[index].shift
            assert shift is not None and shift.dtype == torch.float32 and shift.device.type == "cpu"
            np.testing.assert_array_equal(shift.numpy(), shifts[index])
    shared = group.shared[-1]
    assert isinstance(shared, list) and len(shared) == len(SHAPES)
    # the pilot stays: later batches do not move it
    for batch in batches:
        other.update(batch)
    for index in range(len(SHAPES)):
        np.testing.assert_array_equal(other.moments[index].shift.numpy(), shifts[index])  # type: ignore[union-attr]


def test_a_neuron_is_dead_by_its_variance_per_token_not_its_sum():
    """`DEAD_VARIANCE` bounds the variance per counted token: a neuron that moves by 3e-11 (variance about 1e-21 a
    token, its sum over the tokens above 1e-20) is dead, its correlations undefined; one that moves by 1e-9 is live
    (round 8: `variance * count` and `variance / count` gave the same dead neurons on the planted models)."""
    acts, counted = planted_activations("gaussian", SEED)
    rng = np.random.default_rng(8)
    c = acts["c"]
    c[..., 1, 2] = (3e-11 * rng.standard_normal(c.shape[:2])).astype(np.float32)
    c[..., 0, 0] = (1e-9 * rng.standard_normal(c.shape[:2])).astype(np.float32)
    tiny = c[..., 1, 2][counted].astype(np.float64)
    assert tiny.var() < DEAD_VARIANCE < tiny.var() * counted.sum()  # a dead neuron whose sum alone looks live
    assert c[..., 0, 0][counted].astype(np.float64).var() > DEAD_VARIANCE
    engine = run(acts, counted, baseline_seed=SEED, precision="float64", top_k=2)
    assert engine.dead_neurons(2).nonzero().flatten().tolist() == [5]  # c L1.2; c L0.0 (flat 0) is live
    assert torch.isneginf(engine.results[(2, 0)].top_corr[5]).all()
    assert torch.isfinite(engine.results[(2, 0)].top_corr[0]).all()


@pytest.mark.parametrize("n_missing", [1, 2, 5])
def test_rotations_drawn_ahead_skip_the_kept_ones_and_keep_their_order(monkeypatch, n_missing):
    """`_rotations_for` with `draw_ahead` (a CUDA run's path, forced on the CPU) and a window of 2 threads, asked
    for kept and missing rotations mixed: each key gets its own layer's rotation (NumPy's construction), the kept
    ones are not drawn again, the missing ones are drawn once in the order asked, in worker threads from two
    missing on (one is drawn where it is used), and every one drawn is kept (one pass keeps rotations)."""
    import threading

    import precompute.correlation as correlation

    monkeypatch.setattr(correlation, "ROTATION_DRAW_THREADS", 2)
    engine = CorrelationEngine(SHAPES, CorrelationConfig(baseline_seed=SEED))
    assert engine.plan.keep_rotations
    engine.draw_ahead = True
    keys = [(0, 0), (1, 1), (0, 1), (1, 0), (1, 2), (2, 0)]
    missing = [(0, 0), (0, 1), (1, 0), (1, 2), (2, 0)][:n_missing]
    kept = {key: engine._rotation(*key) for key in keys if key not in missing}
    drawn: list[tuple[tuple[int, int], bool]] = []
    original = engine._drawn

    def recorded(index: int, layer: int) -> torch.Tensor:
        drawn.append(((index, layer), threading.current_thread() is threading.main_thread()))
        return original(index, layer)

    monkeypatch.setattr(engine, "_drawn", recorded)
    got = list(engine._rotations_for(keys))
    assert len(got) == len(keys)
    for key, rotation in zip(keys, got, strict=True):
        if key in kept:
            assert rotation is kept[key]
        expected = layer_rotation(SHAPES[key[0]], key[1], "gaussian", SEED)
        np.testing.assert_allclose(rotation.double().numpy(), expected, rtol=1e-6, atol=1e-6)
    assert [key for key, _ in drawn] == missing
    assert all(on_main == (n_missing < 2) for _, on_main in drawn)
    assert set(engine._rotations) == set(keys)


def test_the_engines_own_budget_is_a_quarter_of_free_host_memory_or_half_the_free_gpu(monkeypatch):
    """`default_budget_bytes` (the engine on its own: benchmarks, tests), with the memory figures replaced: 1,000
    available pages of 4 KiB give a quarter of 4,096,000 bytes; 6 GB free of 8 on a GPU give half of 6 GB."""
    import precompute.correlation as correlation

    sizes = {"SC_AVPHYS_PAGES": 1000, "SC_PAGE_SIZE": 4096}
    monkeypatch.setattr(correlation.os, "sysconf", lambda name: sizes[name])
    assert correlation.default_budget_bytes(torch.device("cpu")) == 1_024_000
    asked: list[torch.device] = []
    monkeypatch.setattr(
        correlation.torch.cuda, "mem_get_info", lambda device: asked.append(device) or (6_000_000_000, 8_000_000_000)
    )
    assert correlation.default_budget_bytes(torch.device("cuda", 1)) == 3_000_000_000
    assert asked == [torch.device("cuda", 1)]


def test_reference_only_pairs_the_first_model_with_each_other_one():
    """`--reference-only`: the pairs (0, j) only, each in both directions, with the correlations and baselines
    of the all-pairs run (the same sums; the pair (1, 2) is not accumulated)."""
    assert model_pairs(4, reference_only=True) == [(0, 1), (0, 2), (0, 3)]
    assert model_pairs(2, reference_only=True) == [(0, 1)]
    assert model_pairs(3, reference_only=False) == [(0, 1), (0, 2), (1, 2)]
    acts, counted = planted_activations("gaussian", SEED)
    every = run(acts, counted, baseline_seed=SEED, precision="float64", top_k=3)
    reference = run(acts, counted, baseline_seed=SEED, precision="float64", top_k=3, reference_only=True)
    assert reference.plan.pairs == [(0, 1), (0, 2)]
    assert set(reference.results) == {(0, 1), (1, 0), (0, 2), (2, 0)}
    for key, result in reference.results.items():
        torch.testing.assert_close(result.top_corr, every.results[key].top_corr, rtol=0, atol=1e-12)
        assert torch.equal(result.top_index, every.results[key].top_index)
        torch.testing.assert_close(result.baseline_corr, every.results[key].baseline_corr, rtol=0, atol=1e-12)


def test_ranks_split_the_passes_round_robin_and_gather_each_gram_matrix_once_a_rank():
    """`schedule` and `gram_passes` worked out by hand: 4 single-layer passes of a 4-layer model a against a
    4-layer b over 2 ranks are 0, 2 and 1, 3; 5 passes over 3 ranks are 0, 3 / 1, 4 / 2. A rank gathers a
    layer's Gram matrix in the first of its own passes that needs it: b's in its first pass, a's own layers
    where their blocks are."""
    shapes = [ModelShape("a", 4, 2), ModelShape("b", 4, 2)]
    cpu = torch.device("cpu")
    two = plan_correlations(shapes, CorrelationConfig(), cpu, n_passes=4, ranks=2)
    assert [[(block.layer_start, block.layer_stop) for block in p] for p in two.passes] == [
        [(i, i + 1)] for i in range(4)
    ]
    assert (two.schedule(0), two.schedule(1), two.schedule()) == ([0, 2], [1, 3], [0, 2])
    b_layers = {(1, layer): None for layer in range(4)}
    assert two.gram_passes(0) == {(0, 0): 0, **dict.fromkeys(b_layers, 0), (0, 2): 2}
    assert two.gram_passes(1) == {(0, 1): 1, **dict.fromkeys(b_layers, 1), (0, 3): 3}
    assert two.gram_passes() == two.gram_passes(0)
    five = plan_correlations([ModelShape("a", 5, 2), ModelShape("b", 2, 2)], CorrelationConfig(), cpu, 5, ranks=3)
    assert [five.schedule(rank) for rank in range(3)] == [[0, 3], [1, 4], [2]]
    one = plan_correlations(shapes, CorrelationConfig(), cpu, n_passes=4)  # one rank makes every pass
    assert one.schedule() == [0, 1, 2, 3] and not one.ranks_split_passes
    assert one.gram_passes() == {(0, 0): 0, **dict.fromkeys(b_layers, 0), (0, 1): 1, (0, 2): 2, (0, 3): 3}
