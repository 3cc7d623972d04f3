"""Corpus to deterministic token batches: the paper's tokenize-and-concatenate.

Documents are tokenised, joined with EOS, cut into rows of ``ctx - 1`` tokens and each row gets a BOS in
front, so every row has exactly ``ctx`` tokens and starts with BOS (paper-spec §1.2). The same rows in the same
order feed every model and every stage, which is what makes a killed run resumable at a row index.

Sources: the standard library's own source code (the embedded default), local ``.txt``/``.jsonl`` files or
folders, and a Hugging Face dataset name for users who are online (``hf:NeelNanda/pile-10k``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

logger = logging.getLogger(__name__)

#: How a source is written on the command line.
STDLIB_SOURCES = {
    "stdlib": "validation",
    "stdlib:validation": "validation",
    "stdlib:train": "train",
    "stdlib:all": "all",
}
HF_PREFIX = "hf:"


class DataError(ValueError):
    """A dataset that cannot be built as asked (unknown source, too few tokens, ...)."""


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer the data pipeline uses."""

    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None

    def __call__(self, texts: list[str], add_special_tokens: bool = ...) -> Any: ...

    def decode(self, ids: list[int]) -> str: ...

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class DatasetConfig:
    """Which tokens the precompute reads.

    Args:
        source: ``stdlib`` (the held-out files of the running Python's standard library), ``stdlib:all``,
            ``stdlib:train``, a ``.txt``/``.jsonl`` file or a folder of them, or ``hf:NAME`` for a Hugging Face
            dataset (needs the ``datasets`` package and network or a local cache).
        tokens: how many tokens to run through the models (rounded up to whole rows).
        ctx: row length; None means the smaller of 256 and the models' context length.
        batch_size: rows per forward pass.
        shuffle_seed: the seed that orders documents (stdlib and local files) before packing.
        text_field: the JSON field that holds the text in ``.jsonl`` files and HF datasets.
        hf_split: the split of a Hugging Face dataset.
        skip_special: leave BOS/EOS/pad positions out of every statistic (paper A.2).
        skip_newline: leave tokens whose text is exactly "\\n" out of every statistic (paper A.2).
    """

    source: str = "stdlib"
    tokens: int = 500_000
    ctx: int | None = None
    batch_size: int = 16
    shuffle_seed: int = 0
    text_field: str = "text"
    hf_split: str = "train"
    skip_special: bool = True
    skip_newline: bool = True

    def __post_init__(self) -> None:
        if self.tokens <= 0:
            raise DataError(f"--tokens must be a positive number of tokens, got {self.tokens}")
        if self.batch_size <= 0:
            raise DataError(f"batch size must be positive, got {self.batch_size}")
        if self.ctx is not None and self.ctx < 2:
            raise DataError(f"ctx must be at least 2 (BOS plus one token), got {self.ctx}")


@dataclass(frozen=True)
class TokenDataset:
    """Rows of token ids, each starting with BOS, and the mask of positions that statistics count."""

    rows: np.ndarray  # [n_rows, ctx] int64
    counted: np.ndarray  # [n_rows, ctx] bool
    config: DatasetConfig
    ctx: int
    description: dict[str, Any]

    @property
    def n_rows(self) -> int:
        return int(self.rows.shape[0])

    @property
    def tokens_seen(self) -> int:
        return int(self.rows.size)

    @property
    def tokens_counted(self) -> int:
        return int(self.counted.sum())

    def batch_starts(self, start_row: int = 0) -> range:
        return range(start_row, self.n_rows, self.config.batch_size)

    def fingerprint(self) -> str:
        return hashlib.sha256(self.rows.astype(np.int64).tobytes()).hexdigest()[:16]


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


def newline_token_ids(tokenizer: Tokenizer) -> list[int]:
    """Ids of tokens whose decoded text is exactly a newline (GPT-2: 198), as the paper filters."""
    return [i for i in range(len(tokenizer)) if tokenizer.decode([i]) == "\n"]


def skipped_token_ids(tokenizer: Tokenizer, config: DatasetConfig) -> list[int]:
    """The token ids that statistics leave out under `config`."""
    skipped: set[int] = set()
    if config.skip_special:
        skipped |= {
            i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None
        }
    if config.skip_newline:
        skipped |= set(newline_token_ids(tokenizer))
    return sorted(skipped)


