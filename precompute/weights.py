"""Per-neuron statistics of the processed weights: norms, bias, vocabulary composition, null-space share.

Everything here is defined on the weights after the paper's processing (fold LN, centre writing weights, centre
unembed: paper-spec §1.1, §7.3 item 13), taken from the model's `TransformerBridge`. For neuron n of layer l:
w_in = W_in[l, :, n] (what it reads), b_in = b_in[l, n], w_out = W_out[l, n, :] (what it writes). The statistics
are the columns of the ``weight_stats`` table (paper-spec §3.2):

- ``w_in_norm`` ‖w_in‖, ``w_out_norm`` ‖w_out‖, ``input_bias`` b_in, ``in_out_sim`` cos(w_in, w_out),
  ``l2_penalty`` ‖w_in‖² + ‖w_out‖²;
- ``vocab_mean/var/skew/kurt``: population moments over the whole (real) vocabulary of
  c_v = cos(W_U[:, v], w_out); biased estimators and NON-excess kurtosis (a random direction gives about 3);
- ``null_space_fraction``: ‖P w_out‖² / ‖w_out‖², P the projector onto W_U's near-null space (`near_null_space`).

The near-null space. LayerNorm removes the mean over d_model, so the all-ones direction never reaches the logits
(after processing W_U is exactly orthogonal to it and every w_out has no component along it). Inside the other
d_model − 1 directions, the near-null space is spanned by the k left singular vectors of W_U (directions in
d_model) with the smallest singular values, k = max(1, round((d_model − 1) / 64)) unless given: 12 of 767 for
GPT2-small, 16 of 1023 for GPT2-medium, 2 of 127 for a d_model-128 toy. A fixed share of the spectrum (rather
than a singular-value threshold) keeps the score comparable across models, and a random direction scores about
k / (d_model − 1) ≈ 1.6%. The paper itself only says entropy neurons write "into the null space"; see docs/roles.md.

The BOS attention heuristic (paper-spec §5.3) is here too: h = ŵ_outᵀ W_Q k_BOS / √d_head for every neuron and
every head of a later layer (`bos_query_directions`, `bos_attention_scores`).

All functions work on float32 CPU tensors and stream over neurons in chunks, so GPT2-medium (98,304 neurons ×
50,257 tokens) needs a few hundred MB, not the 20 GB of the full cosine matrix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from precompute.memory import chunk_rows
from precompute.models import LoadedModel

logger = logging.getLogger(__name__)

#: The columns of ``weight_stats`` that `weight_statistics` fills, in table order.
WEIGHT_STAT_COLUMNS: tuple[str, ...] = (
    "w_in_norm",
    "w_out_norm",
    "input_bias",
    "in_out_sim",
    "l2_penalty",
    "vocab_mean",
    "vocab_var",
    "vocab_skew",
    "vocab_kurt",
    "null_space_fraction",
)

#: The near-null space is this share of W_U's centred spectrum (the smallest singular directions).
NULL_SPACE_SHARE = 1 / 64

_EPS = 1e-12


class WeightError(ValueError):
    """Weights whose shapes do not fit together, or a bad argument to a weight statistic."""


@dataclass
class NeuronWeights:
    """The processed weights the per-neuron statistics need (float32; on the CPU unless asked for elsewhere)."""

    W_in: torch.Tensor  # [n_layers, d_model, d_mlp]
    b_in: torch.Tensor  # [n_layers, d_mlp]
    W_out: torch.Tensor  # [n_layers, d_mlp, d_model]
    W_U: torch.Tensor  # [d_model, d_vocab] (the tokenizer's real vocabulary)
    W_E: torch.Tensor  # [d_vocab, d_model]

    def __post_init__(self) -> None:
        n_layers, d_model, d_mlp = self.W_in.shape
        expected = {
            "b_in": (n_layers, d_mlp),
            "W_out": (n_layers, d_mlp, d_model),
            "W_U": (d_model, self.W_U.shape[1]),
            "W_E": (self.W_U.shape[1], d_model),
        }
        for name, shape in expected.items():
            if tuple(getattr(self, name).shape) != shape:
                raise WeightError(f"{name} has shape {tuple(getattr(self, name).shape)}, expected {shape}")

    @property
    def n_layers(self) -> int:
        return int(self.W_in.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.W_in.shape[1])

    @property
    def d_mlp(self) -> int:
        return int(self.W_in.shape[2])

    @property
    def d_vocab(self) -> int:
        return int(self.W_U.shape[1])


@dataclass
class VocabProjection:
    """Top and bottom tokens of each neuron's raw logit effect W_U·w_out, and of W_E·w_in (paper Fig. 5)."""

    unembed_top_ids: np.ndarray  # [n_layers, d_mlp, top_k] int64, largest W_U·w_out first
    unembed_top_values: np.ndarray  # [n_layers, d_mlp, top_k] float32
    unembed_bottom_ids: np.ndarray  # [n_layers, d_mlp, top_k] int64, most negative first
    unembed_bottom_values: np.ndarray  # [n_layers, d_mlp, top_k] float32
    embed_top_ids: np.ndarray  # [n_layers, d_mlp, top_k] int64, largest W_E·w_in first
    embed_top_values: np.ndarray  # [n_layers, d_mlp, top_k] float32


