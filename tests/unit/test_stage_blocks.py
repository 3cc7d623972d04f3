"""`family_blocks`: how a splittable stage (stats, families) cuts the family's neurons into its passes, so that a
pass after the first reads one or two models and the others need not run (`Stage.models_in_pass`)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from precompute.stages.base import block_widths, family_blocks, models_with_neurons


@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=6), passes=st.integers(1, 12))
def test_the_family_is_cut_into_consecutive_runs_of_nearly_equal_size(sizes, passes):
    named = {f"m{i}": n for i, n in enumerate(sizes)}
    blocks = family_blocks(named, passes)
    total, step = sum(sizes), -(-sum(sizes) // passes)
    assert list(blocks) == list(named)
    flat = []  # every neuron of the family, in the order the passes take them
    for index in range(passes):
        run = [
            (name, neuron) for name, model in blocks.items() for neuron in range(model[index].start, model[index].stop)
        ]
        assert len(run) <= step  # what the memory plan prices: ceil(neurons / passes) a pass
        flat += run
        names = [name for name, _ in run]
        touched = list(dict.fromkeys(names))
        assert sorted(touched) == sorted(models_with_neurons(blocks, index))
        # the run is consecutive: the models it reads follow each other in the run's order (models without
        # neurons aside)
        positions = [[name for name, n in named.items() if n].index(name) for name in touched]
        assert not positions or positions == list(range(positions[0], positions[0] + len(positions)))
    assert flat == [(name, neuron) for name, n in named.items() for neuron in range(n)]
    assert len(flat) == total
    widths, widest = block_widths(named, passes)
    assert widths == max((sum(b[i].stop - b[i].start for b in blocks.values()) for i in range(passes)), default=0)
    assert widest == max(b.stop - b.start for model in blocks.values() for b in model)


def test_a_pass_after_the_first_reads_one_model_when_the_passes_are_the_models():
    """Five GPT-2-small models in 19 passes (the paper's run on one H200 at the default budget): every pass reads
    one model or two, never the five."""
    blocks = family_blocks({f"seed-{i}": 36_864 for i in range(5)}, 19)
    reads = [len(models_with_neurons(blocks, index)) for index in range(19)]
    assert set(reads) <= {1, 2} and sum(reads) < 19 * 2


def test_a_checkpoint_of_the_older_blocks_is_not_resumed_when_the_blocks_differ():
    """Before `family_blocks` every pass held a block of every model: a checkpoint of such a split run has other
    neurons in its blocks, and streaming starts over; one of an unsplit run (no blocks) resumes."""
    from precompute.memory import Split
    from precompute.pipeline import BLOCK_LAYOUT, _same_blocks

    split = Split({"correlations": 3, "stats": 2, "families": 1})
    assert not _same_blocks({}, split)
    assert _same_blocks({"blocks": BLOCK_LAYOUT}, split)
    assert _same_blocks({}, Split({"correlations": 3}))
    assert not _same_blocks({"blocks": "per-model"}, Split({"families": 2}))
