"""Functional roles (paper-spec §5): the config, the rules, two code paths that must agree, planted neurons."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GPT2LMHeadModel

from precompute.causal import clean_run, entropy_intervention, next_token_metrics, path_ablation, valid_positions
from precompute.pipeline import ConfigError
from precompute.stages.roles import RolesConfig, analyse_model, baseline_neurons, ranked_neurons, vocab_roles
from precompute.weights import (
    bos_attention_scores,
    bos_query_directions,
    processed_weights,
    vocab_projection,
    weight_statistics,
)

PREDICTED = [11, 222, 333]  # the tokens the planted prediction neuron writes


def load(folder: Path):
    from precompute.models import load_model, resolve_source

    return load_model(resolve_source(str(folder)))


def plant_roles(folder: Path) -> dict[str, tuple[int, int]]:
    """A tiny GPT-2 (d_model 256, so that random cosines are narrow) with neurons planted by editing weights.

    Last layer: neuron 0 writes the sum of the PREDICTED tokens' unembeddings, neuron 1 its negative, neuron 2
    a direction W_U hardly reads (its component is removed from every token embedding). Layer 0: neuron 0
    writes along W_Q k_BOS of head 1.0 (more attention to BOS), neuron 1 the opposite.
    """
    from tests.factories import tiny_gpt2

    tiny_gpt2(folder, seed=2, d_model=256, d_mlp=64, n_heads=2)
    hf = GPT2LMHeadModel.from_pretrained(folder)
    wte, blocks = hf.transformer.wte.weight, hf.transformer.h  # wte is tied to the unembedding
    null = torch.randn(wte.shape[1], generator=torch.Generator().manual_seed(5))
    null = (null - null.mean()) / (null - null.mean()).norm()
    with torch.no_grad():
        wte -= 0.99 * (wte @ null)[:, None] * null
        out = blocks[-1].mlp.c_proj.weight  # Conv1D [d_mlp, d_model]: row n is neuron n's w_out
        out[0] = 3 * wte[PREDICTED].sum(dim=0)
        out[1] = -out[0]
        out[2] = 5 * null
    hf.save_pretrained(folder)
    direction = bos_query_directions(load(folder))[1, 0]
    direction = (direction - direction.mean()) / (direction - direction.mean()).norm()
    with torch.no_grad():
        blocks[0].mlp.c_proj.weight[0] = direction
        blocks[0].mlp.c_proj.weight[1] = -direction
    hf.save_pretrained(folder)
    return {
        "prediction": (1, 0),
        "suppression": (1, 1),
        "entropy": (1, 2),
        "deactivation": (0, 0),
        "activation": (0, 1),
    }


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("planted") / "tiny-planted"
    neurons = plant_roles(folder)
    return load(folder), neurons


@pytest.fixture(scope="module")
def rows() -> torch.Tensor:
    tokens = torch.randint(1, 512, (4, 64), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 0  # BOS, as every dataset row starts
    tokens[1, 30] = 0  # a document separator (EOS = BOS) inside a row
    return tokens


def test_config_refuses_unknown_keys_and_bad_values():
    with pytest.raises(ConfigError, match="unknown roles setting 'rows'; settings are models, "):
        RolesConfig.from_mapping({"rows": 3})
    with pytest.raises(ConfigError, match="one of all, reference"):
        RolesConfig(models="some")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="intervention_rows must be int"):
        RolesConfig.from_mapping({"intervention_rows": 2.5})
    with pytest.raises(ConfigError, match="at least 1"):
        RolesConfig(batch_rows=0)
    with pytest.raises(ConfigError, match="intervention_values"):
        RolesConfig.from_mapping({"intervention_values": []})
    assert RolesConfig.from_mapping({"partition_var": 0.005, "null_space_dim": None}).partition_var == 0.005


def test_vocab_rules_and_rankings():
    stats = {
        "vocab_kurt": np.array([[11.0, 11.0, 11.0, 2.0]]),
        "vocab_skew": np.array([[1.0, -1.0, 0.0, 0.0]]),
        "vocab_var": np.array([[0.1, 0.1, 0.1, 0.1]]),
    }
    assert vocab_roles(stats, 10, 0.05).tolist() == [["prediction", "suppression", "partition", "partition"]]
    assert vocab_roles(stats, 10, 0.5).tolist() == [["prediction", "suppression", None, None]]
    assert ranked_neurons(np.array([[1.0, 5.0], [3.0, 2.0]]), range(2)) == [(0, 1), (1, 0), (1, 1), (0, 0)]


def test_baseline_neurons_follow_the_paper_filter():
    rng = np.random.default_rng(0)
    stats = {"l2_penalty": rng.random((3, 50)), "vocab_var": rng.random((3, 50))}
    chosen = baseline_neurons(stats, range(1, 3), exclude={(1, 0), (2, 0)}, n=20, seed=4)
    assert len(chosen) == 20 == len(set(chosen))
    assert chosen == baseline_neurons(stats, range(1, 3), exclude={(1, 0), (2, 0)}, n=20, seed=4)
    l2, var = stats["l2_penalty"][1:], stats["vocab_var"][1:]
    for layer, n in chosen:
        assert layer in (1, 2) and (layer, n) not in {(1, 0), (2, 0)}
        assert stats["l2_penalty"][layer, n] <= np.quantile(l2, 0.9)
        assert stats["vocab_var"][layer, n] >= np.quantile(var, 0.1)


def test_next_token_metrics_match_a_sort():
    logits = torch.randn(3, 7, 50, generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(2))
    got = next_token_metrics(logits, targets)
    probs = logits.double().softmax(-1)
    entropy = -(probs * probs.log()).sum(-1)
    loss = -probs.log().gather(-1, targets[..., None])[..., 0]
    rank = (logits.argsort(dim=-1, descending=True) == targets[..., None]).float().argmax(-1)  # 0-based position
    torch.testing.assert_close(got[..., 0].double(), entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[..., 1].double(), loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[..., 2], 1.0 / (rank + 1.0))


def test_valid_positions_drop_special_tokens_and_the_last_position(rows):
    valid = valid_positions(rows, {0})
    assert not valid[:, 0].any() and not valid[:, -1].any() and not valid[1, 30]
    assert int(valid.sum()) == 4 * 62 - 1


def test_direct_path_shortcut_equals_the_hooked_forward(planted, rows):
    model, _ = planted
    valid = valid_positions(rows, {0})
    values = (-0.17, 0.0, 2.0, 6.0)
    fast = entropy_intervention(model, rows, valid, 1, 5, values, batch_rows=3, clean=clean_run(model, rows))
    slow = entropy_intervention(model, rows, valid, 1, 5, values, batch_rows=5)
    for name in ("ln_scale", "entropy", "loss", "reciprocal_rank"):
        np.testing.assert_allclose(getattr(fast, name), getattr(slow, name), rtol=1e-5, err_msg=name)
    assert fast.n_tokens == int(valid.sum())


def test_intervention_matches_a_hand_computed_value(planted, rows):
    """Fix one value by hand with run_with_hooks and average the metrics over valid positions."""
    model, _ = planted

    def fix(act, hook):
        act[:, :, 9] = 3.0
        return act

    with torch.inference_mode():
        logits = model.bridge.run_with_hooks(rows, fwd_hooks=[("blocks.0.mlp.hook_post", fix)])
    valid = valid_positions(rows, {0})
    log_probs = logits[:, :-1].log_softmax(-1)
    loss = -log_probs.gather(-1, rows[:, 1:, None])[..., 0]
    curve = entropy_intervention(model, rows, valid, 0, 9, (3.0,), batch_rows=2)
    assert curve.loss[0] == pytest.approx(float(loss[valid[:, :-1]].mean()), rel=1e-5)


def test_attention_scores_match_a_hand_computation(planted):
    model, _ = planted
    weights = processed_weights(model)
    scores = bos_attention_scores(weights, bos_query_directions(model))
    assert np.isnan(scores[1]).all() and np.isnan(scores[0, :, 0]).all()  # only later layers' heads
    with torch.inference_mode():
        _, cache = model.bridge.run_with_cache(torch.tensor([[0]]), names_filter=["blocks.1.attn.hook_k"])
        k_bos = cache["blocks.1.attn.hook_k"][0, 0, 1]  # head 1
        w_out = weights.W_out[0, 7]
        expected = (w_out / w_out.norm()) @ model.bridge.W_Q[1, 1] @ k_bos / model.bridge.cfg.d_head**0.5
    assert scores[0, 7, 1, 1] == pytest.approx(float(expected), rel=1e-4)


def test_path_ablation_matches_a_hand_computation(planted, rows):
    """Only the queries change: recompute head 1.0's BOS attention and z from the clean keys and values."""
    model, _ = planted
    bridge, after = model.bridge, 40
    points = path_ablation(model, rows, layer=0, neuron=3, attn_layer=1, head=0, after_pos=after)
    assert points.shape == (4 * (64 - after), 3)
    names = ["blocks.0.mlp.hook_post", "blocks.1.hook_resid_pre", "blocks.1.attn.hook_k", "blocks.1.attn.hook_v"]
    with torch.inference_mode():
        _, cache = bridge.run_with_cache(rows, names_filter=[*names, "blocks.1.attn.hook_pattern"])
        activation = cache[names[0]][:, :, 3]
        resid = cache[names[1]] - activation[..., None] * bridge.W_out[0, 3]
        centred = resid - resid.mean(-1, keepdim=True)
        normalized = centred / (centred.pow(2).mean(-1, keepdim=True) + bridge.cfg.eps).sqrt()
        q = normalized @ bridge.W_Q[1, 0] + bridge.b_Q[1, 0]  # [rows, pos, d_head]
        k, v = cache[names[2]][:, :, 0], cache[names[3]][:, :, 0]
        logits = q @ k.transpose(1, 2) / bridge.cfg.d_head**0.5
        logits = logits.masked_fill(torch.ones(64, 64, dtype=torch.bool).triu(1), float("-inf"))
        pattern = logits.softmax(-1)
        clean_pattern = cache["blocks.1.attn.hook_pattern"][:, 0]
        z_norm, clean_norm = (pattern @ v).norm(dim=-1), (clean_pattern @ v).norm(dim=-1)
    np.testing.assert_allclose(points[:, 0], activation[:, after:].reshape(-1), rtol=1e-5)
    expected_bos = (pattern[:, after:, 0] - clean_pattern[:, after:, 0]).reshape(-1)
    np.testing.assert_allclose(points[:, 1], expected_bos, atol=1e-5)
    np.testing.assert_allclose(points[:, 2], (z_norm - clean_norm)[:, after:].reshape(-1), atol=1e-4)


