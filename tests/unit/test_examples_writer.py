"""The examples stage's writer (columns built a block of neurons at a time) against the writer it replaced: one
mapping per example, joined into a row per neuron and kind by `precompute.store.example_columns` (issue 11).

The stored bytes of every table the stage writes must stay the same, row for row: the reference below is that
per-example writer, kept here as the oracle (it encodes each row's snippets with `encode_u8` of their windows, not
the stage's block encoding)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import precompute.stages.examples as examples_module
import tests.unit.test_examples as examples_tests
from precompute.rows import neuron_key
from precompute.stages.examples import ExamplesStage
from precompute.store import (
    AtlasStore,
    blob,
    decode_array,
    example_columns,
    examples,
    models,
    token_itemsize,
)
from tests.unit.test_examples import CTX, D_MLP, N_LAYERS, run_stage, synthetic_run

N_NEURONS = N_LAYERS * D_MLP
D_VOCAB = 50  # synthetic_run's token ids are below it

# the ``examples`` columns in the order the checks read them
EXAMPLE_COLUMNS = [c.name for c in examples.columns]


def reference_examples(stage: ExamplesStage, name: str, model_id: int, dataset_rows: np.ndarray) -> Iterator[dict]:
    """Every example of one model as the stage wrote them before issue 11's block columns: one mapping per
    example, neuron by neuron, top then the quantile bins then random, each kind's slots in rank order."""
    cfg = stage.config
    state = {k: v.cpu().numpy() if isinstance(v, torch.Tensor) else v for k, v in stage.state[name].items()}
    n_bins = len(cfg.quantiles) + 1
    kinds = {"top": ["top_"], "quantile": [f"bin{b}_" for b in range(n_bins if state["edges"] is not None else 0)]}
    kinds["random"] = ["random_"]
    for flat in range(stage.shapes[name]):
        for kind, prefixes in kinds.items():
            for b, prefix in enumerate(prefixes):
                bounds: dict[str, Any] = {"bin": 0, "bin_low": None, "bin_high": None, "bin_fraction": None}
                if kind == "quantile":
                    edges, last = state["edges"], len(cfg.quantiles)
                    bounds = {
                        "bin": b,
                        "bin_low": None if b == 0 else float(edges[flat, b - 1]),
                        "bin_high": float(state["top_value"][0, flat]) if b == last else float(edges[flat, b]),
                        "bin_fraction": float(state["bin_seen"][b, flat] / max(state["bin_looked"][b], 1)),
                    }
                for rank in range(state[f"{prefix}row"].shape[0]):
                    row, pos = int(state[f"{prefix}row"][rank, flat]), int(state[f"{prefix}pos"][rank, flat])
                    value = float(state[f"{prefix}value"][rank, flat])
                    if kind == "random" and not np.isfinite(value):
                        continue  # a random example not drawn (its row was never read)
                    if row < 0 or (kind == "top" and not np.isfinite(value)):
                        break  # top and quantile slots fill in rank order: the first empty one ends the list
                    start, end = max(0, pos - cfg.before), min(dataset_rows.shape[1], pos + cfg.after + 1)
                    first = start - (pos - cfg.before)  # the window starts ``before`` tokens before the peak
                    window = state[f"{prefix}window"][rank, :, flat].astype(np.float64)
                    yield (
                        neuron_key(model_id, D_MLP, flat)
                        | bounds
                        | {
                            "kind": kind,
                            "rank": rank,
                            "dataset_row": row,
                            "start": start,
                            "peak": pos - start,
                            "activation": value,
                            "peak_token": int(dataset_rows[row, pos]),
                            "activations": window[first : first + end - start],
                        }
                    )


def reference_tables(stage: ExamplesStage, model_id: int, dataset_rows: np.ndarray) -> dict[str, list[tuple]]:
    """The rows of ``examples`` (in insertion order), ``example_rows`` and ``example_peaks`` (in key order) the
    reference writer stores for model ``m``."""
    groups: dict[tuple[int, int, str], list[dict]] = {}
    for example in reference_examples(stage, "m", model_id, dataset_rows):
        groups.setdefault((example["layer"], example["neuron"], example["kind"]), []).append(example)
    rows = [tuple(example_columns(group)[c] for c in EXAMPLE_COLUMNS) for group in groups.values()]
    every = [e for group in groups.values() for e in group]
    itemsize = token_itemsize(D_VOCAB)
    used = sorted({e["dataset_row"] for e in every})
    tokens = [(model_id, r, itemsize, blob(dataset_rows[r].astype(f"<u{itemsize}"))) for r in used]
    peak_columns = ("peak_token", "layer", "neuron", "rank", "activation")
    peaks = sorted((model_id, *(e[c] for c in peak_columns)) for e in every if e["kind"] == "top")
    return {"examples": rows, "example_rows": tokens, "example_peaks": peaks}


