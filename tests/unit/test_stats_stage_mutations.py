"""The ``stats`` stage itself against independent NumPy oracles (mutation round 7, docs/testing.md).

`precompute.moments` was mutated in round 1; this file pins what the stage adds around it: `StatsStage.update`,
`_update_statistics`, `reduce`, `finish_pass` (per-position sums accumulated per neuron block each pass and closed
into float32 means and standard deviations; token sums and maxima closed into top-k tables), `state_dict` /
`load_state_dict`, the result accessors, `write` with its helpers (rows read back from an `AtlasStore`),
`token_selection` and `tracked_token_ids`.

The data is built by hand: two models whose layer counts, widths and neuron counts differ (m0 2 × 3, m1 3 × 4),
pre-activations on a quarter grid (values exactly on the histogram edges, repeated extremes, a few at -0.05
between the paper's frequency edge and 0), continuous post-activations (no ties in the token tables), a poison
value at the tokens that are not counted, a batch with no counted token, a position with a single counted token
and batches of 3, 1, 4 and 2 rows. The oracles are NumPy float64 on the concatenated selected tokens: moments by
their definitions, per-position mean and population standard deviation, per-token means (above the least count)
and maxima ranked by hand, histograms from explicit edges, and SciPy's within-layer percentiles.
"""

from __future__ import annotations

import io
import itertools
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import scipy.stats
import torch

import precompute.activations
import precompute.stages.stats as stats_module
from precompute.activations import ActivationBatch
from precompute.data import DatasetConfig, TokenDataset
from precompute.memory import Split, chunk_rows
from precompute.moments import paper_frequency_threshold
from precompute.stages.base import family_blocks
from precompute.stages.stats import StatsStage, token_selection, tracked_token_ids
from precompute.store import (
    AtlasStore,
    decode_array,
    decode_counts,
    decode_postings,
    decode_u8,
    token_kind_code,
)
from precompute.weights import NeuronWeights, weight_tables
from tests.factories import TwoRanks

MODELS = (("m0", 2, 3), ("m1", 3, 4))  # name, layers, d_mlp: 6 and 12 neurons
ROWS, CTX, VOCAB = 10, 8, 14  # token ids 1..11 occur; 12 and 13 never do
SPLITS = [3, 4, 5, 8]  # batches of 3, 1 (nothing counted), 1 (one token counted), 3 and 2 rows
POISON = np.float32(50.0)

#: the counted tokens (the default) with every kind of bin and table edge
COUNTED: dict[str, Any] = {
    "bins": 5,
    "pre_range": [-2.0, 3.0],
    "post_range": [-0.5, 2.0],
    "token_top_k": 3,
    "token_min_count": 4,
}
#: every token, the first 37 of them, only the 5 most frequent ids tracked, top-k above the tracked ids
ALL_CAPPED: dict[str, Any] = {
    "bins": 4,
    "pre_range": [-1.0, 1.0],
    "post_range": [0.0, 3.0],
    "token_top_k": 8,
    "token_min_count": 1,
    "max_vocab": 5,
    "tokens": "all",
    "max_tokens": 37,
}


