"""Token/context features and variance reduction (issue 3 part 4; paper eq. 4, paper-spec §4, §9.9)."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from precompute import features as feats
from precompute.activations import ActivationBatch
from precompute.data import DatasetConfig, build_dataset
from precompute.stages.families import (
    POOLED_BUCKETS,
    FamiliesConfig,
    FamiliesStage,
    grouped_variance_reduction,
    label_neuron,
    position_mutual_information,
    top_rows,
    variance_reduction,
)

# --- variance reduction -----------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, 40, elements=st.floats(-1e3, 1e3)), arrays(bool, 40))
def test_variance_reduction_is_between_zero_and_one(v, y):
    assert 0.0 <= variance_reduction(v, y) <= 1.0 + 1e-12


@settings(max_examples=30, deadline=None)
@given(st.floats(-100, 100), st.floats(-100, 100), arrays(bool, 30))
def test_variance_reduction_is_one_when_v_is_a_function_of_y(low, high, y):
    if abs(high - low) < 1e-6 or y.all() or not y.any():
        return  # a constant v (or a variance that underflows) has no variance to reduce
    v = np.where(y, high, low)
    assert variance_reduction(v, y) == pytest.approx(1.0)


def test_variance_reduction_is_near_zero_for_an_independent_feature():
    rng = np.random.default_rng(0)
    v, y = rng.standard_gamma(0.5, 200_000), rng.random(200_000) < 0.3
    assert variance_reduction(v, y) < 1e-3
    # and it is the R² of the two-group-means model (paper-spec §9.9)
    fit = np.where(y, v[y].mean(), v[~y].mean())
    assert variance_reduction(v, y) == pytest.approx(1 - ((v - fit) ** 2).sum() / ((v - v.mean()) ** 2).sum())


def test_grouped_variance_reduction_equals_the_direct_one():
    rng = np.random.default_rng(1)
    categories = rng.integers(0, 12, 5000)
    v = rng.normal(size=(5000, 3)) + categories[:, None] % 3 * np.array([1.0, 0.0, -2.0])
    members = [np.array([0, 3, 6, 9]), np.array([5]), np.arange(12), np.array([], dtype=int)]
    counts = np.bincount(categories, minlength=12).astype(float)
    sums = np.stack([np.bincount(categories, weights=v[:, j], minlength=12) for j in range(3)], axis=1)
    n1 = np.array([counts[m].sum() for m in members])
    s1 = np.stack([sums[m].sum(0) for m in members])
    sst = ((v - v.mean(0)) ** 2).sum(0)
    got = grouped_variance_reduction(n1, s1, 5000.0, v.sum(0), sst)
    for f, m in enumerate(members):
        for j in range(3):
            assert got[f, j] == pytest.approx(variance_reduction(v[:, j], np.isin(categories, m)), abs=1e-12)
    assert got[0, 0] > 0.3 and got[0, 1] < 0.01


# --- token features ---------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 30).flatmap(
        lambda rows: st.tuples(
            arrays(
                np.float64,
                st.tuples(st.just(rows), st.integers(1, 12)),
                # few distinct values: ties at the k-th are the case a partition could get wrong
                elements=st.sampled_from([-np.inf, -1.0, -0.0, 0.0, 0.5, 2.0, np.inf, np.nan]),
            ),
            st.integers(1, rows + 2),
        )
    )
)
def test_top_rows_equals_a_stable_full_sort(values_and_k):
    values, k = values_and_k
    expected = np.argsort(-values, axis=0, kind="stable")[:k]
    np.testing.assert_array_equal(top_rows(values, k), expected)
    finite = np.nan_to_num(values, nan=-7.0)  # the partition path (NaN takes the full sort)
    np.testing.assert_array_equal(top_rows(finite, k), np.argsort(-finite, axis=0, kind="stable")[:k])


def test_token_features_unigram_alphabet_and_classes():
    strings = ["<|endoftext|>", " On", "on", "ON", " apple", "1999", " 42", "(", "\n    ", "_x"]
    counts = np.array([0, 10, 10, 1, 30, 5, 5, 5, 5, 5])
    buckets = feats.vocab_buckets(strings, counts, None, special=[0])
    f = feats.token_features("token", strings, buckets, counts, min_count=20, special=[0])
    member = {name: set(np.flatnonzero(f.membership[i].toarray()[0]).tolist()) for i, name in enumerate(f.names)}
    assert member["token:on"] == {1, 2, 3}  # normalised: lower().strip(), 21 occurrences
    assert member["token:apple"] == {4}
    assert "token:1999" not in member  # too rare
    assert member["first_letter:o"] == {1, 2, 3} and member["first_letter:a"] == {4}
    assert member["class:year"] == {5} and member["class:digits"] == {5, 6}
    assert member["class:leading_space"] == {1, 4, 6}
    assert member["class:open_bracket"] == {7} and member["class:whitespace"] == {8}
    assert member["class:special"] == {0}
    assert f.sets[f.names.index("token:on")] == "unigram"
    previous = feats.token_features("prev_token", strings, buckets, counts, 20, [0], extra_categories=1)
    assert "prev_token:on" in previous.names and previous.n_categories == len(strings) + 1
    assert set(previous.sets) == {"previous_token"}


def test_pooled_buckets_keep_class_and_letter_features_exact():
    strings = [" cat", " car", " cab", "7", "8", " dog"]
    counts = np.array([100, 1, 1, 1, 1, 50])
    buckets = feats.vocab_buckets(strings, counts, max_vocab=2, special=[])
    assert buckets.own.sum() == 2  # " cat" and " dog" keep their own category
    assert buckets.bucket_of[1] == buckets.bucket_of[2]  # " car" and " cab": same letter and classes
    assert buckets.bucket_of[3] == buckets.bucket_of[4] != buckets.bucket_of[1]
    f = feats.token_features("token", strings, buckets, counts, min_count=1, special=[])
    letter_c = f.membership[f.names.index("first_letter:c")].toarray()[0]
    assert {t for t in range(6) if letter_c[buckets.bucket_of[t]]} == {0, 1, 2}
    assert "token:car" not in f.names  # a pooled id loses its unigram feature (documented)


def test_position_features_and_mutual_information():
    f = feats.position_features(16)
    assert f.names == (
        "position:<2",
        "position:<4",
        "position:<8",
        "position:[2,4)",
        "position:[4,8)",
        "position:[8,16)",
    )
    count = np.full(4, 100)
    always = np.array([[50.0], [50.0], [50.0], [50.0]])
    assert position_mutual_information(always, count)[0] == pytest.approx(0.0, abs=1e-12)
    first_half = np.array([[100.0], [100.0], [0.0], [0.0]])
    assert position_mutual_information(first_half, count)[0] == pytest.approx(np.log(2))


# --- Python syntax ----------------------------------------------------------------------------------------


def test_python_syntax_labels_on_a_document():
    source = [
        "def",
        " f",
        "(",
        "x",
        "):",
        "\n    ",
        "return",
        " x",
        " +",
        " 1",
        "  ",
        "# hi",
        "\n",
        "s",
        " =",
        ' "a',
        '"',
    ]
    strings = ["<eos>", *source]
    rows = np.array([[0, *range(1, len(strings))]])
    labels = feats.python_syntax_labels(rows, strings, eos_id=0)
    kind = {s: feats.SYNTAX_KINDS[c // 12] for s, c in zip(strings[1:], labels.ids[0, 1:], strict=True)}
    indent = {s: (c // 2) % 6 for s, c in zip(strings[1:], labels.ids[0, 1:], strict=True)}
    bracket = {s: c % 2 for s, c in zip(strings[1:], labels.ids[0, 1:], strict=True)}
    assert kind["def"] == "keyword" and kind[" f"] == "name" and kind["("] == "operator"
    assert kind["return"] == "keyword" and kind[" 1"] == "number" and kind["# hi"] == "comment"
    assert kind[' "a'] == "string" and kind['"'] == "string" and kind["\n    "] == "newline"
    assert bracket["x"] == 1 and bracket["("] == 0 and bracket[" f"] == 0
    assert indent["return"] == 1 and indent["def"] == 0 and indent["s"] == 0
    assert labels.error_rate == 0.0
    assert "syntax:keyword" in labels.features.names and "syntax:in_brackets" in labels.features.names


def test_python_syntax_labels_survive_broken_documents():
    pieces = ["x", " =", " (", "1", "\n", "  ", "  y", "\n", " z", "\n", "'''", "open", " string"]
    strings = ["<eos>", *pieces]
    rows = np.array([[0, *range(1, len(strings))], [0, 1, 2, 4, 0, 9, 11, 12, 1, 2, 3, 4, 5, 6]])
    labels = feats.python_syntax_labels(rows, strings, eos_id=0)  # unclosed bracket, bad dedent, open string
    assert labels.ids.shape == rows.shape
    kinds = {feats.SYNTAX_KINDS[c // 12] for c in labels.ids.reshape(-1)}
    assert "unknown" in kinds and "name" in kinds


def test_documents_are_rejoined_across_rows():
    rows = np.array([[9, 5, 6, 0], [9, 7, 0, 8]])
    assert [d.tolist() for d in feats.documents_of(rows, eos_id=0)] == [[0, 1], [3], [5]]


# --- labels -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("best", "kurt", "mi", "alphabet", "family"),
    [
        ({"unigram": ("token:def", 0.9), "first_letter": ("first_letter:d", 0.4)}, 5.0, 0.0, None, "unigram"),
        # the alphabet family is the model's best neuron per letter (`alphabet_neurons`), passed in
        (
            {"unigram": ("token:a", 0.6), "first_letter": ("first_letter:a", 0.3)},
            5.0,
            0.0,
            ("token:a", 0.6),
            "alphabet",
        ),
        ({"unigram": ("token:a", 0.6)}, 5.0, 0.0, None, "unigram"),  # not the best neuron for "a"
        ({"first_letter": ("first_letter:q", 0.36), "unigram": ("token:qu", 0.2)}, 5.0, 0.0, None, "none"),
        ({"first_letter": ("first_letter:q", 0.6)}, 5.0, 0.0, None, "unigram"),  # a token feature, not alphabet
        ({"token_class": ("class:digits", 0.7)}, 5.0, 0.0, None, "unigram"),
        ({"unigram": ("token:x", 0.1), "previous_token": ("prev_token:(", 0.6)}, 5.0, 0.0, None, "previous_token"),
        ({"position": ("position:<8", 0.2)}, 1.8, 0.3, None, "position"),
        ({"position": ("position:<8", 0.2)}, 3.0, 0.3, None, "none"),
        ({"syntax": ("syntax:string", 0.45), "unigram": ("token:x", 0.3)}, 5.0, 0.0, None, "syntax"),
        ({"syntax": ("syntax:string", 0.2), "unigram": ("token:x", 0.3)}, 5.0, 0.0, None, "none"),
    ],
)
def test_family_rules(best, kurt, mi, alphabet, family):
    label, _feature, vr, rule = label_neuron(best, kurt, mi, FamiliesConfig(), alphabet)
    assert label == family and rule
    if family == "none":
        assert vr == max(v for _, v in best.values())


# --- the streaming stage equals the direct computation -----------------------------------------------------


def test_families_stage_streams_the_same_variance_reduction_as_the_raw_data():
    from tests.factories import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    dataset = build_dataset(DatasetConfig(tokens=2000, ctx=32, batch_size=8), tokenizer, model_ctx=32)
    model = SimpleNamespace(name="m", n_layers=1, d_mlp=6, n_neurons=6, d_vocab=len(tokenizer), tokenizer=tokenizer)
    config = SimpleNamespace(analysis={"families": {"unigram_min_count": 5}}, device="cpu")
    stage = FamiliesStage(SimpleNamespace(config=config, dataset=dataset, models=[model]))
    strings = [tokenizer.decode([i]) for i in range(len(tokenizer))]
    norms = [feats.normalise(text) for text in strings]
    counts = np.bincount(dataset.rows[dataset.counted], minlength=len(strings))
    unique = [t for t in range(len(strings)) if norms[t].isidentifier() and norms.count(norms[t]) == 1]
    liked = max(unique, key=lambda t: counts[t])
    generator = torch.Generator().manual_seed(0)
    posts, categories = [], []
    for start in dataset.batch_starts():
        tokens = torch.from_numpy(dataset.rows[start : start + 8])
        pre = torch.randn(*tokens.shape, 1, 6, generator=generator)
        pre[..., 0] = 0.2 * pre[..., 0] - 2 + 5.0 * (tokens == liked).unsqueeze(-1)  # neuron 0 likes one token
        post = torch.nn.functional.gelu(pre, approximate="tanh")
        batch = ActivationBatch(
            start, tokens, torch.from_numpy(dataset.counted[start : start + 8]), {"m": post}, {"m": pre}
        )
        stage.update(batch)
        posts.append(post[batch.counted].reshape(-1, 6).double().numpy())
        categories.append({var: ids.numpy() for var, ids in stage.categories(batch).items()})
    stage.finish_pass()
    v = np.concatenate(posts)
    vr, names, sets, shares = stage.scores("m", slice(0, 6))
    offset = 0
    assert "syntax" in stage.features  # the stdlib corpus is Python
    for var, f in stage.features.items():
        cats = np.concatenate([c[var] for c in categories])
        dense = f.membership.toarray().astype(bool)
        for i in range(0, len(f.names), max(1, len(f.names) // 15)):
            y = dense[i, cats]
            assert shares[offset + i] == pytest.approx(y.mean())
            for j in range(6):
                assert vr[offset + i, j] == pytest.approx(variance_reduction(v[:, j], y), abs=1e-9)
        offset += len(f.names)
    saved = io.BytesIO()  # the pipeline's checkpoint: torch.save of the state dict, loaded into a fresh stage
    torch.save(stage.state_dict(), saved)
    saved.seek(0)
    resumed = FamiliesStage(SimpleNamespace(config=config, dataset=dataset, models=[model]))
    resumed.load_state_dict(torch.load(saved, weights_only=False))
    np.testing.assert_array_equal(resumed.scores("m", slice(0, 6))[0], vr)
    best = int(np.argmax(vr[:, 0]))
    assert sets[best] == "unigram" and vr[best, 0] > 0.5
    assert names[best] == "token:" + norms[liked]


@pytest.mark.parametrize("max_vocab", [None, 40])
def test_families_memory_estimate_is_the_state_the_stage_holds(max_vocab):
    from tests.factories import tensor_bytes, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    dataset = build_dataset(DatasetConfig(tokens=2000, ctx=32, batch_size=8), tokenizer, model_ctx=32)
    model = SimpleNamespace(name="m", n_layers=1, d_mlp=6, n_neurons=6, d_vocab=len(tokenizer), tokenizer=tokenizer)
    config = SimpleNamespace(analysis={"families": {"max_vocab": max_vocab}}, device="cpu")
    context = SimpleNamespace(config=config, dataset=dataset, models=[model])
    stage = FamiliesStage(context)
    tokens, pre = torch.from_numpy(dataset.rows[:8]), torch.randn(8, 32, 1, 6)
    counted = torch.from_numpy(dataset.counted[:8])
    stage.update(ActivationBatch(0, tokens, counted, {"m": torch.nn.functional.gelu(pre)}, {"m": pre}))
    maps = (stage.token_category, stage.previous_category)
    held = tensor_bytes(stage.state, stage.counts, maps, stage.context_labels)
    estimate = FamiliesStage.memory_bytes(context).state
    if max_vocab is None:
        assert estimate == held
    else:  # the pooled buckets are an allowance (token and previous token: 6 neurons' sums and a count each)
        assert held <= estimate <= held + 2 * (6 + 1) * 8 * POOLED_BUCKETS


def test_families_split_over_passes_keeps_the_same_best_features():
    """With the memory plan's split, each pass sums one block of neurons per category: same best features."""
    from precompute.memory import Split
    from tests.factories import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    dataset = build_dataset(DatasetConfig(tokens=2000, ctx=32, batch_size=8), tokenizer, model_ctx=32)
    model = SimpleNamespace(name="m", n_layers=1, d_mlp=7, n_neurons=7, d_vocab=len(tokenizer), tokenizer=tokenizer)
    config = SimpleNamespace(analysis={"families": {"unigram_min_count": 5}}, device="cpu")
    generator = torch.Generator().manual_seed(0)
    batches = []
    for start in dataset.batch_starts():
        tokens = torch.from_numpy(dataset.rows[start : start + 8])
        pre = torch.randn(*tokens.shape, 1, 7, generator=generator) + (tokens % 3 == 0)[..., None, None]
        post = torch.nn.functional.gelu(pre, approximate="tanh")
        batches.append(
            ActivationBatch(
                start, tokens, torch.from_numpy(dataset.counted[start : start + 8]), {"m": post}, {"m": pre}
            )
        )
    stages = []
    for passes in (1, 3):
        stage = FamiliesStage(
            SimpleNamespace(config=config, dataset=dataset, models=[model], split=Split({"families": passes}))
        )
        while not stage.done_streaming:
            for batch in batches:
                stage.update(batch)
            stage.finish_pass()
        stage._reduce("m", stage.blocks["m"][stage.pass_index])  # what `write` does with the last block
        stages.append(stage)
    whole, split = stages
    assert split.pass_index == 2
    for key in ("top_index", "top_vr", "best_index", "best_vr"):
        np.testing.assert_array_equal(split.state["m"][key], whole.state["m"][key])
    assert whole.state["m"]["best_vr"].max() > 0