def _local_documents(path: Path, text_field: str, shuffle_seed: int) -> Iterator[str]:
    files = sorted(p for p in path.rglob("*") if p.suffix in {".txt", ".jsonl"}) if path.is_dir() else [path]
    if not files:
        raise DataError(f"no .txt or .jsonl files under {path}")
    random.Random(shuffle_seed).shuffle(files)
    for file in files:
        if file.suffix == ".jsonl":
            with file.open(encoding="utf-8") as handle:
                for line_no, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    record = json.loads(line)
                    if text_field not in record:
                        raise DataError(f"{file}:{line_no} has no field {text_field!r} (set --text-field)")
                    yield str(record[text_field])
        else:
            yield file.read_text(encoding="utf-8", errors="replace")


def _hf_documents(name: str, split: str, text_field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - depends on the optional extra
        raise DataError("Hugging Face datasets need `pip install datasets` (the [datasets] extra)") from exc
    try:
        dataset = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as exc:
        raise DataError(f"could not load the Hugging Face dataset {name!r} (split {split!r}): {exc}") from exc
    for record in dataset:
        yield str(record[text_field])


def documents(config: DatasetConfig) -> tuple[Iterator[str], dict[str, Any]]:
    """The documents of a source and a description of it for the run record."""
    source = config.source
    if source in STDLIB_SOURCES:
        from precompute import corpus

        split = STDLIB_SOURCES[source]
        texts = corpus.stdlib_documents(split)
        random.Random(config.shuffle_seed).shuffle(texts)
        fingerprint = corpus.stdlib_fingerprint()
        return iter(texts), {"kind": "stdlib", "split": split, "corpus": asdict(fingerprint)}
    if source.startswith(HF_PREFIX):
        name = source[len(HF_PREFIX) :]
        return _hf_documents(name, config.hf_split, config.text_field), {
            "kind": "huggingface",
            "name": name,
            "split": config.hf_split,
        }
    path = Path(source)
    if path.exists():
        return _local_documents(path, config.text_field, config.shuffle_seed), {
            "kind": "local",
            "path": str(path.resolve()),
        }
    raise DataError(
        f"unknown dataset source {source!r}: use one of {', '.join(STDLIB_SOURCES)}, a .txt/.jsonl file or "
        f"folder, or hf:NAME for a Hugging Face dataset"
    )


def _tokenize(texts: Iterator[str], tokenizer: Tokenizer, chunk: int = 64) -> Iterator[list[int]]:
    buffer: list[str] = []
    for text in texts:
        buffer.append(text)
        if len(buffer) == chunk:
            yield from tokenizer(buffer, add_special_tokens=False)["input_ids"]
            buffer = []
    if buffer:
        yield from tokenizer(buffer, add_special_tokens=False)["input_ids"]


def build_dataset(config: DatasetConfig, tokenizer: Tokenizer, model_ctx: int) -> TokenDataset:
    """Tokenise and pack just enough documents for ``config.tokens`` tokens.

    Raises:
        DataError: the source is unknown or holds fewer tokens than asked.
    """
    ctx = config.ctx or min(256, model_ctx)
    if ctx > model_ctx:
        raise DataError(f"ctx {ctx} is longer than the models' context length {model_ctx}")
    bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos_id
    if bos_id is None:
        raise DataError("the tokenizer has neither a BOS nor an EOS token to start rows with")
    n_rows = -(-config.tokens // ctx)
    texts, description = documents(config)
    rows = pack_documents(_tokenize(texts, tokenizer), ctx, bos_id, eos_id, max_rows=n_rows)
    if rows.shape[0] < n_rows:
        raise DataError(
            f"source {config.source!r} holds only {rows.shape[0] * ctx:,} tokens in rows of {ctx}; "
            f"asked for {config.tokens:,} (lower --tokens or use a larger source, e.g. stdlib:all)"
        )
    skipped = skipped_token_ids(tokenizer, config)
    counted = ~np.isin(rows, np.asarray(skipped, dtype=np.int64))
    description |= {
        "source": config.source,
        "ctx": ctx,
        "rows": int(rows.shape[0]),
        "tokens_seen": int(rows.size),
        "tokens_counted": int(counted.sum()),
        "skipped_token_ids": skipped,
        "bos_id": int(bos_id),
        "eos_id": int(eos_id),
    }
    dataset = TokenDataset(rows=rows, counted=counted, config=config, ctx=ctx, description=description)
    dataset.description["fingerprint"] = dataset.fingerprint()
    logger.info("dataset: %s rows x %s tokens, %s counted", rows.shape[0], ctx, description["tokens_counted"])
    return dataset
