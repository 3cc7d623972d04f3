"""Training the embedded model family end to end with a tiny config: outputs load, seeds differ, resume is exact."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel

from precompute.training.trainer import StepInfo, TrainConfig, TrainConfigError, batch_row_indices, train_family

MANIFEST_KEYS = {
    "finished", "command", "seed", "data_seed", "steps", "tokens", "initial_train_loss", "final_train_loss",
    "initial_validation_loss", "final_validation_loss", "validation_tokens", "wall_seconds",
    "tokens_per_second", "train_loss_curve", "config", "corpus", "versions",
}  # fmt: skip


def tiny_config(out_dir: Path, **overrides) -> TrainConfig:
    fields = dict(
        out_dir=out_dir, seeds=(0, 1), n_layers=1, d_model=32, d_mlp=128, n_heads=2, ctx=32, vocab_size=300,
        batch_size=8, tokens_per_seed=8 * 32 * 40, checkpoint_every_steps=10, eval_tokens=32 * 16,
        max_documents=8, threads=1,
    )  # fmt: skip
    return TrainConfig(**(fields | overrides))


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> tuple[TrainConfig, list[Path]]:
    config = tiny_config(tmp_path_factory.mktemp("family"), save_dtype="float16")
    return config, train_family(config, command="universal-neurons train --tiny")


def test_family_layout_and_manifests(family) -> None:
    config, folders = family
    assert folders == [config.out_dir / "seed-0", config.out_dir / "seed-1"]
    family_json = json.loads((config.out_dir / "family.json").read_text())
    assert family_json["command"] == "universal-neurons train --tiny"
    assert family_json["seeds"] == [
        {"seed": 0, "folder": "seed-0", "finished": True},
        {"seed": 1, "folder": "seed-1", "finished": True},
    ]
    for seed, folder in enumerate(folders):
        manifest = json.loads((folder / "manifest.json").read_text())
        assert set(manifest) == MANIFEST_KEYS
        assert manifest["seed"] == seed and manifest["steps"] == 40 and manifest["tokens"] == 40 * 8 * 32
        assert manifest["final_train_loss"] < manifest["initial_train_loss"] - 0.5
        assert manifest["final_validation_loss"] < manifest["initial_validation_loss"] - 0.5
        assert not (folder / "checkpoint.pt").exists()
    tokenizers = {(folder / "tokenizer.json").read_bytes() for folder in folders}
    assert len(tokenizers) == 1


def test_seeds_share_data_but_not_weights(family) -> None:
    _, folders = family
    first, second = (load_file(folder / "model.safetensors") for folder in folders)
    assert first.keys() == second.keys()
    assert first["transformer.wte.weight"].dtype == torch.float16
    assert not torch.equal(first["transformer.h.0.mlp.c_fc.weight"], second["transformer.h.0.mlp.c_fc.weight"])


def test_folders_load_in_float32_with_transformers_and_transformer_lens(family) -> None:
    from transformer_lens.model_bridge import TransformerBridge

    _, folders = family
    for folder in folders:
        hf_model = GPT2LMHeadModel.from_pretrained(folder)  # fp16 weights, float32 model: config.json says so
        assert hf_model.dtype == torch.float32
        assert hf_model.lm_head.weight.data_ptr() == hf_model.transformer.wte.weight.data_ptr()
        bridge = TransformerBridge.boot_transformers(str(folder), device="cpu")
        bridge.enable_compatibility_mode()
        tokens = bridge.to_tokens("def f(x):\n    return x + 1\n")
        assert tokens[0, 0].item() == 0  # BOS
        logits, cache = bridge.run_with_cache(tokens, names_filter=lambda name: name.endswith("mlp.hook_post"))
        assert cache["blocks.0.mlp.hook_post"].shape == (1, tokens.shape[1], 128)
        with torch.no_grad():
            expected = hf_model(tokens).logits.log_softmax(-1)
        # Compatibility mode folds LayerNorm and centres the unembedding: log-probabilities are unchanged.
        torch.testing.assert_close(logits.log_softmax(-1), expected, atol=1e-4, rtol=1e-4)


def test_finished_seeds_are_skipped_and_changed_configs_refused(family) -> None:
    config, folders = family
    before = [(folder / "model.safetensors").stat().st_mtime_ns for folder in folders]
    assert train_family(config, command="again") == folders
    assert [(folder / "model.safetensors").stat().st_mtime_ns for folder in folders] == before
    with pytest.raises(TrainConfigError, match="lr"):
        train_family(replace(config, lr=1e-3), command="changed")


def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path) -> None:
    uninterrupted = tiny_config(tmp_path / "a", seeds=(3,), tokens_per_seed=8 * 32 * 25, checkpoint_every_steps=5)
    [reference] = train_family(uninterrupted, command="a")

    class Killed(Exception):
        pass

    def kill_at_step_13(info: StepInfo) -> None:
        if info.step == 13:
            raise Killed

    interrupted = replace(uninterrupted, out_dir=tmp_path / "b")
    with pytest.raises(Killed):
        train_family(interrupted, command="b", on_step=kill_at_step_13)
    assert (tmp_path / "b" / "seed-3" / "checkpoint.pt").exists()  # written at step 10; steps 11-13 are lost
    assert not (tmp_path / "b" / "seed-3" / "manifest.json").exists()
    steps: list[int] = []
    [resumed] = train_family(interrupted, command="b", on_step=lambda info: steps.append(info.step))
    assert steps == list(range(11, 26))  # resumed after the checkpoint of step 10: steps 1-10 are not trained again
    expected, got = load_file(reference / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    manifests = [json.loads((folder / "manifest.json").read_text()) for folder in (reference, resumed)]
    assert manifests[0]["train_loss_curve"] == manifests[1]["train_loss_curve"]
    assert manifests[0]["final_validation_loss"] == manifests[1]["final_validation_loss"]


def test_data_order_is_a_permutation_per_epoch() -> None:
    n_rows, batch_size = 7, 3
    order = np.concatenate([batch_row_indices(step, batch_size, n_rows, data_seed=5) for step in range(7)])
    epochs = order.reshape(3, n_rows)
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(n_rows))
    assert not np.array_equal(epochs[0], epochs[1])  # each epoch reshuffles
    np.testing.assert_array_equal(order[:3], batch_row_indices(0, batch_size, n_rows, data_seed=5))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"save_dtype": "float8"}, "float32, float16, bfloat16"),
        ({"n_heads": 3}, "multiple of n_heads"),
        ({"seeds": (1, 1)}, "distinct"),
        ({"tokens_per_seed": 10}, "cover one step"),
        ({"vocab_size": 100}, "257"),
        ({"device": "toaster"}, "cpu, cuda"),
    ],
)
def test_invalid_configs_are_refused(tmp_path, overrides, message) -> None:
    with pytest.raises(TrainConfigError, match=message):
        tiny_config(tmp_path, **overrides)