def processed_weights(model: LoadedModel, device: torch.device | str = "cpu") -> NeuronWeights:
    """The processed weights of a `LoadedModel` (its bridge after ``enable_compatibility_mode``), on ``device``.

    W_U and W_E are trimmed to the tokenizer's real vocabulary when the model pads its embedding (Pythia:
    50,304 rows for 50,277 tokens), so padding rows never enter vocabulary moments or top-token lists.
    """
    bridge = model.bridge

    def grab(name: str) -> torch.Tensor:
        # No copy where the bridge already gives a float32 tensor on ``device``: W_U and W_E are its parameters
        # (nothing here writes to them), W_in and W_out are stacked afresh on every access.
        return getattr(bridge, name).detach().to(device=device, dtype=torch.float32)

    W_U, W_E = grab("W_U"), grab("W_E")
    n_real = min(int(W_U.shape[1]), len(model.tokenizer))
    if n_real < W_U.shape[1]:
        logger.info("%s: trimming W_U/W_E from %d to the tokenizer's %d tokens", model.name, W_U.shape[1], n_real)
    return NeuronWeights(
        W_in=grab("W_in"), b_in=grab("b_in"), W_out=grab("W_out"), W_U=W_U[:, :n_real], W_E=W_E[:n_real]
    )


def weights_bytes(model: LoadedModel) -> int:
    """What `processed_weights`, `weight_statistics` and `vocab_projection` hold at most, for the memory plan: W_in
    and W_out stacked from the blocks, W_U's unit columns, the statistics, and one chunk of neurons (float64
    copies of w_in and w_out, vocabulary cosines and their powers; or a chunk of logits)."""
    n, d_vocab, d_model = model.n_neurons, model.d_vocab, model.d_model
    stacked = 2 * n * d_model * 4 + n * 4
    chunk = min(256, chunk_rows(d_vocab, 8 * 3))
    working = chunk * (d_vocab * (4 + 8 + 8 + 4) + 4 * d_model * 8)  # logits, cosines, squares, W_E products
    return stacked + d_vocab * 8 + len(WEIGHT_STAT_COLUMNS) * n * 8 + working


def default_null_space_dim(d_model: int) -> int:
    """How many smallest singular directions of W_U make the near-null space.

    >>> default_null_space_dim(768), default_null_space_dim(1024), default_null_space_dim(128)
    (12, 16, 2)
    """
    return max(1, round((d_model - 1) * NULL_SPACE_SHARE))


def centred_basis(d_model: int) -> torch.Tensor:
    """An orthonormal basis [d_model, d_model − 1] of the vectors whose entries sum to zero (float64).

    >>> basis = centred_basis(4)
    >>> bool(torch.allclose(basis.T @ basis, torch.eye(3, dtype=torch.float64)))
    True
    >>> float(basis.sum(0).abs().max()) < 1e-12
    True
    """
    centring = torch.eye(d_model, dtype=torch.float64) - 1.0 / d_model
    values, vectors = torch.linalg.eigh(centring)  # eigenvalue 0 for the ones direction, 1 for the rest
    return vectors[:, values > 0.5]