def stored_tables(store: AtlasStore) -> dict[str, list[tuple]]:
    """What the store holds in the three tables, ``examples`` in insertion (rowid) order."""
    with store.engine.connect() as conn:
        read = conn.exec_driver_sql
        names = ", ".join(f'"{c}"' for c in EXAMPLE_COLUMNS)
        return {
            "examples": [tuple(r) for r in read(f"SELECT {names} FROM examples ORDER BY rowid")],
            "example_rows": [tuple(r) for r in read("SELECT * FROM example_rows ORDER BY model_id, dataset_row")],
            "example_peaks": [
                tuple(r)
                for r in read(
                    "SELECT model_id, peak_token, layer, neuron, rank, activation FROM example_peaks "
                    "ORDER BY model_id, peak_token, layer, neuron, rank"
                )
            ],
        }


def open_atlas(path: Path) -> tuple[AtlasStore, int]:
    """A store with one run and the synthetic model ``m``; its model id."""
    store = AtlasStore(path)
    run_id = store.create_run({}, {}, {})
    values = {c.name: 1 for c in models.columns if c.name not in ("id", "run_id")}
    values |= {"name": "m", "source": "m", "is_reference": True, "d_mlp": D_MLP, "d_vocab": D_VOCAB}
    return store, store.add_model(run_id, **values | {"processing": {}, "act_fn": "gelu_new"})


def written_by_stage(stage: ExamplesStage, context: Any, store: AtlasStore, model_id: int) -> dict[str, list[tuple]]:
    """The three tables after the stage's own `ExamplesStage.write` (emptied first)."""
    store.clear_model_tables([model_id], ExamplesStage.tables)
    context.models[0].d_vocab = D_VOCAB
    context.store, context.model_ids = store, {"m": model_id}
    stage.write(context)
    return stored_tables(store)


def corner_cases(stage: ExamplesStage) -> None:
    """Edit the kept examples of the 8 neurons into the cases a row's encoding has to get right."""
    state = stage.state["m"]
    state["top_value"] = state["top_value"].double()
    state["top_value"][:, 1] += 1e-9  # neuron 1: activations that are no float32 (stored as float64)
    state["top_value"][4:, 2] = -torch.inf  # neuron 2: four top examples only, ...
    state["top_row"][:4, 2], state["top_row"][4:, 2] = torch.arange(4), 299  # ... the slots after them past 255
    for b in range(3):  # the largest rank of a row at uint8's edge: 256 for neuron 0, 255 for neuron 7
        state[f"bin{b}_row"][257:, 0], state[f"bin{b}_row"][256:, 7] = -1, -1
    state["bin2_row"][:, 3] = -1  # neuron 3: an empty bin (absent from its bin ranges)
    state["bin1_row"][1, 3] = -1  # ... and a bin whose slots end after the first (the later ones not written)
    state["random_value"][1, 4] = torch.nan  # neuron 4: a random example never drawn
    state["random_value"][:, 5] = torch.nan  # neuron 5: no random row at all
    state["top_window"][0, 5:15, 6] = torch.nan  # neuron 6: missing values in a window ...
    state["top_window"][1, 12, 6], state["bin0_window"][0, 12, 6] = torch.inf, -torch.inf  # ... and infinite ones
    state["random_window"][:, :, 7] = torch.nan  # neuron 7: no finite value in its random snippets


