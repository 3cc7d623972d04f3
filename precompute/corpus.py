"""The running Python's standard library as an embedded offline corpus: files, splits, tokenizer, packed rows.

Every machine that runs this project has the corpus: the ``.py`` files of ``sysconfig``'s ``stdlib`` folder,
tests included, third-party ``site-packages`` excluded (1,790 files / 31.5 MB on CPython 3.11.7). The files
depend on the exact CPython build, so runs record a :class:`CorpusFingerprint`. Files are split into train and
validation by a hash of their relative path, which is stable across machines and Python versions (a file keeps
its split when others are added or removed). :func:`packed_corpus` is the data preparation of the embedded
model family (nanoGPT's ``prepare.py``): a BPE tokenizer trained on the train split and both splits packed
into rows of ``ctx`` tokens, cached in a folder.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import random
import sysconfig
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from precompute.data import pack_documents

logger = logging.getLogger(__name__)

Split = Literal["train", "validation"]
SplitOrAll = Literal["train", "validation", "all"]
SPLITS: tuple[str, ...] = ("train", "validation", "all")

#: The one special token: BOS, EOS, UNK and padding, with id 0 (as GPT-2's ``<|endoftext|>`` plays all roles).
ENDOFTEXT = "<|endoftext|>"
#: Path parts that mark third-party code inside the stdlib folder.
_THIRD_PARTY_PARTS = frozenset({"site-packages", "dist-packages"})
#: Byte-level BPE needs the 256 byte symbols plus the special token before any merge.
MIN_VOCAB_SIZE = 257
_PACKED_FORMAT = 1  # bump when the meaning of cached rows changes


class CorpusCacheError(ValueError):
    """A cache folder that was built for another corpus, vocabulary, row length or order."""


def stdlib_root() -> Path:
    """The folder of the running Python's standard library.

    >>> (stdlib_root() / "os.py").is_file()
    True
    """
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """All ``.py`` files of the standard library, tests included, ``site-packages`` excluded.

    Returns:
        absolute paths, sorted by their POSIX path relative to :func:`stdlib_root`.

    >>> files = stdlib_files()
    >>> any(p.name == "os.py" for p in files), any("site-packages" in p.parts for p in files)
    (True, False)
    """
    return list(_stdlib_files())


@functools.lru_cache(maxsize=1)
def _stdlib_files() -> tuple[Path, ...]:
    root = stdlib_root()
    found: list[tuple[str, Path]] = []
    # os.walk without followlinks: a symlinked folder cannot pull a second copy of a tree into the corpus.
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in _THIRD_PARTY_PARTS]
        for name in names:
            if name.endswith(".py"):
                path = Path(folder) / name
                found.append((path.relative_to(root).as_posix(), path))
    found.sort(key=lambda item: item[0])
    return tuple(path for _, path in found)


def relative_path(path: Path) -> str:
    """The POSIX path of a stdlib file relative to :func:`stdlib_root` (what :func:`split_of` hashes)."""
    return path.relative_to(stdlib_root()).as_posix()


def split_of(relative_path: str) -> Split:
    """The split of a file: validation iff the first 8 hex digits of sha256(path) are 0 mod 10 (~10%).

    >>> split_of("os.py"), split_of("json/decoder.py")
    ('train', 'train')
    """
    digest = hashlib.sha256(relative_path.encode("utf-8")).hexdigest()
    return "validation" if int(digest[:8], 16) % 10 == 0 else "train"


def stdlib_documents(split: SplitOrAll) -> list[str]:
    """The texts of the stdlib files in one split, in sorted relative-path order.

    Args:
        split: ``train``, ``validation`` or ``all``.

    Returns:
        a new list (callers may shuffle it in place); bytes that are not UTF-8 become U+FFFD.

    >>> len(stdlib_documents("validation")) < len(stdlib_documents("train"))
    True
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    return [
        path.read_bytes().decode("utf-8", errors="replace")
        for path in stdlib_files()
        if split == "all" or split_of(relative_path(path)) == split
    ]


@dataclass(frozen=True)
class CorpusFingerprint:
    """Which standard library a run read: the CPython build and a hash of every path and byte."""

    python_version: str
    implementation: str
    n_files: int
    n_bytes: int
    sha256: str


@functools.lru_cache(maxsize=1)
def stdlib_fingerprint() -> CorpusFingerprint:
    """Fingerprint of the whole corpus (both splits), cached: hashing 31 MB takes a moment.

    >>> stdlib_fingerprint() == stdlib_fingerprint()
    True
    """
    digest = hashlib.sha256()
    n_bytes = 0
    files = stdlib_files()
    for path in files:
        content = path.read_bytes()
        n_bytes += len(content)
        # Length-prefixed fields so that no two different corpora can hash the same byte stream.
        name = relative_path(path).encode("utf-8")
        for field in (name, content):
            digest.update(len(field).to_bytes(8, "little"))
            digest.update(field)
    return CorpusFingerprint(
        python_version=platform.python_version(),
        implementation=platform.python_implementation(),
        n_files=len(files),
        n_bytes=n_bytes,
        sha256=digest.hexdigest(),
    )


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
    return AutoTokenizer.from_pretrained(str(folder))


@dataclass(frozen=True)
class PackedCorpus:
    """A tokenizer trained on the train split, and both splits packed into rows that start with BOS."""

    tokenizer: PreTrainedTokenizerFast
    train_rows: np.ndarray  # [n_train_rows, ctx] uint16 (int32 for vocabularies over 65,536)
    validation_rows: np.ndarray  # [n_validation_rows, ctx]
    fingerprint: CorpusFingerprint


def pack_texts(texts: list[str], tokenizer: PreTrainedTokenizerFast, ctx: int, chunk: int = 64) -> np.ndarray:
    """Tokenize `texts` in chunks and pack them with :func:`precompute.data.pack_documents`."""

    def token_lists() -> Iterable[list[int]]:
        for start in range(0, len(texts), chunk):
            # verbose=False: documents are longer than model_max_length (ctx) before packing, as intended.
            encoded = tokenizer(texts[start : start + chunk], add_special_tokens=False, verbose=False)
            yield from encoded["input_ids"]

    rows = pack_documents(token_lists(), ctx, bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id)
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
        rows = [np.load(folder / f"{split}_rows.npy") for split in ("train", "validation")]
        return PackedCorpus(load_tokenizer(folder / "tokenizer"), *rows, fingerprint)
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
    for split, rows in packed.items():
        temporary = folder / f"{split}_rows.tmp.npy"
        np.save(temporary, rows)
        os.replace(temporary, folder / f"{split}_rows.npy")
    temporary = meta_path.with_suffix(".tmp")
    temporary.write_text(json.dumps(key, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, meta_path)  # last: its presence marks a complete cache
    return PackedCorpus(tokenizer, packed["train"], packed["validation"], fingerprint)