def build(analysis: dict[str, Any], passes: int = 1, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """A run context of real dataclasses and the raw data: rows, counted mask, activations per model and hook."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(1, VOCAB - 2, size=(ROWS, CTX))
    rows[:, 0] = 0  # BOS, never counted
    counted = (rows != 0) & (rng.random(rows.shape) > 0.2)
    counted[3] = False  # the first 1-row batch counts nothing
    counted[4] = False
    counted[4, 2] = True  # the second counts one token
    counted[:, CTX - 1] = False
    counted[5, CTX - 1] = True  # one counted token at the last position: its spread is 0
    acts: dict[str, dict[str, np.ndarray]] = {}
    for name, layers, d in MODELS:
        shape = (ROWS, CTX, layers, d)
        pre = (np.round(rng.normal(0.3, 1.5, size=shape) * 4) / 4).astype(np.float32)
        pre[rng.random(shape) < 0.05] = -0.05  # above the paper's edge, not above 0
        pre[rng.random(shape) < 0.05] = paper_frequency_threshold()  # on the edge: not above it
        offset = 0.1 * np.arange(layers * d, dtype=np.float32).reshape(layers, d)
        post = (np.exp(rng.normal(0, 0.7, size=shape)) - 0.8 + offset).astype(np.float32)
        acts[name] = {"hook_pre": pre, "hook_post": post}
    if analysis.get("tokens", "counted") == "counted":  # a leak of an uncounted token moves everything
        for hooks in acts.values():
            for x in hooks.values():
                x[~counted] = POISON
    dataset = TokenDataset(rows, counted, DatasetConfig(batch_size=4), CTX, {})
    models = [
        SimpleNamespace(name=name, n_layers=layers, d_mlp=d, n_neurons=layers * d, d_vocab=VOCAB, d_model=4)
        for name, layers, d in MODELS
    ]
    context = SimpleNamespace(
        config=SimpleNamespace(analysis={"stats": analysis}, device="cpu"),
        dataset=dataset,
        models=models,
        model_ids={"m0": 1, "m1": 2},
        split=Split({"stats": passes}),
    )
    return context, {"rows": rows, "counted": counted, "acts": acts}


def batches_of(data: dict[str, Any]) -> list[ActivationBatch]:
    bounds = [0, *SPLITS, ROWS]
    batches = []
    for start, stop in itertools.pairwise(bounds):
        batches.append(
            ActivationBatch(
                start,
                torch.from_numpy(data["rows"][start:stop]),
                torch.from_numpy(data["counted"][start:stop]),
                {name: torch.from_numpy(a["hook_post"][start:stop]) for name, a in data["acts"].items()},
                {name: torch.from_numpy(a["hook_pre"][start:stop]) for name, a in data["acts"].items()},
            )
        )
    return batches


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """A batch's counted tokens in chunks of at most 3 (`ActivationBatch.token_chunks`), the writes in chunks of 4
    neurons: every loop over chunks runs several times, the last one short."""

    def three(n_columns: int, itemsize: int = 8, budget: int = 2**30) -> int:
        return chunk_rows(n_columns, itemsize, min(budget, 3 * n_columns * itemsize))

    monkeypatch.setattr(precompute.activations, "chunk_rows", three)
    monkeypatch.setattr(stats_module, "WRITE_CHUNK_ROWS", 4)


# --- the oracle ----------------------------------------------------------------------------------------------


def selected_mask(data: dict[str, Any], analysis: dict[str, Any]) -> np.ndarray:
    """[rows, ctx] the tokens the statistics read: counted ones or all, the first max_tokens in row order."""
    base = data["counted"] if analysis.get("tokens", "counted") == "counted" else np.ones_like(data["counted"])
    cap = analysis.get("max_tokens")
    if cap is None:
        return base
    flat = base.reshape(-1)
    return (flat & (np.cumsum(flat) <= cap)).reshape(base.shape)


def tracked_by_hand(tokens: np.ndarray, max_vocab: int | None) -> np.ndarray:
    """Ids seen at least once, most frequent first (ties: the lower id), the first max_vocab of them, sorted."""
    counts = np.bincount(tokens, minlength=VOCAB)
    order = sorted((-int(counts[t]), int(t)) for t in np.flatnonzero(counts))
    return np.sort(np.array([t for _, t in order[:max_vocab]], dtype=np.int64))


def oracle(data: dict[str, Any], analysis: dict[str, Any]) -> dict[str, Any]:
    mask = selected_mask(data, analysis)
    tokens = data["rows"][mask]
    positions = np.nonzero(mask)[1]
    tracked = tracked_by_hand(tokens, analysis.get("max_vocab"))
    k = min(analysis["token_top_k"], len(tracked))
    edge = float(paper_frequency_threshold())
    out: dict[str, Any] = {
        "tracked": tracked,
        "position_count": np.bincount(positions, minlength=CTX),
        "token_count": {int(t): int((tokens == t).sum()) for t in tracked},
        "n": int(mask.sum()),
    }
    for name, layers, d in MODELS:
        model: dict[str, Any] = {}
        for hook, key in (("pre", "hook_pre"), ("post", "hook_post")):
            x = data["acts"][name][key][mask].reshape(-1, layers * d).astype(np.float64)
            mean = x.mean(0)
            centred = x - mean
            var = (centred**2).mean(0)
            model[f"{hook}_mean"], model[f"{hook}_var"] = mean, var
            model[f"{hook}_skew"] = (centred**3).mean(0) / var**1.5
            model[f"{hook}_kurt"] = (centred**4).mean(0) / var**2
            model[f"{hook}_min"], model[f"{hook}_max"] = x.min(0), x.max(0)
            low, high = analysis[f"{hook}_range"]
            edges = np.linspace(low, high, analysis["bins"] + 1)
            hist = np.zeros((layers * d, analysis["bins"] + 2), dtype=np.int64)
            for n in range(layers * d):
                inside = (x[:, n] >= low) & (x[:, n] < high)
                hist[n, 0], hist[n, -1] = (x[:, n] < low).sum(), (x[:, n] >= high).sum()
                hist[n, 1:-1] = np.histogram(x[inside, n], bins=edges)[0]
            model[f"{hook}_hist"] = hist
            profile_mean = np.full((CTX, layers * d), np.nan)
            profile_std = np.full((CTX, layers * d), np.nan)
            for p in range(CTX):
                here = x[positions == p]
                if len(here):
                    profile_mean[p], profile_std[p] = here.mean(0), here.std(0)
            model[f"{hook}_position_mean"], model[f"{hook}_position_std"] = profile_mean, profile_std
        pre = data["acts"][name]["hook_pre"][mask].reshape(-1, layers * d)
        model["frequency"] = (pre > 0).mean(0)
        model["frequency_paper"] = (pre > edge).mean(0)
        post = data["acts"][name]["hook_post"][mask].reshape(-1, layers * d).astype(np.float64)
        tables: dict[str, list[list[tuple[int, float, int]]]] = {"mean_activation": [], "max_activation": []}
        for n in range(layers * d):
            means, maxima = [], []
            for t in tracked:
                values = post[tokens == t, n]
                if len(values) >= analysis["token_min_count"]:
                    means.append((values.mean(), int(t), len(values)))
                maxima.append((values.max(), int(t), len(values)))
            for kind, entries in (("mean_activation", means), ("max_activation", maxima)):
                ranked = sorted(entries, key=lambda e: -e[0])[:k]
                tables[kind].append([(t, v, c) for v, t, c in ranked])
        model["tables"] = tables
        out[name] = model
    return out


# --- running the stage ---------------------------------------------------------------------------------------


def run_stage(context: Any, batches: list[ActivationBatch]) -> StatsStage:
    stage = StatsStage(context)
    passes = 0
    while not stage.done_streaming:
        for batch in batches:
            stage.update(batch)
        stage.finish_pass()
        passes += 1
    assert passes == context.split.passes_for("stats")
    return stage


def check_stage(stage: StatsStage, expected: dict[str, Any]) -> None:
    """Every statistic the stage holds against the oracle."""
    np.testing.assert_array_equal(stage.tracked.numpy(), expected["tracked"])
    np.testing.assert_array_equal(stage.shared["position_count"].numpy(), expected["position_count"])
    np.testing.assert_array_equal(stage.shared["token_count"].numpy(), list(expected["token_count"].values()))
    for name, layers, d in MODELS:
        model = expected[name]
        columns = stage.activation_columns(name)
        assert stage.state[name]["pre_moments"].n == stage.state[name]["post_moments"].n == expected["n"]
        for hook in ("pre", "post"):
            np.testing.assert_allclose(columns[f"{hook}_mean"], model[f"{hook}_mean"], rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(columns[f"{hook}_var"], model[f"{hook}_var"], rtol=1e-9)
            np.testing.assert_allclose(columns[f"{hook}_skew"], model[f"{hook}_skew"], rtol=1e-7, atol=1e-9)
            np.testing.assert_allclose(columns[f"{hook}_kurt"], model[f"{hook}_kurt"], rtol=1e-7)
            np.testing.assert_array_equal(columns[f"{hook}_min"], model[f"{hook}_min"])
            np.testing.assert_array_equal(columns[f"{hook}_max"], model[f"{hook}_max"])
            hist = stage.state[name][f"{hook}_hist"].numpy().reshape(layers * d, -1)
            np.testing.assert_array_equal(hist, model[f"{hook}_hist"])
            mean, std = stage.position_profile(name, hook)
            assert mean.dtype == std.dtype == np.float32 and mean.shape == (CTX, layers * d)
            np.testing.assert_allclose(mean, model[f"{hook}_position_mean"], rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(std, model[f"{hook}_position_std"], rtol=1e-5, atol=1e-5)
            part_mean, part_std = stage.position_profile(name, hook, slice(2, 5))
            np.testing.assert_array_equal(part_mean, mean[:, 2:5], strict=True)
            np.testing.assert_array_equal(part_std, std[:, 2:5], strict=True)
        np.testing.assert_array_equal(columns["frequency"], model["frequency"])
        np.testing.assert_array_equal(columns["frequency_paper"], model["frequency_paper"])
        assert (columns["frequency_paper"] > columns["frequency"]).any()  # the -0.05 values count only there
        check_token_tables(stage.token_columns(name, 7, d), model["tables"], layers, d, model_id=7)


def check_token_tables(tables: list[dict[str, Any]], expected: dict[str, list], layers: int, d: int, model_id: int):
    assert len(tables) == 2
    for table, kind in zip(tables, ("mean_activation", "max_activation"), strict=True):
        assert table["kind"] == token_kind_code(kind)
        assert np.all(np.asarray(table["model_id"]) == model_id)
        got: list[list[tuple[int, float, int]]] = [[] for _ in range(layers * d)]
        for i in range(len(table["rank"])):
            flat = int(table["layer"][i]) * d + int(table["neuron"][i])
            assert table["rank"][i] == len(got[flat])
            got[flat].append((int(table["token_id"][i]), float(table["value"][i]), int(table["count"][i])))
        for n in range(layers * d):
            assert [(t, c) for t, _, c in got[n]] == [(t, c) for t, _, c in expected[kind][n]], (kind, n)
            np.testing.assert_allclose([v for _, v, _ in got[n]], [v for _, v, _ in expected[kind][n]], rtol=1e-12)


@pytest.mark.parametrize("passes", [1, 3, 4], ids=["one-pass", "three-blocks", "four-blocks-last-empty"])
@pytest.mark.parametrize("analysis", [COUNTED, ALL_CAPPED], ids=["counted", "all-capped"])
def test_every_statistic_matches_numpy_in_one_pass_and_in_neuron_blocks(analysis, passes):
    """Moments, extremes, frequencies, histograms, position profiles and both token tables of every model, after
    one pass or after passes over neuron blocks (m0's 6 neurons in 4 passes: blocks of 2, the last one empty)."""
    context, data = build(analysis, passes)
    stage = run_stage(context, batches_of(data))
    check_stage(stage, oracle(data, analysis))
    if analysis is ALL_CAPPED:
        assert stage.top_k == 5 and len(stage.tracked) == 5  # token_top_k 8, 5 ids tracked
    assert stage.pass_index == passes and stage.token_block == {}


def test_tokens_that_are_not_tracked_count_nowhere_and_low_counts_leave_the_mean_table():
    """max_vocab below the ids that occur, over the counted tokens: the dropped ids are in no table and no count;
    a token below token_min_count is in the max table only."""
    analysis = COUNTED | {"max_vocab": 6, "token_min_count": 6}
    context, data = build(analysis, passes=2)
    stage = run_stage(context, batches_of(data))
    expected = oracle(data, analysis)
    check_stage(stage, expected)
    seen = np.unique(data["rows"][data["counted"]])
    assert len(seen) > 6 and len(expected["tracked"]) == 6
    assert min(expected["token_count"].values()) < 6  # some tracked token misses the mean table


def test_token_selection_and_tracked_ids_by_hand():
    rows = np.array([[0, 3, 3, 5, 2, 2], [0, 5, 4, 4, 9, 1]])
    counted = rows != 0
    counted[1, 4] = False  # 9 is never counted
    dataset = TokenDataset(rows, counted, DatasetConfig(batch_size=4), 6, {})
    inputs: Any = SimpleNamespace(dataset=dataset)
    config = stats_module.StatsConfig(max_vocab=3)
    selection = token_selection(inputs, config)
    assert selection.is_counted and selection.n_tokens == 9
    # counts among counted tokens: 1:1, 2:2, 3:2, 4:2, 5:2 -> the three most frequent, ties by the lower id
    np.testing.assert_array_equal(tracked_token_ids(inputs, config), [2, 3, 4])
    everything = stats_module.StatsConfig(tokens="all", max_tokens=7)
    assert token_selection(inputs, everything).n_tokens == 7
    np.testing.assert_array_equal(tracked_token_ids(inputs, everything), [0, 2, 3, 5])
    np.testing.assert_array_equal(tracked_token_ids(inputs, stats_module.StatsConfig()), [1, 2, 3, 4, 5])


def test_a_stage_that_read_no_token_has_nan_columns():
    context, data = build(COUNTED)
    data["counted"][:] = False
    data["counted"][0, 1] = True  # the selection tracks one token; the batches below hold none
    batches = [b for b in batches_of(data) if b.row_start == 3]  # the batch with no counted token
    stage = StatsStage(context)
    batches[0].counted[:] = False
    stage.update(batches[0])
    stage.finish_pass()
    columns = stage.activation_columns("m1")
    assert set(columns) == set(stats_module.ACTIVATION_STAT_COLUMNS)
    assert all(np.isnan(v).all() and v.shape == (12,) for v in columns.values())


def test_a_stage_that_read_one_token_has_frequencies_of_zero_and_one():
    """One counted token (the 1-row batch's): each frequency is 0 or 1, the mean is the value, the variance 0."""
    context, data = build(COUNTED)
    one = [b for b in batches_of(data) if b.row_start == 4]
    assert one[0].n_counted == 1
    stage = StatsStage(context)
    stage.update(one[0])
    stage.finish_pass()
    columns = stage.activation_columns("m1")
    pre = data["acts"]["m1"]["hook_pre"][4, 2].reshape(-1)
    assert (pre > 0).any() and not (pre > 0).all()
    np.testing.assert_array_equal(columns["frequency"], (pre > 0).astype(np.float64))
    np.testing.assert_array_equal(columns["frequency_paper"], (pre > paper_frequency_threshold()).astype(np.float64))
    np.testing.assert_array_equal(columns["pre_mean"], pre.astype(np.float64))
    np.testing.assert_array_equal(columns["pre_var"], np.zeros(12))


# --- checkpoints and ranks -----------------------------------------------------------------------------------


def copied(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint as written and read back (no tensor shared with the stage that saved it)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize(("stop_pass", "stop_batch"), [(0, 2), (1, 1), (2, 4)])
def test_a_checkpoint_mid_pass_resumes_to_the_uninterrupted_run(stop_pass, stop_batch):
    """Saved after `stop_batch` batches of pass `stop_pass` (3 passes), loaded into a new stage that streams the
    rest: every state tensor is bitwise the uninterrupted run's, and so is what it writes."""
    context, data = build(COUNTED, passes=3)
    batches = batches_of(data)
    whole = run_stage(context, batches)
    first = StatsStage(context)
    for _ in range(stop_pass):
        for batch in batches:
            first.update(batch)
        first.finish_pass()
    for batch in batches[:stop_batch]:
        first.update(batch)
    resumed = StatsStage(context)
    resumed.load_state_dict(copied(first.state_dict()))
    assert resumed.pass_index == stop_pass and not resumed.done_streaming
    for batch in batches[stop_batch:]:
        resumed.update(batch)
    resumed.finish_pass()
    while not resumed.done_streaming:
        for batch in batches:
            resumed.update(batch)
        resumed.finish_pass()
    assert resumed.pass_index == whole.pass_index == 3
    assert_same_state(resumed, whole)
    if stop_pass == 0:  # a checkpoint written before the stage split its passes has no pass index: pass 0
        old = copied(first.state_dict())
        del old["pass_index"]
        legacy = StatsStage(context)
        legacy.load_state_dict(old)
        assert legacy.pass_index == 0
        for batch in batches[stop_batch:]:
            legacy.update(batch)
        legacy.finish_pass()
        assert legacy.pass_index == 1
        for name, _, _ in MODELS:
            for hook in ("pre", "post"):
                for key in ("position_mean", "position_std"):
                    state = whole.state[name][f"{hook}_{key}"][:, : legacy.blocks[name][0].stop]
                    assert torch.equal(
                        legacy.state[name][f"{hook}_{key}"][:, : legacy.blocks[name][0].stop].nan_to_num(),
                        state.nan_to_num(),
                    )
    done = StatsStage(context)
    done.load_state_dict(copied(whole.state_dict()))
    assert done.done_streaming and done.pass_index == 3
    assert_same_state(done, whole)


def assert_same_state(got: StatsStage, expected: StatsStage) -> None:
    for key, value in expected.shared.items():
        assert torch.equal(got.shared[key], value), key
    for name, state in expected.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(got.state[name][key], value) or (
                    torch.equal(got.state[name][key].isnan(), value.isnan())
                    and torch.equal(got.state[name][key].nan_to_num(), value.nan_to_num())
                ), (name, key)
            else:
                assert got.state[name][key].n == value.n and torch.equal(got.state[name][key].sums, value.sums)


@pytest.mark.parametrize("passes", [1, 3])
def test_two_ranks_reduced_equal_one_process(passes):
    """Rank 0 streams the first two batches, rank 1 the last two; `reduce` before each pass closes: both hold one
    process's statistics and tables (sums added, minima and maxima taken, pass 0's statistics added once)."""
    context, data = build(COUNTED, passes)
    batches = batches_of(data)
    expected = oracle(data, COUNTED)
    stages = [StatsStage(context), StatsStage(context)]
    shares = [batches[:2], batches[2:]]
    while not stages[0].done_streaming:
        TwoRanks().run_pass(stages, shares)
    for stage in stages:
        check_stage(stage, expected)


# --- writing -------------------------------------------------------------------------------------------------


def fake_weights(model: SimpleNamespace, device: Any = None) -> NeuronWeights:
    """Processed weights of the right shapes (drawn from the model's size), on the CPU whatever the device."""
    generator = torch.Generator().manual_seed(model.n_neurons)
    layers, d, d_model = model.n_layers, model.d_mlp, model.d_model

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    return NeuronWeights(
        draw(layers, d_model, d), draw(layers, d), draw(layers, d, d_model), draw(d_model, VOCAB), draw(VOCAB, d_model)
    )


def query(store: AtlasStore, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with store.engine.connect() as conn:
        return [tuple(row) for row in conn.exec_driver_sql(sql, params).fetchall()]


def test_write_puts_every_table_in_the_store(tmp_path, monkeypatch):
    """`write` after a 3-pass run, read back from the SQLite file: activation_stats, histograms, position counts
    and profiles, weight_stats, token tables and postings, and within-layer percentiles, against the oracle."""
    context, data = build(COUNTED, passes=3)
    stage = run_stage(context, batches_of(data))
    expected = oracle(data, COUNTED)
    devices: list[Any] = []

    def weights_on(model: SimpleNamespace, device: Any = None) -> NeuronWeights:
        devices.append(device)
        return fake_weights(model)

    monkeypatch.setattr(stats_module, "processed_weights", weights_on)
    with AtlasStore(tmp_path / "atlas.db") as store:
        run_id = store.create_run({}, {}, {})
        ids = {}
        for position, (name, layers, d) in enumerate(MODELS):
            ids[name] = store.add_model(
                run_id,
                name=name,
                source=name,
                position=position,
                is_reference=position == 0,
                n_layers=layers,
                d_model=4,
                d_mlp=d,
                d_vocab=VOCAB,
                n_ctx=CTX,
                n_heads=1,
                act_fn="gelu_new",
                processing={},
                tokenizer_hash="x",
            )
        context.store, context.model_ids = store, ids
        stage.write(context)
        assert devices == [torch.device("cpu")] * len(MODELS)  # the run's device (a CUDA run's GPU)
        for model in context.models:
            check_written(store, ids[model.name], model, expected[model.name], expected)


def check_written(store: AtlasStore, model_id: int, model: SimpleNamespace, expected: dict, shared: dict) -> None:
    n, d = model.n_neurons, model.d_mlp
    keys = query(
        store, "SELECT layer, neuron, n_tokens FROM activation_stats WHERE model_id = ? ORDER BY 1, 2", model_id
    )
    assert keys == [(i // d, i % d, shared["n"]) for i in range(n)]
    names = list(stats_module.ACTIVATION_STAT_COLUMNS)
    stored = store.model_columns(stats_module.activation_stats, model_id, names)
    for column in names:
        np.testing.assert_allclose(stored[column], expected[column], rtol=1e-7, atol=1e-9, err_msg=column)
    # histograms: both hooks, every neuron, the configured range and bins
    for hook, kind in (("pre", "hook_pre"), ("post", "hook_post")):
        rows = query(
            store,
            "SELECT layer, neuron, low, high, n_bins, counts FROM histograms WHERE model_id = ? AND hook = ? "
            "ORDER BY layer, neuron",
            model_id,
            kind,
        )
        assert [(r[0], r[1]) for r in rows] == [(i // d, i % d) for i in range(n)]
        low, high = COUNTED[f"{hook}_range"]
        assert {r[2:5] for r in rows} == {(low, high, COUNTED["bins"])}
        np.testing.assert_array_equal(np.stack([decode_counts(r[5]) for r in rows]), expected[f"{hook}_hist"])
        rows = query(
            store,
            "SELECT layer, neuron, mean, std FROM position_profiles WHERE model_id = ? AND hook = ? ORDER BY 1, 2",
            model_id,
            kind,
        )
        assert [(r[0], r[1]) for r in rows] == [(i // d, i % d) for i in range(n)]
        for i, (_, _, mean, std) in enumerate(rows):
            for blob, values in (
                (mean, expected[f"{hook}_position_mean"][:, i]),
                (std, expected[f"{hook}_position_std"][:, i]),
            ):
                decoded = decode_u8(blob)
                finite = values[np.isfinite(values)]
                step = (finite.max() - finite.min()) / 254
                np.testing.assert_array_equal(np.isnan(decoded), np.isnan(values))
                np.testing.assert_allclose(decoded, values, atol=step / 2 + 1e-5, rtol=0)
    (count,) = query(store, "SELECT count FROM position_counts WHERE model_id = ?", model_id)
    np.testing.assert_array_equal(np.frombuffer(count[0], dtype="<i8"), shared["position_count"])
    # weight statistics and the vocabulary tables: what `weight_tables` makes of the model's weights
    statistics, projection = weight_tables(fake_weights(model), top_k=min(20, VOCAB))
    assert projection is not None
    stored_weights = store.model_columns(stats_module.weight_stats, model_id, sorted(statistics))
    for column, values in statistics.items():
        np.testing.assert_allclose(stored_weights[column], values.reshape(-1), rtol=1e-6, atol=1e-9, err_msg=column)
    tables = {
        (layer, neuron, kind): (
            decode_array(ids),
            decode_array(values),
            None if counts is None else decode_array(counts),
        )
        for layer, neuron, kind, ids, values, counts in query(
            store,
            "SELECT layer, neuron, kind, token_ids, token_values, counts FROM token_tables WHERE model_id = ?",
            model_id,
        )
    }
    for kind in ("unembed_top", "unembed_bottom", "embed_top"):
        ids = getattr(projection, f"{kind}_ids").reshape(n, -1)
        values = getattr(projection, f"{kind}_values").reshape(n, -1)
        for i in range(n):
            got_ids, got_values, counts = tables[(i // d, i % d, token_kind_code(kind))]
            np.testing.assert_array_equal(got_ids, ids[i])
            np.testing.assert_allclose(got_values, values[i], rtol=1e-6)
            assert counts is None
    for kind in ("mean_activation", "max_activation"):
        for i in range(n):
            entries = expected["tables"][kind][i]
            key = (i // d, i % d, token_kind_code(kind))
            if not entries:
                assert key not in tables
                continue
            got_ids, got_values, counts = tables[key]
            assert got_ids.tolist() == [t for t, _, _ in entries]
            assert counts is not None and counts.tolist() == [c for _, _, c in entries]
            np.testing.assert_allclose(got_values, [v for _, v, _ in entries], rtol=1e-7)
    # postings: (kind, token) -> the neurons listing it, with the rank
    postings = {
        (kind, token): decode_postings(blob).tolist()
        for kind, token, blob in query(
            store, "SELECT kind, token_id, postings FROM token_postings WHERE model_id = ?", model_id
        )
    }
    expected_postings: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for kind in ("mean_activation", "max_activation"):
        for i, entries in enumerate(expected["tables"][kind]):
            for rank, (token, _, _) in enumerate(entries):
                expected_postings.setdefault((token_kind_code(kind), token), []).append((i, rank))
    for kind in ("unembed_top", "unembed_bottom", "embed_top"):
        for i, row in enumerate(getattr(projection, f"{kind}_ids").reshape(n, -1)):
            for rank, token in enumerate(row.tolist()):
                expected_postings.setdefault((token_kind_code(kind), token), []).append((i, rank))
    assert postings == {key: sorted(value) for key, value in expected_postings.items()}
    # percentiles: SciPy's rank percentile within the layer of each statistic (read back), NaN where not finite
    statistics_rows = query(
        store, "SELECT position, statistic FROM percentile_statistics WHERE model_id = ? ORDER BY 1", model_id
    )
    everything = names + sorted(statistics)
    assert [s for _, s in statistics_rows] == sorted(everything)
    assert [p for p, _ in statistics_rows] == list(range(len(everything)))
    values = dict(stored) | dict(stored_weights)
    rows = query(store, "SELECT layer, neuron, percentiles FROM percentiles WHERE model_id = ? ORDER BY 1, 2", model_id)
    assert [(r[0], r[1]) for r in rows] == [(i // d, i % d) for i in range(n)]
    got = np.stack([decode_array(r[2]) for r in rows])
    for j, (_, statistic) in enumerate(statistics_rows):
        by_layer = values[statistic].reshape(model.n_layers, d)
        for i in range(n):
            layer = by_layer[i // d]
            finite = layer[np.isfinite(layer)]
            if not np.isfinite(layer[i % d]):
                assert np.isnan(got[i, j])
            else:
                expected_rank = scipy.stats.percentileofscore(finite, layer[i % d], kind="rank")
                assert got[i, j] == pytest.approx(expected_rank, rel=1e-6), (statistic, i)


# --- the settings and what the stage holds -----------------------------------------------------------------------


def test_settings_refused_with_their_name_and_accepted_on_the_edge():
    config: Any = stats_module.StatsConfig
    for key in ("bins", "token_top_k", "token_min_count", "vocab_top_k"):
        assert getattr(config(**{key: 1}), key) == 1
        with pytest.raises(stats_module.ConfigError, match=rf"^stats\.{key} must be at least 1, got 0$"):
            config(**{key: 0})
    for key in ("max_vocab", "max_tokens"):
        assert getattr(config(**{key: 1}), key) == 1 and getattr(config(**{key: None}), key) is None
        with pytest.raises(stats_module.ConfigError, match=rf"^stats\.{key} must be at least 1 or null, got 0$"):
            config(**{key: 0})
    context, _ = build(COUNTED | {"bin": 3})
    with pytest.raises(stats_module.ConfigError, match=r"^unknown stats setting 'bin'; settings are bins, "):
        StatsStage(context)
    for key in ("pre_range", "post_range"):
        assert getattr(config(**{key: (-1e-9, 0.0)}), key) == (-1e-9, 0.0)
        for bad in ((1.0, 1.0), (2.0, 1.0), (0.0,), (0.0, 1.0, 2.0)):
            message = rf"^stats\.{key} must be \[low, high\] with low < high, got \[{', '.join(map(str, bad))}\]$"
            with pytest.raises(stats_module.ConfigError, match=message):
                config(**{key: bad})


def test_state_and_block_dtypes_and_shapes():
    """What the stage holds, as `memory_bytes` prices it: exact counts (int64), float64 sums and token values,
    float32 extremes and closed position profiles; this pass's block of sums and maxima of its neurons only."""
    context, data = build(COUNTED, passes=3)
    stage = StatsStage(context)
    assert stage.models_in_pass() is None  # the first pass's statistics read every model
    for batch in batches_of(data):
        stage.update(batch)
    tracked = len(stage.tracked)
    # the family's 18 neurons in 3 runs of 6 (`family_blocks`): m0's 6, then m1's first 6, then its last 6
    blocks = family_blocks({name: layers * d for name, layers, d in MODELS}, 3)
    assert [(b.start, b.stop) for b in blocks["m0"]] == [(0, 6), (6, 6), (6, 6)]
    assert [(b.start, b.stop) for b in blocks["m1"]] == [(0, 0), (0, 6), (6, 12)]
    assert stage.blocks == blocks
    for name, layers, d in MODELS:
        n, state, block = layers * d, stage.state[name], stage.token_block[name]
        width = blocks[name][0].stop - blocks[name][0].start
        assert (state["frequency"].dtype, state["frequency"].shape) == (torch.float64, (n,))
        assert (state["frequency_paper"].dtype, state["frequency_paper"].shape) == (torch.int64, (n,))
        for kind in ("mean_activation", "max_activation"):
            assert (state[f"{kind}_value"].dtype, state[f"{kind}_value"].shape) == (torch.float64, (3, n))
            assert (state[f"{kind}_slot"].dtype, state[f"{kind}_slot"].shape) == (torch.int64, (3, n))
        for hook in ("pre", "post"):
            assert (state[f"{hook}_min"].dtype, state[f"{hook}_max"].dtype) == (torch.float32, torch.float32)
            assert (state[f"{hook}_hist"].dtype, state[f"{hook}_hist"].shape) == (torch.int64, (n * 7,))
            for key in ("position_mean", "position_std"):
                assert (state[f"{hook}_{key}"].dtype, state[f"{hook}_{key}"].shape) == (torch.float32, (CTX, n))
                assert state[f"{hook}_{key}"].isnan().all()  # nothing closed yet
            for key in ("position_sum", "position_sq"):
                assert (block[f"{hook}_{key}"].dtype, block[f"{hook}_{key}"].shape) == (torch.float64, (CTX, width))
        assert (block["sum"].dtype, block["sum"].shape) == (torch.float64, (tracked, width))
        assert (block["max"].dtype, block["max"].shape) == (torch.float32, (tracked, width))
    assert stage.shared["position_count"].dtype == stage.shared["token_count"].dtype == torch.int64
    assert stage.slot.dtype == torch.int64 and stage.slot.shape == (VOCAB,)
    assert (stage.slot[stage.tracked] == torch.arange(tracked)).all() and (stage.slot >= 0).sum() == tracked
    stage.finish_pass()
    assert stage.models_in_pass() == {"m1"}  # the second block is m1's alone: m0 need not run
    for name, _layers, _d in MODELS:  # the second block: the next neurons, the first block's profile closed
        first, second = blocks[name][0], blocks[name][1]
        assert stage.token_block[name]["sum"].shape == (tracked, second.stop - second.start)
        assert not stage.state[name]["post_position_mean"][1:-1, first].isnan().any()
        assert stage.state[name]["post_position_mean"][:, first.stop :].isnan().all()
