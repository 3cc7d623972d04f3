"""Model sources: local Hugging Face folders load offline as processed TransformerLens models."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel

from precompute.activations import run_mlp_hooks
from precompute.models import ModelLoadError, load_family, load_model, resolve_source


def test_local_folder_gives_the_same_logits_as_transformers(tiny_family):
    folder = tiny_family["base"]
    model = load_model(resolve_source(str(folder)))
    reference = GPT2LMHeadModel.from_pretrained(folder).eval()
    tokens = torch.randint(1, model.d_vocab, (3, 40), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 0
    with torch.no_grad():
        ours = model.bridge(tokens)
        theirs = reference(tokens).logits
    # Centring the unembedding (paper processing) adds a constant per position: compare up to that constant.
    difference = ours - theirs
    difference = difference - difference.mean(dim=-1, keepdim=True)
    assert difference.abs().max().item() < 1e-4
    assert model.processing == {
        "fold_ln": True,
        "center_writing_weights": True,
        "center_unembed": True,
        "fold_value_biases": True,
    }


def test_mlp_hooks_equal_the_transformers_activations(tiny_family):
    folder = tiny_family["base"]
    model = load_model(resolve_source(str(folder)))
    reference = GPT2LMHeadModel.from_pretrained(folder).eval()
    tokens = torch.randint(1, model.d_vocab, (2, 30), generator=torch.Generator().manual_seed(1))
    captured: dict[int, torch.Tensor] = {}
    handles = [
        block.mlp.act.register_forward_hook(lambda _m, _i, out, layer=layer: captured.__setitem__(layer, out))
        for layer, block in enumerate(reference.transformer.h)
    ]
    try:
        with torch.no_grad():
            reference(tokens)
    finally:
        for handle in handles:
            handle.remove()
    post = run_mlp_hooks(model, tokens)["hook_post"]  # [batch, pos, n_layers, d_mlp]
    for layer, expected in captured.items():
        torch.testing.assert_close(post[:, :, layer], expected, atol=1e-5, rtol=1e-5)


def test_model_names_and_shapes(tiny_family):
    models = load_family([str(tiny_family["base"]), str(tiny_family["other"])])
    assert [m.name for m in models] == ["tiny-a", "tiny-b"]
    record = models[0].record()
    assert (record["n_layers"], record["d_mlp"], record["d_model"], record["n_ctx"]) == (2, 64, 32, 64)
    assert record["source"] == str(tiny_family["base"].resolve())


def test_transformer_lens_names_resolve_without_loading():
    source = resolve_source("stanford-gpt2-small-a")
    assert (source.kind, source.location) == ("transformer_lens", "stanford-crfm/alias-gpt2-small-x21")
    assert resolve_source("pythia-160m-seed1").location == "EleutherAI/pythia-160m-seed1"


def test_duplicate_models_are_refused(tiny_family):
    with pytest.raises(ModelLoadError, match="share the name"):
        load_family([str(tiny_family["base"]), str(tiny_family["base"])])


@pytest.mark.slow
def test_stanford_gpt2_loads_from_the_hub():
    """Online users: the paper's models by TransformerLens name (needs network or a Hugging Face cache)."""
    model = load_model(resolve_source("stanford-gpt2-small-a"))
    assert (model.n_layers, model.d_mlp, model.d_vocab) == (12, 3072, 50257)