@pytest.mark.parametrize("block", [3, 2048])
def test_the_written_tables_are_byte_for_byte_the_per_example_writers(monkeypatch, tmp_path, block):
    """300 dataset rows (rows and ranks past 255: some rows narrow to uint16), all three kinds, the corner cases of
    `corner_cases`, in blocks of 3 neurons (the last one short) or one block: every row of every table equal."""
    monkeypatch.setattr(examples_tests, "N_ROWS", 300)
    monkeypatch.setattr(examples_module, "ENCODE_BLOCK", block)
    analysis = {"top": 6, "quantiles": [0.8, 0.95], "per_bin": 300, "random": 3, "before": 12, "after": 8}
    context, batches, _ = synthetic_run(analysis)
    stage = run_stage(context, batches)
    corner_cases(stage)
    store, model_id = open_atlas(tmp_path / "atlas.db")
    with store:
        got = written_by_stage(stage, context, store, model_id)
    expected = reference_tables(stage, model_id, context.dataset.rows)
    assert got == expected
    # the cases are there: uint8 and uint16 ranks and dataset rows, a float64 row, an absent bin, cut snippets
    table = [dict(zip(EXAMPLE_COLUMNS, r, strict=True)) for r in got["examples"]]
    rows = {(r["layer"] * D_MLP + r["neuron"], r["kind"]): r for r in table}
    assert {r["ranks"][0] for r in table} == {r["dataset_rows"][0] for r in table} == {0, 1}  # <u1, <u2
    assert rows[1, "top"]["activations"][0] == 5 and rows[0, "top"]["activations"][0] == 4  # <f8, <f4
    assert rows[2, "top"]["n_examples"] == 4 and rows[2, "top"]["dataset_rows"][0] == 0  # <u1
    assert (rows[0, "quantile"]["ranks"][0], rows[7, "quantile"]["ranks"][0]) == (1, 0)  # <u2, <u1
    assert decode_array(rows[3, "quantile"]["bin_ranges"]).reshape(-1, 4)[:, 0].tolist() == [0.0, 1.0]
    assert decode_array(rows[3, "quantile"]["bins"]).tolist().count(1) == 1
    assert (5, "random") not in rows and rows[4, "random"]["n_examples"] == 2
    starts = np.concatenate([decode_array(r["starts"]) for r in rows.values()])
    ends = starts + np.concatenate([decode_array(r["lengths"]) for r in rows.values()])
    assert (starts == 0).any() and (ends == CTX).any() and ((starts > 0) & (ends < CTX)).any()


def test_without_the_pilots_edges_only_top_and_random_rows_are_written(tmp_path):
    """No quantile bins before a pilot batch: the top and random rows as the reference writes them; and a stage
    that streamed nothing writes no row at all."""
    context, batches, _ = synthetic_run({"top": 3, "random": 2})
    stage = run_stage(context, batches)
    stage.state["m"]["edges"] = None
    store, model_id = open_atlas(tmp_path / "atlas.db")
    with store:
        got = written_by_stage(stage, context, store, model_id)
        assert got == reference_tables(stage, model_id, context.dataset.rows)
        assert {r[3] for r in got["examples"]} == {"top", "random"}
        fresh = ExamplesStage(context)  # nothing streamed: no examples, no rows of any table
        assert written_by_stage(fresh, context, store, model_id) == {
            "examples": [],
            "example_rows": [],
            "example_peaks": [],
        }


@pytest.fixture(scope="module")
def streamed() -> tuple[Any, dict[str, Any]]:
    """A stage's context and kept examples after one pass, to edit copies of."""
    context, batches, _ = synthetic_run({"top": 5, "quantiles": [0.5, 0.9], "per_bin": 4, "random": 3})
    stage = run_stage(context, batches)
    return context, stage.state["m"]


def test_any_missing_slots_and_values_are_written_as_the_per_example_writer_does(streamed, tmp_path, monkeypatch):
    """Slots emptied at random (top and quantile lists cut short, random examples not drawn), values and window
    values made NaN, inf or float64, in blocks of any size."""
    context, kept = streamed
    store, model_id = open_atlas(tmp_path / "atlas.db")

    @settings(max_examples=40, deadline=None)
    @given(
        block=st.integers(1, N_NEURONS + 1),
        seed=st.integers(0, 2**32 - 1),
        share=st.sampled_from([0.0, 0.1, 0.5]),
    )
    def check(block: int, seed: int, share: float) -> None:
        rng = np.random.default_rng(seed)
        stage = ExamplesStage(context)
        stage.state["m"] = state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kept.items()}

        def hit(name: str, chance: float) -> torch.Tensor:
            return torch.from_numpy(rng.random(state[name].shape) < chance)

        for name in ("bin0_row", "bin1_row", "bin2_row"):
            state[name][hit(name, share)] = -1  # a bin's list cut short
        for name in ("top_value", "random_value"):
            state[name][hit(name, share)] = torch.nan  # a top list cut short, a random example not drawn
        for name in [n for n in state if n.endswith(("value", "window"))]:
            noise = torch.from_numpy(rng.choice([np.nan, np.inf, -np.inf], size=state[name].shape))
            state[name] = torch.where(hit(name, share / 4), noise.to(state[name].dtype), state[name])
        for name in ("bin1_value", "random_value"):  # activations that are no float32
            state[name] = state[name].double() + hit(name, share).double() * 1e-9
        monkeypatch.setattr(examples_module, "ENCODE_BLOCK", block)
        got = written_by_stage(stage, context, store, model_id)
        assert got == reference_tables(stage, model_id, context.dataset.rows)

    with store:
        check()
