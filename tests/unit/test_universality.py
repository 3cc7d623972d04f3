"""The universality aggregates (`precompute.universality`) on hand-made partner results, against NumPy oracles.

Model 0 of a three-model run has two partners whose best correlations differ, so max, mean and min over partners
differ; one neuron is dead, one has no finite match in one partner, one sits exactly on the threshold and one has an
excess above 1 and one below -1, which the histograms clip into their end bins.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from precompute.correlation import ModelShape, PartnerResult
from precompute.store import matches as match_table
from precompute.store import neurons, partner_scores
from precompute.universality import (
    QUANTILES,
    distribution_rows,
    layer_summary_rows,
    match_columns,
    neuron_columns,
    partner_columns,
    score_model,
    universal_fraction,
)

SHAPE = ModelShape("x", n_layers=2, d_mlp=4)
THRESHOLD = 0.3
#: Best correlation with each partner [partner, neuron]; neuron 2 is dead, neuron 6 has no finite match in partner 2.
BEST = np.array(
    [
        [0.9, 0.8, 0.7, 0.6, -0.1, 0.95, 0.4, 0.9],
        [0.3, 0.6, 0.1, 0.2, -0.3, 0.85, -np.inf, 0.7],
    ]
)
BASELINE = np.array(
    [
        [0.2, 0.5, 0.1, 0.1, 0.9, -0.6, 0.1, 0.2],
        [0.4, 0.3, 0.1, 0.1, 1.0, -0.4, 0.2, 0.1],
    ]
)
DEAD = np.array([False, False, True, False, False, False, False, False])


def result(partner: int, top_k: int = 3) -> PartnerResult:
    """Partner results whose best match is `BEST` and whose lower ranks are 0.1 and 0.05 below it."""
    best = torch.from_numpy(BEST[partner])
    top = torch.stack([best, best - 0.1, best - 0.05 * 3], dim=1)[:, :top_k]
    top[6, 1:] = -torch.inf  # neuron 6: one finite match at most
    index = torch.arange(SHAPE.n_neurons * top_k).reshape(SHAPE.n_neurons, top_k) % SHAPE.n_neurons
    return PartnerResult(
        top_corr=top.clone(),
        top_index=index,
        baseline_corr=torch.from_numpy(BASELINE[partner]),
        baseline_index=torch.arange(SHAPE.n_neurons).flip(0),
    )


@pytest.fixture
def scores():
    results = {(0, 1): result(0), (0, 2): result(1), (1, 0): result(0)}
    return score_model(0, 3, results, DEAD)


def expected_aggregates() -> dict[str, np.ndarray]:
    best, baseline = BEST.copy(), BASELINE.copy()
    best[:, DEAD] = baseline[:, DEAD] = np.nan
    best[~np.isfinite(best)] = np.nan
    return {
        "max_corr": best.max(0),
        "mean_corr": best.mean(0),
        "min_corr": best.min(0),
        "max_baseline": baseline.max(0),
        "mean_baseline": baseline.mean(0),
        "min_baseline": baseline.min(0),
        "excess_corr": best.mean(0) - baseline.mean(0),
    }


def test_scores_are_max_mean_and_min_over_partners(scores):
    expected = expected_aggregates()
    assert (expected["max_corr"][[0, 1, 3]] > expected["mean_corr"][[0, 1, 3]]).all()  # they differ here
    for name, values in expected.items():
        np.testing.assert_allclose(getattr(scores, name), values, equal_nan=True, err_msg=name)
    assert np.isnan(scores.excess_corr[[2, 6]]).all()  # dead; no finite match in one partner
    np.testing.assert_array_equal(scores.dead, DEAD)


def test_a_model_without_every_partner_has_no_scores():
    scores = score_model(0, 3, {(0, 1): result(0)}, DEAD)
    for name in expected_aggregates():
        assert np.isnan(getattr(scores, name)).all(), name


def test_universal_is_strictly_above_the_threshold_and_null_when_undefined(scores):
    scores.excess_corr[0] = THRESHOLD  # exactly on it: not universal
    columns = neuron_columns(7, SHAPE, scores, THRESHOLD)
    excess = scores.excess_corr
    assert columns["universal"] == [None if np.isnan(e) else bool(e > THRESHOLD) for e in excess]
    assert columns["universal"][0] is False and columns["universal"][2] is None
    assert set(columns) == {column.name for column in neurons.columns}  # the table's columns, no other
    assert columns["model_id"] == 7 and columns["dead"].dtype == bool
    np.testing.assert_array_equal(columns["dead"], DEAD)
    np.testing.assert_allclose(columns["excess_corr"], excess, equal_nan=True)
    np.testing.assert_array_equal(columns["layer"], [0, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(columns["neuron"], [0, 1, 2, 3, 0, 1, 2, 3])
    for name, values in expected_aggregates().items():
        if name != "excess_corr":
            np.testing.assert_allclose(columns[name], values, equal_nan=True, err_msg=name)


def test_layer_summaries(scores):
    scores.excess_corr[1] = THRESHOLD  # on the threshold: not counted
    rows = layer_summary_rows(7, SHAPE, scores, THRESHOLD)
    assert [row["layer"] for row in rows] == [0, 1]
    for row in rows:
        part = scores.excess_corr[row["layer"] * 4 : row["layer"] * 4 + 4]
        finite = part[np.isfinite(part)]
        assert row["model_id"] == 7 and row["n_neurons"] == 4
        assert row["n_dead"] == int(DEAD[row["layer"] * 4 : row["layer"] * 4 + 4].sum())
        assert row["n_universal"] == int((finite > THRESHOLD).sum())
        assert row["mean_excess"] == pytest.approx(finite.mean())
        assert row["max_excess"] == pytest.approx(finite.max())
    assert [row["n_dead"] for row in rows] == [1, 0]
    nothing = layer_summary_rows(7, SHAPE, score_model(0, 3, {}, DEAD), THRESHOLD)
    assert [(r["n_universal"], r["mean_excess"], r["max_excess"]) for r in nothing] == [(None, None, None)] * 2


def test_distributions_are_clipped_histograms_and_quantiles(scores):
    assert np.nanmax(scores.excess_corr) > 1 and np.nanmin(scores.excess_corr) < -1  # neurons 5, 4: clipped
    rows = distribution_rows(7, scores)
    assert [row["quantity"] for row in rows] == ["max_corr", "mean_corr", "mean_baseline", "excess_corr"]
    edges = np.linspace(-1, 1, 201)
    for row in rows:
        values = getattr(scores, row["quantity"])
        values = values[np.isfinite(values)]
        assert row["model_id"] == 7 and row["bin_edges"] == [round(float(e), 6) for e in edges]
        assert row["counts"] == np.histogram(np.clip(values, -1, 1), bins=edges)[0].tolist()
        assert sum(row["counts"]) == values.size
        assert row["quantiles"] == pytest.approx({str(q): float(np.quantile(values, q)) for q in QUANTILES})
    assert rows[-1]["counts"][-1] >= 1 and rows[-1]["counts"][0] >= 1
    assert distribution_rows(7, score_model(0, 3, {}, DEAD)) == []


def test_universal_fraction_counts_every_neuron(scores):
    excess = scores.excess_corr
    excess[1] = THRESHOLD  # on the threshold: not counted
    assert universal_fraction([scores], THRESHOLD) == [pytest.approx((excess[np.isfinite(excess)] > 0.3).sum() / 8)]
    assert universal_fraction([score_model(0, 3, {}, DEAD)], THRESHOLD) == [None]


def flat_of(columns: dict) -> np.ndarray:
    return columns["layer"] * SHAPE.d_mlp + columns["neuron"]


def test_partner_and_match_rows_skip_dead_and_undefined_neurons():
    partner = ModelShape("y", n_layers=2, d_mlp=4)
    res = result(1)
    rows = partner_columns(7, 8, SHAPE, partner, res, DEAD)
    assert set(rows) == {column.name for column in partner_scores.columns}
    assert (rows["model_id"], rows["partner_model_id"]) == (7, 8)
    live = [0, 1, 3, 4, 5, 7]  # not dead (2), not undefined (6)
    np.testing.assert_array_equal(rows["layer"] * 4 + rows["neuron"], live)
    np.testing.assert_allclose(rows["max_corr"], BEST[1, live])
    np.testing.assert_array_equal(rows["max_layer"] * 4 + rows["max_neuron"], res.top_index[live, 0].numpy())
    np.testing.assert_allclose(rows["baseline_corr"], BASELINE[1, live])
    np.testing.assert_array_equal(rows["baseline_layer"] * 4 + rows["baseline_unit"], [7 - n for n in live])
    matches = match_columns(7, 8, SHAPE, partner, result(0), DEAD)
    assert set(matches) == {column.name for column in match_table.columns}
    assert (matches["model_id"], matches["partner_model_id"]) == (7, 8)
    top_index = result(0).top_index.numpy()[flat_of(matches), matches["rank"]]
    np.testing.assert_array_equal(matches["partner_layer"] * 4 + matches["partner_neuron"], top_index)
    assert matches["partner_layer"].dtype.kind == "i" and matches["partner_neuron"].dtype.kind == "i"
    flat = matches["layer"] * 4 + matches["neuron"]
    # every live neuron keeps its three ranks, but neuron 6 only its one finite match; the dead one none
    assert {n: int((flat == n).sum()) for n in range(8)} == {0: 3, 1: 3, 2: 0, 3: 3, 4: 3, 5: 3, 6: 1, 7: 3}
    np.testing.assert_allclose(matches["corr"], result(0).top_corr.numpy()[flat, matches["rank"]])