def test_planted_prediction_and_suppression_neurons(planted):
    model, neurons = planted
    weights = processed_weights(model)
    stats = weight_statistics(weights)
    projection = vocab_projection(weights, top_k=3)
    config = RolesConfig(n_random_baseline=0, n_entropy_candidates=0, n_path_ablation_pairs=0)
    result = analyse_model(model, torch.zeros(1, 64, dtype=torch.long), config)
    labels = {(r["layer"], r["neuron"]): r["vocab_role"] for r in result["roles"]}
    for role, top in (("prediction", projection.unembed_top_ids), ("suppression", projection.unembed_bottom_ids)):
        layer, n = neurons[role]
        assert labels[(layer, n)] == role
        assert stats["vocab_kurt"][layer, n] > 10
        assert sorted(top[layer, n].tolist()) == PREDICTED
    assert sum(label is not None for label in labels.values()) == 2  # random neurons get no vocab role


def test_planted_entropy_neuron_ranks_first_and_raises_entropy(planted, rows):
    model, neurons = planted
    config = RolesConfig(n_entropy_candidates=1, n_random_baseline=3, n_path_ablation_pairs=0)
    result = analyse_model(model, rows, config)
    ranks = {(r["layer"], r["neuron"]): r["entropy_rank"] for r in result["roles"]}
    assert ranks[neurons["entropy"]] == 0
    assert ranks[(0, 0)] is not None  # both layers are "the last two" of a two-layer model
    curve = [c for c in result["entropy_interventions"] if (c["layer"], c["neuron"]) == neurons["entropy"]]
    assert [c["value"] for c in curve] == [-0.17, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert not any(c["is_baseline"] for c in curve)
    scale, entropy = [c["ln_scale"] for c in curve[1:]], [c["entropy"] for c in curve[1:]]
    assert scale == sorted(scale) and entropy == sorted(entropy)  # monotone from v = 0 to 6
    assert len({(c["layer"], c["neuron"]) for c in result["entropy_interventions"] if c["is_baseline"]}) == 3


def test_planted_attention_neurons(planted, rows):
    model, neurons = planted
    result = analyse_model(model, rows, RolesConfig(n_random_baseline=0, n_entropy_candidates=0, ablation_after_pos=8))
    by_neuron = {(r["layer"], r["neuron"]): r for r in result["roles"]}
    for role in ("deactivation", "activation"):
        row = by_neuron[neurons[role]]
        assert row["attention_role"] == role
        assert (row["attention_layer"], row["attention_head"]) == (1, 0)
    assert sum(r["attention_role"] is not None for r in result["roles"]) <= 4
    assert by_neuron[(1, 0)]["attention_layer"] is None  # the last layer has no later head
    top = [s for s in result["attention_scores"] if (s["layer"], s["neuron"]) == neurons["deactivation"]]
    assert [s["rank"] for s in top] == [0, 1] and top[0]["score"] > 0  # two heads in the next layer
    ablated = {(a["layer"], a["neuron"]): a for a in result["path_ablations"]}
    assert set(ablated) >= {neurons["deactivation"], neurons["activation"]}
    # removing a positive activation that pulls queries toward BOS lowers the attention to BOS
    assert ablated[neurons["deactivation"]]["pearson_bos"] < 0 < ablated[neurons["activation"]]["pearson_bos"]
    assert ablated[neurons["deactivation"]]["n_points"] == 4 * (64 - 8)


# --- mutation testing (docs/testing.md): checks that killed mutmut's survivors ---------------------------------


def test_path_ablation_correlations_pair_each_change_with_the_activation():
    """Hand-built points: Δ attention to BOS falls monotonically with the activation and Δ‖z‖ rises, non-linearly,
    so each Spearman is exactly ∓1 while each Pearson is NumPy's correlation of the matching columns."""
    from precompute.causal import correlations

    activation = np.array([0.5, 1.0, 2.0, 3.0, 5.0])
    points = np.stack([activation, -(activation**3), activation**2], axis=1)
    got = correlations(points)
    assert set(got) == {"pearson_bos", "spearman_bos", "pearson_norm", "spearman_norm"}
    assert got["spearman_bos"] == pytest.approx(-1.0) and got["spearman_norm"] == pytest.approx(1.0)
    assert got["pearson_bos"] == pytest.approx(np.corrcoef(activation, -(activation**3))[0, 1], rel=1e-12)
    assert got["pearson_norm"] == pytest.approx(np.corrcoef(activation, activation**2)[0, 1], rel=1e-12)
    assert -1 < got["pearson_bos"] < -0.9 and 0.9 < got["pearson_norm"] < 1