def near_null_space(W_U: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Orthonormal columns [d_model, dim]: W_U's smallest left singular directions orthogonal to all-ones.

    Args:
        W_U: the processed unembedding [d_model, d_vocab].
        dim: how many directions; default `default_null_space_dim`.

    Returns:
        float64 [d_model, dim], smallest singular value first.

    >>> W_U = torch.zeros(3, 5); W_U[0, :] = torch.arange(5.0); W_U[1, :] = -W_U[0, :]
    >>> null = near_null_space(W_U, dim=1)  # W_U only uses e0 - e1; the unused centred direction is null
    >>> bool(torch.allclose(null[:, 0].abs(), torch.tensor([1, 1, 2], dtype=torch.float64) / 6**0.5))
    True
    """
    d_model = int(W_U.shape[0])
    dim = default_null_space_dim(d_model) if dim is None else dim
    if not 1 <= dim <= d_model - 1:
        raise WeightError(f"null space dimension must be between 1 and d_model - 1 = {d_model - 1}, got {dim}")
    basis = centred_basis(d_model)
    # (basis^T W_U)(basis^T W_U)^T from W_U W_U^T summed over vocabulary chunks: no float64 copy of W_U
    outer = torch.zeros(d_model, d_model, dtype=torch.float64)
    for start in range(0, int(W_U.shape[1]), chunk_rows(d_model)):
        part = W_U[:, start : start + chunk_rows(d_model)].to(torch.float64)
        outer += part @ part.T
    _, vectors = torch.linalg.eigh(basis.T @ outer @ basis)  # ascending eigenvalues = squared singular values
    return basis @ vectors[:, :dim]


def random_direction_vocab_var(W_U: torch.Tensor) -> float:
    """Expected vocab_var of a uniformly random centred direction: the scale the partition rule compares with.

    For unit u uniform in the centred subspace (dimension d − 1), E[Var_v uᵀŵ_v] = tr(Cov_v ŵ_v) / (d − 1) with
    ŵ_v the unit columns of W_U: about 1/d_model for an isotropic unembedding.

    >>> W_U = torch.randn(64, 4096); W_U -= W_U.mean(0)
    >>> abs(random_direction_vocab_var(W_U) * 63 - 1) < 0.01
    True
    """
    d_model, d_vocab = int(W_U.shape[0]), int(W_U.shape[1])
    unit_sum = torch.zeros(d_model, dtype=torch.float64)
    square_sum = 0.0
    for start in range(0, d_vocab, chunk_rows(d_model)):  # vocabulary chunks: no float64 copy of W_U
        part = W_U[:, start : start + chunk_rows(d_model)].to(torch.float64)
        unit = part / part.norm(dim=0).clamp_min(_EPS)
        unit_sum += unit.sum(dim=1)
        square_sum += float((unit * unit).sum())
    mean = unit_sum / d_vocab
    trace_cov = square_sum / d_vocab - float(mean @ mean)
    return trace_cov / (W_U.shape[0] - 1)


def weight_statistics(
    weights: NeuronWeights, null_space_dim: int | None = None, chunk_size: int = 256
) -> dict[str, np.ndarray]:
    """The ``weight_stats`` columns for every neuron, as float64 arrays [n_layers, d_mlp].

    Args:
        weights: processed weights (`processed_weights`).
        null_space_dim: the dimension of W_U's near-null space (`near_null_space`); default 1/64 of d_model.
        chunk_size: neurons per vocabulary-cosine block (memory ≈ chunk_size × d_vocab × 24 bytes).

    Returns:
        one array per name in `WEIGHT_STAT_COLUMNS`.

    >>> torch.manual_seed(0) and None
    >>> w = NeuronWeights(torch.randn(1, 8, 3), torch.zeros(1, 3), torch.randn(1, 3, 8), torch.randn(8, 50),
    ...                   torch.randn(50, 8))
    >>> stats = weight_statistics(w)
    >>> sorted(stats) == sorted(WEIGHT_STAT_COLUMNS), stats["vocab_kurt"].shape
    (True, (1, 3))
    """
    return weight_tables(weights, null_space_dim, top_k=None, chunk_size=chunk_size)[0]


def vocab_projection(weights: NeuronWeights, top_k: int = 20, chunk_size: int = 256) -> VocabProjection:
    """The top/bottom ``top_k`` tokens of W_U·w_out and the top tokens of W_E·w_in, per neuron (raw dot products).

    Args:
        weights: processed weights.
        top_k: tokens kept per list (at most d_vocab).
        chunk_size: neurons per block.

    >>> w = NeuronWeights(torch.zeros(1, 2, 1), torch.zeros(1, 1), torch.tensor([[[1.0, -1.0]]]),
    ...                   torch.tensor([[0.0, 2.0, -3.0], [0.0, 0.0, 0.0]]), torch.zeros(3, 2))
    >>> p = vocab_projection(w, top_k=2)
    >>> p.unembed_top_ids[0, 0].tolist(), p.unembed_bottom_ids[0, 0].tolist(), p.unembed_top_values[0, 0].tolist()
    ([1, 0], [2, 0], [2.0, 0.0])
    """
    projection = weight_tables(weights, top_k=top_k, chunk_size=chunk_size)[1]
    assert projection is not None
    return projection


def weight_tables(
    weights: NeuronWeights, null_space_dim: int | None = None, top_k: int | None = 20, chunk_size: int = 256
) -> tuple[dict[str, np.ndarray], VocabProjection | None]:
    """`weight_statistics` and (unless ``top_k`` is None) `vocab_projection` in one pass over chunks of neurons.

    W_U·w_out, the largest product here (50,257 tokens × 36,864 neurons for GPT2-small), is made once per chunk:
    its top and bottom tokens are the projection, and divided by the norms it is the vocabulary cosines whose
    moments are the ``vocab_*`` statistics. float64 copies and the cosines exist one chunk at a time, on the
    weights' device (a CUDA run's stats stage passes them on the GPU: on the CPU this was most of its writing
    time); the results are NumPy arrays.
    """
    if chunk_size < 1:
        raise WeightError(f"chunk_size must be positive, got {chunk_size}")
    if top_k is not None and not 1 <= top_k <= weights.d_vocab:
        raise WeightError(f"top_k must be between 1 and d_vocab = {weights.d_vocab}, got {top_k}")
    n_layers, d_mlp = weights.n_layers, weights.d_mlp
    device = weights.W_out.device
    chunk_size = min(chunk_size, chunk_rows(weights.d_vocab, 8 * 3))
    w_in_all = weights.W_in.transpose(1, 2).reshape(-1, weights.d_model)  # [n_neurons, d_model]
    w_out_all = weights.W_out.reshape(-1, weights.d_model)
    n_neurons = w_out_all.shape[0]
    # a [d_model, d_model] eigenproblem: solved on the CPU, whatever the device
    null = near_null_space(weights.W_U.cpu(), null_space_dim).to(device)
    W_U = weights.W_U.to(torch.float32)
    U_norm = W_U.norm(dim=0).clamp_min(_EPS).double()  # [d_vocab]
    stats = {name: torch.empty(n_neurons, dtype=torch.float64, device=device) for name in WEIGHT_STAT_COLUMNS}
    stats["input_bias"] = weights.b_in.reshape(-1).to(torch.float64)
    arrays = {}
    if top_k is not None:
        arrays = {
            name: np.empty((n_neurons, top_k), dtype=np.int64 if name.endswith("ids") else np.float32)
            for name in VocabProjection.__dataclass_fields__
        }
    for start in range(0, n_neurons, chunk_size):
        part = slice(start, start + chunk_size)
        w_in, w_out = w_in_all[part].to(torch.float64), w_out_all[part].to(torch.float64)
        in_norm, out_norm = w_in.norm(dim=1), w_out.norm(dim=1)
        stats["w_in_norm"][part] = in_norm
        stats["w_out_norm"][part] = out_norm
        stats["in_out_sim"][part] = (w_in * w_out).sum(dim=1) / (in_norm * out_norm).clamp_min(_EPS)
        stats["l2_penalty"][part] = in_norm**2 + out_norm**2
        centred_out = w_out - w_out.mean(dim=1, keepdim=True)  # a no-op after centre_writing_weights
        stats["null_space_fraction"][part] = (centred_out @ null).pow(2).sum(dim=1) / centred_out.pow(2).sum(
            dim=1
        ).clamp_min(_EPS)
        logits = w_out_all[part].to(torch.float32) @ W_U  # [chunk, d_vocab]
        if top_k is not None:
            for prefix, largest in (("unembed_top", True), ("unembed_bottom", False)):
                values, ids = torch.topk(logits, top_k, dim=1, largest=largest, sorted=True)
                arrays[f"{prefix}_values"][part], arrays[f"{prefix}_ids"][part] = (
                    values.cpu().numpy(),
                    ids.cpu().numpy(),
                )
            values, ids = torch.topk(w_in_all[part].to(torch.float32) @ weights.W_E.T, top_k, dim=1, sorted=True)
            arrays["embed_top_values"][part], arrays["embed_top_ids"][part] = values.cpu().numpy(), ids.cpu().numpy()
        cos = logits.double().div_(out_norm.clamp_min(_EPS).unsqueeze(1)).div_(U_norm)  # [chunk, d_vocab]
        del logits
        mean = cos.mean(dim=1, keepdim=True)
        centred = cos.sub_(mean)
        square = centred.square()
        var = square.mean(dim=1)
        stats["vocab_mean"][part] = mean[:, 0]
        stats["vocab_var"][part] = var
        # row-wise dot products as batched [1, V] x [V, 1] GEMMs: 20% faster than vecdot's product and sum on
        # the CPU (measured on a 256 x 50,257 chunk)
        third, fourth = (
            torch.bmm(square.unsqueeze(1), x.unsqueeze(2))[:, 0, 0] / weights.d_vocab for x in (centred, square)
        )
        stats["vocab_skew"][part] = third / var.clamp_min(_EPS).pow(1.5)
        stats["vocab_kurt"][part] = fourth / var.clamp_min(_EPS).pow(2)
    statistics = {name: stats[name].reshape(n_layers, d_mlp).cpu().numpy() for name in WEIGHT_STAT_COLUMNS}
    if top_k is None:
        return statistics, None
    return statistics, VocabProjection(**{name: a.reshape(n_layers, d_mlp, top_k) for name, a in arrays.items()})


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two vectors (e.g. the paper's −0.886 between two entropy neurons' w_out).

    >>> round(cosine(torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])), 4)
    -0.7071
    """
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    return float(a64 @ b64 / max(float(a64.norm() * b64.norm()), _EPS))


