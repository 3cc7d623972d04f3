"""Data factories for tests: tiny tokenizers and tiny GPT-2 model folders, built for real (nothing mocked).

A model folder is what a Hugging Face hub cache holds (config.json, safetensors weights, tokenizer files), so
tests exercise the same local-folder path that users take.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from precompute import corpus

TINY = {"n_layers": 2, "d_model": 32, "d_mlp": 64, "n_heads": 2, "ctx": 64}


@functools.lru_cache(maxsize=4)
def _tokenizer_folder(vocab_size: int) -> Path:
    """Train one small BPE tokenizer per test session on a slice of the stdlib validation split."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix=f"tokenizer-{vocab_size}-"))
    texts = corpus.stdlib_documents("validation")[:40]
    corpus.save_tokenizer(corpus.train_bpe_tokenizer(texts, vocab_size=vocab_size), folder)
    return folder


def tiny_tokenizer(vocab_size: int = 512):
    return corpus.load_tokenizer(_tokenizer_folder(vocab_size))


def tiny_gpt2(folder: Path, seed: int = 0, vocab_size: int = 512, **overrides: int) -> Path:
    """Save a randomly initialised tiny GPT-2 (with its tokenizer) as a Hugging Face folder."""
    shape = TINY | overrides
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=shape["ctx"],
        n_embd=shape["d_model"],
        n_layer=shape["n_layers"],
        n_head=shape["n_heads"],
        n_inner=shape["d_mlp"],
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    # A larger init than GPT-2's 0.02 gives random tiny models varied, clearly non-dead neurons.
    with torch.no_grad():
        for block in model.transformer.h:
            block.mlp.c_fc.weight.normal_(0, 0.3)
            block.mlp.c_fc.bias.normal_(0, 0.5)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tiny_tokenizer(vocab_size).save_pretrained(folder)
    return folder


def permuted_copy(source: Path, folder: Path, seed: int) -> list[np.ndarray]:
    """Copy a GPT-2 folder with the MLP neurons of every layer permuted; returns the permutations.

    The copy computes the same function: neuron ``perm[j]`` of the source is neuron ``j`` of the copy.
    """
    model = GPT2LMHeadModel.from_pretrained(source)
    rng = np.random.default_rng(seed)
    permutations = []
    with torch.no_grad():
        for block in model.transformer.h:
            perm = rng.permutation(block.mlp.c_fc.weight.shape[1])
            index = torch.from_numpy(perm)
            block.mlp.c_fc.weight.copy_(block.mlp.c_fc.weight[:, index])  # Conv1D: [d_model, d_mlp]
            block.mlp.c_fc.bias.copy_(block.mlp.c_fc.bias[index])
            block.mlp.c_proj.weight.copy_(block.mlp.c_proj.weight[index, :])  # [d_mlp, d_model]
            permutations.append(perm)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    corpus.load_tokenizer(source).save_pretrained(folder)
    return permutations
