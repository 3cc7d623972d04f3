"""Streaming cross-model Pearson correlation of MLP neurons, with the rotated-basis baseline.

For two models a and b the engine accumulates, over the counted tokens of every batch, the cross products
P = Σ_t x_t y_tᵀ between every neuron of a (all layers) and every neuron of b (all layers), each model's sums
S and sums of squares Q, and each model's within-layer Gram matrices G_l = Σ_t y_{l,t} y_{l,t}ᵀ. From these,
at the end, ρ_ij = (P_ij − S_i S_j / n) / (σ_i σ_j) exactly as the paper's ``StreamingPearsonComputer`` (paper-spec
§2.2), and the baseline against a random rotation R_l of each partner layer (§2.3) follows without a second
pass: the rotated units R_l y_l have cross products P R_lᵀ and variances diag(R_l G̃_l R_lᵀ). One GEMM per batch
and model pair, and one batched GEMM per model for the Gram matrices, is all the per-token work.

Numerics (paper-spec §7.3 pitfalls 1-2): every model's activations are shifted by a pilot mean (the first
batch's) before anything is summed, so the raw-moment formula does not cancel catastrophically; per-batch
products are computed in the chosen precision (float32 on the CPU, bf16 or TF32 operands with fp32 results on a
GPU) and summed into float64 (CPU) or float32 (GPU) accumulators. Memory is bounded by splitting each pair into
blocks of whole layers of model a; blocks that do not fit together run in further passes over the same rows.

Both directions of a pair come from one accumulator: rows give a→b, columns give b→a (merged across blocks).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from precompute.activations import ActivationBatch, HookKind

logger = logging.getLogger(__name__)

Precision = Literal["float64", "float32", "tf32", "bfloat16"]
BaselineKind = Literal["gaussian", "haar"]
PRECISIONS: tuple[str, ...] = ("float64", "float32", "tf32", "bfloat16")
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
        precision: products per batch: float64, float32 (CPU default), tf32 or bfloat16 (CUDA default).
        reference_only: correlate the first model with each other model only, instead of all pairs.
        memory_budget_gb: bytes for the cross-product accumulators; None picks a share of free memory.
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
    """The accumulator for rows = layers [layer_start, layer_stop) of model a against all neurons of model b."""

    a: int
    b: int
    layer_start: int
    layer_stop: int


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
class StreamingMoments:
    """Per-model running sums over counted tokens, of activations shifted by a pilot mean."""

    shift: torch.Tensor | None = None  # [n_neurons] float32, the first batch's mean
    count: int = 0
    total: torch.Tensor | None = None  # [n_neurons] float64: Σ (x - shift)
    gram: torch.Tensor | None = None  # [n_layers, d_mlp, d_mlp] float64 (float32 on CUDA): Σ x_l x_lᵀ

    def variance_sums(self) -> torch.Tensor:
        """Σ (x - mean)² per neuron (n times the population variance); Σ x² is the Gram diagonal."""
        assert self.total is not None and self.gram is not None
        total_sq = self.gram.diagonal(dim1=1, dim2=2).reshape(-1).double()
        return (total_sq - self.total.square() / self.count).clamp_min(0)


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
    """Split pair accumulators into whole-layer blocks and pack them into passes under a memory budget.

    >>> shapes = [ModelShape("a", 2, 4), ModelShape("b", 2, 4)]
    >>> [len(p) for p in plan_passes(shapes, [(0, 1)], budget_bytes=10**9, bytes_per_entry=8)]
    [1]
    >>> [len(p) for p in plan_passes(shapes, [(0, 1)], budget_bytes=4 * 8 * 8, bytes_per_entry=8)]
    [1, 1]
    """
    blocks: list[tuple[LayerBlock, int]] = []
    for a, b in pairs:
        layer_bytes = shapes[a].d_mlp * shapes[b].n_neurons * bytes_per_entry
        if layer_bytes > budget_bytes:
            raise CorrelationError(
                f"one layer of {shapes[a].name} against all of {shapes[b].name} needs "
                f"{layer_bytes / 2**30:.2f} GiB; raise --memory-budget-gb"
            )
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


def default_budget_bytes(device: torch.device) -> int:
    """A quarter of free host memory on the CPU, half the free GPU memory on CUDA (the rest holds a batch's
    activations and their bf16 copies: about 3 GB per GPT2-small model at 12,288 tokens)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    import os

    pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(pages * 0.25)


