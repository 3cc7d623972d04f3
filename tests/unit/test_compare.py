"""Comparing two runs on a known answer: the published small-a table against a perturbed copy of it."""

from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from precompute.compare import ComparisonError, compare_runs, resolve_model
from precompute.published import PUBLISHED_MODELS, import_paper, import_table
from precompute.store import AtlasStore
from tests.factories import MOST_PERTURBED, SHIFT, Perturbed, write_perturbed_table

SMALL = "stanford-gpt2-small-a"


@pytest.fixture
def atlas(tmp_path) -> tuple[Path, int, int, Perturbed]:
    """A fresh atlas with the published small-a run (B, the reference) and the perturbed one (A)."""
    db = tmp_path / "atlas.db"
    perturbed = write_perturbed_table(tmp_path)
    (published_run,) = import_paper(db, [SMALL])
    with AtlasStore(db) as store:
        perturbed_run = import_table(
            store, PUBLISHED_MODELS[SMALL], perturbed.path, "perturbed", provenance={"source": "test: perturbed"}
        )
    return db, resolve_model(db, perturbed_run), resolve_model(db, published_run), perturbed


def test_the_universal_sets_agree_as_constructed(atlas):
    db, model_a, model_b, table = atlas
    result = compare_runs(db, model_a, model_b)
    assert (result.a.n_universal, result.b.n_universal, result.agreement.n_both) == (1483, 1533, 1433)
    assert (result.a.n_neurons, result.b.n_neurons, result.n_shared_neurons) == (1483, 1533, 1433)
    assert result.agreement.jaccard == 1433 / 1583
    assert result.agreement.precision == 1433 / 1483  # A is the perturbed run, B the published reference
    assert result.agreement.recall == 1433 / 1533
    assert result.a.threshold == result.b.threshold == 0.5
    assert result.a.model == result.b.model == SMALL and result.a.run_id != result.b.run_id

    swapped = compare_runs(db, model_b, model_a)
    assert (swapped.agreement.precision, swapped.agreement.recall) == (1433 / 1533, 1433 / 1483)

    shared = set(table.original) & set(table.perturbed)
    expected_layers = {
        layer: (
            sum(1 for k in table.perturbed if k[0] == layer),
            sum(1 for k in table.original if k[0] == layer),
            sum(1 for k in shared if k[0] == layer),
        )
        for layer in range(12)
    }
    assert {c.layer: (c.universal_a, c.universal_b, c.universal_both) for c in result.layers} == expected_layers


def test_the_excess_correlation_is_numpys_on_the_shared_neurons(atlas):
    db, model_a, model_b, table = atlas
    result = compare_runs(db, model_a, model_b)
    shared = sorted(set(table.original) & set(table.perturbed))
    a = np.array([table.perturbed[k] for k in shared])
    b = np.array([table.original[k] for k in shared])
    excess = result.correlation("excess_corr")
    assert excess.n_shared == 1433
    assert excess.pearson == pytest.approx(np.corrcoef(a, b)[0, 1], rel=1e-9)
    assert excess.pearson is not None and 0.9 < excess.pearson < 1.0
    # Everything but the excess is copied unchanged: perfect agreement over the shared neurons.
    for name in ("mean_corr", "w_in_norm", "vocab_kurt", "pre_mean", "pre_kurt", "frequency_paper"):
        assert result.correlation(name).n_shared == 1433
        assert result.correlation(name).pearson == pytest.approx(1.0)
    # Not published: no shared values, no correlation.
    for name in ("frequency", "null_space_fraction", "post_mean"):
        assert (result.correlation(name).n_shared, result.correlation(name).pearson) == (0, None)
    with pytest.raises(KeyError, match="excess_corr"):
        result.correlation("no_such_statistic")


def test_the_largest_disagreement_is_the_neuron_perturbed_most(atlas):
    db, model_a, model_b, table = atlas
    result = compare_runs(db, model_a, model_b, top_k=5)
    assert len(result.disagreements) == 5
    top = result.disagreements[0]
    assert (top.layer, top.neuron) == MOST_PERTURBED
    assert top.difference == pytest.approx(SHIFT)
    assert (top.excess_a, top.excess_b) == (table.perturbed[MOST_PERTURBED], table.original[MOST_PERTURBED])
    assert top.universal_a and top.universal_b
    gaps = [abs(d.difference) for d in result.disagreements]
    assert gaps == sorted(gaps, reverse=True) and gaps[1] <= 0.002 + 1e-9


def test_thresholds_can_be_overridden_and_a_connection_passed(atlas):
    db, model_a, model_b, table = atlas
    with sqlite3.connect(db) as conn:
        result = compare_runs(conn, model_a, model_b, threshold_a=0.6, threshold_b=0.65)
    in_a = {k for k, v in table.perturbed.items() if v > 0.6}
    in_b = {k for k, v in table.original.items() if v > 0.65}
    assert (result.a.threshold, result.b.threshold) == (0.6, 0.65)
    assert (result.agreement.n_a, result.agreement.n_b, result.agreement.n_both) == (
        len(in_a),
        len(in_b),
        len(in_a & in_b),
    )
    assert result.agreement.jaccard == len(in_a & in_b) / len(in_a | in_b)
    assert Counter(k[0] for k in in_b) == Counter({c.layer: c.universal_b for c in result.layers if c.universal_b})


def test_models_that_cannot_be_compared_are_refused(tmp_path):
    db = tmp_path / "atlas.db"
    small, medium = import_paper(db, [SMALL, "stanford-gpt2-medium-a"])
    small_id, medium_id = resolve_model(db, small), resolve_model(db, medium)
    with pytest.raises(ComparisonError, match="same model"):
        compare_runs(db, small_id, medium_id)
    with pytest.raises(ComparisonError, match="no model with id 99"):
        compare_runs(db, small_id, 99)
    with pytest.raises(ComparisonError, match="no model 'gpt2'"):
        resolve_model(db, small, "gpt2")
    with pytest.raises(ComparisonError, match="no atlas"):
        compare_runs(tmp_path / "missing.db", 1, 2)
    assert not (tmp_path / "missing.db").exists()


def test_a_run_compared_with_itself_agrees_perfectly(tmp_path):
    db = tmp_path / "atlas.db"
    (run,) = import_paper(db, ["pythia-160m"])
    model = resolve_model(db, run, "pythia-160m")
    result = compare_runs(db, model, model)
    assert (result.agreement.jaccard, result.agreement.precision, result.agreement.recall) == (1.0, 1.0, 1.0)
    assert result.correlation("excess_corr").pearson == pytest.approx(1.0)
    assert all(d.difference == 0 for d in result.disagreements)
