"""Documents to rows of token ids: tokenise in chunks and pack, the paper's tokenize-and-concatenate.

A leaf module: the precompute's datasets (`precompute.data`) and the embedded family's training rows
(`precompute.training.corpus`) pack documents the same way, so a model is evaluated on rows shaped like the ones
it was trained on. Documents are joined with EOS, cut into rows of ``ctx - 1`` tokens and each row gets a BOS in
front, so every row has exactly ``ctx`` tokens and starts with BOS (paper-spec §1.2).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import numpy as np

#: Documents per tokenizer call: large enough for the fast tokenizer's batching, small enough to stream.
TOKENIZE_CHUNK = 64


class TextTokenizer(Protocol):
    """The part of a Hugging Face tokenizer that tokenising in chunks calls."""

    def __call__(self, texts: list[str], /, *, add_special_tokens: bool, verbose: bool) -> Any: ...


def tokenize_in_chunks(
    texts: Iterable[str], tokenizer: TextTokenizer, chunk: int = TOKENIZE_CHUNK
) -> Iterator[list[int]]:
    """The token ids of every text, without special tokens, tokenising ``chunk`` texts per call (lazily).

    Documents are longer than the tokenizer's ``model_max_length`` before packing, as intended: ``verbose=False``
    keeps the tokenizer from warning about it.
    """
    buffer: list[str] = []
    for text in texts:
        buffer.append(text)
        if len(buffer) == chunk:
            yield from tokenizer(buffer, add_special_tokens=False, verbose=False)["input_ids"]
            buffer = []
    if buffer:
        yield from tokenizer(buffer, add_special_tokens=False, verbose=False)["input_ids"]


def pack_documents(
    token_lists: Iterable[list[int]], ctx: int, bos_id: int, eos_id: int, max_rows: int | None = None
) -> np.ndarray:
    """Join documents with EOS, cut into rows of ``ctx - 1`` and put BOS in front of each row.

    The tail that does not fill a whole row is dropped (as TransformerLens' tokenize_and_concatenate does).

    >>> pack_documents([[5, 6, 7], [8, 9]], ctx=4, bos_id=0, eos_id=1).tolist()
    [[0, 5, 6, 7], [0, 1, 8, 9]]
    """
    body = ctx - 1
    rows: list[np.ndarray] = []
    pending: list[int] = []
    first = True
    for tokens in token_lists:
        if not first:
            pending.append(eos_id)
        first = False
        pending.extend(tokens)
        while len(pending) >= body:
            rows.append(np.array([bos_id, *pending[:body]], dtype=np.int64))
            pending = pending[body:]
            if max_rows is not None and len(rows) >= max_rows:
                return np.stack(rows)
    if not rows:
        return np.zeros((0, ctx), dtype=np.int64)
    return np.stack(rows)


__all__ = ["TOKENIZE_CHUNK", "TextTokenizer", "pack_documents", "tokenize_in_chunks"]