class CorrelationEngine:
    """Accumulates cross-model correlations batch by batch; `finish_pass` turns accumulators into results.

    Usage: for each pass in ``range(engine.n_passes)``, feed every batch of the dataset to `update`, then call
    `finish_pass`. Pass 0 also gathers the per-model moments. `results` then holds a `PartnerResult` per ordered
    model pair (x, y).
    """

    hooks: frozenset[HookKind] = frozenset({"hook_post"})

    def __init__(self, shapes: Sequence[ModelShape], config: CorrelationConfig, device: str = "cpu") -> None:
        self.shapes = list(shapes)
        self.config = config
        self.device = torch.device(device)
        self.precision = config.resolved_precision(self.device)
        # The GPU precisions accumulate in float32: float64 adds would double the memory traffic per batch.
        gpu_style = self.precision in ("tf32", "bfloat16")
        self.accumulator_dtype = torch.float32 if gpu_style else torch.float64
        self.pairs = model_pairs(len(shapes), config.reference_only)
        budget = (
            int(config.memory_budget_gb * 2**30)
            if config.memory_budget_gb is not None
            else default_budget_bytes(self.device)
        )
        entry_bytes = torch.tensor([], dtype=self.accumulator_dtype).element_size()
        self.passes = plan_passes(self.shapes, self.pairs, budget, entry_bytes)
        self.pass_index = 0
        self.moments = [StreamingMoments() for _ in shapes]
        self.accumulators: dict[LayerBlock, torch.Tensor] = {}
        self.results: dict[tuple[int, int], PartnerResult] = {}
        for a, b in self.pairs:
            self.results[(a, b)] = PartnerResult.empty(shapes[a].n_neurons, config.top_k)
            self.results[(b, a)] = PartnerResult.empty(shapes[b].n_neurons, config.top_k)
        self._rotated_std: dict[tuple[int, int], torch.Tensor] = {}
        self._rotations: dict[tuple[int, int], torch.Tensor] = {}
        if self.precision == "tf32":
            torch.backends.cuda.matmul.allow_tf32 = True
        self._allocate_pass()

    # --- accumulation -------------------------------------------------------------------------------------

    @property
    def n_passes(self) -> int:
        return len(self.passes)

    @property
    def done(self) -> bool:
        return self.pass_index >= len(self.passes)

    def _allocate_pass(self) -> None:
        self.accumulators = {}
        if self.done:
            return
        for block in self.passes[self.pass_index]:
            rows = (block.layer_stop - block.layer_start) * self.shapes[block.a].d_mlp
            self.accumulators[block] = torch.zeros(
                rows, self.shapes[block.b].n_neurons, dtype=self.accumulator_dtype, device=self.device
            )

    def _operand(self, x: torch.Tensor) -> torch.Tensor:
        if self.precision == "float64":
            return x.double()
        if self.precision == "bfloat16":
            return x.bfloat16()
        return x

    def _products(self, left: torch.Tensor, right: torch.Tensor, out: torch.Tensor) -> None:
        """out += leftᵀ right for operands in the engine's precision ([..., tokens, m] and [..., tokens, n])."""
        left_t = left.transpose(-2, -1)
        if self.precision == "bfloat16":
            out.add_(bf16_matmul_fp32(left_t, right))
        elif out.dtype == left.dtype:
            out.baddbmm_(left_t, right) if out.dim() == 3 else out.addmm_(left_t, right)
        else:
            out.add_(left_t @ right)

    def update(self, batch: ActivationBatch) -> None:
        """Fold one batch into the current pass's accumulators (and, in pass 0, into the moments)."""
        if self.done:
            raise CorrelationError("all passes are finished")
        centred: list[torch.Tensor] = []
        for index, shape in enumerate(self.shapes):
            x = batch.counted_post(shape.name).to(self.device, torch.float32)  # [tokens, n_neurons]
            moments = self.moments[index]
            if moments.shift is None:
                if x.shape[0] == 0:
                    return
                moments.shift = x.mean(dim=0)
            centred.append(x - moments.shift)
        if centred[0].shape[0] == 0:
            return
        operands = [self._operand(x) for x in centred]
        if self.pass_index == 0:
            for index, shape in enumerate(self.shapes):
                self._update_moments(self.moments[index], shape, operands[index])
        for block, accumulator in self.accumulators.items():
            d_a = self.shapes[block.a].d_mlp
            left = operands[block.a][:, block.layer_start * d_a : block.layer_stop * d_a]
            self._products(left, operands[block.b], accumulator)

    def _update_moments(self, moments: StreamingMoments, shape: ModelShape, operand: torch.Tensor) -> None:
        """Sums by a ones-vector GEMM and within-layer Gram matrices by one batched GEMM.

        The Gram diagonals are the sums of squares, so those come for free.
        """
        if moments.total is None:
            moments.total = torch.zeros(shape.n_neurons, dtype=torch.float64, device=self.device)
            moments.gram = torch.zeros(
                shape.n_layers, shape.d_mlp, shape.d_mlp, dtype=self.accumulator_dtype, device=self.device
            )
        assert moments.gram is not None
        tokens = operand.shape[0]
        moments.count += tokens
        ones = torch.ones(1, tokens, dtype=operand.dtype, device=self.device)
        if self.precision == "bfloat16":  # sums need more than bf16's 8 bits: use the float32 activations
            moments.total += (ones.float() @ operand.float()).squeeze(0).double()
        else:
            moments.total += (ones @ operand).squeeze(0).double()
        per_layer = operand.view(tokens, shape.n_layers, shape.d_mlp).transpose(0, 1)  # [layers, tokens, d_mlp]
        self._products(per_layer, per_layer, moments.gram)

    # --- results ------------------------------------------------------------------------------------------

    def _std(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-neuron standard deviation (times sqrt(n)) and the live mask."""
        moments = self.moments[index]
        variance = moments.variance_sums()
        live = variance / max(moments.count, 1) > DEAD_VARIANCE
        return variance.sqrt(), live

    def dead_neurons(self, index: int) -> torch.Tensor:
        return ~self._std(index)[1].cpu()

    def _rotation(self, index: int, layer: int) -> torch.Tensor:
        """The layer's rotation, drawn once per run and kept (as much memory as the Gram matrices)."""
        key = (index, layer)
        if key not in self._rotations:
            shape = self.shapes[index]
            seed = layer_rotation_seed(self.config.baseline_seed, shape.name, layer)
            self._rotations[key] = rotation_matrix(shape.d_mlp, self.config.baseline, seed).to(self.device)
        return self._rotations[key]

    def _rotated_unit_std(self, index: int, layer: int) -> torch.Tensor:
        """sqrt(diag(R G̃ Rᵀ)): the spread of every rotated unit of one layer, from the centred Gram matrix."""
        key = (index, layer)
        if key not in self._rotated_std:
            moments, shape = self.moments[index], self.shapes[index]
            assert moments.gram is not None and moments.total is not None
            sums = moments.total[layer * shape.d_mlp : (layer + 1) * shape.d_mlp]
            gram = moments.gram[layer].double() - torch.outer(sums, sums) / moments.count
            rotation = self._rotation(index, layer)
            self._rotated_std[key] = ((rotation @ gram) * rotation).sum(dim=1).clamp_min(0).sqrt()
        return self._rotated_std[key]

    def finish_pass(self) -> None:
        """Turn the current pass's accumulators into results, free them, and start the next pass."""
        for block, accumulator in self.accumulators.items():
            d_a = self.shapes[block.a].d_mlp
            for layer in range(block.layer_start, block.layer_stop):
                local = slice((layer - block.layer_start) * d_a, (layer - block.layer_start + 1) * d_a)
                self._finish_layer(block.a, block.b, layer, accumulator[local])
        self.accumulators = {}
        self.pass_index += 1
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self._allocate_pass()

    def _finish_layer(self, a: int, b: int, layer: int, products: torch.Tensor) -> None:
        """Correlations of one layer of a with all of b: fold into both directions' results."""
        shape_a, shape_b = self.shapes[a], self.shapes[b]
        d_a = shape_a.d_mlp
        rows = slice(layer * d_a, (layer + 1) * d_a)
        count = self.moments[a].count
        sums_a = self.moments[a].total[rows]  # type: ignore[index]
        sums_b = self.moments[b].total
        covariance = products.double() - torch.outer(sums_a, sums_b) / count  # [d_a, n_b] (times n)
        std_a, live_a = (t[rows] for t in self._std(a))
        std_b, live_b = self._std(b)
        corr = covariance / torch.outer(std_a, std_b)
        valid = torch.outer(live_a, live_b)
        corr = torch.where(valid, corr.clamp(-1, 1), torch.full_like(corr, -torch.inf))
        k = self.config.top_k

        # a -> b: the best partners of each neuron in this layer of a.
        top = corr.topk(min(k, corr.shape[1]), dim=1)
        self.results[(a, b)].merge_top(rows, top.values.cpu(), top.indices.cpu())
        # b -> a: these rows are candidates for every neuron of b (merged over all layers of a).
        top_t = corr.topk(min(k, corr.shape[0]), dim=0)
        self.results[(b, a)].merge_top(slice(None), top_t.values.T.cpu(), (top_t.indices.T + layer * d_a).cpu())

        # a -> rotated b: the best rotated unit of any layer of b.
        result_ab = self.results[(a, b)]
        for layer_b in range(shape_b.n_layers):
            cols = slice(layer_b * shape_b.d_mlp, (layer_b + 1) * shape_b.d_mlp)
            rotated = covariance[:, cols] @ self._rotation(b, layer_b).T  # [d_a, d_b]
            rotated_corr = rotated / torch.outer(std_a, self._rotated_unit_std(b, layer_b))
            rotated_corr = torch.where(live_a.unsqueeze(1), rotated_corr.clamp(-1, 1), -torch.inf)
            best, unit = rotated_corr.max(dim=1)
            result_ab.merge_baseline(rows, best.cpu(), (unit + layer_b * shape_b.d_mlp).cpu())
        # b -> rotated a (this layer's rotated units).
        rotated = covariance.T @ self._rotation(a, layer).T  # [n_b, d_a]
        rotated_corr = rotated / torch.outer(std_b, self._rotated_unit_std(a, layer))
        rotated_corr = torch.where(live_b.unsqueeze(1), rotated_corr.clamp(-1, 1), -torch.inf)
        best, unit = rotated_corr.max(dim=1)
        self.results[(b, a)].merge_baseline(slice(None), best.cpu(), (unit + layer * d_a).cpu())

    # --- checkpoints --------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "pass_index": self.pass_index,
            "moments": [{"shift": m.shift, "count": m.count, "total": m.total, "gram": m.gram} for m in self.moments],
            "accumulators": {(b.a, b.b, b.layer_start, b.layer_stop): t for b, t in self.accumulators.items()},
            "results": {key: vars(result) for key, result in self.results.items()},
            "passes": [[(b.a, b.b, b.layer_start, b.layer_stop) for b in p] for p in self.passes],
        }

    def load_state_dict(self, state: dict) -> None:
        self.passes = [[LayerBlock(*key) for key in p] for p in state["passes"]]
        self.pass_index = state["pass_index"]
        device = self.device
        self.moments = [
            StreamingMoments(
                shift=None if m["shift"] is None else m["shift"].to(device),
                count=m["count"],
                total=None if m["total"] is None else m["total"].to(device),
                gram=None if m["gram"] is None else m["gram"].to(device),
            )
            for m in state["moments"]
        ]
        self.accumulators = {LayerBlock(*key): t.to(device) for key, t in state["accumulators"].items()}
        self.results = {key: PartnerResult(**fields) for key, fields in state["results"].items()}
        self._rotated_std = {}
