"""`weight_tables` on hand-built weights whose statistics are known from their construction (docs/testing.md,
mutation round 5), and against an independent NumPy float64 oracle (paper-spec §3.2).

Every statistic is checked on several neurons in one chunk (so that an aggregate over the wrong axis differs) and
across chunk boundaries (chunks of 3 over 10 neurons), with shapes that differ from each other (n_layers 2, d_mlp 5,
d_model 6, d_vocab 9) so that a transposed or flattened array does not fit by accident.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from precompute.weights import (
    WEIGHT_STAT_COLUMNS,
    NeuronWeights,
    WeightError,
    near_null_space,
    vocab_projection,
    weight_statistics,
    weight_tables,
)


def basis(d: int, *pairs: tuple[int, float]) -> torch.Tensor:
    """A vector of length d with the given (index, value) entries."""
    vector = torch.zeros(d)
    for index, value in pairs:
        vector[index] = value
    return vector


def bernoulli_weights() -> NeuronWeights:
    """d_model 4; W_U's four columns have norms 2√2, 3√6, √2/2 and 10, and w_out = ±7(e0 − e1) is parallel to the
    first and orthogonal to the other three: the cosines over the vocabulary are exactly (±1, 0, 0, 0)."""
    e0_e1 = basis(4, (0, 1.0), (1, -1.0))
    W_U = torch.stack(
        [
            2 * e0_e1,
            3 * basis(4, (0, 1.0), (1, 1.0), (2, -2.0)),
            0.5 * basis(4, (2, 1.0), (3, -1.0)),
            5 * basis(4, (0, 1.0), (1, 1.0), (2, -1.0), (3, -1.0)),
        ],
        dim=1,
    )
    W_in = torch.stack([basis(4, (0, 3.0), (2, 4.0)), basis(4, (1, 1.0), (3, -2.0))], dim=1)[None]  # [1, 4, 2]
    W_out = torch.stack([7 * e0_e1, -7 * e0_e1])[None]  # [1, 2, 4]
    return NeuronWeights(W_in=W_in, b_in=torch.tensor([[-1.5, 0.25]]), W_out=W_out, W_U=W_U, W_E=torch.eye(4))


def test_vocab_moments_of_a_planted_bernoulli_cosine():
    """Cosines (1, 0, 0, 0): a Bernoulli(1/4) variable, mean 1/4, variance 3/16, skew 2/√3, kurtosis 7/3 (population
    moments, non-excess kurtosis); the negated w_out has cosines (−1, 0, 0, 0): mean −1/4, skew −2/√3."""
    stats = weight_statistics(bernoulli_weights(), chunk_size=2)  # both neurons in one chunk
    np.testing.assert_allclose(stats["vocab_mean"], [[0.25, -0.25]], rtol=1e-6)
    np.testing.assert_allclose(stats["vocab_var"], [[3 / 16, 3 / 16]], rtol=1e-6)
    np.testing.assert_allclose(stats["vocab_skew"], [[2 / math.sqrt(3), -2 / math.sqrt(3)]], rtol=1e-6)
    np.testing.assert_allclose(stats["vocab_kurt"], [[7 / 3, 7 / 3]], rtol=1e-6)


def test_norms_bias_similarity_and_penalty_by_hand():
    """w_in = (3, 0, 4, 0), w_out = 7(e0 − e1): ‖w_in‖ = 5, ‖w_out‖ = 7√2, cos = 21 / (5 · 7√2), penalty 25 + 98;
    w_in = (0, 1, 0, −2), w_out = −7(e0 − e1): ‖w_in‖ = √5, cos = 7 / (√5 · 7√2), penalty 5 + 98."""
    stats = weight_statistics(bernoulli_weights(), chunk_size=2)
    np.testing.assert_allclose(stats["w_in_norm"], [[5.0, math.sqrt(5)]], rtol=1e-12)
    np.testing.assert_allclose(stats["w_out_norm"], [[7 * math.sqrt(2)] * 2], rtol=1e-12)
    np.testing.assert_allclose(stats["input_bias"], [[-1.5, 0.25]], rtol=0)
    expected_sim = [21 / (5 * 7 * math.sqrt(2)), 7 / (math.sqrt(5) * 7 * math.sqrt(2))]
    np.testing.assert_allclose(stats["in_out_sim"], [expected_sim], rtol=1e-12)
    np.testing.assert_allclose(stats["l2_penalty"], [[25.0 + 98.0, 5.0 + 98.0]], rtol=1e-12)


def null_weights() -> tuple[NeuronWeights, torch.Tensor]:
    """d_model 5; W_U spans only three of the four centred directions, so its near-null space of dimension 1 is
    exactly z = (e3 − e4)/√2. Neurons: 3z + 4u (u = (e0 − e1)/√2, in W_U's span): fraction 9/25; 2z + 1.5·1 (the
    all-ones part is not a direction W_U can read): 1; 5u − 0.7·1: 0; 6u: 0."""
    z = basis(5, (3, 1.0), (4, -1.0)) / math.sqrt(2)
    u = basis(5, (0, 1.0), (1, -1.0)) / math.sqrt(2)
    span = [
        basis(5, (0, 1.0), (1, -1.0)),
        basis(5, (0, 1.0), (1, 1.0), (2, -2.0)),
        basis(5, (0, 2.0), (1, 2.0), (2, 2.0), (3, -3.0), (4, -3.0)),
    ]
    W_U = torch.stack([span[0], 2 * span[1], 0.5 * span[2], span[0] - span[1], span[1] + 3 * span[2]], dim=1)  # exact
    ones = torch.ones(5)
    W_out = torch.stack([3 * z + 4 * u, 2 * z + 1.5 * ones, 5 * u - 0.7 * ones, 6 * u])[None]  # [1, 4, 5]
    generator = torch.Generator().manual_seed(4)
    weights = NeuronWeights(
        W_in=torch.randn(1, 5, 4, generator=generator),
        b_in=torch.zeros(1, 4),
        W_out=W_out,
        W_U=W_U,
        W_E=torch.randn(5, 5, generator=generator),
    )
    return weights, z


def test_null_space_fraction_of_planted_components():
    weights, z = null_weights()
    null = near_null_space(weights.W_U, 1)[:, 0]
    assert abs(float(null @ z.double())) == pytest.approx(
        float(z.double().norm()), abs=1e-12
    )  # the fixture's null space is z
    for chunk_size in (4, 3, 1):
        stats = weight_statistics(weights, null_space_dim=1, chunk_size=chunk_size)
        np.testing.assert_allclose(stats["null_space_fraction"], [[9 / 25, 1.0, 0.0, 0.0]], atol=1e-6)  # float32 z, u


def oracle(weights: NeuronWeights, null_dim: int) -> dict[str, np.ndarray]:
    """One neuron at a time in NumPy float64 (SciPy's moments, NumPy's SVD for the near-null space)."""
    W_U = weights.W_U.double().numpy()
    d_model = W_U.shape[0]
    centring = np.eye(d_model) - 1.0 / d_model
    left, _, _ = np.linalg.svd(centring @ W_U)  # descending; the last is the all-ones direction (singular value 0)
    null = left[:, d_model - 1 - null_dim : d_model - 1]
    unit_U = W_U / np.linalg.norm(W_U, axis=0)
    out = {name: np.zeros((weights.n_layers, weights.d_mlp)) for name in WEIGHT_STAT_COLUMNS}
    for layer, n in np.ndindex(weights.n_layers, weights.d_mlp):
        w_in = weights.W_in[layer, :, n].double().numpy()
        w_out = weights.W_out[layer, n].double().numpy()
        cos = w_out @ unit_U / np.linalg.norm(w_out)
        centred = w_out - w_out.mean()
        values = {
            "w_in_norm": np.sqrt(np.sum(w_in**2)),
            "w_out_norm": np.sqrt(np.sum(w_out**2)),
            "input_bias": float(weights.b_in[layer, n]),
            "in_out_sim": np.dot(w_in, w_out) / np.sqrt(np.sum(w_in**2) * np.sum(w_out**2)),
            "l2_penalty": np.sum(w_in**2) + np.sum(w_out**2),
            "vocab_mean": np.mean(cos),
            "vocab_var": np.var(cos),
            "vocab_skew": scipy.stats.skew(cos),
            "vocab_kurt": scipy.stats.kurtosis(cos, fisher=False),
            "null_space_fraction": np.sum((null.T @ centred) ** 2) / np.sum(centred**2),
        }
        for name, value in values.items():
            out[name][layer, n] = value
    return out


def random_weights(seed: int = 0) -> NeuronWeights:
    """n_layers 2, d_mlp 5, d_model 6, d_vocab 9; w_out with a non-zero mean, W_U columns of unequal norms."""
    generator = torch.Generator().manual_seed(seed)
    return NeuronWeights(
        W_in=torch.randn(2, 6, 5, generator=generator),
        b_in=torch.randn(2, 5, generator=generator),
        W_out=torch.randn(2, 5, 6, generator=generator) + torch.linspace(-1.0, 1.0, 5)[None, :, None],
        W_U=torch.randn(6, 9, generator=generator) * torch.linspace(0.5, 3.0, 9),
        W_E=torch.randn(9, 6, generator=generator),
    )


@pytest.mark.parametrize("chunk_size", [3, 10])
def test_statistics_match_a_numpy_oracle_in_float64(chunk_size):
    """Chunks of 3 over 10 neurons (a last chunk of 1), or all in one; float64 arrays of shape [n_layers, d_mlp].

    The norms, similarity, penalty and null-space share are float64 arithmetic on the float32 weights: equal to
    NumPy's to 1e-12. The vocabulary cosines come from float32 logits (W_U·w_out): 1e-5."""
    weights = random_weights()
    stats, projection = weight_tables(weights, null_space_dim=2, top_k=None, chunk_size=chunk_size)
    assert projection is None
    expected = oracle(weights, null_dim=2)
    assert list(stats) == list(WEIGHT_STAT_COLUMNS)
    for name in WEIGHT_STAT_COLUMNS:
        assert stats[name].dtype == np.float64, name
        assert stats[name].shape == (2, 5), name
        tight = not name.startswith("vocab_")
        np.testing.assert_allclose(stats[name], expected[name], rtol=1e-12 if tight else 1e-5, err_msg=name)
    assert np.ptp(expected["vocab_mean"]) > 0.1 and np.ptp(expected["vocab_skew"]) > 0.1  # neurons differ


