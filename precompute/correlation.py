"""Streaming cross-model Pearson correlation of MLP neurons, with the rotated-basis baseline.

For two models a and b the engine accumulates, over the counted tokens of every batch, the cross products
P = Σ_t x_t y_tᵀ between every neuron of a (all layers) and every neuron of b (all layers), each model's sums
S and sums of squares Q, and each model's within-layer Gram matrices G_l = Σ_t y_{l,t} y_{l,t}ᵀ. From these,
at the end, ρ_ij = (P_ij − S_i S_j / n) / (σ_i σ_j) exactly as the paper's ``StreamingPearsonComputer`` (paper-spec
§2.2), and the baseline against a random rotation R_l of each partner layer (§2.3) follows without a second
pass: the rotated units R_l y_l have cross products P R_lᵀ and variances diag(R_l G̃_l R_lᵀ). One GEMM per batch
and model pair, and one GEMM per layer for the Gram matrices, is all the per-token work.

Numerics (paper-spec §7.3 pitfalls 1-2): every model's activations are shifted by a pilot mean (the first
batch's) before anything is summed, so the raw-moment formula does not cancel catastrophically; per-batch
products are computed in the chosen precision (float32 on the CPU, bf16 or TF32 operands with fp32 results on a
GPU) and summed into float64 (CPU) or float32 (GPU) accumulators. Under torchrun every rank shifts by the same
pilot, the dataset's first batch (`CorrelationEngine.share_pilot`), so the ranks' sums add up exactly in the
mathematical sense (`CorrelationEngine.reduce`; only the order of the float additions changes). The rotated
baseline's own products (d³ per layer and [d_a, d_b] tile, from the float64 covariances) use float32 too unless
``--precision float64``: in float64 they were the larger part of a GPT2-small run's time on the CPU.

Memory (issue 11) is bounded by splitting each pair into blocks of whole layers of model a; blocks that do not
fit together run in further passes over the same rows (`CorrelationPlan.memory` says what each moment holds).
Around the accumulators nothing is large: a batch is read in chunks of tokens, products reach the accumulators
in blocks of at most `precompute.memory.CHUNK_BYTES`, the Gram matrices are freed as soon as the first pass has
given the rotated units' spreads, and a pass is closed one [d_a, d_b] tile of layers at a time.

Both directions of a pair come from one accumulator: rows give a→b, columns give b→a (merged across blocks).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from precompute.activations import ActivationBatch, HookKind
from precompute.distributed import Distributed
from precompute.memory import CHUNK_BYTES, StageMemory, chunk_bytes, chunk_rows, even_slices

logger = logging.getLogger(__name__)

Precision = Literal["float64", "float32", "tf32", "bfloat16", "fp8", "fp8-fast"]
BaselineKind = Literal["gaussian", "haar"]
PRECISIONS: tuple[str, ...] = ("float64", "float32", "tf32", "bfloat16", "fp8", "fp8-fast")
#: Precisions whose products reach float32 accumulators (the GPU's): float64 adds would double the memory traffic.
FLOAT32_ACCUMULATED: frozenset[str] = frozenset({"tf32", "bfloat16", "fp8", "fp8-fast"})

#: The precisions whose products are float8 GEMMs (`ScaledOperand`, `fp8_matmul_fp32`); fp8-fast lets the tensor
#: cores accumulate each product in their own reduced precision (``use_fast_accum``: no periodic promotion to
#: float32 inside the GEMM), which is faster on Hopper GPUs and less exact: the bench measures both.
FP8_PRECISIONS: frozenset[str] = frozenset({"fp8", "fp8-fast"})

#: On CUDA a batch's operands are worked whole up to this many bytes (every model's counted tokens at once): the
#: token count is the products' inner dimension, and each chunk reads and writes the whole accumulator once, so
#: CPU-sized chunks (`precompute.memory.CHUNK_BYTES`, ~150 tokens at GPT-2-small shapes) would make the GEMMs
#: memory-bound. 8 GiB holds a 12,288-token batch of two GPT-2-small models in bf16 with its float32 copies.
CUDA_OPERAND_CHUNK_BYTES = 8 * 2**30

#: Rotations drawn at once in CPU threads while a CUDA run closes a pass (`CorrelationEngine._rotations_for`).
ROTATION_DRAW_THREADS = min(8, os.cpu_count() or 1)

#: The largest value of float8 e4m3: each neuron's values are scaled so that its largest magnitude lands here.
FP8_MAX = 448.0
BASELINES: tuple[str, ...] = ("gaussian", "haar")

#: A neuron whose per-token variance is below this is dead: its correlations are undefined (NaN in the paper).
DEAD_VARIANCE = 1e-20


class CorrelationError(ValueError):
    """A correlation configuration that cannot run (bad precision, memory budget too small, ...)."""


@dataclass(frozen=True)
class CorrelationConfig:
    """How correlations and the baseline are computed.

    Args:
        baseline: ``gaussian`` is the paper's "approximate rotation" (i.i.d. N(0,1) entries, rows normalised to
            unit length); ``haar`` is a uniformly random orthogonal matrix.
        baseline_seed: seeds every layer's rotation (the paper's was unseeded: pitfall 3).
        top_k: how many best partner neurons to keep per neuron and partner model.
        precision: products per batch: float64, float32 (CPU default), tf32, bfloat16 (CUDA default), fp8
            (e4m3 operands with a scale per neuron and chunk, `torch._scaled_mm`, float32 results) or fp8-fast
            (the same with the GEMM's fast accumulation).
        reference_only: correlate the first model with each other model only, instead of all pairs.
        memory_budget_gb: the run's memory budget in GiB: a precompute plans every stage under it
            (`precompute.memory`); the engine on its own (benchmarks, tests) packs its accumulators under it.
            None picks a share of the memory available.
    """

    baseline: BaselineKind = "gaussian"
    baseline_seed: int = 0
    top_k: int = 5
    precision: Precision | None = None
    reference_only: bool = False
    memory_budget_gb: float | None = None

    def __post_init__(self) -> None:
        if self.baseline not in BASELINES:
            raise CorrelationError(f"baseline must be one of {', '.join(BASELINES)}, got {self.baseline!r}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise CorrelationError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.top_k < 1:
            raise CorrelationError(f"top_k must be at least 1, got {self.top_k}")
        if self.memory_budget_gb is not None and self.memory_budget_gb <= 0:
            raise CorrelationError(f"memory budget must be positive, got {self.memory_budget_gb}")

    def resolved_precision(self, device: torch.device) -> Precision:
        """The asked precision, else bfloat16 on CUDA and float32 elsewhere. (bfloat16 and tf32 also run on the
        CPU, slowly: that is how the tests cover the GPU's code path.)"""
        if self.precision is not None:
            return self.precision
        return "bfloat16" if device.type == "cuda" else "float32"


@dataclass(frozen=True)
class ModelShape:
    name: str
    n_layers: int
    d_mlp: int

    @property
    def n_neurons(self) -> int:
        return self.n_layers * self.d_mlp


@dataclass(frozen=True)
class LayerBlock:
    """The accumulator for rows = layers [layer_start, layer_stop) of model a against the neurons of layers
    [b_layer_start, b_layer_stop) of model b (None: to b's last layer). A block is made of whole [d_a, d_b] tiles,
    so each pass closes complete tiles: both rotated baselines of a tile need all of its rows and columns."""

    a: int
    b: int
    layer_start: int
    layer_stop: int
    b_layer_start: int = 0
    b_layer_stop: int | None = None

    def b_layers(self, shapes: Sequence[ModelShape]) -> range:
        stop = shapes[self.b].n_layers if self.b_layer_stop is None else self.b_layer_stop
        return range(self.b_layer_start, stop)

    def rows(self, shapes: Sequence[ModelShape]) -> slice:
        """The block's neurons of model a (flat indices): its accumulator's rows."""
        d_a = shapes[self.a].d_mlp
        return slice(self.layer_start * d_a, self.layer_stop * d_a)

    def columns(self, shapes: Sequence[ModelShape]) -> slice:
        """The block's neurons of model b (flat indices): its accumulator's columns."""
        layers, d_b = self.b_layers(shapes), shapes[self.b].d_mlp
        return slice(layers.start * d_b, layers.stop * d_b)

    def size(self, shapes: Sequence[ModelShape]) -> tuple[int, int]:
        """The accumulator's [rows, columns]."""
        rows, columns = self.rows(shapes), self.columns(shapes)
        return rows.stop - rows.start, columns.stop - columns.start

    def key(self) -> tuple[int, int, int, int, int, int | None]:
        """The block as a plain tuple (checkpoints); `LayerBlock(*key)` makes it again."""
        return (self.a, self.b, self.layer_start, self.layer_stop, self.b_layer_start, self.b_layer_stop)


def block_entries(shapes: Sequence[ModelShape], block: LayerBlock) -> int:
    """How many numbers a block's accumulator holds: its rows of model a times its columns of model b."""
    rows, columns = block.size(shapes)
    return rows * columns


@dataclass
class PartnerResult:
    """For every neuron of a model x, its best matches in partner y and its best rotated-baseline unit."""

    top_corr: torch.Tensor  # [n_neurons_x, top_k] float64, -inf where undefined
    top_index: torch.Tensor  # [n_neurons_x, top_k] int64 flat index (layer * d_mlp + neuron) into y
    baseline_corr: torch.Tensor  # [n_neurons_x] float64
    baseline_index: torch.Tensor  # [n_neurons_x] int64 flat index (layer * d_mlp + unit) into y's rotated units

    @classmethod
    def empty(cls, n_neurons: int, top_k: int) -> PartnerResult:
        return cls(
            top_corr=torch.full((n_neurons, top_k), -torch.inf, dtype=torch.float64),
            top_index=torch.full((n_neurons, top_k), -1, dtype=torch.int64),
            baseline_corr=torch.full((n_neurons,), -torch.inf, dtype=torch.float64),
            baseline_index=torch.full((n_neurons,), -1, dtype=torch.int64),
        )

    def merge_top(self, rows: slice | torch.Tensor, corr: torch.Tensor, index: torch.Tensor) -> None:
        """Keep the top_k of the current and the new candidates for the given rows."""
        k = self.top_corr.shape[1]
        values = torch.cat([self.top_corr[rows], corr], dim=1)
        indices = torch.cat([self.top_index[rows], index], dim=1)
        best, order = values.topk(k, dim=1)
        self.top_corr[rows] = best
        self.top_index[rows] = indices.gather(1, order)

    def merge_baseline(self, rows: slice, corr: torch.Tensor, index: torch.Tensor) -> None:
        better = corr > self.baseline_corr[rows]
        self.baseline_corr[rows] = torch.where(better, corr, self.baseline_corr[rows])
        self.baseline_index[rows] = torch.where(better, index, self.baseline_index[rows])


@dataclass
class ShiftedGramSums:
    """Per-model running sums over counted tokens of activations shifted by a pilot mean, with within-layer Gram
    matrices (the moments the correlations and the rotated baseline need).

    A layer's Gram matrix is only needed for the spread of its rotated units: it is gathered in the pass whose
    closing first needs that spread (`CorrelationPlan.gram_passes`; every pass streams every row), then the spread
    is computed (`CorrelationEngine.rotated_std`), the diagonal is kept as the layer's sums of squares and the
    matrix is freed.
    """

    shift: torch.Tensor | None = None  # [n_neurons] float32, the first batch's mean
    count: int = 0
    total: torch.Tensor | None = None  # [n_neurons] float64: Σ (x - shift)
    gram: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [d_mlp, d_mlp] float64: Σ x_l x_lᵀ
    squares: torch.Tensor | None = None  # [n_neurons] float64: Σ (x - shift)², NaN until the layer's Gram closes

    def variance_sums(self) -> torch.Tensor:
        """Σ (x - mean)² per neuron (n times the population variance); Σ x² is the Gram diagonal."""
        assert self.total is not None and self.squares is not None
        return (self.squares - self.total.square() / self.count).clamp_min(0)


@dataclass(frozen=True)
class ScaledOperand:
    """A chunk of activations in float8 e4m3, neuron-major (``values`` [neurons, tokens], tokens padded with zeros
    to a multiple of 16, as `torch._scaled_mm` needs), with one float32 scale per neuron (``scales`` [neurons, 1]):
    value ≈ values * scales. Neuron-major rows are what `torch._scaled_mm` wants on both sides (left row-major,
    right column-major), so one copy serves every product the chunk takes part in."""

    values: torch.Tensor
    scales: torch.Tensor

    @classmethod
    def quantize(cls, x: torch.Tensor) -> ScaledOperand:
        """Scale each neuron of ``x`` ([tokens, neurons] float32; may be divided in place) by its largest magnitude.

        Memory traffic is most of its cost on a GPU: the largest magnitude comes from the column maxima and minima
        of one reading of ``x`` (`torch.aminmax`; no |x| copy); the division writes float8 straight away
        (`divided_into_fp8`: one reading of ``x``, one byte written a value) in ``x``'s own layout, before the
        neuron-major transpose, so the strided copy moves one byte a value instead of four; of the padded
        matrix only the padding is zeroed.
        """
        tokens, n = x.shape
        smallest, largest = torch.aminmax(x, dim=0)
        magnitude = torch.maximum(largest, smallest.neg_())
        scales = magnitude.clamp_min_(torch.finfo(torch.float32).tiny).div_(FP8_MAX)
        values = torch.empty(n, -(-tokens // 16) * 16, dtype=torch.float8_e4m3fn, device=x.device)
        values[:, tokens:] = 0
        values[:, :tokens] = divided_into_fp8(x, scales).T
        return cls(values, scales.unsqueeze(1))

    def columns(self, neurons: slice) -> ScaledOperand:
        return ScaledOperand(self.values[neurons], self.scales[neurons])


_DIVIDE_INTO_FP8: dict[str, bool] = {}  # device type -> whether a division writes float8 right (checked once)


def divided_into_fp8(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``(x / scales)`` rounded to float8 e4m3, [tokens, n] like ``x`` (float32; ``scales`` [n]).

    One kernel where the device's division can write float8 (``out=``: it divides in float32 and rounds on the
    store): 5 bytes moved a value instead of 13 for a float32 quotient cast afterwards. The first use on a device
    type compares it, bit for bit, with that two-step cast on a small sample (the rounding must be the cast's);
    where it fails or differs, ``x`` is divided in place and cast.
    """
    kind = x.device.type
    if kind not in _DIVIDE_INTO_FP8:
        sample = torch.linspace(-500.0, 500.0, 4099, device=x.device).reshape(-1, 1) * torch.tensor(
            [1.0, 1e-3, 7.3e-41], device=x.device
        )
        sample_scales = torch.tensor([1.0, 1e-3 / 448, 7.3e-41 / 448], device=x.device)
        try:
            fused = torch.div(sample, sample_scales, out=torch.empty_like(sample, dtype=torch.float8_e4m3fn))
            two_step = (sample / sample_scales).to(torch.float8_e4m3fn)
            _DIVIDE_INTO_FP8[kind] = bool(torch.equal(fused.view(torch.uint8), two_step.view(torch.uint8)))
        except (RuntimeError, TypeError, NotImplementedError):
            _DIVIDE_INTO_FP8[kind] = False
    if _DIVIDE_INTO_FP8[kind]:
        return torch.div(x, scales, out=torch.empty_like(x, dtype=torch.float8_e4m3fn))
    return x.div_(scales).to(torch.float8_e4m3fn)


def fp8_matmul_fp32(left: ScaledOperand, right: ScaledOperand, fast_accum: bool = False) -> torch.Tensor:
    """leftᵀ right (each [tokens, n] as a `ScaledOperand`): float8 products with float32 results, rescaled;
    ``fast_accum``: the tensor cores' fast accumulation (`FP8_PRECISIONS`)."""
    return torch._scaled_mm(
        left.values,
        right.values.T,
        scale_a=left.scales,
        scale_b=right.scales.reshape(1, -1),
        out_dtype=torch.float32,
        use_fast_accum=fast_accum,
    )


_ADDMM_OUT_DTYPE: dict[str, bool] = {}  # device type -> whether torch.addmm(..., out_dtype=float32) runs there


def add_bf16_products(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> bool:
    """out += left @ right for bf16 operands into a float32 ``out`` by one GEMM that reads and writes ``out`` in
    place (cuBLAS with beta = 1: no product block is made and added). False where no such kernel exists (the CPU)."""
    kind = out.device.type
    if not _ADDMM_OUT_DTYPE.get(kind, kind == "cuda"):
        return False
    try:
        torch.addmm(out, left, right, out_dtype=torch.float32, out=out)
    except (RuntimeError, TypeError, NotImplementedError):
        _ADDMM_OUT_DTYPE[kind] = False
        return False
    _ADDMM_OUT_DTYPE[kind] = True
    return True


def bf16_matmul_fp32(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """left @ right for bf16 operands with float32 accumulation and output (CUDA ``out_dtype``)."""
    try:
        if left.dim() == 2:
            return torch.mm(left, right, out_dtype=torch.float32)
        return torch.bmm(left, right, out_dtype=torch.float32)
    except (RuntimeError, TypeError):  # no out_dtype kernel here: fp32 operands (TF32 on GPUs that allow it)
        return left.float() @ right.float()


def rotation_matrix(d: int, kind: BaselineKind, seed: int) -> torch.Tensor:
    """A seeded random rotation of a d-neuron layer basis, float64 on the CPU; row m mixes neurons into unit m.

    >>> r = rotation_matrix(4, "haar", seed=0)
    >>> torch.allclose(r @ r.T, torch.eye(4, dtype=torch.float64))
    True
    >>> bool(torch.allclose(rotation_matrix(4, "gaussian", 0).norm(dim=1), torch.ones(4, dtype=torch.float64)))
    True
    """
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(d, d, generator=generator, dtype=torch.float64)
    if kind == "gaussian":
        return gaussian / gaussian.norm(dim=1, keepdim=True)
    q, r = torch.linalg.qr(gaussian)
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # sign fix makes Q Haar-distributed


def layer_rotation_seed(baseline_seed: int, model_name: str, layer: int) -> int:
    """A seed per (run seed, model, layer), stable across processes (Python's hash() is not)."""
    text = f"{baseline_seed}:{model_name}:{layer}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & (2**62 - 1)


def model_pairs(n_models: int, reference_only: bool) -> list[tuple[int, int]]:
    """Unordered model pairs to accumulate; each gives both directions.

    >>> model_pairs(3, reference_only=False)
    [(0, 1), (0, 2), (1, 2)]
    >>> model_pairs(3, reference_only=True)
    [(0, 1), (0, 2)]
    """
    if reference_only:
        return [(0, j) for j in range(1, n_models)]
    return [(i, j) for i in range(n_models) for j in range(i + 1, n_models)]


def plan_passes(
    shapes: Sequence[ModelShape], pairs: Sequence[tuple[int, int]], budget_bytes: int, bytes_per_entry: int
) -> list[list[LayerBlock]]:
    """Split pair accumulators into blocks and pack them into passes under a memory budget: blocks of whole layers
    of model a against all of model b, or, when one such layer does not fit, one layer of a against as many
    layers of b as fit (down to one [d_a, d_b] tile).

    >>> shapes = [ModelShape("a", 2, 4), ModelShape("b", 2, 4)]
    >>> [len(p) for p in plan_passes(shapes, [(0, 1)], budget_bytes=10**9, bytes_per_entry=8)]
    [1]
    >>> [len(p) for p in plan_passes(shapes, [(0, 1)], budget_bytes=4 * 8 * 8, bytes_per_entry=8)]
    [1, 1]
    >>> [(b.layer_start, b.b_layer_start, b.b_layer_stop) for p in plan_passes(shapes, [(0, 1)], 4 * 4 * 8, 8)
    ...  for b in p]
    [(0, 0, 1), (0, 1, 2), (1, 0, 1), (1, 1, 2)]
    """
    blocks: list[tuple[LayerBlock, int]] = []
    for a, b in pairs:
        tile_bytes = shapes[a].d_mlp * shapes[b].d_mlp * bytes_per_entry
        if tile_bytes > budget_bytes:
            raise CorrelationError(
                f"one layer of {shapes[a].name} against one layer of {shapes[b].name} needs "
                f"{tile_bytes / 2**30:.2f} GiB; raise --memory-budget-gb"
            )
        layer_bytes = tile_bytes * shapes[b].n_layers
        if layer_bytes > budget_bytes:  # a layer of a against groups of b's layers
            per_group = budget_bytes // tile_bytes
            for layer in range(shapes[a].n_layers):
                for start in range(0, shapes[b].n_layers, per_group):
                    stop = min(shapes[b].n_layers, start + per_group)
                    blocks.append((LayerBlock(a, b, layer, layer + 1, start, stop), (stop - start) * tile_bytes))
            continue
        per_block = max(1, budget_bytes // layer_bytes)
        for start in range(0, shapes[a].n_layers, per_block):
            stop = min(shapes[a].n_layers, start + per_block)
            blocks.append((LayerBlock(a, b, start, stop), (stop - start) * layer_bytes))
    passes: list[list[LayerBlock]] = []
    used = budget_bytes + 1
    for block, size in blocks:
        if used + size > budget_bytes:
            passes.append([])
            used = 0
        passes[-1].append(block)
        used += size
    return passes


def pack_into_passes(
    shapes: Sequence[ModelShape], pairs: Sequence[tuple[int, int]], n_passes: int, bytes_per_entry: int
) -> list[list[LayerBlock]]:
    """The passes with the smallest accumulators that hold every block in at most ``n_passes`` passes (fewer when
    there are fewer layer blocks than that).

    >>> shapes = [ModelShape("a", 4, 2), ModelShape("b", 4, 2)]
    >>> [[(b.layer_start, b.layer_stop) for b in p] for p in pack_into_passes(shapes, [(0, 1)], 2, 8)]
    [[(0, 2)], [(2, 4)]]
    """
    layer_bytes = [shapes[a].d_mlp * shapes[b].n_neurons * bytes_per_entry for a, b in pairs]
    low = max((shapes[a].d_mlp * shapes[b].d_mlp * bytes_per_entry for a, b in pairs), default=1)  # one tile:
    # the budget that makes the most passes of any packing
    high = sum(size * shapes[a].n_layers for size, (a, _) in zip(layer_bytes, pairs, strict=True)) or 1
    while low < high:  # the least budget whose packing makes at most n_passes passes
        middle = (low + high) // 2
        if len(plan_passes(shapes, pairs, middle, bytes_per_entry)) <= n_passes:
            high = middle
        else:
            low = middle + 1
    return plan_passes(shapes, pairs, low, bytes_per_entry)


def default_budget_bytes(device: torch.device) -> int:
    """The engine on its own (benchmarks, tests): a quarter of free host memory on the CPU, half the free GPU memory
    on CUDA. A precompute plans its passes with every other stage under the run's budget (`precompute.memory`)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(pages * 0.25)


#: Bytes a value of the products' operands (float32 and TF32 use the float32 copy itself).
OPERAND_ITEMSIZE: dict[str, int] = {"float64": 8, "float32": 4, "tf32": 4, "bfloat16": 2, "fp8": 1, "fp8-fast": 1}


def operand_token_bytes(precision: Precision, shapes: Sequence[ModelShape]) -> int:
    """Bytes the engine holds a counted token of a chunk (`CorrelationEngine.update`): every model's operand, and
    the float32 copy it is made from, one model at a time (fp8 also rounds that copy to float8 before transposing
    it: one byte more).

    >>> operand_token_bytes("bfloat16", [ModelShape("a", 12, 3072), ModelShape("b", 12, 3072)])
    294912
    """
    n_all = sum(shape.n_neurons for shape in shapes)
    widest = max((shape.n_neurons for shape in shapes), default=0)
    if precision in ("float32", "tf32"):
        return 4 * n_all
    return OPERAND_ITEMSIZE[precision] * n_all + (5 if precision in FP8_PRECISIONS else 4) * widest


def operand_chunk_budget(device: torch.device) -> int:
    """Bytes of operands the engine works at once: `CHUNK_BYTES` on the CPU, a whole batch on CUDA."""
    return CUDA_OPERAND_CHUNK_BYTES if device.type == "cuda" else CHUNK_BYTES


@dataclass(frozen=True)
class CorrelationPlan:
    """What the engine will do and hold, decided before any work: precision, model pairs, passes of blocks, and
    whether the rotations are kept between uses (a run in one pass keeps them; a split run draws them again)."""

    shapes: tuple[ModelShape, ...]
    precision: Precision
    accumulator_dtype: torch.dtype
    pairs: list[tuple[int, int]]
    passes: list[list[LayerBlock]]
    top_k: int
    ranks: int = 1  # the ranks of a distributed run (`precompute.distributed`)
    operand_chunk: int = CHUNK_BYTES  # bytes of every model's operands worked at once (`operand_chunk_budget`)

    @property
    def keep_rotations(self) -> bool:
        return len(self.passes) <= 1

    @property
    def ranks_split_passes(self) -> bool:
        """Several ranks and several passes: each rank makes its own passes (`schedule`) over every row, instead
        of every rank making every pass over its share of the rows, so N ranks make ceil(P / N) passes each."""
        return self.ranks > 1 and len(self.passes) > 1

    def schedule(self, rank: int = 0) -> list[int]:
        """The passes a rank makes, in order: every pass, or when the ranks split them, r, r + N, r + 2N, ...

        >>> plan = plan_correlations([ModelShape("a", 4, 2), ModelShape("b", 4, 2)], CorrelationConfig(),
        ...                          torch.device("cpu"), n_passes=4, ranks=2)
        >>> plan.schedule(0), plan.schedule(1)
        ([0, 2], [1, 3])
        """
        if not self.ranks_split_passes:
            return list(range(len(self.passes)))
        return list(range(rank, len(self.passes), self.ranks))

    def gram_passes(self, rank: int = 0) -> dict[tuple[int, int], int]:
        """(model, layer) -> the pass whose closing first needs the spreads of the layer's rotated units: the
        layer's Gram matrix is gathered in that pass only. A block needs every layer of its partner model b and
        its own layers of model a, so a split run spreads model a's Gram matrices over its passes. When the ranks
        split the passes, each gathers the Gram matrices its own passes need, in the first of them that does.

        >>> plan = plan_correlations([ModelShape("a", 2, 4), ModelShape("b", 2, 4)], CorrelationConfig(),
        ...                          torch.device("cpu"), n_passes=2)
        >>> plan.gram_passes()
        {(0, 0): 0, (1, 0): 0, (1, 1): 0, (0, 1): 1}
        >>> plan_correlations(plan.shapes, CorrelationConfig(), torch.device("cpu"), 2, ranks=2).gram_passes(rank=1)
        {(0, 1): 1, (1, 0): 1, (1, 1): 1}
        """
        first: dict[tuple[int, int], int] = {}
        for index in self.schedule(rank):
            for block in self.passes[index]:
                for layer in range(block.layer_start, block.layer_stop):
                    first.setdefault((block.a, layer), index)
                for layer in block.b_layers(self.shapes):
                    first.setdefault((block.b, layer), index)
        return first

    def models_in_pass(self, index: int, rank: int = 0) -> frozenset[int] | None:
        """The models whose activations pass ``index`` reads (None: every model): the rank's first pass gathers
        every model's sums; a later one, the models of its blocks and those whose Gram matrices it gathers. A run
        in several passes need not run every model's forward pass in each of them.

        >>> plan = plan_correlations([ModelShape(m, 2, 4) for m in "abc"], CorrelationConfig(reference_only=True),
        ...                          torch.device("cpu"), n_passes=2)
        >>> [plan.models_in_pass(i) for i in range(2)], sorted(plan.models_in_pass(1) or ())
        ([None, frozenset({0, 2})], [0, 2])
        """
        schedule = self.schedule(rank)
        if index not in schedule[1:]:
            return None
        models = {m for block in self.passes[index] for m in (block.a, block.b)}
        models.update(m for (m, _), first in self.gram_passes(rank).items() if first == index)
        return frozenset(models)

    def memory(self, batch_tokens: int) -> StageMemory:
        """The engine's memory from the shapes (bytes), moment by moment.

        - streaming: the largest pass's accumulators with the Gram matrices that pass gathers, every model's shift,
          sums, sums of squares and rotated spreads, the results of both directions of every pair; per batch, a
          chunk of every model's operands and one GEMM output block;
        - closing a pass: the rotations (all of them when kept, else one model's or one block's layers, whichever
          is fewer, and one more layer) and three [d_a, d_b] float64 tiles;
        - after the last pass: the results, the sums and spreads.
        """
        entry = self.accumulator_dtype.itemsize
        accumulators = [sum(block_entries(self.shapes, b) for b in blocks) * entry for blocks in self.passes]
        # (pass, the Gram matrices it gathers) of every rank's passes: the same split on every rank, each holding
        # the largest of its own
        moments: list[tuple[int, int]] = []
        for rank in range(self.ranks if self.ranks_split_passes else 1):
            firsts = self.gram_passes(rank)
            for index in self.schedule(rank):
                grams = sum(self.shapes[m].d_mlp ** 2 * entry for (m, _), first in firsts.items() if first == index)
                moments.append((accumulators[index], grams))
        state = max((a + g for a, g in moments), default=0)
        small = sum(s.n_neurons * (4 + 8 + 8 + 8) for s in self.shapes)  # shift, sums, squares, rotated spreads
        for a, b in self.pairs:
            for x in (a, b):  # top-k correlations and indices, best rotated unit and its index: 8 bytes each
                small += self.shapes[x].n_neurons * (2 * self.top_k + 2) * 8
        # every model's operands (padded to 16 tokens for fp8) and one model's float32 copy
        token_bytes = operand_token_bytes(self.precision, self.shapes)
        update = chunk_bytes(batch_tokens + 15, 1, token_bytes, self.operand_chunk)
        if self.precision != "float64":  # products in float32 reach the accumulators a block at a time
            # (fp8's blocks are as large as the operand budget allows, as in `CorrelationEngine._products`)
            budget = self.operand_chunk if self.precision in FP8_PRECISIONS else CHUNK_BYTES
            update += max(
                (chunk_bytes(*b.size(self.shapes), itemsize=4, budget=budget) for p in self.passes for b in p),
                default=0,
            )
        square = max((s.d_mlp * s.d_mlp * 8 for s in self.shapes), default=0)  # float64
        item = 8 if self.precision == "float64" else 4  # the baseline's products (see `CorrelationEngine`)
        spreads = square + 3 * square * item // 8  # a rotation drawn in float64, the Gram matrix, two products
        if self.keep_rotations:
            rotations = sum(s.n_layers * s.d_mlp * s.d_mlp * item for s in self.shapes)
        else:  # a block's layers of a or of b (fewer), one more, and the float64 draw
            rotations = max(
                (
                    (min(b.layer_stop - b.layer_start, len(b.b_layers(self.shapes))) + 1) * square * item // 8
                    for p in self.passes
                    for b in p
                ),
                default=0,
            )
            rotations += square
        tiles = 3 * square + 2 * square * item // 8  # covariance, its copy, products, their float64 and division
        # closing pass p: its Gram matrices become spreads (one rotation at a time), then are freed for the tiles
        closing = max((a + max(g + spreads, rotations + tiles) for a, g in moments), default=0)
        return StageMemory(state=state + small, update=update, finish=max(0, closing - state), written=small)


def plan_correlations(
    shapes: Sequence[ModelShape],
    config: CorrelationConfig,
    device: torch.device,
    n_passes: int | None = None,
    ranks: int = 1,
) -> CorrelationPlan:
    """The pairs, precision and passes the engine will use for these models.

    Args:
        n_passes: pack the accumulators into at most this many passes (the run's memory plan decides); None:
            pack them under ``config.memory_budget_gb``, or a share of free memory (the engine on its own).
        ranks: the ranks of a distributed run: with several passes each rank makes its own
            (`CorrelationPlan.schedule`); the passes themselves are the same as in one process.
    """
    precision = config.resolved_precision(device)
    accumulator_dtype = torch.float32 if precision in FLOAT32_ACCUMULATED else torch.float64
    pairs = model_pairs(len(shapes), config.reference_only)
    if n_passes is not None:
        passes = pack_into_passes(shapes, pairs, n_passes, accumulator_dtype.itemsize)
    else:
        budget = (
            int(config.memory_budget_gb * 2**30)
            if config.memory_budget_gb is not None
            else default_budget_bytes(device)
        )
        passes = plan_passes(shapes, pairs, budget, accumulator_dtype.itemsize)
    return CorrelationPlan(
        tuple(shapes),
        precision,
        accumulator_dtype,
        pairs,
        passes,
        config.top_k,
        max(1, ranks),
        operand_chunk_budget(device),
    )


class CorrelationEngine:
    """Accumulates cross-model correlations batch by batch; `finish_pass` turns accumulators into results.

    Usage: for each pass in ``range(engine.n_passes)``, feed every batch of the dataset to `update`, then call
    `finish_pass`. Pass 0 also gathers the per-model moments. `results` then holds a `PartnerResult` per ordered
    model pair (x, y).

    One rank of several (``rank``, ``world_size``): when the plan has several passes, the ranks split them
    (`CorrelationPlan.schedule`): the engine makes only its own passes, each over every row (its first also
    gathers the moments), needs no `reduce`, and `gather` merges the ranks' results once all have streamed.
    With one pass every rank makes it over its share of the rows and `reduce` adds the ranks' sums.
    """

    hooks: frozenset[HookKind] = frozenset({"hook_post"})

    def __init__(
        self,
        shapes: Sequence[ModelShape],
        config: CorrelationConfig,
        device: str = "cpu",
        n_passes: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.shapes = list(shapes)
        self.config = config
        self.device = torch.device(device)
        plan = plan_correlations(self.shapes, config, self.device, n_passes, ranks=world_size)
        self.plan = plan
        self.precision = plan.precision
        self.accumulator_dtype = plan.accumulator_dtype
        self.pairs = plan.pairs
        self.passes = plan.passes
        self.rank = rank
        self.schedule = plan.schedule(rank)  # the passes this engine makes, in order
        self.round = 0  # how many of them are done
        self.merged = False  # the ranks' results are merged (`gather`)
        self.moments = [ShiftedGramSums() for _ in shapes]
        self.accumulators: dict[LayerBlock, torch.Tensor] = {}
        self.results: dict[tuple[int, int], PartnerResult] = {}
        for a, b in self.pairs:
            self.results[(a, b)] = PartnerResult.empty(shapes[a].n_neurons, config.top_k)
            self.results[(b, a)] = PartnerResult.empty(shapes[b].n_neurons, config.top_k)
        self.rotated_std: dict[tuple[int, int], torch.Tensor] = {}  # (model, layer) -> spread of each rotated unit
        self.gram_passes = plan.gram_passes(rank)
        # The rotated baseline's products (d³ per layer and tile) in the precision of the batch products: float32
        # unless --precision float64 (in float64 they were most of a GPT2-small run's time on the CPU).
        self.baseline_dtype = torch.float64 if self.precision == "float64" else torch.float32
        self._pass_rows = 0  # tokens folded into this pass's accumulators
        self._rotations: dict[tuple[int, int], torch.Tensor] = {}  # kept only when the plan keeps them
        self.draw_ahead = self.device.type == "cuda"  # rotations drawn in CPU threads ahead of use (`_rotations_for`)
        if self.precision == "tf32":
            torch.backends.cuda.matmul.allow_tf32 = True
        self._allocate_pass()

    # --- accumulation -------------------------------------------------------------------------------------

    @property
    def n_passes(self) -> int:
        return len(self.passes)

    @property
    def pass_index(self) -> int:
        """The pass being made (`n_passes` once done)."""
        return self.schedule[self.round] if self.round < len(self.schedule) else len(self.passes)

    @property
    def ranks_split_passes(self) -> bool:
        """Each rank makes its own passes over every row (`CorrelationPlan.ranks_split_passes`)."""
        return self.plan.ranks_split_passes

    def models_in_pass(self) -> frozenset[str] | None:
        """The names of the models whose activations this pass reads (`CorrelationPlan.models_in_pass`; None:
        every model, as in the first pass; the empty set once done)."""
        if self.done:
            return frozenset()
        wanted = self.plan.models_in_pass(self.pass_index, self.rank)
        return None if wanted is None else frozenset(self.shapes[index].name for index in wanted)

    @property
    def done(self) -> bool:
        return self.round >= len(self.schedule)

    def _allocate_pass(self) -> None:
        self.accumulators = {}
        if self.done:
            return
        for block in self.passes[self.pass_index]:
            self.accumulators[block] = torch.zeros(
                block.size(self.shapes), dtype=self.accumulator_dtype, device=self.device
            )

    def _operand(self, x: torch.Tensor) -> torch.Tensor | ScaledOperand:
        """A chunk's shifted float32 activations [tokens, n] in the engine's precision (may reuse ``x``); float64
        operands are made in `update`, which sums them too."""
        if self.precision == "bfloat16":
            return x.bfloat16()
        if self.precision in FP8_PRECISIONS:
            return ScaledOperand.quantize(x)
        return x

    @staticmethod
    def _columns(operand: torch.Tensor | ScaledOperand, neurons: slice) -> torch.Tensor | ScaledOperand:
        if isinstance(operand, ScaledOperand):
            return operand.columns(neurons)
        return operand[:, neurons]

    def _products(
        self, left: torch.Tensor | ScaledOperand, right: torch.Tensor | ScaledOperand, out: torch.Tensor
    ) -> None:
        """out += leftᵀ right for operands in the engine's precision ([tokens, m] and [tokens, n]).

        When the products' dtype is not the accumulator's, they are made in blocks of rows of ``out`` of at most
        `CHUNK_BYTES` (a whole product block is as large as the accumulator block), except bf16 on CUDA, where one
        GEMM adds into ``out`` in place (`add_bf16_products`).
        """
        if isinstance(left, ScaledOperand) and isinstance(right, ScaledOperand):
            step = chunk_rows(out.shape[1], 4, self.plan.operand_chunk)
            for start in range(0, out.shape[0], step):
                rows = slice(start, start + step)
                out[rows].add_(fp8_matmul_fp32(left.columns(rows), right, self.precision == "fp8-fast"))
            return
        assert isinstance(left, torch.Tensor) and isinstance(right, torch.Tensor)
        left_t = left.transpose(0, 1)
        if self.precision != "bfloat16" and out.dtype == left.dtype:
            out.addmm_(left_t, right)
            return
        if self.precision == "bfloat16" and add_bf16_products(out, left_t, right):
            return
        step = chunk_rows(out.shape[1], 4)
        for start in range(0, out.shape[0], step):
            rows = slice(start, start + step)
            if self.precision == "bfloat16":
                out[rows].add_(bf16_matmul_fp32(left_t[rows], right))
            else:
                out[rows].add_(left_t[rows] @ right)

    def update(self, batch: ActivationBatch) -> None:
        """Fold one batch into the current pass's accumulators (and, in pass 0, into the moments).

        The counted tokens are read in chunks (`ActivationBatch.counted_rows`) of at most the plan's operand bytes
        (`operand_chunk_budget`: small on the CPU, a whole batch on CUDA): a chunk of every model's shifted
        operands is all the per-token memory the engine adds to the batch.
        """
        if self.done:
            raise CorrelationError("all passes are finished")
        n_tokens = batch.n_counted
        if n_tokens == 0:
            return
        self._pass_rows += n_tokens
        self._set_pilot(batch)
        shifts = [m.shift for m in self.moments if m.shift is not None]
        wanted = self.plan.models_in_pass(self.pass_index, self.rank)  # the batch may hold only these
        shapes = [shape for index, shape in enumerate(self.shapes) if wanted is None or index in wanted]
        step = chunk_rows(1, operand_token_bytes(self.precision, shapes), self.plan.operand_chunk)
        for tokens in even_slices(n_tokens, step):
            operands: dict[int, torch.Tensor | ScaledOperand] = {}
            for index, (shape, shift) in enumerate(zip(self.shapes, shifts, strict=True)):
                if wanted is not None and index not in wanted:
                    continue
                x = batch.counted_rows(shape.name, "hook_post", tokens).to(self.device, torch.float32).sub_(shift)
                if self.precision == "float64":  # the sums from the float64 operand, no second copy
                    wide = x.double()
                    operands[index] = wide
                    if self.round == 0:
                        self._add_sums(index, shape, wide)
                else:  # from the float32 values, before fp8 scales them in place
                    if self.round == 0:
                        self._add_sums(index, shape, x)
                    operands[index] = self._operand(x)
                del x
            for index, operand in operands.items():
                self._update_grams(index, self.shapes[index], operand)
            for block, accumulator in self.accumulators.items():
                left = self._columns(operands[block.a], block.rows(self.shapes))
                right = self._columns(operands[block.b], block.columns(self.shapes))
                self._products(left, right, accumulator)

    def _set_pilot(self, batch: ActivationBatch) -> None:
        """The shift of every model without one: the mean of this batch (the first with counted tokens)."""
        for index, shape in enumerate(self.shapes):
            moments = self.moments[index]
            if moments.shift is None and batch.n_counted:
                total = torch.zeros(shape.n_neurons, dtype=torch.float64, device=self.device)
                for _, x in batch.counted_chunks(shape.name, "hook_post", itemsize=4):
                    total += x.to(self.device, torch.float32).sum(0, dtype=torch.float64)
                moments.shift = (total / batch.n_counted).float()

    # --- several ranks (precompute.distributed) -----------------------------------------------------------

    def share_pilot(self, group: Distributed, batch: ActivationBatch | None) -> None:
        """Every rank shifts by the dataset's first batch's mean (rank 0's ``batch``): sums from the ranks are
        only additive when they share one shift."""
        if group.is_main and batch is not None:
            self._set_pilot(batch)
        shifts = group.broadcast_object([None if m.shift is None else m.shift.cpu() for m in self.moments])
        for moments, shift in zip(self.moments, shifts, strict=True):
            moments.shift = None if shift is None else shift.to(self.device)

    def reduce(self, group: Distributed) -> None:
        """Add up, over the ranks and in place, what this pass gathered: in pass 0 the token counts and sums,
        then the Gram matrices this pass gathers and the pass's accumulators (a rank that streamed no rows adds
        zeros). Every rank then closes the pass on the same sums. When the ranks split the passes, each has
        streamed every row of its own: nothing to add."""
        if self.ranks_split_passes:
            return
        for index, shape in enumerate(self.shapes):
            moments = self.moments[index]
            if self.round == 0:
                if moments.total is None:
                    moments.total = torch.zeros(shape.n_neurons, dtype=torch.float64, device=self.device)
                    moments.squares = torch.full((shape.n_neurons,), torch.nan, dtype=torch.float64, device=self.device)
                moments.count = group.all_reduce_int(moments.count)
                group.all_reduce(moments.total)
            for layer in range(shape.n_layers):
                if self.gram_passes.get((index, layer)) != self.pass_index:
                    continue
                if layer not in moments.gram:
                    moments.gram[layer] = torch.zeros(
                        shape.d_mlp, shape.d_mlp, dtype=self.accumulator_dtype, device=self.device
                    )
                group.all_reduce(moments.gram[layer])
        for accumulator in self.accumulators.values():
            group.all_reduce(accumulator)

    def gather(self, group: Distributed) -> None:
        """When the ranks split the passes, once every rank has made its own: merge every rank's results into
        what one process making every pass holds, on every rank (once; a resumed run does not merge again).

        A neuron's top-k partners are the best k of every rank's (a neuron of model a has candidates only on the
        rank that closed its layer's block; one of model b, on every rank), ties broken by the lower index; its
        best rotated unit is the largest of the ranks', the lower index on a tie (one process keeps the first it
        meets, the lower layer). The sums of squares of each layer come from a rank that gathered its Gram
        matrix (every rank gathers only those its own passes need): rank 0 writes the dead neurons from them.
        """
        if not self.ranks_split_passes or group.world_size == 1 or self.merged:
            return
        k = self.config.top_k
        for key in sorted(self.results):
            result = self.results[key]
            values = torch.cat(group.all_gather(result.top_corr), dim=1)
            indices = torch.cat(group.all_gather(result.top_index), dim=1)
            order = indices.argsort(dim=1, stable=True)  # the lower index first among equal values
            values, indices = values.gather(1, order), indices.gather(1, order)
            order = values.argsort(dim=1, descending=True, stable=True)[:, :k]
            result.top_corr, result.top_index = values.gather(1, order), indices.gather(1, order)
            values = torch.stack(group.all_gather(result.baseline_corr))
            indices = torch.stack(group.all_gather(result.baseline_index))
            best = values.max(dim=0).values
            chosen = torch.where(values == best, indices, torch.iinfo(torch.int64).max).min(dim=0).values
            result.baseline_corr, result.baseline_index = best, chosen
        for moments, shape in zip(self.moments, self.shapes, strict=True):
            squares = moments.squares
            if squares is None:  # a rank with no passes of its own gathered nothing
                squares = torch.full((shape.n_neurons,), torch.nan, dtype=torch.float64, device=self.device)
            merged = squares.clone()
            for part in group.all_gather(squares):
                merged = torch.where(merged.isnan(), part, merged)
            moments.squares = merged
        self.merged = True

    def _add_sums(self, index: int, shape: ModelShape, x: torch.Tensor) -> None:
        """First pass: the token count and the sums of the shifted activations ``x`` (float32, or the float64
        operand for --precision float64), by a ones-vector GEMM (the CPU's fastest reduction), whatever the
        products' precision: bf16 or fp8 operands would lose the sums' low bits."""
        moments = self.moments[index]
        if moments.total is None:
            moments.total = torch.zeros(shape.n_neurons, dtype=torch.float64, device=self.device)
            moments.squares = torch.full((shape.n_neurons,), torch.nan, dtype=torch.float64, device=self.device)
        moments.count += x.shape[0]
        ones = torch.ones(1, x.shape[0], dtype=x.dtype, device=self.device)
        moments.total += (ones @ x).squeeze(0).double()

    def _update_grams(self, index: int, shape: ModelShape, operand: torch.Tensor | ScaledOperand) -> None:
        """The Gram matrices of the layers whose spreads this pass's closing needs first, one GEMM per layer
        (their diagonals are the sums of squares)."""
        moments = self.moments[index]
        for layer in range(shape.n_layers):
            if self.gram_passes.get((index, layer)) != self.pass_index:
                continue
            if layer not in moments.gram:
                moments.gram[layer] = torch.zeros(
                    shape.d_mlp, shape.d_mlp, dtype=self.accumulator_dtype, device=self.device
                )
            part = self._columns(operand, slice(layer * shape.d_mlp, (layer + 1) * shape.d_mlp))
            self._products(part, part, moments.gram[layer])

    # --- results ------------------------------------------------------------------------------------------

    def _std(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-neuron standard deviation (times sqrt(n)) and the live mask."""
        moments = self.moments[index]
        variance = moments.variance_sums()
        live = variance / max(moments.count, 1) > DEAD_VARIANCE
        return variance.sqrt(), live

    def dead_neurons(self, index: int) -> torch.Tensor:
        return ~self._std(index)[1].cpu()

    def _drawn(self, index: int, layer: int) -> torch.Tensor:
        """The layer's rotation as drawn from its seed: float64, on the CPU."""
        shape = self.shapes[index]
        seed = layer_rotation_seed(self.config.baseline_seed, shape.name, layer)
        return rotation_matrix(shape.d_mlp, self.config.baseline, seed)

    def _placed(self, key: tuple[int, int], drawn: torch.Tensor) -> torch.Tensor:
        """A drawn rotation on the engine's device in the baseline's precision (kept when the plan keeps them)."""
        rotation = drawn.to(self.device, self.baseline_dtype)
        if self.plan.keep_rotations:
            self._rotations[key] = rotation
        return rotation

    def _rotation(self, index: int, layer: int) -> torch.Tensor:
        """The layer's rotation, drawn from its seed in float64 and used in the baseline's precision (kept when the
        plan keeps rotations)."""
        key = (index, layer)
        if key in self._rotations:
            return self._rotations[key]
        return self._placed(key, self._drawn(index, layer))

    def _rotations_for(self, keys: Sequence[tuple[int, int]]) -> Iterator[torch.Tensor]:
        """The rotations of these (model, layer) keys, in order. On CUDA the draws run ahead in CPU threads
        (`draw_ahead`; `ROTATION_DRAW_THREADS` at a time): a float64 draw of a GPT-2-small layer takes ~0.26 s in
        one CPU thread, and a run's 24 of them were most of the correlation stage's closing on an H100 (6.2 of
        8.1 s; 2.5 s in all with the threads). The draws wait in host memory, outside the GPU's plan, and reach the
        device one at a time as before. On the CPU they are drawn one at a time, as the plan prices them."""
        missing = [key for key in keys if key not in self._rotations]
        if not self.draw_ahead or len(missing) < 2:
            for key in keys:
                yield self._rotation(*key)
            return
        with ThreadPoolExecutor(ROTATION_DRAW_THREADS) as pool:
            ahead: deque[tuple[tuple[int, int], Future[torch.Tensor]]] = deque()
            queue = iter(missing)
            for key in keys:
                while len(ahead) < ROTATION_DRAW_THREADS and (following := next(queue, None)) is not None:
                    ahead.append((following, pool.submit(self._drawn, *following)))
                if key in self._rotations:
                    yield self._rotations[key]
                    continue
                drawn_key, future = ahead.popleft()
                assert drawn_key == key  # missing keys are drawn in the order they are asked for
                yield self._placed(key, future.result())

    def _rotated_spreads(self) -> None:
        """sqrt(diag(R G̃ Rᵀ)): the spread of every rotated unit of the layers whose Gram matrices this pass
        gathered, from the centred Gram matrices; then each matrix is freed, keeping its diagonal."""
        keys = [(index, layer) for index in range(len(self.shapes)) for layer in sorted(self.moments[index].gram)]
        for (index, layer), rotation in zip(keys, self._rotations_for(keys), strict=True):
            shape, moments = self.shapes[index], self.moments[index]
            assert moments.total is not None and moments.squares is not None
            rows = slice(layer * shape.d_mlp, (layer + 1) * shape.d_mlp)
            sums = moments.total[rows]
            gram = (moments.gram[layer].double() - torch.outer(sums, sums) / moments.count).to(self.baseline_dtype)
            spread = ((rotation @ gram) * rotation).sum(dim=1, dtype=torch.float64)
            self.rotated_std[(index, layer)] = spread.clamp_min(0).sqrt()
            moments.squares[rows] = moments.gram.pop(layer).diagonal().double()
            del gram, rotation, spread

    def finish_pass(self) -> None:
        """Turn the current pass's accumulators into results, free them, and start the next pass."""
        self._rotated_spreads()
        for block, accumulator in self.accumulators.items():
            self._finish_block(block, accumulator)
        self.accumulators = {}
        self.round += 1
        self._pass_rows = 0
        if self.done:
            self._rotations = {}
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self._allocate_pass()

    def _finish_block(self, block: LayerBlock, accumulator: torch.Tensor) -> None:
        """Every [d_a, d_b] tile of a block (one layer of a against one layer of b), drawing each rotation once:
        the block's layers of a are held and b's layers drawn one at a time, or the other way round, whichever
        holds fewer."""
        a, b = block.a, block.b
        d_a, d_b = self.shapes[a].d_mlp, self.shapes[b].d_mlp
        layers_a, layers_b = range(block.layer_start, block.layer_stop), block.b_layers(self.shapes)

        def tile(layer: int, layer_b: int, rotation_a: torch.Tensor, rotation_b: torch.Tensor) -> None:
            local, local_b = (layer - block.layer_start) * d_a, (layer_b - layers_b.start) * d_b
            products = accumulator[local : local + d_a, local_b : local_b + d_b]
            self._finish_tile(a, b, layer, layer_b, products, rotation_a, rotation_b)

        if len(layers_a) <= len(layers_b):
            held = dict(zip(layers_a, self._rotations_for([(a, layer) for layer in layers_a]), strict=True))
            for layer_b, rotation_b in zip(layers_b, self._rotations_for([(b, i) for i in layers_b]), strict=True):
                for layer in layers_a:
                    tile(layer, layer_b, held[layer], rotation_b)
        else:
            held = dict(zip(layers_b, self._rotations_for([(b, layer_b) for layer_b in layers_b]), strict=True))
            for layer, rotation_a in zip(layers_a, self._rotations_for([(a, i) for i in layers_a]), strict=True):
                for layer_b in layers_b:
                    tile(layer, layer_b, rotation_a, held[layer_b])

    def _finish_tile(
        self,
        a: int,
        b: int,
        layer: int,
        layer_b: int,
        products: torch.Tensor,
        rotation_a: torch.Tensor,
        rotation_b: torch.Tensor,
    ) -> None:
        """Correlations of one layer of a with one layer of b, folded into both directions' results, with both
        rotated baselines (a against b's rotated units, b against this layer of a's)."""
        d_a, d_b = self.shapes[a].d_mlp, self.shapes[b].d_mlp
        rows = slice(layer * d_a, (layer + 1) * d_a)
        cols = slice(layer_b * d_b, (layer_b + 1) * d_b)
        count = self.moments[a].count
        sums_a, sums_b = self.moments[a].total, self.moments[b].total
        assert sums_a is not None and sums_b is not None  # gathered in pass 0, before any pass finishes
        covariance = products.double() - torch.outer(sums_a[rows], sums_b[cols]) / count  # [d_a, d_b] (times n)
        std_a, live_a = (t[rows] for t in self._std(a))
        std_b, live_b = (t[cols] for t in self._std(b))

        # a -> rotated b: the best rotated unit of this layer of b.
        operand = covariance.to(self.baseline_dtype)
        rotated = (operand @ rotation_b.T).double()  # [d_a, d_b]
        rotated = rotated.div_(torch.outer(std_a, self.rotated_std[(b, layer_b)])).clamp_(-1, 1)
        best, unit = rotated.masked_fill_(~live_a.unsqueeze(1), -torch.inf).max(dim=1)
        self.results[(a, b)].merge_baseline(rows, best.cpu(), (unit + layer_b * d_b).cpu())
        # b -> rotated a: this layer's rotated units.
        rotated = (operand.T @ rotation_a.T).double()  # [d_b, d_a]
        rotated = rotated.div_(torch.outer(std_b, self.rotated_std[(a, layer)])).clamp_(-1, 1)
        best, unit = rotated.masked_fill_(~live_b.unsqueeze(1), -torch.inf).max(dim=1)
        self.results[(b, a)].merge_baseline(cols, best.cpu(), (unit + layer * d_a).cpu())
        del rotated, operand

        corr = covariance.div_(torch.outer(std_a, std_b)).clamp_(-1, 1)
        corr.masked_fill_(~live_a.unsqueeze(1), -torch.inf).masked_fill_(~live_b.unsqueeze(0), -torch.inf)
        k = self.config.top_k
        # a -> b: candidates among this layer of b for each neuron of this layer of a.
        top = corr.topk(min(k, d_b), dim=1)
        self.results[(a, b)].merge_top(rows, top.values.cpu(), (top.indices + layer_b * d_b).cpu())
        # b -> a: these rows are candidates for the neurons of this layer of b (merged over all layers of a).
        top_t = corr.topk(min(k, d_a), dim=0)
        self.results[(b, a)].merge_top(cols, top_t.values.T.cpu(), (top_t.indices.T + layer * d_a).cpu())

    # --- checkpoints --------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "pass_index": self.pass_index,
            "round": self.round,
            "schedule": self.schedule,
            "merged": self.merged,
            "moments": [
                {"shift": m.shift, "count": m.count, "total": m.total, "gram": m.gram, "squares": m.squares}
                for m in self.moments
            ],
            "rotated_std": self.rotated_std,
            # a pass that has seen no rows has zero accumulators: not written (GBs at GPT-2 shapes), made again
            "accumulators": {b.key(): t for b, t in self.accumulators.items() if self._pass_rows},
            "results": {key: vars(result) for key, result in self.results.items()},
            "passes": [[b.key() for b in p] for p in self.passes],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.passes = [[LayerBlock(*key) for key in p] for p in state["passes"]]
        self.schedule = list(state.get("schedule", range(len(self.passes))))
        self.round = state.get("round", state["pass_index"])  # one process: the passes done so far
        self.merged = state.get("merged", False)
        device = self.device

        def moved(value: torch.Tensor | None) -> torch.Tensor | None:
            return None if value is None else value.to(device)

        self.moments = [
            ShiftedGramSums(
                shift=moved(m["shift"]),
                count=m["count"],
                total=moved(m["total"]),
                gram={layer: value.to(device) for layer, value in m["gram"].items()},
                squares=moved(m["squares"]),
            )
            for m in state["moments"]
        ]
        self.rotated_std = {key: value.to(device) for key, value in state.get("rotated_std", {}).items()}
        self.accumulators = {}  # free this run's empty first pass before the checkpoint's arrive
        saved = {LayerBlock(*key): t.to(device) for key, t in state["accumulators"].items()}
        if saved:
            self.accumulators, self._pass_rows = saved, 1
        else:  # the pass had seen no rows: its accumulators were zeros
            self._allocate_pass()
            self._pass_rows = 0
        self.results = {key: PartnerResult(**fields) for key, fields in state["results"].items()}
        self._rotations = {}
