"""The examples stage against brute force over the concatenated activations (issue 3 part 3)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from precompute.activations import ActivationBatch
from precompute.data import DatasetConfig, TokenDataset
from precompute.pipeline import ConfigError
from precompute.stages.examples import ExamplesStage, gather_windows
from precompute.store import U8_HEADER, decode_u8, encode_u8, example_columns

N_ROWS, CTX, N_LAYERS, D_MLP = 14, 40, 2, 4


def synthetic_run(analysis: dict | None = None, seed: int = 0):
    """A context of real dataclasses and random activations [rows, ctx, n_neurons], in batches of 5 rows."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(1, 50, size=(N_ROWS, CTX))
    rows[:, 0] = 0
    counted = (rows != 0) & (rng.random(rows.shape) > 0.1)
    dataset = TokenDataset(rows, counted, DatasetConfig(batch_size=5), CTX, {})
    model = SimpleNamespace(name="m", n_layers=N_LAYERS, d_mlp=D_MLP, n_neurons=N_LAYERS * D_MLP)
    context = SimpleNamespace(
        config=SimpleNamespace(analysis={"examples": analysis or {}}, device="cpu"),
        dataset=dataset,
        models=[model],
        model_ids={"m": 3},
    )
    post = torch.from_numpy(rng.standard_gamma(0.7, size=(N_ROWS, CTX, N_LAYERS, D_MLP)).astype(np.float32))
    batches = [
        ActivationBatch(
            s,
            torch.from_numpy(rows[s : s + 5]),
            torch.from_numpy(counted[s : s + 5]),
            {"m": post[s : s + 5].contiguous()},
            {},
        )
        for s in range(0, N_ROWS, 5)
    ]
    return context, batches, post.reshape(N_ROWS, CTX, -1).numpy()


def run_stage(context, batches) -> ExamplesStage:
    stage = ExamplesStage(context)
    for batch in batches:
        stage.update(batch)
    stage.finish_pass()
    return stage


def test_memory_estimate_is_the_state_the_stage_holds():
    from tests.factories import tensor_bytes

    for analysis in (None, {"top": 3, "quantiles": [0.5, 0.9], "per_bin": 2, "random": 1, "before": 3}):
        context, batches, _ = synthetic_run(analysis)
        stage = run_stage(context, batches)
        assert stage.state["m"]["edges"] is not None
        assert ExamplesStage.memory_bytes(context).state == tensor_bytes(stage.state)


def stored(stage: ExamplesStage, context) -> list[dict]:
    rows = list(stage.example_rows("m", 3, D_MLP, context.dataset.rows))
    for row in rows:
        row["flat"] = row["layer"] * D_MLP + row["neuron"]
        # the snippet's tokens are stored once per dataset row (``example_rows``), its activations as uint8 codes on
        # one scale for the neuron and kind (its `encode_u8` header)
        row["activation_array"] = decode_u8(row["snippet_scale"] + row["snippet_codes"])
        row["step"] = U8_HEADER.unpack(row["snippet_scale"])[1]
        start = row["start"]
        row["token_array"] = context.dataset.rows[row["dataset_row"], start : start + row["activation_array"].size]
        assert row["peak_token"] == row["token_array"][row["peak"]]
    return rows


def test_top_examples_are_the_best_row_maxima_with_their_contexts():
    context, batches, post = synthetic_run({"top": 6})
    rows = stored(run_stage(context, batches), context)
    masked = np.where(context.dataset.counted[..., None], post, -np.inf)  # [rows, ctx, n]
    row_max = masked.max(axis=1)  # [rows, n]
    for flat in range(N_LAYERS * D_MLP):
        top = [r for r in rows if r["flat"] == flat and r["kind"] == "top"]
        assert [r["rank"] for r in top] == list(range(6))
        expected_rows = np.argsort(-row_max[:, flat], kind="stable")[:6]
        assert [r["dataset_row"] for r in top] == expected_rows.tolist()  # one per row, best first
        assert top[0]["activation"] == masked[..., flat].max()
        for r in top:
            pos = r["start"] + r["peak"]
            assert context.dataset.counted[r["dataset_row"], pos]
            assert r["activation"] == post[r["dataset_row"], pos, flat]
            end = min(CTX, pos + 9)
            assert r["start"] == max(0, pos - 24)
            np.testing.assert_array_equal(r["token_array"], context.dataset.rows[r["dataset_row"], r["start"] : end])
            expected = post[r["dataset_row"], r["start"] : end, flat].astype(np.float16).astype(np.float64)
            assert r["step"] >= np.ptp(expected) / 254 * (1 - 1e-6)  # the row's range holds the snippet's
            # uint8 codes: within half a step of the row's range (float32 low and step)
            np.testing.assert_allclose(r["activation_array"], expected, rtol=0, atol=r["step"] / 2 * 1.01 + 1e-6)


