"""The memory plan's arithmetic and its choice of split (issue 11), on a synthetic price function."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from precompute.memory import MemoryBudgetError, MemoryPlan, Split, StageMemory, even_slices, fit_split

MIB = 2**20


def pricer(budget: int):
    """Two splittable stages: `big` holds 96 MiB in as many blocks as its passes, `small` 8 MiB; a batch row is
    4 MiB; writing needs 10 MiB."""

    def price(split: Split) -> MemoryPlan:
        rows = split.batch_rows or 16
        stages = {
            "big": StageMemory(state=96 * MIB // split.passes_for("big"), update=MIB),
            "small": StageMemory(state=8 * MIB // split.passes_for("small"), written=MIB, write=10 * MIB),
        }
        return MemoryPlan(budget, models=20 * MIB, batch=4 * MIB * rows, stages=stages, split=split)

    return price


def test_phases_add_what_is_held_together():
    plan = pricer(10**12)(Split())
    assert plan.phases["streaming"] == 20 * MIB + 64 * MIB + 104 * MIB + MIB
    assert plan.phases["closing a pass"] == 20 * MIB + 104 * MIB
    assert plan.phases["writing"] == 20 * MIB + max(96 * MIB + MIB + 0, MIB + 10 * MIB)
    assert plan.total == plan.phases["streaming"] and plan.fits
    assert "= streaming" in plan.table() and plan.record()["total"] == plan.total


def test_a_roomy_budget_needs_no_split():
    plan = fit_split(pricer(10**12), ["big", "small"], batch_rows=16, max_passes=8)
    assert plan.split == Split({"big": 1, "small": 1}, None)


def test_fewest_passes_first_then_the_largest_batches_then_each_stage_back():
    # one pass fits only with batches of 2 rows (20 + 8 + 104 + 1 = 133 MiB); that is preferred to more passes
    plan = fit_split(pricer(133 * MIB), ["big", "small"], batch_rows=16, max_passes=8)
    assert plan.split == Split({"big": 1, "small": 1}, 2) and plan.fits
    # 100 MiB: `big` must split (96 / 2 = 48), `small` need not
    plan = fit_split(pricer(100 * MIB), ["big", "small"], batch_rows=16, max_passes=8)
    assert plan.split.passes_for("big") == 2 and plan.split.passes_for("small") == 1 and plan.fits
    assert plan.split.batch_rows is not None and plan.total <= 100 * MIB


def test_a_budget_below_the_minimum_is_refused_with_the_minimum():
    smallest = pricer(0)(Split({"big": 8, "small": 8}, 1)).total
    # the message's numbers are beyond the models (20 MiB), which are loaded before the plan and outside the budget
    beyond = rf"needs at least {(smallest - 20 * MIB) / MIB:.1f} MiB of memory beyond its models \(20.0 MiB, loaded\)"
    with pytest.raises(
        MemoryBudgetError, match=beyond + r".*the budget is " + f"{(smallest - 1 - 20 * MIB) / MIB:.1f}"
    ):
        fit_split(pricer(smallest - 1), ["big", "small"], batch_rows=16, max_passes=8)
    assert fit_split(pricer(smallest), ["big", "small"], batch_rows=16, max_passes=8).fits


@given(st.integers(0, 5000), st.integers(1, 600))
def test_even_slices_cover_the_range_in_the_fewest_slices_of_nearly_equal_size(n, most):
    slices = even_slices(n, most)
    sizes = [s.stop - s.start for s in slices]
    assert [s.start for s in slices[1:]] == [s.stop for s in slices[:-1]]  # consecutive
    assert (slices[0].start if slices else 0) == 0 and sum(sizes) == n
    assert len(slices) == -(-n // most) and all(0 < size <= most for size in sizes)
    assert not sizes or max(sizes) - min(sizes) <= 1
