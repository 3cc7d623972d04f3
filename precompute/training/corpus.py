"""The embedded family's training data (nanoGPT's ``prepare.py``): a tokenizer and both stdlib splits packed.

:func:`packed_corpus` trains a BPE tokenizer on the train split of the standard library
(`precompute.stdlib_corpus`) and packs both splits into rows of ``ctx`` tokens that start with BOS
(`precompute.packing`, as the precompute's datasets are packed), cached in a folder.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerFast

from precompute.packing import pack_documents, tokenize_in_chunks
from precompute.stdlib_corpus import CorpusFingerprint, stdlib_documents, stdlib_fingerprint
from precompute.training.tokenizer import load_tokenizer, save_tokenizer, train_bpe_tokenizer

logger = logging.getLogger(__name__)

_PACKED_FORMAT = 1  # bump when the meaning of cached rows changes


class CorpusCacheError(ValueError):
    """A cache folder that was built for another corpus, vocabulary, row length or order."""


@dataclass(frozen=True)
class PackedCorpus:
    """A tokenizer trained on the train split, and both splits packed into rows that start with BOS."""

    tokenizer: PreTrainedTokenizerFast
    train_rows: np.ndarray  # [n_train_rows, ctx] uint16 (int32 for vocabularies over 65,536)
    validation_rows: np.ndarray  # [n_validation_rows, ctx]
    fingerprint: CorpusFingerprint


def pack_texts(texts: list[str], tokenizer: PreTrainedTokenizerFast, ctx: int) -> np.ndarray:
    """Tokenize `texts` in chunks and pack them with :func:`precompute.packing.pack_documents`."""
    rows = pack_documents(
        tokenize_in_chunks(texts, tokenizer), ctx, bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id
    )
    return rows.astype(np.uint16 if len(tokenizer) <= 2**16 else np.int32)


def packed_corpus(
    folder: Path, vocab_size: int, ctx: int, shuffle_seed: int = 0, max_documents: int | None = None
) -> PackedCorpus:
    """Train the tokenizer and pack both splits once; later calls load them from `folder`.

    Args:
        folder: the cache (``tokenizer/``, ``{train,validation}_rows.npy``, ``meta.json``).
        vocab_size: the BPE vocabulary.
        ctx: tokens per row, BOS included.
        shuffle_seed: orders the train documents before packing.
        max_documents: only the first N files of each split (smoke runs); None reads every file.

    Raises:
        CorpusCacheError: `folder` holds a cache built with other arguments or another standard library.
    """
    fingerprint = stdlib_fingerprint()
    key = {"format": _PACKED_FORMAT, "corpus": asdict(fingerprint), "vocab_size": vocab_size, "ctx": ctx}
    key |= {"shuffle_seed": shuffle_seed, "max_documents": max_documents}
    meta_path = folder / "meta.json"
    if meta_path.exists():
        cached = json.loads(meta_path.read_text(encoding="utf-8"))
        if cached != key:
            raise CorpusCacheError(f"{folder} was built for {cached}, not {key}: use another folder")
        logger.info("reusing the tokenizer and rows cached in %s", folder)
        train_rows, validation_rows = (np.load(folder / f"{split}_rows.npy") for split in ("train", "validation"))
        return PackedCorpus(load_tokenizer(folder / "tokenizer"), train_rows, validation_rows, fingerprint)
    train_texts = stdlib_documents("train")[:max_documents]
    validation_texts = stdlib_documents("validation")[:max_documents]
    started = time.perf_counter()
    tokenizer = train_bpe_tokenizer(train_texts, vocab_size)
    tokenizer.model_max_length = ctx
    save_tokenizer(tokenizer, folder / "tokenizer")
    tokenizer = load_tokenizer(folder / "tokenizer")  # the form TransformerLens accepts
    logger.info("BPE tokenizer (%d tokens) trained in %.1f s", len(tokenizer), time.perf_counter() - started)
    started = time.perf_counter()
    random.Random(shuffle_seed).shuffle(train_texts)  # neighbours in a row come from unrelated files
    packed = {
        "train": pack_texts(train_texts, tokenizer, ctx),
        "validation": pack_texts(validation_texts, tokenizer, ctx),
    }
    if min(len(rows) for rows in packed.values()) == 0:
        raise CorpusCacheError(f"a split of the corpus holds no full row of ctx={ctx} tokens")
    seconds = time.perf_counter() - started
    logger.info("tokenized and packed %s rows in %.1f s", {k: len(v) for k, v in packed.items()}, seconds)
    for split, rows_of_split in packed.items():
        temporary = folder / f"{split}_rows.tmp.npy"
        np.save(temporary, rows_of_split)
        os.replace(temporary, folder / f"{split}_rows.npy")
    temporary = meta_path.with_suffix(".tmp")
    temporary.write_text(json.dumps(key, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, meta_path)  # last: its presence marks a complete cache
    return PackedCorpus(tokenizer, packed["train"], packed["validation"], fingerprint)


__all__ = ["CorpusCacheError", "PackedCorpus", "pack_texts", "packed_corpus"]
