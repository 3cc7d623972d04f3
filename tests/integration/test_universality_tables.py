"""The universality tables against the family's construction and an independent recomputation (issue 9).

The family is built so that a neuron's partners disagree: ``tiny-a``; ``tiny-a-permuted``, the same network with
its MLP neurons permuted (every neuron has an exact twin); ``tiny-a-noised``, another permutation whose last-layer
`NOISED` neurons get noisy input weights (their twins are no longer exact, and nothing else changes: no later MLP
reads them); ``tiny-b``, another seed. For a neuron of tiny-a the partners' best correlations are 1 (the permuted
twin), 1 or clearly less (the noised twin) and well below 1 (tiny-b), so max, mean and min over partners differ.

Every aggregate the correlations stage writes (``neurons``, ``layer_summaries``, ``distributions``, ``matches``) is
recomputed here with NumPy from ``partner_scores`` (the per-partner results, written straight from the engine) and
from ``neurons``, never by the code under test (`precompute.universality`).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cli.main import main

THRESHOLD = 0.3
#: The neurons of layer 1 (the last) of tiny-a-noised, in its own order, whose input weights get noise.
NOISED = list(range(0, 64, 4))
LAYERS, D_MLP, TOP_K = 2, 64, 5
MODELS = ("tiny-a", "tiny-a-permuted", "tiny-a-noised", "tiny-b")
QUANTITIES = {"max_corr", "mean_corr", "mean_baseline", "excess_corr"}
QUANTILES = ["0.01", "0.05", "0.1", "0.25", "0.5", "0.75", "0.9", "0.95", "0.99", "0.999"]


def query(db: Path, sql: str, *params: object) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql, params).fetchall()


@pytest.fixture(scope="module")
def atlas(tiny_family, tmp_path_factory) -> SimpleNamespace:
    from tests.factories import permuted_copy, perturb_neurons

    root = tmp_path_factory.mktemp("universality")
    noised = root / "tiny-a-noised"
    permutations = permuted_copy(tiny_family["base"], noised, seed=2)
    perturb_neurons(noised, layer=1, neurons=NOISED, noise=1.0, seed=3)
    db = root / "atlas.db"
    models = [tiny_family["base"], tiny_family["permuted"], noised, tiny_family["other"]]
    argv = ["precompute", "--db", str(db), "--tokens", "6000", "--stages", "correlations"]
    assert main([*argv, "--threshold", str(THRESHOLD), *map(str, models)]) == 0
    ids = dict(query(db, "SELECT name, id FROM models"))
    assert sorted(ids) == sorted(MODELS)
    return SimpleNamespace(
        db=db,
        ids=ids,
        names={i: name for name, i in ids.items()},
        permutations={"tiny-a-permuted": tiny_family["permutations"], "tiny-a-noised": permutations},
    )


def partner_table(atlas: SimpleNamespace, model: str) -> dict[str, np.ndarray]:
    """``partner_scores`` of one model as arrays [partner, layer * d_mlp + neuron], partners in the run's order."""
    partners = [name for name in MODELS if name != model]
    corr = np.full((len(partners), LAYERS * D_MLP), np.nan)
    baseline = np.full_like(corr, np.nan)
    for p, partner in enumerate(partners):
        for layer, neuron, best, base in query(
            atlas.db,
            "SELECT layer, neuron, max_corr, baseline_corr FROM partner_scores WHERE model_id = ? "
            "AND partner_model_id = ?",
            atlas.ids[model],
            atlas.ids[partner],
        ):
            corr[p, layer * D_MLP + neuron], baseline[p, layer * D_MLP + neuron] = best, base
    return {"partners": np.array(partners), "corr": corr, "baseline": baseline}


def neuron_table(atlas: SimpleNamespace, model: str) -> dict[str, np.ndarray]:
    """The ``neurons`` rows of one model as float arrays (NULL -> NaN) in layer, neuron order."""
    columns = ["dead", "max_corr", "mean_corr", "min_corr", "max_baseline", "mean_baseline", "min_baseline"]
    columns += ["excess_corr", "universal"]
    rows = query(
        atlas.db,
        f"SELECT {', '.join(columns)} FROM neurons WHERE model_id = ? ORDER BY layer, neuron",
        atlas.ids[model],
    )
    assert len(rows) == LAYERS * D_MLP
    values = np.array([[np.nan if v is None else float(v) for v in row] for row in rows])
    return dict(zip(columns, values.T, strict=True))


