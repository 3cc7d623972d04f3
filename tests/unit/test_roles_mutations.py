"""The roles stage's `analyse_model` and the causal helpers against independent oracles (docs/testing.md, mutation
round 5; paper-spec §5).

A three-layer tiny GPT-2 (d_model 16, 8 neurons a layer, 2 heads, rows of 16 tokens) takes about a second to build
and load. Most checks hand `analyse_model` hand-written weight statistics, so the vocabulary roles, the entropy
ranking and the pool of random baseline neurons follow from the paper's rules applied by hand; the attention
scores h = ŵ_outᵀ W_Q k_BOS / √d_head, the intervention curves and the path-ablation points are recomputed here in
NumPy float64 from the model's weights and hooked forward passes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch

from precompute.causal import final_logits, next_token_metrics, valid_positions
from precompute.models import load_model, resolve_source
from precompute.stages.roles import RolesConfig, analyse_model
from precompute.weights import bos_attention_scores, bos_query_directions, bos_score_sigma, processed_weights
from tests.factories import tiny_gpt2  # at the top: mutmut's forkserver imports it once for every mutant

N_LAYERS, D_MLP, N_HEADS, CTX = 3, 8, 2, 16
LAST = (1, 2)  # the default entropy_layers = 2 of a three-layer model


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    folder: Path = tmp_path_factory.mktemp("roles-mutations") / "tiny-3"
    tiny_gpt2(folder, seed=3, n_layers=N_LAYERS, d_model=16, d_mlp=D_MLP, n_heads=N_HEADS, ctx=CTX)
    return load_model(resolve_source(str(folder)))


@pytest.fixture(scope="module")
def rows(model) -> torch.Tensor:
    """Three rows starting with BOS; row 1 has a document separator at position 9 (BOS = EOS here)."""
    bos = model.tokenizer.bos_token_id
    tokens = torch.randint(1, 500, (3, CTX), generator=torch.Generator().manual_seed(1))
    tokens[tokens == bos] = 1
    tokens[:, 0] = bos
    tokens[1, 9] = bos
    return tokens


def quiet(**settings) -> RolesConfig:
    """No causal checks unless asked for: the weight-based tables only."""
    return RolesConfig(**{"n_entropy_candidates": 0, "n_random_baseline": 0, "n_path_ablation_pairs": 0, **settings})


# --- oracles ---------------------------------------------------------------------------------------------------


def head_scores(model) -> tuple[np.ndarray, np.ndarray]:
    """h [L, d_mlp, L, H] (NaN unless the head's layer is after the neuron's) and σ [L, H] = ‖P d‖ / √(d_model − 1),
    d = W_Q k_BOS / √d_head with k_BOS from the model run on the BOS token alone, in float64."""
    bridge = model.bridge
    names = [f"blocks.{a}.attn.hook_k" for a in range(N_LAYERS)]
    with torch.inference_mode():
        _, cache = bridge.run_with_cache(torch.tensor([[model.tokenizer.bos_token_id]]), names_filter=names)
    W_Q = bridge.W_Q.detach().double().numpy()  # [L, H, d_model, d_head]
    W_out = bridge.W_out.detach().double().numpy()  # [L, d_mlp, d_model]
    unit = W_out / np.linalg.norm(W_out, axis=-1, keepdims=True)
    h = np.full((N_LAYERS, D_MLP, N_LAYERS, N_HEADS), np.nan)
    sigma = np.zeros((N_LAYERS, N_HEADS))
    for a in range(N_LAYERS):
        for head in range(N_HEADS):
            k = cache[names[a]][0, 0, head].double().numpy()
            direction = W_Q[a, head] @ k / np.sqrt(W_Q.shape[-1])
            sigma[a, head] = np.linalg.norm(direction - direction.mean()) / np.sqrt(direction.size - 1)
            for layer in range(a):
                h[layer, :, a, head] = unit[layer] @ direction
    return h, sigma


def hand_stats() -> dict[str, np.ndarray]:
    """Weight statistics [3, 8] written by hand: vocabulary moments for the roles, ‖w_out‖ and the null-space share
    for the entropy score, l2_penalty and vocab_var for the baseline filter."""
    kurt = np.full((N_LAYERS, D_MLP), 3.0)
    skew = np.zeros((N_LAYERS, D_MLP))
    var = np.tile(np.arange(1, D_MLP + 1) * 0.002, (N_LAYERS, 1))  # 0.002 · (n + 1) in every layer
    kurt[0] = [12, 12, 12, 10, 10, 3, 3, 12]
    skew[0] = [1, -1, 0, 1, -1, 0, 0, 0.5]
    var[0, 6] = 0.0105  # exactly the partition threshold used below
    var[1, 1] = 0.002  # three neurons share the last layers' 10th percentile of vocab_var, 0.002
    kurt[2, 5], skew[2, 5] = 40.0, -3.0
    norm = np.ones((N_LAYERS, D_MLP))
    fraction = np.full((N_LAYERS, D_MLP), 0.01)
    # entropy score ‖w_out‖ · fraction: (1, 6) 2.0 · 0.9 = 1.8 first, (2, 3) 10 · 0.15 = 1.5, (2, 0) 1 · 0.8 = 0.8;
    # by ‖w_out‖ alone (2, 3) would lead, by the fraction alone (2, 0), by their ratio (1, 6) would not be first.
    norm[1, 6], fraction[1, 6] = 2.0, 0.9
    norm[2, 3], fraction[2, 3] = 10.0, 0.15
    norm[2, 0], fraction[2, 0] = 1.0, 0.8
    norm[0, 2], fraction[0, 2] = 50.0, 0.9  # layer 0 is not among the last two: never ranked
    l2 = np.tile(np.arange(D_MLP, dtype=float), (N_LAYERS, 1)) + np.arange(N_LAYERS)[:, None] * 10
    l2[2, 5] = 26.0  # two neurons share the last layers' 90th percentile of l2_penalty, 26
    return {
        "vocab_kurt": kurt,
        "vocab_skew": skew,
        "vocab_var": var,
        "w_out_norm": norm,
        "null_space_fraction": fraction,
        "l2_penalty": l2,
        "w_in_norm": np.ones((N_LAYERS, D_MLP)),
    }


def paper_role(kurt: float, skew: float, var: float, kurtosis: float, partition: float) -> str | None:
    """paper-spec §5.1: prediction (kurt > k, skew > 0), suppression (kurt > k, skew < 0), else partition (var above
    the threshold), else none."""
    if kurt > kurtosis and skew > 0:
        return "prediction"
    if kurt > kurtosis and skew < 0:
        return "suppression"
    return "partition" if var > partition else None


def entropy_order(stats: dict[str, np.ndarray], layers: tuple[int, ...]) -> list[tuple[int, int]]:
    score = {
        (a, n): stats["w_out_norm"][a, n] * stats["null_space_fraction"][a, n] for a in layers for n in range(D_MLP)
    }
    return sorted(score, key=lambda key: (-score[key], key))


def numpy_weight_stats(model, null_dim: int) -> dict[str, np.ndarray]:
    """‖w_out‖, null-space share (NumPy SVD of the centred W_U) and vocab_var of cos(W_U[:, v], w_out), float64."""
    weights = processed_weights(model)
    W_U = weights.W_U.double().numpy()
    d = W_U.shape[0]
    left, _, _ = np.linalg.svd((np.eye(d) - 1.0 / d) @ W_U)
    null = left[:, d - 1 - null_dim : d - 1]
    W_out = weights.W_out.double().numpy()
    centred = W_out - W_out.mean(axis=-1, keepdims=True)
    cos = W_out @ (W_U / np.linalg.norm(W_U, axis=0)) / np.linalg.norm(W_out, axis=-1, keepdims=True)
    return {
        "w_out_norm": np.linalg.norm(W_out, axis=-1),
        "null_space_fraction": np.sum((centred @ null) ** 2, axis=-1) / np.sum(centred**2, axis=-1),
        "vocab_var": cos.var(axis=-1),
    }


def metrics_oracle(model, tokens: torch.Tensor, valid: np.ndarray, hooks: list) -> np.ndarray:
    """Mean final-LN scale, entropy, loss and reciprocal rank over the valid positions, from the model's own logits
    and ``ln_final.hook_scale`` in a hooked forward pass, in NumPy float64."""
    kept: dict[str, torch.Tensor] = {}

    def keep(act, hook):
        kept["scale"] = act.clone()
        return act

    with torch.inference_mode():
        logits = model.bridge.run_with_hooks(tokens, fwd_hooks=[*hooks, ("ln_final.hook_scale", keep)])
    logits = logits.double().numpy()
    log_probs = logits - scipy.special.logsumexp(logits, axis=-1, keepdims=True)
    targets = tokens[:, 1:].numpy()
    per_position = []
    for r, p in zip(*np.nonzero(valid), strict=True):
        target_logit = logits[r, p, targets[r, p]]
        per_position.append(
            [
                float(kept["scale"][r, p, 0]),
                -np.sum(np.exp(log_probs[r, p]) * log_probs[r, p]),
                -log_probs[r, p, targets[r, p]],
                1.0 / (1 + np.sum(logits[r, p] > target_logit)),
            ]
        )
    return np.mean(per_position, axis=0)


def hand_valid(tokens: torch.Tensor, special: int) -> np.ndarray:
    valid = np.ones(tokens.shape, dtype=bool)
    for r, p in np.ndindex(*tokens.shape):
        valid[r, p] = int(tokens[r, p]) != special and p < tokens.shape[1] - 1
    return valid


# --- analyse_model: roles, ranks, heads ----------------------------------------------------------------------


def test_the_model_fixture_separates_the_heads(model):
    """Later heads' |h| differ by more than float32 rounding, and the threshold used below lies between neurons."""
    h, _ = head_scores(model)
    for layer in range(N_LAYERS - 1):
        for n in range(D_MLP):
            magnitudes = np.sort(np.abs(h[layer, n][np.isfinite(h[layer, n])]))
            assert np.diff(magnitudes).min() > 1e-4 * magnitudes.max()  # float32 rounding: about 1e-7
    assert np.nanmax(np.abs(h)) < 1  # NaN heads must sort after every |h| (a NaN filled with +1 would not)


