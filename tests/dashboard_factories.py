"""Fixture atlas files for the dashboard's tests, built with the real precompute (nothing mocked).

`build_atlas` runs ``universal-neurons precompute`` on a tiny family with the real stages: correlations and the
analyses (precompute/stages/stats.py, examples.py, families.py, roles.py).

`build_xss_family` makes a family whose vocabulary holds HTML/JS-like tokens (``<script>alert(1)</script>``,
``" onmouseover="...``) and control characters, for the escaping tests.
"""

from __future__ import annotations

import functools
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

#: Tokens that must always render as text.
NASTY_TOKENS = (
    "<script>alert(1)</script>",
    '" onmouseover="alert(2)',
    "'><img src=x onerror=alert(3)>",
    "</span><b>bold</b>",
    "\x07bell\x1b[31m",
    "{{ 7*7 }}",
)


def precompute(db: Path, models: Sequence[Path], tokens: int = 6000, extra: Sequence[str] = ()) -> None:
    """Run the real precompute CLI; raises if it fails."""
    from cli.main import main

    code = main(["precompute", "--db", str(db), "--tokens", str(tokens), *extra, *(str(m) for m in models)])
    if code != 0:
        raise RuntimeError(f"precompute failed with exit code {code}")


#: The analysis stages whose tables the dashboard shows (revision 0002).
ANALYSIS_STAGES = ("stats", "examples", "families", "roles")


def build_atlas(
    db: Path,
    models: Sequence[Path],
    tokens: int = 6000,
    threshold: float = 0.3,
    analyses: bool = True,
    extra: Sequence[str] = (),
) -> Path:
    """Precompute a family into `db`: correlations and, with `analyses`, the analysis stages."""
    import sqlite3

    stages = ",".join(("correlations", *ANALYSIS_STAGES)) if analyses else "correlations"
    precompute(db, models, tokens, ["--threshold", str(threshold), "--stages", stages, *extra])
    with sqlite3.connect(db) as conn:  # fold the WAL into the file: one self-contained file, like a finished run
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return db


def copy_atlas(template: Path, target: Path) -> Path:
    """A fresh copy of a fixture file (each test gets its own database), through SQLite's backup API."""
    import sqlite3

    source = sqlite3.connect(f"file:{template}?mode=ro", uri=True)
    destination = sqlite3.connect(target)
    try:
        source.backup(destination)
    finally:
        source.close()
        destination.close()
    return target


@functools.cache
def family_template(base: Path, permuted: Path, other: Path) -> Path:
    """The tests' standard atlas file, built once per process (shared by tests/app and tests/browser).

    Run 1: ``tiny-a``, ``tiny-b``, ``tiny-a-permuted`` with ``--reference-only`` and no analyses (the non-reference
    models' aggregates are NULL). Run 2 (the default): ``tiny-a``, ``tiny-a-permuted`` (the same network with its
    neurons permuted) and ``tiny-b``, with analysis rows.
    """
    db = Path(tempfile.mkdtemp(prefix="atlas-template-")) / "template.db"
    build_atlas(db, [base, other, permuted], tokens=3000, analyses=False, extra=["--reference-only"])
    return build_atlas(db, [base, permuted, other], tokens=6000)


@functools.cache
def xss_template() -> Path:
    """An atlas of the `build_xss_family` models, built once per process."""
    root = Path(tempfile.mkdtemp(prefix="atlas-xss-"))
    models, text = build_xss_family(root)
    return build_atlas(root / "xss.db", models, tokens=3000, extra=["--dataset", str(text)])


def build_xss_family(root: Path, seeds: Sequence[int] = (0, 1)) -> tuple[list[Path], Path]:
    """Tiny models whose tokenizer contains `NASTY_TOKENS`, and a text file full of them to precompute on."""
    from precompute.training.tokenizer import load_tokenizer
    from tests.factories import tiny_gpt2, tiny_tokenizer

    base = tiny_tokenizer(512)
    folder = root / "xss-tokenizer"
    base.save_pretrained(folder)
    tokenizer = load_tokenizer(folder)
    tokenizer.add_tokens(list(NASTY_TOKENS))
    tokenizer.save_pretrained(folder)
    vocab_size = len(tokenizer)
    models = []
    for seed in seeds:
        path = tiny_gpt2(root / f"xss-{seed}", seed=seed, vocab_size=512)
        _resize_vocab(path, vocab_size)
        load_tokenizer(folder).save_pretrained(path)
        models.append(path)
    text = root / "nasty.txt"
    words = ["def f(x):", "return x", *NASTY_TOKENS, "print('hi')", "<div>", "&amp;"]
    text.write_text("\n".join(" ".join(words[(i + j) % len(words)] for j in range(8)) for i in range(400)))
    return models, text


def _resize_vocab(folder: Path, vocab_size: int) -> None:
    """Grow a saved GPT-2's embedding to `vocab_size` (the added tokens get small random embeddings)."""
    import torch
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(folder)
    torch.manual_seed(vocab_size)
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    model.save_pretrained(folder)


#: The planted family (`planted_template`): a last-layer neuron of ``plant-a`` whose output writes `PLANTED_TOKEN`.
PLANTED = {"layer": 1, "neuron": 7, "token": 100}


@functools.cache
def planted_template() -> tuple[Path, dict[str, list]]:
    """An atlas of ``plant-a`` (a tiny GPT-2 with `PLANTED`'s neuron made a prediction neuron) and two copies with
    their neurons permuted (``plant-b``, ``plant-c``): correlations and activation statistics, built once per
    process. Returns the file and each copy's permutations (neuron ``perm[j]`` of plant-a is neuron ``j``)."""
    from tests.factories import permuted_copy, plant_prediction_neuron, tiny_gpt2

    root = Path(tempfile.mkdtemp(prefix="atlas-planted-"))
    base = tiny_gpt2(root / "plant-a", seed=3)
    plant_prediction_neuron(base, PLANTED["layer"], PLANTED["neuron"], PLANTED["token"])
    permutations = {
        "plant-b": permuted_copy(base, root / "plant-b", seed=4),
        "plant-c": permuted_copy(base, root / "plant-c", seed=5),
    }
    db = root / "planted.db"
    precompute(
        db, [base, root / "plant-b", root / "plant-c"], 2000, ["--threshold", "0.3", "--stages", "correlations,stats"]
    )
    return db, permutations