def twin(permutation: np.ndarray, neuron: int) -> int:
    """The copy's neuron that is ``neuron`` of the source: ``permutation[j]`` of the source is ``j`` of the copy."""
    return int(np.flatnonzero(permutation == neuron)[0])


def noised_in_tiny_a(atlas: SimpleNamespace) -> set[int]:
    """The layer-1 neurons of tiny-a whose twins in tiny-a-noised got noise (neuron ``perm[j]`` of tiny-a is ``j``)."""
    return {int(atlas.permutations["tiny-a-noised"][1][j]) for j in NOISED}


def test_partner_scores_follow_the_construction(atlas):
    scores = partner_table(atlas, "tiny-a")
    assert not np.isnan(scores["corr"]).any()  # no dead neuron in tiny-a: every neuron has every partner
    permuted, noised, other = scores["corr"]
    assert (permuted > 0.999).all()  # an exact twin for every neuron
    noised_twins = noised_in_tiny_a(atlas)
    for flat in range(LAYERS * D_MLP):
        layer, neuron = divmod(flat, D_MLP)
        if layer == 1 and neuron in noised_twins:
            assert noised[flat] < 0.99, (layer, neuron)
        else:
            assert noised[flat] > 0.999, (layer, neuron)
    assert (other < 0.99).all()  # another seed has no exact twin
    rows = query(
        atlas.db,
        "SELECT layer, neuron, max_layer, max_neuron FROM partner_scores WHERE model_id = ? AND partner_model_id = ?",
        atlas.ids["tiny-a"],
        atlas.ids["tiny-a-permuted"],
    )
    assert len(rows) == LAYERS * D_MLP
    for layer, neuron, max_layer, max_neuron in rows:
        assert (max_layer, max_neuron) == (layer, twin(atlas.permutations["tiny-a-permuted"][layer], neuron))


@pytest.mark.parametrize("model", MODELS)
def test_neuron_aggregates_are_max_mean_and_min_over_partners(atlas, model):
    scores, stored = partner_table(atlas, model), neuron_table(atlas, model)
    corr, baseline = scores["corr"], scores["baseline"]
    assert not np.isnan(corr).any() and not stored["dead"].any()
    expected = {
        "max_corr": corr.max(0),
        "mean_corr": corr.mean(0),
        "min_corr": corr.min(0),
        "max_baseline": baseline.max(0),
        "mean_baseline": baseline.mean(0),
        "min_baseline": baseline.min(0),
        "excess_corr": corr.mean(0) - baseline.mean(0),  # paper eq. 3
    }
    for column, values in expected.items():
        np.testing.assert_allclose(stored[column], values, atol=1e-6, err_msg=column)
    np.testing.assert_array_equal(stored["universal"], stored["excess_corr"] > THRESHOLD)


def test_the_fixture_separates_max_mean_and_min(atlas):
    """For tiny-a the construction fixes the aggregates: max is the exact twin's 1, min is at most tiny-b's best,
    and an un-noised neuron's mean is (1 + 1 + tiny-b's best) / 3."""
    stored = neuron_table(atlas, "tiny-a")
    other = partner_table(atlas, "tiny-a")["corr"][2]
    np.testing.assert_allclose(stored["max_corr"], 1.0, atol=1e-3)
    assert (stored["min_corr"] <= other + 1e-6).all()
    assert (stored["max_corr"] - stored["mean_corr"] > 0.05).all()
    assert (stored["mean_corr"] - stored["min_corr"] > 0.05).all()
    noised_twins = noised_in_tiny_a(atlas)
    exact = np.array([not (flat >= D_MLP and flat - D_MLP in noised_twins) for flat in range(LAYERS * D_MLP)])
    np.testing.assert_allclose(stored["mean_corr"][exact], (2 + other[exact]) / 3, atol=1e-3)
    np.testing.assert_allclose(stored["min_corr"][exact], other[exact], atol=1e-6)