def bos_token_id(model: LoadedModel) -> int:
    """The BOS id (GPT-2: BOS = EOS); falls back to EOS for tokenizers without a BOS."""
    tokenizer = model.tokenizer
    return int(tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id)


@torch.inference_mode()
def bos_query_directions(model: LoadedModel) -> torch.Tensor:
    """W_Q k_BOS / √d_head per layer and head [n_layers, n_heads, d_model] (float32, CPU).

    k_BOS (b_K included) is the key of each head when the model runs on the BOS token alone; since attention is
    causal it is also the key of position 0 of every dataset row. As in the paper, ln1's scale and b_Q are
    ignored and the scale is 1/√d_head whatever the model's attention scaling.
    """
    bridge = model.bridge
    names = [f"blocks.{a}.attn.hook_k" for a in range(model.n_layers)]
    _, cache = bridge.run_with_cache(
        torch.tensor([[bos_token_id(model)]], device=bridge.W_Q.device), names_filter=names
    )
    k_bos = torch.stack([cache[name][0, 0] for name in names]).float().cpu()  # [n_layers, n_heads, d_head]
    W_Q = bridge.W_Q.detach().float().cpu()  # [n_layers, n_heads, d_model, d_head]
    return torch.einsum("lhmd,lhd->lhm", W_Q, k_bos) / W_Q.shape[-1] ** 0.5