@pytest.mark.parametrize("chunk_size", [3, 10])
def test_projection_is_numpys_sort_of_the_raw_products(chunk_size):
    """Top and bottom W_U·w_out and top W_E·w_in, in order, ids int64 and values float32, for every neuron."""
    weights = random_weights(1)
    stats, projection = weight_tables(weights, top_k=4, chunk_size=chunk_size)
    assert projection is not None
    logits = np.einsum("lnm,mv->lnv", weights.W_out.double().numpy(), weights.W_U.double().numpy())
    embed = np.einsum("lmn,vm->lnv", weights.W_in.double().numpy(), weights.W_E.double().numpy())
    expected = {
        "unembed_top": (np.argsort(-logits, axis=-1)[..., :4], logits),
        "unembed_bottom": (np.argsort(logits, axis=-1)[..., :4], logits),
        "embed_top": (np.argsort(-embed, axis=-1)[..., :4], embed),
    }
    for prefix, (ids, products) in expected.items():
        got_ids, got_values = getattr(projection, f"{prefix}_ids"), getattr(projection, f"{prefix}_values")
        assert got_ids.dtype == np.int64 and got_values.dtype == np.float32, prefix
        assert got_ids.shape == got_values.shape == (2, 5, 4), prefix
        np.testing.assert_array_equal(got_ids, ids, err_msg=prefix)
        np.testing.assert_allclose(got_values, np.take_along_axis(products, ids, axis=-1), rtol=1e-5, err_msg=prefix)
    assert stats["w_in_norm"].shape == (2, 5)


