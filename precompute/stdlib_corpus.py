"""The running Python's standard library as an embedded offline corpus: its files, their split, its fingerprint.

Every machine that runs this project has the corpus: the ``.py`` files of ``sysconfig``'s ``stdlib`` folder,
tests included, third-party ``site-packages`` excluded (1,790 files / 31.5 MB on CPython 3.11.7). The files
depend on the exact CPython build, so runs record a :class:`CorpusFingerprint`. Files are split into train and
validation by a hash of their relative path, which is stable across machines and Python versions (a file keeps
its split when others are added or removed).

Reading the corpus is all this module does: the precompute's ``stdlib`` datasets (`precompute.data`) read the
held-out split, and training the embedded family (`precompute.training`) reads the train split.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Split = Literal["train", "validation"]
SplitOrAll = Literal["train", "validation", "all"]
SPLITS: tuple[str, ...] = ("train", "validation", "all")

#: Path parts that mark third-party code inside the stdlib folder.
_THIRD_PARTY_PARTS = frozenset({"site-packages", "dist-packages"})


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


__all__ = [
    "SPLITS",
    "CorpusFingerprint",
    "Split",
    "SplitOrAll",
    "relative_path",
    "split_of",
    "stdlib_documents",
    "stdlib_files",
    "stdlib_fingerprint",
    "stdlib_root",
]
