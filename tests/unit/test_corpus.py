"""The embedded corpus: file list, splits, fingerprint, BPE tokenizer and packed rows."""

from __future__ import annotations

import json
import platform

import numpy as np
import pytest

from precompute import stdlib_corpus
from precompute.training import corpus
from precompute.training import tokenizer as bpe

SNIPPET = 'def greet(name: str) -> str:\n\treturn f"héllo {name} ✓"  # 日本\n\n\nclass A:\n    pass\n'


@pytest.fixture(scope="module")
def small_texts() -> list[str]:
    return stdlib_corpus.stdlib_documents("train")[:30]


@pytest.fixture(scope="module")
def small_tokenizer(small_texts: list[str]):
    return bpe.train_bpe_tokenizer(small_texts, vocab_size=512)


def test_files_include_tests_exclude_site_packages_and_are_sorted() -> None:
    files = stdlib_corpus.stdlib_files()
    relative = [stdlib_corpus.relative_path(path) for path in files]
    assert relative == sorted(relative)
    assert not any({"site-packages", "dist-packages"} & set(path.parts) for path in files)
    assert all(path.suffix == ".py" and path.is_file() for path in files)
    assert "os.py" in relative
    assert any(name.startswith("test/") for name in relative)  # the test suite is part of the corpus
    assert stdlib_corpus.stdlib_files() is not stdlib_corpus.stdlib_files()  # callers get their own list


def test_split_is_stable_pinned_and_about_ten_percent() -> None:
    # Pinned: the split is sha256 of the relative path, so it must never change between versions of this code.
    assert [stdlib_corpus.split_of(name) for name in ("__hello__.py", "ast.py", "asyncio/constants.py")] == [
        "validation"
    ] * 3
    assert [stdlib_corpus.split_of(name) for name in ("os.py", "json/decoder.py")] == ["train"] * 2
    synthetic = [f"package/module_{i}.py" for i in range(20_000)]
    fraction = sum(stdlib_corpus.split_of(name) == "validation" for name in synthetic) / len(synthetic)
    assert 0.09 < fraction < 0.11
    relative = [stdlib_corpus.relative_path(path) for path in stdlib_corpus.stdlib_files()]
    assert 0.07 < sum(stdlib_corpus.split_of(name) == "validation" for name in relative) / len(relative) < 0.13


def test_documents_partition_the_corpus_and_are_fresh_lists() -> None:
    train, validation = stdlib_corpus.stdlib_documents("train"), stdlib_corpus.stdlib_documents("validation")
    everything = stdlib_corpus.stdlib_documents("all")
    assert len(train) + len(validation) == len(everything) == len(stdlib_corpus.stdlib_files())
    assert set(train) | set(validation) == set(everything)
    train.clear()
    assert stdlib_corpus.stdlib_documents("train")
    with pytest.raises(ValueError, match="train, validation, all"):
        stdlib_corpus.stdlib_documents("test")  # type: ignore[arg-type]


def test_fingerprint_is_stable() -> None:
    fingerprint = stdlib_corpus.stdlib_fingerprint()
    assert fingerprint == stdlib_corpus.stdlib_fingerprint.__wrapped__()  # recomputed without the cache
    assert fingerprint.n_files == len(stdlib_corpus.stdlib_files())
    assert fingerprint.n_bytes == sum(path.stat().st_size for path in stdlib_corpus.stdlib_files())
    assert fingerprint.python_version == platform.python_version()
    assert len(fingerprint.sha256) == 64


def test_bpe_is_deterministic(small_texts: list[str], small_tokenizer) -> None:
    again = json.loads(bpe.train_bpe_tokenizer(small_texts, vocab_size=512).backend_tokenizer.to_str())
    first = json.loads(small_tokenizer.backend_tokenizer.to_str())
    assert first["model"]["vocab"] == again["model"]["vocab"]
    assert first["model"]["merges"] == again["model"]["merges"]
    assert len(first["model"]["merges"]) > 0


def test_endoftext_is_id_zero_and_every_special_role(small_tokenizer) -> None:
    assert len(small_tokenizer) == 512
    assert small_tokenizer.convert_tokens_to_ids("<|endoftext|>") == 0
    for role in ("bos", "eos", "unk", "pad"):
        assert getattr(small_tokenizer, f"{role}_token_id") == 0
    assert small_tokenizer("a<|endoftext|>b", add_special_tokens=False)["input_ids"][1] == 0
    assert small_tokenizer("x = 1")["input_ids"][0] != 0  # no BOS added: rows get theirs when packed


def test_decode_encode_round_trips(small_tokenizer, tmp_path) -> None:
    ids = small_tokenizer(SNIPPET, add_special_tokens=False)["input_ids"]
    assert small_tokenizer.decode(ids) == SNIPPET
    assert len(ids) < len(SNIPPET.encode("utf-8"))  # merges compress
    bpe.save_tokenizer(small_tokenizer, tmp_path / "tok")
    reloaded = bpe.load_tokenizer(tmp_path / "tok")
    assert reloaded(SNIPPET, add_special_tokens=False)["input_ids"] == ids
    assert reloaded.bos_token_id == 0


def test_vocab_size_below_the_byte_alphabet_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 257"):
        bpe.train_bpe_tokenizer(["x"], vocab_size=100)


def test_full_corpus_bpe_has_the_asked_vocabulary() -> None:
    tokenizer = bpe.train_bpe_tokenizer(stdlib_corpus.stdlib_documents("train"), vocab_size=4096)
    assert len(tokenizer) == 4096
    assert tokenizer.decode(tokenizer(SNIPPET)["input_ids"]) == SNIPPET
    common = "    def __init__(self):\n        self.value = None\n"
    assert len(tokenizer(common)["input_ids"]) < len(common) / 3  # common Python compresses well


def test_packed_corpus_is_cached_and_checks_its_key(tmp_path) -> None:
    packed = corpus.packed_corpus(tmp_path, vocab_size=300, ctx=16, shuffle_seed=0, max_documents=5)
    assert packed.train_rows.shape[1] == packed.validation_rows.shape[1] == 16
    assert (packed.train_rows[:, 0] == 0).all() and (packed.validation_rows[:, 0] == 0).all()
    assert packed.train_rows.max() < 300 and packed.fingerprint == stdlib_corpus.stdlib_fingerprint()
    cached = corpus.packed_corpus(tmp_path, vocab_size=300, ctx=16, shuffle_seed=0, max_documents=5)
    np.testing.assert_array_equal(cached.train_rows, packed.train_rows)
    np.testing.assert_array_equal(cached.validation_rows, packed.validation_rows)
    assert cached.tokenizer.backend_tokenizer.to_str() == packed.tokenizer.backend_tokenizer.to_str()
    with pytest.raises(corpus.CorpusCacheError, match="another folder"):
        corpus.packed_corpus(tmp_path, vocab_size=300, ctx=32, shuffle_seed=0, max_documents=5)