def test_projection_keeps_the_order_when_every_token_is_asked_for():
    """top_k = d_vocab (allowed) lists the whole vocabulary sorted; the products of a permuted W_U come back in
    the order of their values, not of their ids."""
    weights = random_weights(2)
    order = torch.tensor([4, 0, 7, 2, 8, 1, 6, 3, 5])
    values = torch.arange(9.0)[order]  # token v gets the product values[v]
    weights.W_out[0, 0] = basis(6, (0, 1.0))
    weights.W_U[0] = values
    projection = vocab_projection(weights, top_k=9, chunk_size=10)
    assert projection.unembed_top_ids[0, 0].tolist() == torch.argsort(values, descending=True).tolist()
    assert projection.unembed_top_values[0, 0].tolist() == [8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0]
    assert projection.unembed_bottom_values[0, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    one = vocab_projection(weights, top_k=1)  # the least allowed
    assert one.unembed_top_ids[0, 0].tolist() == [int(torch.argmax(values))]
    assert one.unembed_bottom_ids[0, 0].tolist() == [int(torch.argmin(values))]


def test_the_default_projection_keeps_twenty_tokens():
    weights = NeuronWeights(
        W_in=torch.randn(1, 4, 2), b_in=torch.zeros(1, 2), W_out=torch.randn(1, 2, 4), W_U=torch.randn(4, 30),
        W_E=torch.randn(30, 4),
    )  # fmt: skip
    _, projection = weight_tables(weights)
    assert projection is not None and projection.unembed_top_ids.shape == (1, 2, 20)


def test_chunk_and_top_k_bounds_are_refused_with_their_values():
    weights = random_weights()
    with pytest.raises(WeightError, match="chunk_size must be positive, got 0"):
        weight_tables(weights, chunk_size=0)
    with pytest.raises(WeightError, match=r"top_k must be between 1 and d_vocab = 9, got 10"):
        weight_tables(weights, top_k=10)
    with pytest.raises(WeightError, match=r"top_k must be between 1 and d_vocab = 9, got 0"):
        weight_tables(weights, top_k=0)
    single = weight_statistics(weights, null_space_dim=2, chunk_size=1)  # the least chunk
    np.testing.assert_allclose(single["vocab_kurt"], oracle(weights, 2)["vocab_kurt"], rtol=1e-5)
