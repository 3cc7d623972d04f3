"""Corpus to deterministic token batches: the paper's tokenize-and-concatenate, and the counted-token filter.

Documents are tokenised and packed into rows of ``ctx`` tokens that start with BOS (`precompute.packing`). The
same rows in the same order feed every model and every stage, which is what makes a killed run resumable at a row
index.

Sources: the standard library's own source code (the embedded default, `precompute.stdlib_corpus`), local
``.txt``/``.jsonl`` files or folders, and a Hugging Face dataset name for users who are online
(``hf:NeelNanda/pile-10k``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from precompute.packing import TextTokenizer, pack_documents, tokenize_in_chunks
from precompute.stdlib_corpus import SplitOrAll, stdlib_documents, stdlib_fingerprint

logger = logging.getLogger(__name__)

#: How a source is written on the command line.
STDLIB_SOURCES: dict[str, SplitOrAll] = {
    "stdlib": "validation",
    "stdlib:validation": "validation",
    "stdlib:train": "train",
    "stdlib:all": "all",
}
HF_PREFIX = "hf:"

#: Which tokens a statistic covers: ``counted`` (the run's counted tokens: BOS/EOS/pad and "\n" left out as the
#: correlations do, paper A.2) or ``all`` (every token of the rows, BOS included: what the paper's moments,
#: histograms and variance reductions cover, paper-spec §1.3, §3.1, §7.3 item 5).
TokenSet = Literal["counted", "all"]


class DataError(ValueError):
    """A dataset that cannot be built as asked (unknown source, too few tokens, ...)."""


class Tokenizer(TextTokenizer, Protocol):
    """The part of a Hugging Face tokenizer the data pipeline uses."""

    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None

    def decode(self, ids: list[int]) -> str: ...

    def __len__(self) -> int: ...


#: Tokens a batch on CUDA unless ``--batch-size`` says otherwise: the correlation engine's bench reaches the GEMMs'
#: rate at 12,288-token batches on an H100, and a 4,096-token batch (16 rows of 256, the CPU's default) read and
#: wrote the pair's accumulator three times as often a token (0.23 of the bench inside a default precompute,
#: docs/performance.md). The memory plan still takes fewer rows when a batch does not fit.
CUDA_BATCH_TOKENS = 12_288


def default_batch_rows(device: str, row_tokens: int) -> int:
    """Rows a batch when none is asked for: `DatasetConfig.batch_size` on a CPU; on CUDA, `CUDA_BATCH_TOKENS`
    worth of rows of ``row_tokens`` (an upper bound on the row length: ``--ctx``, else ``--max-ctx``).

    >>> default_batch_rows("cpu", 256), default_batch_rows("cuda", 256), default_batch_rows("cuda:1", 1024)
    (16, 48, 12)
    """
    if device.partition(":")[0] != "cuda":
        return DatasetConfig.batch_size
    return max(1, CUDA_BATCH_TOKENS // row_tokens)


@dataclass(frozen=True)
class DatasetConfig:
    """Which tokens the precompute reads.

    Args:
        source: ``stdlib`` (the held-out files of the running Python's standard library), ``stdlib:all``,
            ``stdlib:train``, a ``.txt``/``.jsonl`` file or a folder of them, or ``hf:NAME`` for a Hugging Face
            dataset (needs the ``datasets`` package and network or a local cache).
        tokens: how many tokens to run through the models (rounded up to whole rows).
        ctx: row length; None means the smaller of ``max_ctx`` and the models' context length.
        max_ctx: the row length when ``ctx`` is None, if the models' context is not shorter (the paper: 512).
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
    max_ctx: int = 256
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
        if self.max_ctx < 2:
            raise DataError(f"max_ctx must be at least 2 (BOS plus one token), got {self.max_ctx}")


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

    # Counts the stages plan their memory from, computed once per dataset (the plan prices many splits).

    @functools.cached_property
    def max_token_id(self) -> int:
        return int(self.rows.max()) if self.rows.size else 0

    @functools.cached_property
    def token_counts(self) -> np.ndarray:
        """How often each token id is counted: [max_token_id + 1] int64."""
        return np.bincount(self.rows[self.counted], minlength=self.max_token_id + 1)

    @functools.cached_property
    def previous_token_counts(self) -> np.ndarray:
        """How often each token id is the token before a counted one: [max_token_id + 1] int64."""
        return np.bincount(self.rows[:, :-1][self.counted[:, 1:]], minlength=self.max_token_id + 1)

    def fingerprint(self) -> str:
        return hashlib.sha256(self.rows.astype(np.int64).tobytes()).hexdigest()[:16]

    def selection(self, tokens: TokenSet = "counted", max_tokens: int | None = None) -> TokenSelection:
        """The tokens a stage reads (`TokenSelection`), made once per (tokens, max_tokens) and kept: the memory
        plan prices many splits, and each asks for the selection's counts."""
        key = (tokens, max_tokens)
        if key not in self._selections:
            self._selections[key] = TokenSelection(self, tokens, max_tokens)
        return self._selections[key]

    @functools.cached_property
    def _selections(self) -> dict[tuple[TokenSet, int | None], TokenSelection]:
        return {}


@dataclass(frozen=True, eq=False)
class TokenSelection:
    """The tokens a stage reads: the dataset's counted tokens or all of them, and of those only the first
    ``max_tokens`` in row order (None: every one), so that one run can feed its statistics fewer tokens than its
    correlations (the paper: 10M and 100M, paper-spec §1.3).

    >>> rows = np.array([[0, 5, 6, 0], [0, 7, 0, 8]])
    >>> data = TokenDataset(rows, rows != 0, DatasetConfig(), 4, {})
    >>> data.selection("counted", 3).mask(slice(0, 2)).astype(int).tolist()
    [[0, 1, 1, 0], [0, 1, 0, 0]]
    >>> data.selection("all", 6).n_tokens, data.selection("counted").is_counted, data.selection("all").is_counted
    (6, True, False)
    """

    dataset: TokenDataset
    tokens: TokenSet = "counted"
    max_tokens: int | None = None

    @functools.cached_property
    def _before(self) -> np.ndarray:
        """Tokens of the set (without the cap) before each row: [n_rows + 1] int64."""
        dataset = self.dataset
        if self.tokens == "counted":
            per_row = dataset.counted.sum(1, dtype=np.int64)
        else:
            per_row = np.full(dataset.n_rows, dataset.ctx, dtype=np.int64)
        return np.concatenate([[0], np.cumsum(per_row)]).astype(np.int64)

    @functools.cached_property
    def n_tokens(self) -> int:
        """How many tokens the selection holds."""
        total = int(self._before[-1])
        return total if self.max_tokens is None else min(total, self.max_tokens)

    @functools.cached_property
    def is_counted(self) -> bool:
        """The selection is exactly the dataset's counted tokens: batches are read as they come (asked per batch:
        computed once)."""
        return self.tokens == "counted" and self.n_tokens == self.dataset.tokens_counted

    @property
    def key(self) -> tuple[str, int | None]:
        """What names the selection: stages with the same key read the same tokens (and share a batch's view)."""
        return (self.tokens, self.max_tokens)

    def mask(self, rows: slice) -> np.ndarray:
        """Which tokens of the rows ``rows`` (a slice with a start and a stop) the selection holds: [rows, ctx]."""
        dataset = self.dataset
        start, stop, _ = rows.indices(dataset.n_rows)
        if self.tokens == "counted":
            base = dataset.counted[start:stop]
        else:
            base = np.ones((stop - start, dataset.ctx), dtype=bool)
        if self.max_tokens is None or self._before[stop] <= self.max_tokens:
            return base
        left = self.max_tokens - int(self._before[start])  # what the cap leaves for these rows
        flat = base.reshape(-1)
        return (flat & (np.cumsum(flat) <= left)).reshape(base.shape)

    def flat_indices(self) -> np.ndarray:
        """Flat indices (row * ctx + position) of every selected token, in order: [n_tokens] int64."""
        return np.flatnonzero(self.mask(slice(None)).reshape(-1))

    @functools.cached_property
    def token_counts(self) -> np.ndarray:
        """How often each token id is selected: [max_token_id + 1] int64."""
        if self.is_counted:
            return self.dataset.token_counts
        mask = self.mask(slice(None))
        return np.bincount(self.dataset.rows[mask], minlength=self.dataset.max_token_id + 1)

    @functools.cached_property
    def previous_token_counts(self) -> np.ndarray:
        """How often each token id is the token before a selected one: [max_token_id + 1] int64."""
        if self.is_counted:
            return self.dataset.previous_token_counts
        mask = self.mask(slice(None))
        return np.bincount(self.dataset.rows[:, :-1][mask[:, 1:]], minlength=self.dataset.max_token_id + 1)


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
        import datasets  # lazy: an optional extra, needed only for hf: sources
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
        split = STDLIB_SOURCES[source]
        texts = stdlib_documents(split)
        random.Random(config.shuffle_seed).shuffle(texts)
        fingerprint = stdlib_fingerprint()
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


def build_dataset(config: DatasetConfig, tokenizer: Tokenizer, model_ctx: int) -> TokenDataset:
    """Tokenise and pack just enough documents for ``config.tokens`` tokens.

    Raises:
        DataError: the source is unknown or holds fewer tokens than asked.
    """
    ctx = config.ctx or min(config.max_ctx, model_ctx)
    if ctx > model_ctx:
        raise DataError(f"ctx {ctx} is longer than the models' context length {model_ctx}")
    bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos_id is None:
        raise DataError("the tokenizer has neither a BOS nor an EOS token to start rows with")
    eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos_id
    n_rows = -(-config.tokens // ctx)
    texts, description = documents(config)
    rows = pack_documents(tokenize_in_chunks(texts, tokenizer), ctx, bos_id, eos_id, max_rows=n_rows)
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