# --- mutation testing (docs/testing.md): checks that killed mutmut's survivors ---------------------------------


def test_family_rows_cover_every_neuron_once_with_its_position_mi_over_several_chunks(monkeypatch):
    """`_label_rows` in chunks of 3 neurons: one row per neuron, in order, each with the firing/position MI that
    NumPy computes from the raw pre-activations (Σ_p P(p)·KL(Bernoulli(r_p) ‖ Bernoulli(r))) and SciPy's
    kurtosis in its evidence. Neuron 0 is a planted position neuron (pre ≈ +2 early in the row, −2 late: kurtosis
    about 1), neuron 6 a constant one (kurtosis undefined: never a position neuron, no kurtosis in its evidence)."""
    import scipy.stats

    import precompute.stages.families as families_module
    from tests.factories import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    dataset = build_dataset(DatasetConfig(tokens=2000, ctx=32, batch_size=8), tokenizer, model_ctx=32)
    model = SimpleNamespace(name="m", n_layers=1, d_mlp=7, n_neurons=7, d_vocab=len(tokenizer), tokenizer=tokenizer)
    config = SimpleNamespace(analysis={"families": {"unigram_min_count": 5}}, device="cpu")
    stage = FamiliesStage(SimpleNamespace(config=config, dataset=dataset, models=[model]))
    generator = torch.Generator().manual_seed(3)
    fire, count, pres = np.zeros((32, 7)), np.zeros(32), []
    for start in dataset.batch_starts():
        tokens = torch.from_numpy(dataset.rows[start : start + 8])
        counted = torch.from_numpy(dataset.counted[start : start + 8])
        pre = torch.randn(*tokens.shape, 1, 7, generator=generator)
        pre[..., 0, 0] = 0.3 * pre[..., 0, 0] + torch.where(torch.arange(32) < 16, 2.0, -2.0)
        pre[..., 0, 5] += torch.linspace(-2.0, 2.0, 32)  # fires late in the row
        pre[..., 0, 6] = -1.0
        stage.update(ActivationBatch(start, tokens, counted, {"m": torch.nn.functional.gelu(pre)}, {"m": pre}))
        mask = counted.numpy()
        fire += ((pre[..., 0, :].numpy() > 0) & mask[..., None]).sum(axis=0)
        count += mask.sum(axis=0)
        pres.append(pre[..., 0, :].numpy()[mask])
    stage.finish_pass()
    stage._reduce("m", stage.blocks["m"][stage.pass_index])
    names = np.asarray([name for f in stage.features.values() for name in f.names], dtype=object)
    monkeypatch.setattr(families_module, "chunk_rows", lambda *args, **kwargs: 3)  # chunks of 3, 3 and 1 neurons
    rows = list(stage._label_rows("m", 9, 7, names))

    p_position, rate = count / count.sum(), fire.sum(axis=0) / count.sum()
    expected = np.zeros(7)
    for p in np.flatnonzero(count):  # position 0 (BOS) is never counted
        r_p = fire[p] / count[p]
        for a, b in ((r_p, rate), (1 - r_p, 1 - rate)):
            with np.errstate(divide="ignore", invalid="ignore"):  # b = 0 only where a = 0 (neuron 6): no term
                expected += p_position[p] * np.where(a > 0, a * np.log(np.where(a > 0, a, 1) / b), 0.0)
    assert [(row["model_id"], row["layer"], row["neuron"]) for row in rows] == [(9, 0, n) for n in range(7)]
    np.testing.assert_allclose([row["position_mi"] for row in rows], expected, rtol=1e-9)
    assert expected[[0, 5]].min() > 5 * np.delete(expected, [0, 5, 6]).max()  # the planted neurons stand out
    kurtosis = scipy.stats.kurtosis(np.concatenate(pres)[:, 0], fisher=False)
    assert kurtosis < 2 and rows[0]["family"] == "position"
    assert set(rows[0]["evidence"]) == {"rule", "pre_kurt", "best"}
    assert (
        rows[0]["evidence"]["pre_kurt"] == pytest.approx(kurtosis, abs=1e-4)
        and "kurtosis" in rows[0]["evidence"]["rule"]
    )
    assert rows[6]["family"] != "position" and rows[6]["evidence"]["pre_kurt"] is None


