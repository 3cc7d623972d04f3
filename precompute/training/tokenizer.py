"""The embedded family's tokenizer: a deterministic GPT-2-style byte-level BPE, trained, saved and loaded."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

#: The one special token: BOS, EOS, UNK and padding, with id 0 (as GPT-2's ``<|endoftext|>`` plays all roles).
ENDOFTEXT = "<|endoftext|>"
#: Byte-level BPE needs the 256 byte symbols plus the special token before any merge.
MIN_VOCAB_SIZE = 257


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """Train a deterministic GPT-2-style byte-level BPE tokenizer.

    Args:
        texts: the training documents.
        vocab_size: total vocabulary, the 256 byte symbols and ``<|endoftext|>`` included (at least 257).

    Returns:
        a fast tokenizer whose only special token ``<|endoftext|>`` has id 0 and serves as BOS, EOS, UNK and
        padding. TransformerLens only accepts tokenizers loaded by ``from_pretrained``: pass it through
        :func:`save_tokenizer` and :func:`load_tokenizer` before handing it to a model.

    >>> tok = train_bpe_tokenizer(["def f(x):\\n    return x\\n"] * 3, vocab_size=300)
    >>> tok.convert_tokens_to_ids("<|endoftext|>"), tok.decode(tok("return x")["input_ids"])
    (0, 'return x')
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes + {ENDOFTEXT}), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT],  # first, so it gets id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if tokenizer.token_to_id(ENDOFTEXT) != 0:  # pragma: no cover - guards a change in `tokenizers`
        raise RuntimeError(f"{ENDOFTEXT} did not get id 0")
    logger.info("trained a byte-level BPE tokenizer with %d tokens", tokenizer.get_vocab_size())
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        unk_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, folder: Path) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into `folder` (created if missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))


def load_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved by :func:`save_tokenizer` (the form TransformerLens accepts)."""
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise TypeError(f"{folder} holds a {type(tokenizer).__name__}, not a fast byte-level BPE tokenizer")
    return tokenizer


__all__ = ["ENDOFTEXT", "MIN_VOCAB_SIZE", "load_tokenizer", "save_tokenizer", "train_bpe_tokenizer"]