def bos_attention_scores(weights: NeuronWeights, directions: torch.Tensor) -> np.ndarray:
    """h = ŵ_out · (W_Q k_BOS / √d_head) for every neuron and head, float32 [n_layers, d_mlp, n_layers, n_heads].

    Positive h: the neuron pushes the head's queries toward BOS (a deactivation neuron); NaN unless the head's
    layer comes after the neuron's (only later heads read it).
    """
    unit_out = weights.W_out / weights.W_out.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    scores = torch.einsum("lnm,ahm->lnah", unit_out, directions).numpy()  # float32: 150 MB for GPT2-medium
    for layer in range(weights.n_layers):
        scores[layer, :, : layer + 1] = np.nan
    return scores


def bos_score_sigma(directions: torch.Tensor) -> np.ndarray:
    """The standard deviation of h for a uniformly random centred unit vector, per head [n_layers, n_heads].

    >>> bos_score_sigma(torch.tensor([[[3.0, -3.0, 0.0, 0.0]]])).round(4).tolist()  # |d| / sqrt(d_model - 1)
    [[2.4495]]
    """
    centred = directions.to(torch.float64) - directions.to(torch.float64).mean(dim=-1, keepdim=True)
    return (centred.norm(dim=-1) / (directions.shape[-1] - 1) ** 0.5).numpy()


__all__ = [
    "NULL_SPACE_SHARE",
    "WEIGHT_STAT_COLUMNS",
    "NeuronWeights",
    "VocabProjection",
    "WeightError",
    "bos_attention_scores",
    "bos_query_directions",
    "bos_score_sigma",
    "bos_token_id",
    "centred_basis",
    "cosine",
    "default_null_space_dim",
    "near_null_space",
    "processed_weights",
    "random_direction_vocab_var",
    "vocab_projection",
    "weight_statistics",
    "weight_tables",
]