@pytest.mark.parametrize(
    ("best", "kurt", "mi", "expected"),
    [
        # a VR exactly on a threshold is not above it: the next rule decides
        ({"unigram": ("token:x", 0.5), "previous_token": ("prev_token:y", 0.5)}, 5.0, 0.0, ("none", "token:x", 0.5)),
        ({"previous_token": ("prev_token:(", 0.6)}, 5.0, 0.0, ("previous_token", "prev_token:(", 0.6)),
        ({"position": ("position:<4", 0.2)}, 2.0, 0.3, ("none", "position:<4", 0.2)),  # kurtosis not below 2
        ({"position": ("position:<4", 0.2)}, 1.5, 0.05, ("none", "position:<4", 0.2)),  # MI not above 0.05
        ({"position": ("position:<4", 0.2)}, 1.5, 0.06, ("position", "position:<4", 0.2)),
        ({"unigram": ("token:x", 0.1)}, 1.5, 0.3, ("position", None, None)),  # no position feature in the run
        # the best of syntax and spaCy, by VR; exactly 0.35 is not enough
        (
            {"syntax": ("syntax:name", 0.4), "spacy": ("spacy:pos=NOUN", 0.45)},
            5.0,
            0.0,
            ("syntax", "spacy:pos=NOUN", 0.45),
        ),
        (
            {"syntax": ("syntax:name", 0.42), "spacy": ("spacy:pos=NOUN", 0.4)},
            5.0,
            0.0,
            ("syntax", "syntax:name", 0.42),
        ),
        ({"spacy": ("spacy:dep=nsubj", 0.35)}, 5.0, 0.0, ("none", "spacy:dep=nsubj", 0.35)),
        ({}, 5.0, 0.0, ("none", None, None)),
    ],
)
def test_family_rules_return_the_feature_and_vr_that_decided(best, kurt, mi, expected):
    family, feature, vr, rule = label_neuron(best, kurt, mi, FamiliesConfig())
    assert (family, feature, vr) == expected
    assert (
        rule
        == {
            "none": "no rule holds",
            "previous_token": "previous-token VR > 0.5",
            "position": "kurtosis < 2.0 and position MI > 0.05",
            "syntax": "syntax VR > 0.35",
        }[family]
    )