def test_quantile_bins_hold_every_token_of_the_bin_when_per_bin_is_large():
    context, batches, post = synthetic_run({"per_bin": 1000, "quantiles": [0.5, 0.9]})
    stage = run_stage(context, batches)
    rows = stored(stage, context)
    counted = context.dataset.counted
    first = post[:5][counted[:5]]  # the pilot batch sets the edges
    for flat in range(N_LAYERS * D_MLP):
        edges = np.quantile(first[:, flat], [0.5, 0.9], method="closest_observation")
        values = post[..., flat][counted]
        bins = np.searchsorted(edges, values, side="right")
        for b in range(3):
            sample = [r for r in rows if r["flat"] == flat and r["kind"] == "quantile" and r["bin"] == b]
            assert len(sample) == (bins == b).sum()  # per_bin exceeds the bin: all of it, each token once
            assert sorted(r["activation"] for r in sample) == sorted(values[bins == b].tolist())
            assert sample[0]["bin_fraction"] == pytest.approx((bins == b).mean())
            for r in sample:
                assert (r["bin_low"] is None or r["bin_low"] <= r["activation"]) and (
                    r["activation"] < r["bin_high"] or b == 2
                )


def test_quantile_samples_are_inside_their_bins_and_random_examples_are_where_they_say():
    context, batches, post = synthetic_run({"per_bin": 3, "random": 4, "seed": 5})
    rows = stored(run_stage(context, batches), context)
    for r in rows:
        pos = r["start"] + r["peak"]
        assert r["activation"] == post[r["dataset_row"], pos, r["flat"]]
        assert context.dataset.counted[r["dataset_row"], pos]
        if r["kind"] == "quantile":
            assert r["bin_low"] is None or r["activation"] >= r["bin_low"]
            assert r["activation"] <= r["bin_high"]
    per_neuron = [sum(r["kind"] == "random" and r["flat"] == f for r in rows) for f in range(N_LAYERS * D_MLP)]
    assert per_neuron == [4] * (N_LAYERS * D_MLP)
    draws = {
        tuple((r["dataset_row"], r["start"] + r["peak"]) for r in rows if r["kind"] == "random" and r["flat"] == f)
        for f in range(N_LAYERS * D_MLP)
    }
    assert len(draws) > 1  # a different draw per neuron


def test_resuming_from_a_state_dict_gives_the_same_examples():
    context, batches, _ = synthetic_run()
    whole = stored(run_stage(context, batches), context)
    first = ExamplesStage(context)
    first.update(batches[0])
    resumed = ExamplesStage(context)
    resumed.load_state_dict(first.state_dict())
    for batch in batches[1:]:
        resumed.update(batch)
    again = stored(resumed, context)
    assert [(r["kind"], r["dataset_row"], r["start"], r["activation"]) for r in again] == [
        (r["kind"], r["dataset_row"], r["start"], r["activation"]) for r in whole
    ]


def test_gather_windows_clamps_at_the_row_edges():
    acts = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    got = gather_windows(acts, torch.tensor([1]), torch.tensor([4]), torch.tensor([2]), torch.arange(-1, 3))
    assert got.tolist() == [[acts[1, 3, 2].item(), acts[1, 4, 2].item(), acts[1, 4, 2].item(), acts[1, 4, 2].item()]]


@pytest.mark.parametrize(
    ("analysis", "message"),
    [({"quantiles": [0.9, 0.5]}, "increase strictly"), ({"top": 0}, "examples.top"), ({"tops": 3}, "settings are")],
)
def test_bad_settings_are_refused(analysis, message):
    context, _, _ = synthetic_run()
    context.config.analysis = {"examples": analysis}
    with pytest.raises(ConfigError, match=message):
        ExamplesStage(context)


def test_snippets_encoded_by_blocks_of_neurons_are_encode_u8_of_each_rows_windows(monkeypatch):
    """The write encodes a block of neurons' snippets at once, each neuron and kind on one scale: with blocks of 3
    neurons (the 8 neurons in 3 blocks, the last one short) every stored row's snippets are, byte for byte,
    `encode_u8` of its examples' windows (clipped at the row's edges) one after the other in (bin, rank) order."""
    import precompute.stages.examples as examples_module

    context, batches, _ = synthetic_run({"top": 4, "quantiles": [0.5, 0.9], "per_bin": 2, "random": 2, "before": 30})
    stage = run_stage(context, batches)
    monkeypatch.setattr(examples_module, "ENCODE_BLOCK", 3)
    rows = list(stage.example_rows("m", 3, D_MLP, context.dataset.rows))
    state = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in stage.state["m"].items()}
    prefixes = {"top": lambda r: "top_", "quantile": lambda r: f"bin{r['bin']}_", "random": lambda r: "random_"}
    groups: dict[tuple[int, str], list[dict]] = {}
    shapes = set()
    for row in rows:
        groups.setdefault((row["layer"] * D_MLP + row["neuron"], row["kind"]), []).append(row)
    assert {kind for _, kind in groups} == {"top", "quantile", "random"}
    assert len({flat for flat, _ in groups}) == N_LAYERS * D_MLP
    for (flat, kind), group in groups.items():
        windows = []
        for row in sorted(group, key=lambda r: (r["bin"], r["rank"])):
            pos = row["start"] + row["peak"]
            first = row["start"] - (pos - 30)  # windows start 30 tokens before the peak
            length = min(CTX, pos + 9) - row["start"]
            window = state[f"{prefixes[kind](row)}window"][row["rank"], :, flat]
            windows.append(window[first : first + length])
            shapes.add((first > 0, length < 40))
        assert example_columns(group)["snippets"] == encode_u8(np.concatenate(windows))
    assert len(shapes) > 1  # spans of several shapes