def test_layer_summaries_count_at_the_runs_threshold(atlas):
    config = json.loads(query(atlas.db, "SELECT config FROM runs")[0][0])
    assert config["threshold"] == THRESHOLD
    excess_a = neuron_table(atlas, "tiny-a")["excess_corr"]
    # neurons on both sides of the paper's 0.5 and of the run's threshold, so a count at the wrong one differs
    assert ((excess_a > THRESHOLD) & (excess_a <= 0.5)).any() and (excess_a > 0.5).any()
    assert (excess_a <= THRESHOLD).any()
    for model in MODELS:
        stored = neuron_table(atlas, model)
        summaries = query(
            atlas.db,
            "SELECT layer, n_neurons, n_dead, n_universal, mean_excess, max_excess FROM layer_summaries "
            "WHERE model_id = ? ORDER BY layer",
            atlas.ids[model],
        )
        assert [row[0] for row in summaries] == list(range(LAYERS))
        for layer, n_neurons, n_dead, n_universal, mean_excess, max_excess in summaries:
            part = slice(layer * D_MLP, (layer + 1) * D_MLP)
            excess, dead = stored["excess_corr"][part], stored["dead"][part]
            assert (n_neurons, n_dead) == (D_MLP, int(dead.sum()))
            assert n_universal == int((excess > THRESHOLD).sum()), (model, layer)
            assert mean_excess == pytest.approx(float(excess.mean()), abs=1e-9)
            assert max_excess == pytest.approx(float(excess.max()), abs=1e-9)


@pytest.mark.parametrize("model", MODELS)
def test_distributions_are_histograms_and_quantiles_of_the_neurons(atlas, model):
    stored = neuron_table(atlas, model)
    rows = query(
        atlas.db,
        "SELECT quantity, bin_edges, counts, quantiles FROM distributions WHERE model_id = ?",
        atlas.ids[model],
    )
    assert {row[0] for row in rows} == QUANTITIES
    edges = np.linspace(-1, 1, 201)
    for quantity, bin_edges, counts, quantiles in rows:
        values = stored[quantity][np.isfinite(stored[quantity])]
        assert values.size == LAYERS * D_MLP
        np.testing.assert_allclose(json.loads(bin_edges), edges, atol=1e-6)
        expected, _ = np.histogram(np.clip(values, -1, 1), bins=edges)
        assert json.loads(counts) == expected.tolist(), quantity
        quantiles = json.loads(quantiles)
        assert list(quantiles) == QUANTILES
        for q, value in quantiles.items():
            assert value == pytest.approx(float(np.quantile(values, float(q))), abs=1e-6), (quantity, q)


def test_matches_are_the_top_k_and_start_at_the_partner_score(atlas):
    for model in MODELS:
        best = {
            (row[0], row[1], row[2]): row[3:]
            for row in query(
                atlas.db,
                "SELECT layer, neuron, partner_model_id, max_layer, max_neuron, max_corr FROM partner_scores "
                "WHERE model_id = ?",
                atlas.ids[model],
            )
        }
        ranked: dict[tuple[int, int, int], list[tuple]] = {}
        for layer, neuron, partner, rank, partner_layer, partner_neuron, corr in query(
            atlas.db,
            "SELECT layer, neuron, partner_model_id, rank, partner_layer, partner_neuron, corr FROM matches "
            "WHERE model_id = ? ORDER BY layer, neuron, partner_model_id, rank",
            atlas.ids[model],
        ):
            ranked.setdefault((layer, neuron, partner), []).append((rank, partner_layer, partner_neuron, corr))
        assert ranked.keys() == best.keys() and len(best) == 3 * LAYERS * D_MLP
        for key, matches in ranked.items():
            assert [m[0] for m in matches] == list(range(TOP_K))
            assert len({m[1:3] for m in matches}) == TOP_K  # distinct partner neurons
            corrs = [m[3] for m in matches]
            assert corrs == sorted(corrs, reverse=True)
            assert (matches[0][1], matches[0][2]) == best[key][:2]
            assert matches[0][3] == pytest.approx(best[key][2], abs=1e-9)
