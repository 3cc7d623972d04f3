"""Token batches: the paper's tokenize-and-concatenate, sources and the counted-token filter."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from precompute.data import DataError, DatasetConfig, build_dataset
from precompute.packing import pack_documents
from tests.factories import tiny_tokenizer


@given(
    docs=st.lists(st.lists(st.integers(2, 50), min_size=0, max_size=30), min_size=1, max_size=8),
    ctx=st.integers(2, 12),
)
def test_packing_keeps_every_token_in_order_with_eos_between_documents(docs, ctx):
    rows = pack_documents(docs, ctx=ctx, bos_id=0, eos_id=1)
    assert rows.shape[1] == ctx
    assert (rows[:, 0] == 0).all()
    stream = [t for i, doc in enumerate(docs) for t in ([1] if i else []) + doc]
    body = rows[:, 1:].reshape(-1).tolist()
    assert body == stream[: len(body)]
    assert len(stream) - len(body) < ctx - 1  # only an incomplete last row is dropped


def test_local_text_and_jsonl_sources(tmp_path):
    tokenizer = tiny_tokenizer()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("def f(x):\n    return x + 1\n" * 200)
    with (tmp_path / "docs" / "b.jsonl").open("w") as handle:
        for i in range(100):
            handle.write(json.dumps({"body": f"print({i})\n" * 5}) + "\n")
    with pytest.raises(DataError, match="has no field 'text'"):
        build_dataset(DatasetConfig(source=str(tmp_path / "docs"), tokens=2000, ctx=32), tokenizer, 64)
    config = DatasetConfig(source=str(tmp_path / "docs"), tokens=2000, ctx=32, text_field="body")
    dataset = build_dataset(config, tokenizer, model_ctx=64)
    assert dataset.rows.shape == (63, 32)
    assert dataset.description["kind"] == "local"
    again = build_dataset(config, tokenizer, model_ctx=64)
    assert dataset.fingerprint() == again.fingerprint()  # deterministic


def test_default_ctx_is_the_smaller_of_256_and_the_model_context():
    tokenizer = tiny_tokenizer()
    assert build_dataset(DatasetConfig(tokens=1000), tokenizer, model_ctx=64).ctx == 64
    assert build_dataset(DatasetConfig(tokens=1000), tokenizer, model_ctx=1024).ctx == 256


def test_stdlib_source_records_the_corpus_fingerprint():
    dataset = build_dataset(DatasetConfig(tokens=3000, ctx=64), tiny_tokenizer(), model_ctx=64)
    corpus = dataset.description["corpus"]
    assert corpus["python_version"] and len(corpus["sha256"]) == 64
    assert dataset.description["tokens_counted"] == int(dataset.counted.sum()) < dataset.tokens_seen


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (dict(tokens=0), "positive number of tokens"),
        (dict(source="nope:xyz", tokens=10), "unknown dataset source"),
        (dict(tokens=10**9, ctx=64), "holds only"),
        (dict(tokens=100, ctx=1), "ctx must be at least 2"),
    ],
)
def test_bad_dataset_requests_are_refused_clearly(config, message):
    with pytest.raises(DataError, match=message):
        build_dataset(DatasetConfig(**config), tiny_tokenizer(), model_ctx=64)


def test_keep_newlines_counts_them():
    tokenizer = tiny_tokenizer()
    skip = build_dataset(DatasetConfig(tokens=3000, ctx=64), tokenizer, 64)
    keep = build_dataset(DatasetConfig(tokens=3000, ctx=64, skip_newline=False), tokenizer, 64)
    assert keep.tokens_counted > skip.tokens_counted
    assert keep.tokens_counted == int((keep.rows != 0).sum())
    np.testing.assert_array_equal(keep.rows, skip.rows)