def test_roles_rows_follow_the_paper_rules_on_hand_statistics(model, rows):
    """vocab_role from the given statistics (kurtosis 10, partition var 0.0105), entropy_rank over the last two layers
    by ‖w_out‖ · null-space share, the strongest later head with its sign and significance, every row's keys."""
    stats = hand_stats()
    h, sigma = head_scores(model)
    strongest = {}
    for layer in range(N_LAYERS - 1):
        for n in range(D_MLP):
            flat = [(abs(h[layer, n, a, k]), a, k) for a in range(layer + 1, N_LAYERS) for k in range(N_HEADS)]
            _, a, k = max(flat)
            strongest[(layer, n)] = (a, k, h[layer, n, a, k], abs(h[layer, n, a, k]) / sigma[a, k])
    ratios = sorted(ratio for *_, ratio in strongest.values())
    threshold = (ratios[len(ratios) // 2 - 1] + ratios[len(ratios) // 2]) / 2  # half the neurons are significant
    assert min(abs(r - threshold) for r in ratios) > 1e-4 * threshold
    result = analyse_model(model, rows, quiet(partition_var=0.0105, attention_sigma=threshold), stats)

    ranks = {neuron: rank for rank, neuron in enumerate(entropy_order(stats, LAST))}
    assert list(ranks)[:3] == [(1, 6), (2, 3), (2, 0)]
    expected = []
    for layer, n in np.ndindex(N_LAYERS, D_MLP):
        kurt, skew, var = (float(stats[name][layer, n]) for name in ("vocab_kurt", "vocab_skew", "vocab_var"))
        role = paper_role(kurt, skew, var, 10, 0.0105)
        row = {"layer": layer, "neuron": n, "vocab_role": role, "entropy_rank": ranks.get((layer, n))}
        row |= dict.fromkeys(("attention_role", "attention_layer", "attention_head", "attention_score"))
        if layer < N_LAYERS - 1:
            a, k, score, ratio = strongest[(layer, n)]
            sign = "deactivation" if score > 0 else "activation"
            row |= {
                "attention_role": sign if ratio >= threshold else None,
                "attention_layer": a,
                "attention_head": k,
                "attention_score": pytest.approx(score, rel=1e-4),
            }
        expected.append(row)
    assert result["roles"] == expected
    got_roles = [row["vocab_role"] for row in result["roles"][:D_MLP]]
    # kurtosis 12 with skew 0 is neither; kurtosis exactly 10 is not above 10 (neurons 3 and 4); vocab_var 0.010
    # and exactly 0.0105 are not above 0.0105; the kurtosis rule wins over the partition rule (neuron 7: 0.016)
    assert got_roles == ["prediction", "suppression", None, None, None, "partition", None, "prediction"]
    assert {r["attention_role"] for r in result["roles"]} == {"deactivation", "activation", None}
    assert result["roles"][2 * D_MLP + 5]["vocab_role"] == "suppression"


def test_attention_scores_list_the_top_later_heads_by_magnitude(model, rows):
    """top_heads = 3: layer 0 has four later heads (three kept), layer 1 two, layer 2 none; ranked by |h|."""
    h, _ = head_scores(model)
    result = analyse_model(model, rows, quiet(top_heads=3), hand_stats())
    expected = []
    for layer, n in np.ndindex(N_LAYERS, D_MLP):
        heads = [(a, k) for a in range(layer + 1, N_LAYERS) for k in range(N_HEADS)]
        heads.sort(key=lambda ak: -abs(h[layer, n, ak[0], ak[1]]))
        for rank, (a, k) in enumerate(heads[:3]):
            score = pytest.approx(h[layer, n, a, k], rel=1e-4)
            expected.append(
                {"layer": layer, "neuron": n, "rank": rank, "attention_layer": a, "head": k, "score": score}
            )
    assert len(expected) == D_MLP * 3 + D_MLP * 2
    assert result["attention_scores"] == expected


def test_significance_is_at_least_the_threshold(model, rows):
    """|h| exactly equal to attention_sigma · σ counts (paper: at least 4σ); one ulp more does not."""
    weights = processed_weights(model)
    directions = bos_query_directions(model)
    scores, sigma = bos_attention_scores(weights, directions), bos_score_sigma(directions)
    layer, n = 0, 5
    best = np.nanargmax(np.abs(scores[layer, n]).reshape(-1))
    a, k = divmod(int(best), N_HEADS)
    magnitude = float(abs(scores[layer, n, a, k]))
    factor = magnitude / float(sigma[a, k])
    for _ in range(8):  # the float64 factor whose product with σ is exactly |h|
        if factor * float(sigma[a, k]) == magnitude:
            break
        factor = float(np.nextafter(factor, np.inf if factor * float(sigma[a, k]) < magnitude else -np.inf))
    assert factor * float(sigma[a, k]) == magnitude
    on = analyse_model(model, rows, quiet(attention_sigma=factor), hand_stats())["roles"][layer * D_MLP + n]
    above = float(np.nextafter(factor, np.inf))
    off = analyse_model(model, rows, quiet(attention_sigma=above), hand_stats())["roles"][layer * D_MLP + n]
    assert (on["attention_layer"], on["attention_head"]) == (a, k)
    assert on["attention_role"] == ("deactivation" if scores[layer, n, a, k] > 0 else "activation")
    assert off["attention_role"] is None


@pytest.mark.parametrize(("entropy_layers", "layers"), [(1, (2,)), (3, (0, 1, 2)), (5, (0, 1, 2))])
def test_entropy_ranks_cover_the_last_entropy_layers(model, rows, entropy_layers, layers):
    stats = hand_stats()
    result = analyse_model(model, rows, quiet(entropy_layers=entropy_layers), stats)
    ranks = {neuron: rank for rank, neuron in enumerate(entropy_order(stats, layers))}
    assert {(r["layer"], r["neuron"]): r["entropy_rank"] for r in result["roles"]} == {
        (layer, n): ranks.get((layer, n)) for layer, n in np.ndindex(N_LAYERS, D_MLP)
    }
    assert sum(rank is not None for rank in ranks.values()) == D_MLP * len(layers)


def test_a_null_space_dimension_recomputes_the_statistics(model, rows):
    """Given statistics are the stats stage's (default near-null space): with null_space_dim set they are ignored
    and the entropy ranking is NumPy's ‖w_out‖ · share for that dimension (5 here; the default is 1)."""
    five, one = numpy_weight_stats(model, 5), numpy_weight_stats(model, 1)
    assert entropy_order(five, LAST)[:4] != entropy_order(one, LAST)[:4]  # the dimension changes the ranking
    scores = np.sort((five["w_out_norm"] * five["null_space_fraction"])[1:].reshape(-1))
    assert np.diff(scores).min() > 1e-6 * scores.max()  # no near-ties that float32 weights could swap
    result = analyse_model(model, rows, quiet(null_space_dim=5, prediction_kurtosis=1e9), hand_stats())
    got = sorted((r["entropy_rank"], (r["layer"], r["neuron"])) for r in result["roles"] if r["layer"] in LAST)
    assert [neuron for _, neuron in got] == entropy_order(five, LAST)


def test_the_default_partition_threshold_is_a_multiple_of_a_random_directions_var(model, rows):
    """partition_var None: partition_factor · tr(Cov_v ŵ_v) / (d_model − 1) (NumPy, unit columns of W_U); a factor
    that puts the threshold inside the neurons' vocab_var splits them into partition neurons and the rest."""
    W_U = processed_weights(model).W_U.double().numpy()
    unit = W_U / np.linalg.norm(W_U, axis=0)
    random_var = np.trace(np.cov(unit, bias=True)) / (W_U.shape[0] - 1)
    var = numpy_weight_stats(model, 1)["vocab_var"]
    factor = float(np.median(var)) / random_var
    assert np.min(np.abs(var / random_var - factor)) > 1e-4 * factor
    result = analyse_model(model, rows, quiet(partition_factor=factor, prediction_kurtosis=1e9))
    got = np.array([r["vocab_role"] == "partition" for r in result["roles"]]).reshape(N_LAYERS, D_MLP)
    np.testing.assert_array_equal(got, var > factor * random_var)
    assert 0 < got.sum() < got.size
    assert {r["vocab_role"] for r in result["roles"]} == {"partition", None}


# --- analyse_model: entropy interventions ------------------------------------------------------------------------


def baseline_pool(stats: dict[str, np.ndarray], exclude: set[tuple[int, int]]) -> set[tuple[int, int]]:
    """paper-spec §5.2: last-two-layer neurons with l2_penalty ≤ its 90th and vocab_var ≥ its 10th percentile."""
    l2, var = stats["l2_penalty"][1:], stats["vocab_var"][1:]
    return {
        (layer, n)
        for layer in LAST
        for n in range(D_MLP)
        if stats["l2_penalty"][layer, n] <= np.quantile(l2, 0.9)
        and stats["vocab_var"][layer, n] >= np.quantile(var, 0.1)
    } - exclude


def test_candidates_and_the_whole_baseline_pool_get_curves(model, rows):
    """Two candidates (the top entropy scores) and, with more baseline neurons asked for than the pool holds, the
    whole pool. The filter's bounds are inclusive: the neurons exactly on the 90th percentile of l2_penalty and on
    the 10th of vocab_var stay in."""
    stats = hand_stats()
    candidates = entropy_order(stats, LAST)[:2]
    pool = baseline_pool(stats, set(candidates))
    # l2 10..17, 20..24, 26, 26, 27: the 90th percentile (position 13.5 of 16) is 26, so only (2, 7) goes; vocab_var
    # 0.002 three times, then 0.004 ..: the 10th percentile (position 1.5) is 0.002, so none goes; the candidates
    # (1, 6) and (2, 3) go
    assert pool == {(1, n) for n in (0, 1, 2, 3, 4, 5, 7)} | {(2, n) for n in (0, 1, 2, 4, 5, 6)}
    config = RolesConfig(
        n_entropy_candidates=2, n_random_baseline=50, n_path_ablation_pairs=0, intervention_values=(1.0,)
    )
    curves = analyse_model(model, rows, config, stats)["entropy_interventions"]
    assert [(c["layer"], c["neuron"]) for c in curves if not c["is_baseline"]] == candidates
    assert sorted((c["layer"], c["neuron"]) for c in curves if c["is_baseline"]) == sorted(pool)
    assert len(curves) == 2 + len(pool)


def test_the_baseline_draw_follows_the_seed(model, rows):
    stats = hand_stats()

    def drawn(seed: int) -> list[tuple[int, int]]:
        config = RolesConfig(n_entropy_candidates=2, n_random_baseline=3, n_path_ablation_pairs=0, seed=seed,
                             intervention_values=(0.0,))  # fmt: skip
        curves = analyse_model(model, rows, config, stats)["entropy_interventions"]
        return [(c["layer"], c["neuron"]) for c in curves if c["is_baseline"]]

    first = drawn(0)
    assert len(first) == 3 and set(first) <= baseline_pool(stats, set(entropy_order(stats, LAST)[:2]))
    assert drawn(0) == first
    assert {tuple(drawn(seed)) for seed in (1, 2, 3)} != {tuple(first)}


def test_intervention_rows_match_hooked_forward_passes(model, rows):
    """For the two candidates, (1, 6) (a hooked forward) and (2, 3) (last layer: the direct-path shortcut), and one
    baseline neuron, each fixed value's row holds the means over the first two rows' valid positions of the
    final-LN scale, entropy, loss and reciprocal rank, recomputed here from the model's logits in a hooked forward;
    the nominal columns are the same without an intervention."""
    stats = hand_stats()
    config = RolesConfig(
        n_entropy_candidates=2, n_random_baseline=1, n_path_ablation_pairs=0, intervention_values=(-0.17, 2.5),
        intervention_rows=2, batch_rows=1,
    )  # fmt: skip
    curves = analyse_model(model, rows, config, stats)["entropy_interventions"]
    tokens = rows[:2]
    valid = hand_valid(tokens, model.tokenizer.bos_token_id)[:, :-1]
    nominal = metrics_oracle(model, tokens, valid, [])
    assert len(curves) == 6
    assert [(c["layer"], c["neuron"]) for c in curves[:4]] == [(1, 6), (1, 6), (2, 3), (2, 3)]
    assert len({(c["layer"], c["neuron"]) for c in curves[4:]}) == 1
    names = ("ln_scale", "entropy", "loss", "reciprocal_rank")
    nominal_names = tuple(f"nominal_{name}" for name in names)
    for curve in curves:
        layer, n, value = curve["layer"], curve["neuron"], curve["value"]

        def fix(act, hook, n=n, value=value):
            act[:, :, n] = value
            return act

        expected = metrics_oracle(model, tokens, valid, [(f"blocks.{layer}.mlp.hook_post", fix)])
        assert set(curve) == {"layer", "neuron", "value", "is_baseline", "n_tokens", *names, *nominal_names}
        assert curve["is_baseline"] == ((layer, n) not in {(1, 6), (2, 3)})
        assert curve["n_tokens"] == int(valid.sum()) == 2 * (CTX - 2) - 1
        np.testing.assert_allclose([curve[name] for name in names], expected, rtol=2e-4, err_msg=str((layer, n)))
        np.testing.assert_allclose([curve[name] for name in nominal_names], nominal, rtol=2e-4)
    assert [c["value"] for c in curves] == [-0.17, 2.5] * 3


# --- analyse_model: path ablations -------------------------------------------------------------------------------


def test_path_ablations_take_the_strongest_pairs_and_store_their_points(model, rows):
    """The three (neuron, head) pairs with the largest |h|; each stores n_points = ablation_rows · (ctx − after)
    points (after = ctx // 4 when unset), column 0 the neuron's clean activation, and the correlations of the
    stored points."""
    h, _ = head_scores(model)
    finite = [(abs(h[idx]), idx) for idx in zip(*np.nonzero(np.isfinite(h)), strict=True)]
    top = [tuple(int(i) for i in idx) for _, idx in sorted(finite, key=lambda x: -x[0])[:3]]
    config = RolesConfig(n_entropy_candidates=0, n_random_baseline=0, n_path_ablation_pairs=3, ablation_rows=2)
    ablations = analyse_model(model, rows, config, hand_stats())["path_ablations"]
    assert [(r["layer"], r["neuron"], r["attention_layer"], r["head"]) for r in ablations] == top
    after = CTX // 4
    names = [f"blocks.{layer}.mlp.hook_post" for layer in range(N_LAYERS)]
    with torch.inference_mode():
        _, cache = model.bridge.run_with_cache(rows[:2], names_filter=names)
    for row in ablations:
        assert set(row) == {
            "layer", "neuron", "attention_layer", "head", "n_points", "points",
            "pearson_bos", "spearman_bos", "pearson_norm", "spearman_norm",
        }  # fmt: skip
        assert row["n_points"] == 2 * (CTX - after)
        points = np.frombuffer(row["points"], dtype=np.float32).reshape(row["n_points"], 3)
        activation = cache[names[row["layer"]]][:, after:, row["neuron"]].reshape(-1).numpy()
        np.testing.assert_allclose(points[:, 0], activation, rtol=1e-5)
        for column, name in ((1, "bos"), (2, "norm")):
            x, y = points[:, 0].astype(np.float64), points[:, column].astype(np.float64)
            assert row[f"pearson_{name}"] == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-6, abs=1e-9)
            assert row[f"spearman_{name}"] == pytest.approx(scipy.stats.spearmanr(x, y)[0], rel=1e-6, abs=1e-9)


def test_path_ablations_stop_at_the_pairs_that_have_a_head(model, rows):
    """More pairs asked for than there are (neuron, later head) pairs: 8 · 4 + 8 · 2 = 48; an explicit first
    ablated position gives ablation_rows · (ctx − after) points."""
    config = RolesConfig(
        n_entropy_candidates=0, n_random_baseline=0, n_path_ablation_pairs=60, ablation_rows=1, ablation_after_pos=10
    )
    ablations = analyse_model(model, rows, config, hand_stats())["path_ablations"]
    assert len(ablations) == 48
    assert {(r["layer"], r["attention_layer"]) for r in ablations} == {(0, 1), (0, 2), (1, 2)}
    assert {r["n_points"] for r in ablations} == {CTX - 10}


# --- the causal helpers ------------------------------------------------------------------------------------------


def test_next_token_metrics_over_many_cpu_blocks():
    """1,500 positions of a 1,000-token vocabulary: 12 blocks of 131 rows (METRIC_BLOCK // 1000), the last one
    partial; NumPy float64 entropy, loss and 1 / (1 + number of larger logits), ties at the target included."""
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(5, 300, 1000, generator=generator)
    targets = torch.randint(0, 1000, (5, 300), generator=generator)
    logits[0, 0, :] = 0.0  # all tied: rank 1
    got = next_token_metrics(logits, targets).double().numpy()
    x = logits.double().numpy()
    log_probs = x - scipy.special.logsumexp(x, axis=-1, keepdims=True)
    target_logit = np.take_along_axis(x, targets.numpy()[..., None], axis=-1)
    assert got.shape == (5, 300, 3)
    np.testing.assert_allclose(got[..., 0], -np.sum(np.exp(log_probs) * log_probs, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(
        got[..., 1], -np.take_along_axis(log_probs, targets.numpy()[..., None], -1)[..., 0], rtol=1e-5
    )
    np.testing.assert_allclose(got[..., 2], 1.0 / (1.0 + np.sum(x > target_logit, axis=-1)), rtol=1e-6)
    assert got[0, 0, 2] == 1.0


def test_final_logits_centre_scale_and_unembed():
    """scale = √(mean((r − r̄)²) + ε) per position, logits = (r − r̄) / scale · W_U + b_U, for [2, 3, d_model]."""
    generator = torch.Generator().manual_seed(6)
    resid = torch.randn(2, 3, 5, generator=generator) * 3 + torch.arange(5.0)
    W_U, b_U = torch.randn(5, 7, generator=generator), torch.randn(7, generator=generator)
    scale, logits = final_logits(resid, W_U, b_U, eps=0.5)
    r = resid.double().numpy()
    centred = r - r.mean(axis=-1, keepdims=True)
    expected_scale = np.sqrt((centred**2).mean(axis=-1, keepdims=True) + 0.5)
    assert scale.shape == (2, 3, 1) and logits.shape == (2, 3, 7)
    np.testing.assert_allclose(scale.double().numpy(), expected_scale, rtol=1e-6)
    expected = (centred / expected_scale) @ W_U.double().numpy() + b_U.double().numpy()
    np.testing.assert_allclose(logits.double().numpy(), expected, rtol=1e-5, atol=1e-5)


def test_valid_positions_drop_every_special_id():
    tokens = torch.tensor([[7, 3, 9, 3, 4], [9, 9, 5, 6, 1]], dtype=torch.int32)
    got = valid_positions(tokens, {9, 3})
    assert got.dtype == torch.bool
    assert got.tolist() == [[True, False, False, False, False], [False, False, True, True, False]]