def test_alphabet_label_names_the_letter_feature():
    family, feature, vr, rule = label_neuron({}, 5.0, 0.0, FamiliesConfig(), ("token:q", 0.7))
    assert (family, feature, vr, rule) == ("alphabet", "token:q", 0.7, "the model's best neuron for token:q, VR > 0.35")


def test_position_mutual_information_by_hand_with_empty_and_single_token_positions():
    """Plain-float MI per neuron; position 1 has no counted token (no weight), position 2 exactly one."""
    import math

    count = np.array([4, 0, 1, 5])
    fire = np.array([[3.0, 1.0], [0.0, 0.0], [1.0, 0.0], [0.0, 3.0]])  # neuron 0 fires at a rate of 0.4
    total = 10
    expected = []
    for n in range(2):
        r = fire[:, n].sum() / total
        mi = 0.0
        for p in (0, 2, 3):
            r_p = fire[p, n] / count[p]
            for a, b in ((r_p, r), (1 - r_p, 1 - r)):
                mi += count[p] / total * (a * math.log(a / b) if a > 0 else 0.0)
        expected.append(mi)
    np.testing.assert_allclose(position_mutual_information(fire, count), expected, rtol=1e-12)


def test_position_mutual_information_of_a_neuron_firing_on_every_counted_token_is_zero():
    """A neuron that fires on every counted token carries no information about the position (a constant has zero
    mutual information with anything), also when a position has no counted token (position 0, BOS, never has one
    in a default run): it was NaN there (0 × log(1/0) from the empty position)."""
    count = np.array([0, 3, 5, 2])
    fire = np.array([[0.0, 0.0], [3.0, 1.0], [5.0, 0.0], [2.0, 2.0]])  # neuron 0 always fires where counted
    values = position_mutual_information(fire, count)
    assert values[0] == 0.0
    assert np.isfinite(values[1]) and values[1] > 0
