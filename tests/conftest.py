"""Shared fixtures: tiny model families on disk, built per test session (nothing loads a model at import)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see precompute/__init__.py


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="run tests marked slow (GPU, downloads)")
    parser.addoption("--run-browser", action="store_true", help="run tests marked browser (headless Chromium)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_slow = pytest.mark.skip(reason="slow: needs --run-slow (GPU or downloads); see tests/QUARANTINES.md")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A tiny random GPT-2, a copy with permuted MLP neurons, and a different-seed model."""
    from tests.factories import permuted_copy, tiny_gpt2

    root: Path = tmp_path_factory.mktemp("family")
    base = tiny_gpt2(root / "tiny-a", seed=0)
    permutations = permuted_copy(base, root / "tiny-a-permuted", seed=1)
    other = tiny_gpt2(root / "tiny-b", seed=1)
    return {"base": base, "permuted": root / "tiny-a-permuted", "other": other, "permutations": permutations}
