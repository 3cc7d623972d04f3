"""Mutation round 7 (docs/testing.md): the families features and stage against oracles built by hand or in NumPy.

Every expected value here comes from how the input was built (token strings, a Python snippet labelled by hand,
planted neurons) or from NumPy float64 on the concatenated tokens (the R² of the two group means, paper eq. 4),
never from the code under test. No fixture of the suite: hand-built vocabularies, datasets and activation batches.
"""

from __future__ import annotations

import io
import itertools
import tokenize
import warnings
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from precompute import features as feats
from precompute.activations import ActivationBatch
from precompute.data import DatasetConfig, TokenDataset
from precompute.memory import Split
from precompute.stages.families import FamiliesStage, grouped_variance_reduction, variance_reduction

# --- the oracle: the R² of predicting v by its two group means (paper eq. 4, population variances) ---------------


def r_squared(v: np.ndarray, y: np.ndarray) -> float:
    """1 − SS_res / SS_tot of the two-group-means model; 0 when a group is empty or v is constant."""
    v, y = np.asarray(v, dtype=np.float64), np.asarray(y, dtype=bool)
    ss_tot = float(((v - v.mean()) ** 2).sum()) if v.size else 0.0
    if not y.any() or y.all() or ss_tot <= 0:
        return 0.0
    fit = np.where(y, v[y].mean(), v[~y].mean())
    return 1.0 - float(((v - fit) ** 2).sum()) / ss_tot


def test_variance_reduction_by_hand():
    # v = 0, 1, 2, 5 with y = 0, 0, 1, 1: group means 0.5 and 3.5, SS_res = 5, SS_tot = 14: VR = 9/14
    assert variance_reduction(np.array([0.0, 1.0, 2.0, 5.0]), np.array([0, 0, 1, 1])) == pytest.approx(9 / 14)
    # y given as 0/1 integers that are not a boolean mask (a mask of 2s and 0s): VR of the mask, 9/14 again
    assert variance_reduction(np.array([0.0, 1.0, 2.0, 5.0]), np.array([0, 0, 2, 2])) == pytest.approx(9 / 14)
    # a share of 1/4 (β(1 − β) = 3/16, not 1/4): v = 0, 0, 0, 4 + a planted step is a function of y: 1
    assert variance_reduction(np.array([0.0, 0.0, 0.0, 4.0]), np.array([0, 0, 0, 1])) == pytest.approx(1.0)
    # v = 1, 2, 3, 6, y = 1, 0, 0, 0: m1 = 1, m0 = 11/3, β = 1/4, Var = 3.5: (3/16)(64/9)/3.5 = 8/21
    assert variance_reduction(np.array([1.0, 2.0, 3.0, 6.0]), np.array([1, 0, 0, 0])) == pytest.approx(8 / 21)
    assert variance_reduction(np.array([2.0, 2.0, 2.0]), np.array([0, 1, 1])) == 0.0  # constant v
    assert variance_reduction(np.array([1.0, 2.0, 4.0]), np.array([1, 1, 1])) == 0.0  # y everywhere
    assert variance_reduction(np.array([1.0, 2.0, 4.0]), np.array([0, 0, 0])) == 0.0  # y nowhere
    assert isinstance(variance_reduction(np.array([0.0, 1.0]), np.array([0, 1])), float)
    # a variance below 1 (0.0625) still has something to reduce: v = 0, 0, 0.5, 0.5 is a function of y
    assert variance_reduction(np.array([0.0, 0.0, 0.5, 0.5]), np.array([0, 0, 1, 1])) == pytest.approx(1.0)


def test_variance_reduction_is_clipped_at_one_where_rounding_overshoots():
    # found by a search in float64: β(1 − β)(m1 − m0)² / Var(v) of this step function is 1 + 2.2e-16 unclipped
    v, y = overshooting_step()
    y = y.astype(bool)
    raw = y.mean() * (1 - y.mean()) * (v[y].mean() - v[~y].mean()) ** 2 / v.var()
    assert raw > 1.0
    assert variance_reduction(v, y) == 1.0


def overshooting_step() -> tuple[np.ndarray, np.ndarray]:
    """A step function of y whose eq.-4 ratio rounds above 1 in float64 (searched once, deterministic)."""
    rng = np.random.default_rng(7)
    for _ in range(10_000):
        y = rng.random(7) < 0.5
        if y.all() or not y.any():
            continue
        low, high = rng.normal(size=2) * 10
        v = np.where(y, high, low)
        if y.mean() * (1 - y.mean()) * (v[y].mean() - v[~y].mean()) ** 2 / v.var() > 1.0:
            return v, y.astype(np.int64)
    raise AssertionError("no overshooting step found")


def test_grouped_variance_reduction_against_numpy_group_means():
    rng = np.random.default_rng(3)
    categories = rng.integers(0, 9, 600)
    v = rng.normal(size=(600, 4))
    v[:, 0] += 3.0 * np.isin(categories, [1, 4])  # planted on the feature {1, 4}
    v[:, 1] = np.where(np.isin(categories, [2, 7, 8]), 1.5, -0.25)  # a function of the feature {2, 7, 8}
    v[:, 3] = 0.75  # constant: no variance to reduce
    members = [
        np.array([1, 4]),
        np.array([2, 7, 8]),
        np.array([5]),
        np.arange(9),  # everywhere: n0 = 0
        np.array([], dtype=np.int64),  # nowhere: n1 = 0
        np.array([0, 3, 6]),
    ]
    ys = [np.isin(categories, m) for m in members]
    n1 = np.array([y.sum() for y in ys], dtype=np.float64)
    s1 = np.stack([v[y].sum(0) for y in ys])
    sst = ((v - v.mean(0)) ** 2).sum(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 0/0 and x/0 for the empty and full features: silent
        got = grouped_variance_reduction(n1, s1, 600.0, v.sum(0), sst)
    assert got.shape == (6, 4)
    for f, y in enumerate(ys):
        for j in range(4):
            assert got[f, j] == pytest.approx(r_squared(v[:, j], y), abs=1e-12)
    assert got[1, 1] == pytest.approx(1.0) and got[0, 0] > 0.5
    assert (got[3] == 0).all() and (got[4] == 0).all() and (got[:, 3] == 0).all()


def test_grouped_variance_reduction_by_hand_with_one_token_outside_and_a_small_spread():
    # v = 0, 0, 0, 0.5 and y = 1, 1, 1, 0: n0 = 1, Σ(v − v̄)² = 0.1875 < 1, and v is a function of y: VR 1
    v, y = np.array([0.0, 0.0, 0.0, 0.5]), np.array([True, True, True, False])
    got = grouped_variance_reduction(np.array([3.0]), np.array([[0.0]]), 4.0, np.array([0.5]), np.array([0.1875]))
    assert got[0, 0] == pytest.approx(1.0) and r_squared(v, y) == pytest.approx(1.0)
    # a feature on every token whose sum differs from the total in the last bits (the stage sums them in different
    # orders): n0 = 0, so VR 0, with no division warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        everywhere = grouped_variance_reduction(
            np.array([4.0]), np.array([[0.5]]), 4.0, np.array([0.5 + 1e-12]), np.array([0.1875])
        )
    assert everywhere[0, 0] == 0.0


def test_grouped_variance_reduction_searched_overshoot_is_clipped():
    rng = np.random.default_rng(11)
    for _ in range(20_000):
        y = rng.random(9) < 0.4
        if y.all() or not y.any():
            continue
        low, high = rng.normal(size=2) * 100
        v = np.where(y, high, low)
        n, n1 = 9.0, float(y.sum())
        s1, s = v[y].sum(), v.sum()
        sst = ((v - v.mean()) ** 2).sum()
        raw = n1 * (n - n1) / n * (s1 / n1 - (s - s1) / (n - n1)) ** 2 / sst
        if raw > 1.0:
            got = grouped_variance_reduction(np.array([n1]), np.array([[s1]]), n, np.array([s]), np.array([sst]))
            assert got[0, 0] == 1.0
            return
    raise AssertionError("no overshooting grouped step found")


# --- token strings ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "norm", "first", "single"),
    [
        (" On\n", "on", "o", ""),
        ("ÄB ", "äb", "", ""),  # "ä" is not in a-z
        (" Apple", "apple", "a", ""),
        ("_x", "_x", "", ""),
        ("  ", "", "", ""),
        ("", "", "", ""),
        (" A", "a", "a", "a"),
        ("z\n", "z", "z", "z"),
        ("Zed", "zed", "z", ""),
        ("`", "`", "", ""),  # just below "a"
        ("{", "{", "", ""),  # just above "z"
        ("1", "1", "", ""),
        (" an", "an", "a", ""),
    ],
)
def test_normalise_first_letter_and_single_letter_by_hand(text, norm, first, single):
    assert feats.normalise(text) == norm
    assert feats.first_letter(text) == first
    assert feats.single_letter(text) == single


def test_feature_matrix_build_restricted_and_observed_categories():
    f = feats.FeatureMatrix.build(
        "v",
        5,
        [
            ("x", "s", np.array([2, 0, 2])),  # a repeated category counts once
            ("empty", "s", np.array([], dtype=np.int64)),  # holds nowhere: dropped
            ("y", "t", np.array([4, 1])),
        ],
    )
    assert (f.variable, f.n_categories, f.names, f.sets) == ("v", 5, ("x", "y"), ("s", "t"))
    assert f.membership.shape == (2, 5)
    np.testing.assert_array_equal(f.membership.toarray(), [[1, 0, 1, 0, 0], [0, 1, 0, 0, 1]])
    assert f.membership.dtype == np.float64
    none = feats.FeatureMatrix.build("w", 3, [("e", "s", np.array([], dtype=np.int64))])
    assert none.names == () and none.sets == () and none.membership.shape == (0, 3) and none.n_categories == 3
    r = f.restricted(np.array([True, True, False, False, True]))
    assert (r.variable, r.n_categories, r.names, r.sets) == ("v", 3, ("x", "y"), ("s", "t"))
    np.testing.assert_array_equal(r.membership.toarray(), [[1, 0, 0], [0, 1, 1]])
    slots = feats.FeatureMatrix.observed_categories(np.array([False, True, True, False, True]))
    assert slots.dtype == np.int64
    assert slots.tolist() == [-1, 0, 1, -1, 2]
    assert feats.FeatureMatrix.observed_categories(np.zeros(3, dtype=bool)).tolist() == [-1, -1, -1]


def test_vocab_buckets_exact_and_pooled_by_hand():
    strings = ["x", " cat", " car", " cab", "7", "8", " dog", "a", " A", "<s>"]
    exact = feats.vocab_buckets(strings, np.arange(10), None, special=[9])
    assert exact.bucket_of.tolist() == list(range(10)) and exact.representative.tolist() == list(range(10))
    assert exact.own.tolist() == [True] * 10 and exact.n_buckets == 10
    assert exact.bucket_of.dtype == np.int64 and exact.own.dtype == bool
    assert exact.representative is not exact.bucket_of
    assert feats.vocab_buckets(strings, np.arange(10), 10, special=[]).bucket_of.tolist() == list(range(10))
    counts = np.array([5, 9, 1, 1, 1, 1, 9, 0, 0, 0])
    # ids 1 and 6 (9 each) are the two most frequent, the special id 9 keeps its own category too; the others are
    # pooled in id order by (first letter, single letter, token classes)
    b = feats.vocab_buckets(strings, counts, max_vocab=2, special=[9])
    assert b.bucket_of.tolist() == [3, 0, 4, 4, 5, 5, 1, 6, 7, 2]
    assert b.representative.tolist() == [1, 6, 9, 0, 2, 4, 7, 8]
    assert b.own.tolist() == [True, True, True, False, False, False, False, False]
    assert b.n_buckets == 8 and b.bucket_of.dtype == np.int64 and b.representative.dtype == np.int64
    # a tie in counts goes to the smaller id: 1 before 6
    one = feats.vocab_buckets(strings, counts, max_vocab=1, special=[])
    assert one.own.tolist()[:1] == [True] and one.representative.tolist()[0] == 1
    assert one.bucket_of[1] == 0 and one.bucket_of[6] != 0 and one.own.sum() == 1
    # three of the most frequent: 1, 6 (9 each) and 0 (5)
    three = feats.vocab_buckets(strings, counts, max_vocab=3, special=[])
    assert three.representative.tolist()[:3] == [0, 1, 6] and three.own.sum() == 3


#: token id -> string of the hand-labelled vocabulary; id 0 is the special token
TOKEN_STRINGS = [
    "<s>",  # 0: special
    " On",  # 1
    "on",  # 2
    "ON",  # 3
    " apple",  # 4
    "1999",  # 5
    " 42",  # 6
    "(,",  # 7
    "\n  ",  # 8
    "a",  # 9
    "_x.y",  # 10
    ")]",  # 11
    "'",  # 12
    ":=",  # 13
    "<S>",  # 14: normalises like the special token
]
#: every feature of `TOKEN_STRINGS` with the counts below and min_count 10, worked out by hand: name -> token ids
TOKEN_FEATURES_BY_HAND = {
    "token:'": {12},
    "token:(,": {7},
    "token:)]": {11},
    "token:1999": {5},
    "token:42": {6},
    "token::=": {13},
    "token:_x.y": {10},
    "token:a": {9},
    "token:on": {1, 2, 3},  # 4 + 3 + 3 = 10 occurrences: exactly min_count
    "first_letter:a": {4, 9},
    "first_letter:o": {1, 2, 3},
    "class:leading_space": {1, 4, 6},
    "class:whitespace": {8},
    "class:newline": {8},
    "class:alpha": {1, 2, 3, 4, 9},
    "class:lower": {2, 4, 9},
    "class:capitalised": {1, 3},
    "class:all_caps": {3, 14},
    "class:digits": {5, 6},
    "class:contains_digit": {5, 6},
    "class:year": {5},
    "class:punctuation": {7, 11, 12, 13},
    "class:open_bracket": {7},
    "class:close_bracket": {11},
    "class:quote": {12},
    "class:underscore": {10},
    "class:dot": {10},
    "class:comma": {7},
    "class:colon": {13},
    "class:equals": {13},
    "class:word_continuation": {2, 3, 9},
    "class:special": {0},
}
TOKEN_COUNTS = np.array([100, 4, 3, 3, 9, 10, 10, 10, 10, 10, 10, 10, 10, 10, 5])


def members(f: feats.FeatureMatrix, bucket_of: np.ndarray) -> dict[str, set[int]]:
    dense = f.membership.toarray()
    return {name: {t for t in range(len(bucket_of)) if dense[i, bucket_of[t]]} for i, name in enumerate(f.names)}


def test_token_features_every_feature_by_hand():
    buckets = feats.vocab_buckets(TOKEN_STRINGS, TOKEN_COUNTS, None, special=[0])
    f = feats.token_features("token", TOKEN_STRINGS, buckets, TOKEN_COUNTS, min_count=10, special=[0])
    assert f.variable == "token" and f.n_categories == 15
    assert f.names == tuple(TOKEN_FEATURES_BY_HAND)  # unigrams sorted, letters a-z, classes in order, special
    assert members(f, buckets.bucket_of) == TOKEN_FEATURES_BY_HAND
    expected_sets = ["unigram"] * 9 + ["first_letter"] * 2 + ["token_class"] * 21
    assert list(f.sets) == expected_sets
    assert set(f.membership.data.tolist()) == {1.0}


def test_previous_token_features_use_their_own_counts_and_an_extra_category():
    buckets = feats.vocab_buckets(TOKEN_STRINGS, TOKEN_COUNTS, None, special=[0])
    previous_counts = TOKEN_COUNTS.copy()
    previous_counts[[1, 2, 3]] = [1, 1, 1]  # "on" 3 times before a token: below min_count
    previous_counts[12] = 9  # "'" once too few
    f = feats.token_features("prev_token", TOKEN_STRINGS, buckets, previous_counts, 10, [0], extra_categories=1)
    assert f.variable == "prev_token" and f.n_categories == 16
    expected = {
        "prev_" + name: ids for name, ids in TOKEN_FEATURES_BY_HAND.items() if name not in ("token:on", "token:'")
    }
    assert f.names == tuple(expected)
    assert members(f, buckets.bucket_of) == expected
    assert set(f.sets) == {"previous_token"}
    assert f.membership.toarray()[:, 15].sum() == 0  # "no previous token" is in no feature


def test_token_features_min_count_one_and_pooled_single_letters():
    strings = [" the", " a", " apple", " and", "a", "A", " b", "bb", "<e>"]
    counts = np.array([100, 1, 1, 1, 1, 1, 50, 0, 3])
    buckets = feats.vocab_buckets(strings, counts, max_vocab=2, special=[8])
    # own: " the", " b", and the special id; pooled: " a" | " apple", " and" | "a" | "A" | "bb"
    assert buckets.own.tolist() == [True, True, True, False, False, False, False, False]
    f = feats.token_features("token", strings, buckets, counts, min_count=1, special=[8])
    got = members(f, buckets.bucket_of)
    assert got["token:the"] == {0} and got["token:b"] == {6}
    assert got["token:a"] == {1, 4, 5}  # the pooled single letters keep their unigram feature
    assert "token:apple" not in got and "token:and" not in got and "token:bb" not in got  # pooled words lose it
    assert got["first_letter:a"] == {1, 2, 3, 4, 5} and got["first_letter:b"] == {6, 7}
    assert got["first_letter:t"] == {0} and got["class:special"] == {8}
    assert "token:<e>" not in got


def test_token_features_with_two_specials_and_no_special():
    strings = ["<a>", "x", "<b>", "y"]
    counts = np.array([5, 5, 5, 5])
    buckets = feats.vocab_buckets(strings, counts, None, special=[0, 2])
    f = feats.token_features("token", strings, buckets, counts, 1, [2, 0])
    got = members(f, buckets.bucket_of)
    assert got["class:special"] == {0, 2} and got["token:x"] == {1} and got["token:y"] == {3}
    assert "token:<a>" not in got and "token:<b>" not in got
    plain = feats.token_features("token", strings, feats.vocab_buckets(strings, counts, None, []), counts, 1, [])
    got = members(plain, np.arange(4))
    assert "class:special" not in got and got["token:<a>"] == {0} and got["token:<b>"] == {2}


@pytest.mark.parametrize(
    ("ctx", "expected"),
    [
        (1, {}),
        (2, {}),
        (3, {"position:<2": {0, 1}, "position:[2,3)": {2}}),
        (4, {"position:<2": {0, 1}, "position:[2,4)": {2, 3}}),
        (
            12,
            {
                "position:<2": {0, 1},
                "position:<4": {0, 1, 2, 3},
                "position:<8": set(range(8)),
                "position:[2,4)": {2, 3},
                "position:[4,8)": {4, 5, 6, 7},
                "position:[8,12)": {8, 9, 10, 11},
            },
        ),
    ],
)
def test_position_features_by_hand(ctx, expected):
    f = feats.position_features(ctx)
    assert f.variable == "position" and f.n_categories == ctx
    assert f.names == tuple(expected) and set(f.sets) <= {"position"}
    assert members(f, np.arange(ctx)) == expected


# --- documents and Python syntax --------------------------------------------------------------------------------

KEYWORD, NAME, OPERATOR, STRING, NUMBER, COMMENT, NEWLINE, SPACE, UNKNOWN = range(9)  # SYNTAX_KINDS, by hand


def test_documents_of_by_hand():
    rows = np.array([[9, 0, 1, 2, 0], [9, 0, 3, 0, 0], [9, 4, 5, 6, 7]])
    docs = feats.documents_of(rows, eos_id=0)
    assert [d.tolist() for d in docs] == [[1, 2], [5], [8, 9, 10, 11]]
    assert [d.tolist() for d in feats.documents_of(np.array([[0, 3, 4]]), eos_id=0)] == [[0, 1]]


@pytest.mark.parametrize(
    ("kind", "string", "expected"),
    [
        (tokenize.NAME, "def", KEYWORD),
        (tokenize.NAME, "x", NAME),
        (tokenize.OP, "+", OPERATOR),
        (tokenize.STRING, "'a'", STRING),
        (tokenize.NUMBER, "1", NUMBER),
        (tokenize.COMMENT, "# c", COMMENT),
        (tokenize.NEWLINE, "\n", NEWLINE),
        (tokenize.NL, "\n", NEWLINE),
        (tokenize.INDENT, "    ", SPACE),
        (tokenize.ERRORTOKEN, "$", UNKNOWN),
        (tokenize.DEDENT, "", None),
        (tokenize.ENDMARKER, "", None),
        (tokenize.ENCODING, "utf-8", None),
    ],
)
def test_syntax_kind_of_each_token_type(kind, string, expected):
    tok = tokenize.TokenInfo(kind, string, (1, 0), (1, len(string)), string)
    assert feats._syntax_kind(tok) == expected


def test_char_labels_of_a_snippet_by_hand():
    text = "if (a):\n    b = 'c'  # d\n"
    kinds, indents, brackets, clean = feats._char_labels(text)
    line1 = [KEYWORD, KEYWORD, SPACE, OPERATOR, NAME, OPERATOR, OPERATOR, NEWLINE]  # "if (a):\n"
    line2 = [SPACE] * 4 + [NAME, SPACE, OPERATOR, SPACE, STRING, STRING, STRING, SPACE, SPACE, COMMENT, COMMENT]
    line2 += [COMMENT, NEWLINE]  # "    b = 'c'  # d\n"
    assert kinds.tolist() == line1 + line2
    assert indents.tolist() == [0] * 8 + [1] * 17
    assert brackets.tolist() == [0, 0, 0, 0, 1, 0, 0, 0] + [0] * 17
    assert clean


def test_char_labels_nested_brackets_and_deep_indentation():
    text = "f((1), 2)\n" + "".join(" " * d + f"if a{d}:\n" for d in range(7)) + " " * 7 + "g\n"
    kinds, indents, brackets, clean = feats._char_labels(text)
    assert clean
    # "f((1), 2)": the brackets hold from inside the first "(" up to the last ")"
    assert brackets[:10].tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 0, 0]
    assert kinds[:10].tolist() == [
        NAME,
        OPERATOR,
        OPERATOR,
        NUMBER,
        OPERATOR,
        OPERATOR,
        SPACE,
        NUMBER,
        OPERATOR,
        NEWLINE,
    ]
    start = 10
    for d in range(7):
        line = " " * d + f"if a{d}:\n"
        keyword_at = start + d
        assert kinds[keyword_at] == KEYWORD and indents[keyword_at] == min(d, 5), d
        start += len(line)
    assert kinds[start + 7] == NAME and indents[start + 7] == 5  # depth 7, capped at 5
    assert indents[-1] == 5


def test_char_labels_dedent_goes_back_and_never_below_zero():
    text = "if a:\n  b\nc\n"
    kinds, indents, _brackets, clean = feats._char_labels(text)
    assert clean
    assert indents.tolist() == [0] * 6 + [1] * 4 + [0] * 2
    assert kinds[-2:].tolist() == [NAME, NEWLINE]


def test_char_labels_dedent_one_level_of_two():
    text = "if a:\n if b:\n  c\n d\ne\n"
    kinds, indents, _brackets, clean = feats._char_labels(text)
    assert clean
    at = {name: text.index(name) for name in ("if b", "c", "d", "e")}
    assert [int(indents[i]) for i in at.values()] == [1, 2, 1, 0]
    assert [int(kinds[i]) for i in at.values()] == [KEYWORD, NAME, NAME, NAME]


def test_char_labels_error_token_and_a_failed_string_by_hand():
    # tokenize (3.11) reports the space before a character it cannot match as an error token of its own
    kinds, _indents, _brackets, clean = feats._char_labels("a $\n")
    assert kinds.tolist() == [NAME, UNKNOWN, UNKNOWN, NEWLINE] and clean is False
    kinds, _indents, _brackets, clean = feats._char_labels("a  \n")  # whitespace only: still clean
    assert clean
    # an unterminated triple-quoted string: the rest of its line is unknown, the next line is tokenized afresh
    kinds, indents, brackets, clean = feats._char_labels("x = '''abc\ny\n")
    assert kinds.tolist() == [NAME, SPACE, OPERATOR] + [UNKNOWN] * 8 + [NAME, NEWLINE]
    assert indents.tolist() == [0] * 13 and brackets.tolist() == [0] * 13
    assert clean is False


def test_char_labels_of_an_unclosed_bracket_on_a_later_line():
    # "EOF in multi-line statement" is reported past the last line: the failing part is unknown to the end
    text = "a = 1\nb = (2,\n"
    kinds, _indents, brackets, clean = feats._char_labels(text)
    assert clean is False
    assert kinds[:6].tolist() == [NAME, SPACE, OPERATOR, SPACE, NUMBER, NEWLINE]
    assert kinds[6:11].tolist() == [NAME, SPACE, OPERATOR, SPACE, OPERATOR]
    assert brackets[11:13].tolist() == [1, 1]  # "2," inside the bracket
    assert kinds[-1] in (UNKNOWN, NEWLINE)
    assert len(kinds) == len(text)


def test_char_labels_a_bad_dedent_is_unknown_to_the_end_of_its_line():
    # tokenize raises IndentationError (a SyntaxError with its line number) at " c": that line is unknown, the
    # next one is tokenized afresh
    text = "if a:\n  b\n c\nd\n"
    kinds, indents, _brackets, clean = feats._char_labels(text)
    assert kinds.tolist()[:10] == [KEYWORD, KEYWORD, SPACE, NAME, OPERATOR, NEWLINE, SPACE, SPACE, NAME, NEWLINE]
    assert kinds.tolist()[10:] == [UNKNOWN] * 3 + [NAME, NEWLINE]
    assert indents.tolist() == [0] * 6 + [1] * 4 + [0] * 5
    assert clean is False


def test_char_labels_a_document_cut_inside_brackets_has_an_unknown_tail():
    # "EOF in multi-line statement", reported (a TokenError) at the line after the last: the cut line is unknown
    kinds, _indents, brackets, clean = feats._char_labels("z = [\n  ")
    assert kinds.tolist() == [NAME, SPACE, OPERATOR, SPACE, OPERATOR, NEWLINE, UNKNOWN, UNKNOWN]
    assert brackets.tolist() == [0, 0, 0, 0, 0, 1, 0, 0]
    assert clean is False


def test_char_labels_a_document_that_fails_before_its_first_token():
    # an unterminated string opens the document: no token before the error, so the unknown part starts at 0
    kinds, _indents, _brackets, clean = feats._char_labels("'''a\nb\n")
    assert kinds.tolist() == [UNKNOWN] * 5 + [NAME, NEWLINE]
    assert clean is False


def test_char_labels_the_line_after_an_error_starts_at_indentation_zero_outside_brackets():
    # the spaces before a comment (no INDENT token of their own) keep the label that closes the unknown span
    kinds, indents, brackets, clean = feats._char_labels("x = '''a\n  # c\n")
    assert kinds.tolist() == [NAME, SPACE, OPERATOR] + [UNKNOWN] * 6 + [
        SPACE,
        SPACE,
        COMMENT,
        COMMENT,
        COMMENT,
        NEWLINE,
    ]
    assert indents.tolist() == [0] * 15 and brackets.tolist() == [0] * 15
    assert clean is False


def test_char_labels_of_empty_and_blank_text():
    kinds, indents, brackets, clean = feats._char_labels("")
    assert kinds.tolist() == [] and indents.tolist() == [] and brackets.tolist() == [] and clean
    assert kinds.dtype == indents.dtype == brackets.dtype == np.int64
    kinds, _i, _b, clean = feats._char_labels("\n\n")
    assert kinds.tolist() == [NEWLINE, NEWLINE] and clean
    assert kinds.dtype == indents.dtype == brackets.dtype == np.int64
    kinds, indents, brackets, clean = feats._char_labels("   ")  # blank, no newline
    assert kinds.tolist() == [SPACE] * 3 and indents.tolist() == [0] * 3 and brackets.tolist() == [0] * 3 and clean
    assert kinds.dtype == indents.dtype == brackets.dtype == np.int64


def test_char_labels_before_the_first_token_are_whitespace():
    # a backslash continuation: the first token, "x", starts at character 2; what comes before is whitespace
    kinds, indents, brackets, clean = feats._char_labels("\\\nx\n")
    assert kinds.tolist() == [SPACE, SPACE, NAME, NEWLINE]
    assert indents.tolist() == [0] * 4 and brackets.tolist() == [0] * 4 and clean


def test_syntax_features_over_every_combination():
    f = feats.syntax_features()
    combos = list(itertools.product(range(9), range(6), range(2)))  # (kind, indent, bracket) in category order
    assert f.variable == "syntax" and f.n_categories == 108 == len(combos)
    kinds = ["keyword", "name", "operator", "string", "number", "comment", "newline", "whitespace"]
    expected = {f"syntax:{k}": {c for c, (kind, _, _) in enumerate(combos) if kind == i} for i, k in enumerate(kinds)}
    for d in range(6):
        expected[f"syntax:indent={d}"] = {c for c, (kind, ind, _) in enumerate(combos) if ind == d and kind != 8}
    expected["syntax:in_brackets"] = {c for c, (_, _, br) in enumerate(combos) if br == 1}
    assert f.names == tuple(expected) and set(f.sets) == {"syntax"}
    assert members(f, np.arange(108)) == expected


def label(kind: int, indent: int = 0, bracket: int = 0) -> int:
    return (kind * 6 + indent) * 2 + bracket


def test_documents_probe_the_first_non_space_character():
    strings = ["<e>", "ab", "  c", " ", "", "b"]
    rows = np.array([[0, 1, 2, 3, 0, 4, 1, 0, 4, 0, 5, 4]])
    docs = list(feats._documents(rows, strings, eos_id=0))
    assert [(d.tolist(), text, probe.tolist()) for d, text, probe in docs] == [
        ([0, 1, 2], "ab  c ", [0, 4, 5]),  # "ab" at 0, "  c" at 2 (its "c" at 4), " " at 5
        ([4, 5], "ab", [0, 0]),  # "" at 0, "ab" at 0
        ([7], "", [0]),
        ([9, 10], "b", [0, 0]),  # "" after "b" starts at 1, past the text: clipped to its last character
    ]


def test_an_all_whitespace_token_is_labelled_by_its_first_character():
    """Found by mutation round 7: the code took the last character of an all-whitespace token, so a newline and
    the next line's indentation was labelled a newline at that indentation."""
    strings = ["<e>", "if", " x", ":", "\n  ", "y", "\n"]
    rows = np.array([[0, 1, 2, 3, 4, 5, 6]])
    (_doc, text, probe), *_ = feats._documents(rows, strings, eos_id=0)
    assert text == "if x:\n  y\n" and probe.tolist()[3] == 5  # the token's first character, its "\n"
    labels = feats.python_syntax_labels(rows, strings, eos_id=0)
    assert labels.ids[0, 4] == label(NEWLINE, 0)  # the newline ending "if x:", at indentation 0


def test_python_syntax_labels_of_documents_across_rows_by_hand():
    strings = ["<e>", "if", " x", ":", "unused", "y", "\n", "", "  ", " #c", "z", "$", " 1", "\n\n"]
    # BOS, then the documents "if x:\n  y\n" (over two rows), "" (empty), "z$\n\n" (broken), "z 1 #c\n" (last)
    rows = np.array(
        [
            [0, 1, 2, 3, 6, 8, 5],
            [0, 6, 0, 7, 0, 10, 11],
            [0, 13, 0, 10, 12, 9, 6],
        ]
    )
    labels = feats.python_syntax_labels(rows, strings, eos_id=0)
    unknown = label(UNKNOWN)
    expected = np.array(
        [
            [unknown, label(KEYWORD), label(NAME), label(OPERATOR), label(NEWLINE), label(SPACE, 1), label(NAME, 1)],
            [unknown, label(NEWLINE, 1), unknown, unknown, unknown, label(NAME), unknown],
            [unknown, label(NEWLINE), unknown, label(NAME), label(NUMBER), label(COMMENT), label(NEWLINE)],
        ]
    )
    np.testing.assert_array_equal(labels.ids, expected)
    assert labels.ids.dtype == np.int64
    # one broken document ("z$") of the three before the last one (the empty one counts)
    assert labels.error_rate == pytest.approx(1 / 3)
    assert labels.features.names == feats.syntax_features().names


def test_python_syntax_labels_a_blank_token_inside_a_string_in_brackets():
    strings = ["<e>", "f", "(", "'a", " ", "b'", ")", "\n"]
    rows = np.array([[0, 1, 2, 3, 4, 5, 6, 7]])  # "f('a b')\n": the " " token is blank, inside a string
    labels = feats.python_syntax_labels(rows, strings, eos_id=0)
    expected = [
        label(UNKNOWN),
        label(NAME),
        label(OPERATOR),  # "(" itself is outside the bracket
        label(STRING, 0, 1),
        label(SPACE, 0, 1),  # a blank token: whitespace, whatever character it probes
        label(STRING, 0, 1),
        label(OPERATOR),
        label(NEWLINE),
    ]
    assert labels.ids[0].tolist() == expected
    assert labels.error_rate == 0.0


def test_python_syntax_labels_a_broken_last_document_is_not_an_error():
    strings = ["<e>", "a", " $", "\n"]
    rows = np.array([[0, 1, 3, 0, 1, 2]])
    labels = feats.python_syntax_labels(rows, strings, eos_id=0)
    assert labels.error_rate == 0.0  # the only broken document is the last, cut by the dataset's end
    broken_first = feats.python_syntax_labels(np.array([[0, 1, 2, 3, 0, 1, 3]]), strings, eos_id=0)
    assert broken_first.error_rate == 1.0  # one of one complete document
    only = feats.python_syntax_labels(np.array([[0, 1, 2, 3]]), strings, eos_id=0)
    assert only.error_rate == 0.0  # no complete document at all: max(1, 0) documents


# --- the stage: streamed sums, scores and best features against NumPy on the concatenation ---------------------

#: the stage's vocabulary: id 0 is BOS/EOS/pad
STAGE_VOCAB = ["<e>", "a", "A", " a", " apple", " and", "apple", " b", "B", " cat", " dog", " the", "x1", " Anna"]
STAGE_VOCAB += ["1999", ",", "(", "\n"]
N_NEURONS = 7


class VocabTokenizer:
    bos_token_id = eos_token_id = pad_token_id = 0

    def __init__(self, vocab: list[str]) -> None:
        self.vocab = vocab

    def decode(self, ids: list[int]) -> str:
        return "".join(self.vocab[i] for i in ids)

    def __len__(self) -> int:
        return len(self.vocab)


def holds(name: str, ids: np.ndarray, previous: np.ndarray, positions: np.ndarray, strings: list[str]) -> np.ndarray:
    """Where a feature holds, from its name alone (independent of the stage's categories)."""
    if name.startswith("position:<"):
        return positions < int(name.split("<")[1])
    if name.startswith("position:["):
        low, high = name[len("position:[") : -1].split(",")
        return (positions >= int(low)) & (positions < int(high))
    if name.startswith("prev_"):
        name, ids = name[len("prev_") :], previous
    kind, value = name.split(":", 1)
    out = np.zeros(len(ids), dtype=bool)
    for i, t in enumerate(ids.tolist()):
        if t < 0:
            continue  # no previous token
        s, special = strings[t], t == 0
        if kind == "token":
            out[i] = not special and s.lower().strip() == value
        elif kind == "first_letter":
            out[i] = not special and s.lower().strip()[:1] == value
        elif value == "special":
            out[i] = special
        else:
            out[i] = not special and feats.TOKEN_CLASSES[value](s)
    return out


def stage_data(seed: int = 0) -> dict[str, Any]:
    """12 rows of 8 tokens (BOS first), an irregular counted mask, planted neurons, batches of 5, 1, 1, 5 rows:
    row 5 has one counted token and row 6 none."""
    rng = np.random.default_rng(seed)
    n_rows, ctx = 12, 8
    rows = rng.integers(1, len(STAGE_VOCAB), size=(n_rows, ctx))
    rows[:, 0] = 0
    rows[0, 1:] = np.arange(1, 8)
    rows[1, 1:] = np.arange(8, 15)
    rows[2, 1:4] = [15, 16, 17]
    rows[3, 3] = 0  # an EOS inside a row
    counted = (rows != 0) & (rng.random(rows.shape) > 0.2)
    counted[5] = False
    counted[5, 3] = True
    counted[6] = False
    positions = np.tile(np.arange(ctx), (n_rows, 1))
    previous = np.concatenate([np.full((n_rows, 1), -1), rows[:, :-1]], axis=1)
    is_a = np.isin(rows, [1, 2, 3])
    post = np.stack(
        [
            np.where(is_a, 3.0, -0.5),  # 0: a function of the single letter "a": VR 1 for token:a
            np.where(previous == 15, 2.0, 0.25),  # 1: a function of the previous token ",": VR 1
            np.where(positions < 4, 1.0, -1.0),  # 2: a function of position < 4
            np.where(np.isin(rows, [1, 2, 3, 4, 5, 6, 13]), 1.5, 0.0),  # 3: first letter a
            rng.normal(size=rows.shape),  # 4: noise
            np.full(rows.shape, 0.5),  # 5: constant
            np.where(np.isin(rows, [7, 8]), 2.0, 0.0) + 0.3 * rng.normal(size=rows.shape),  # 6: "b" with noise
        ],
        axis=-1,
    ).astype(np.float32)
    pre = (rng.normal(size=post.shape) + 0.5 * post).astype(np.float32)
    spans = [(0, 5), (5, 6), (6, 7), (7, 12)]
    return dict(rows=rows, counted=counted, post=post, pre=pre, spans=spans, ctx=ctx, previous=previous)


def stage_for(data: dict[str, Any], analysis: dict, passes: int = 1, vocab: list[str] | None = None) -> FamiliesStage:
    vocab = vocab or STAGE_VOCAB
    dataset = TokenDataset(data["rows"], data["counted"], DatasetConfig(batch_size=5), data["ctx"], {})
    model = SimpleNamespace(
        name="m", n_layers=1, d_mlp=N_NEURONS, n_neurons=N_NEURONS, d_vocab=len(vocab), tokenizer=VocabTokenizer(vocab)
    )
    base = {"syntax": "off", "spacy": "off", "unigram_min_count": 1, "top_features": 5}
    config = SimpleNamespace(analysis={"families": base | analysis}, device="cpu")
    inputs: Any = SimpleNamespace(config=config, dataset=dataset, models=[model], split=Split({"families": passes}))
    return FamiliesStage(inputs)


def batches_of(data: dict[str, Any]) -> list[ActivationBatch]:
    post, pre = torch.from_numpy(data["post"])[:, :, None], torch.from_numpy(data["pre"])[:, :, None]
    return [
        ActivationBatch(
            a,
            torch.from_numpy(data["rows"][a:b]),
            torch.from_numpy(data["counted"][a:b]),
            {"m": post[a:b].contiguous()},
            {"m": pre[a:b].contiguous()},
        )
        for a, b in data["spans"]
    ]


def chosen_mask(data: dict[str, Any], tokens: str, cap: int | None) -> np.ndarray:
    base = data["counted"].reshape(-1) if tokens == "counted" else np.ones(data["rows"].size, dtype=bool)
    return base & (np.cumsum(base) <= (cap if cap is not None else base.sum()))


def oracle(stage: FamiliesStage, data: dict[str, Any], chosen: np.ndarray) -> dict[str, Any]:
    """NumPy float64 on the chosen tokens, concatenated: VR [features, neurons] by name, shares, sums."""
    ids = data["rows"].reshape(-1)[chosen]
    previous = data["previous"].reshape(-1)[chosen]
    positions = np.tile(np.arange(data["ctx"]), data["rows"].shape[0])[chosen]
    v = data["post"].reshape(-1, N_NEURONS)[chosen].astype(np.float64)
    names = [name for f in stage.features.values() for name in f.names]
    ys = np.stack([holds(name, ids, previous, positions, stage.strings) for name in names])
    vr = np.array([[r_squared(v[:, j], y) for j in range(N_NEURONS)] for y in ys])
    return dict(names=names, ys=ys, vr=vr, v=v, positions=positions, pre=data["pre"].reshape(-1, N_NEURONS)[chosen])


def check_scores(stage: FamiliesStage, want: dict[str, Any], neurons: slice) -> None:
    vr, names, sets, shares = stage.scores("m", neurons)
    assert names == want["names"]
    assert len(sets) == len(names)
    assert vr.shape == (len(names), neurons.stop - neurons.start)
    np.testing.assert_allclose(vr, want["vr"][:, neurons], rtol=0, atol=1e-9)
    np.testing.assert_allclose(shares, want["ys"].mean(1), rtol=0, atol=1e-12)


def check_sums(stage: FamiliesStage, want: dict[str, Any]) -> None:
    """Counts, power sums, firing and the block's category sums: exactly what NumPy sums on the concatenation."""
    state, block = stage.state["m"], stage.blocks["m"][stage.pass_index]
    positions, v, pre = want["positions"], want["v"], want["pre"].astype(np.float64)
    np.testing.assert_array_equal(stage.counts["position"].numpy(), np.bincount(positions, minlength=8))
    offset = 0
    for var, f in stage.features.items():
        assert float(stage.counts[var].sum()) == len(positions), var
        ys = want["ys"][offset : offset + len(f.names)]
        np.testing.assert_allclose(f.membership @ stage.counts[var].numpy(), ys.sum(1), rtol=0, atol=0)
        got = f.membership @ state[f"{var}_sum"].numpy()
        assert got.shape == (len(f.names), block.stop - block.start)
        np.testing.assert_allclose(got, ys.astype(np.float64) @ v[:, block], rtol=0, atol=1e-9)
        assert state[f"{var}_sum"].dtype == torch.float64
        offset += len(f.names)
    assert state["post_moments"].n == len(positions) and state["pre_moments"].n == len(positions)
    np.testing.assert_allclose(state["post_moments"].sums[0].numpy(), v.sum(0), atol=1e-9)
    np.testing.assert_allclose(state["post_moments"].sums[1].numpy(), (v**2).sum(0), atol=1e-9)
    np.testing.assert_allclose(state["pre_moments"].sums[0].numpy(), pre.sum(0), atol=1e-9)
    fire = np.stack([(pre[positions == p] > 0).sum(0) for p in range(8)])
    np.testing.assert_array_equal(state["fire"].numpy(), fire)


def check_best(stage: FamiliesStage, want: dict[str, Any], neurons: range) -> None:
    """The reduced arrays of `_reduce` against the oracle VR: top features, best per set, letters."""
    state, k = stage.state["m"], stage.config.top_features
    vr, names = want["vr"], want["names"]
    sets = [s for f in stage.features.values() for s in f.sets]
    for j in neurons:
        ranked = np.sort(vr[:, j])[::-1][:k]
        np.testing.assert_allclose(state["top_vr"][:, j], ranked, atol=1e-9)
        top = state["top_index"][:, j]
        assert len(set(top.tolist())) == k
        np.testing.assert_allclose(vr[top, j], state["top_vr"][:, j], atol=1e-9)
        for s, feature_set in enumerate(dict.fromkeys(sets)):
            rows = [i for i, x in enumerate(sets) if x == feature_set]
            best = float(vr[rows, j].max())
            assert state["best_vr"][s, j] == pytest.approx(best, abs=1e-9), (j, feature_set)
            assert sets[state["best_index"][s, j]] == feature_set
            assert vr[state["best_index"][s, j], j] == pytest.approx(best, abs=1e-9)
        for i, letter in enumerate("abcdefghijklmnopqrstuvwxyz"):
            expected = vr[names.index(f"token:{letter}"), j] if f"token:{letter}" in names else 0.0
            assert state["letter_vr"][i, j] == pytest.approx(expected, abs=1e-9), (letter, j)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of at most 3 tokens in the batches and 2 neurons in `_reduce`, so every chunked loop turns (the real
    `chunk_rows` still sees the arguments)."""
    import precompute.activations
    import precompute.stages.families
    from precompute.memory import chunk_rows

    monkeypatch.setattr(precompute.activations, "chunk_rows", lambda n, itemsize=8: min(3, chunk_rows(n, itemsize)))
    monkeypatch.setattr(precompute.stages.families, "chunk_rows", lambda n, itemsize: min(2, chunk_rows(n, itemsize)))


@pytest.mark.parametrize(
    ("passes", "tokens", "cap"),
    [(1, "counted", None), (3, "counted", None), (2, "all", None), (3, "all", 50), (2, "counted", 1)],
)
def test_stage_streams_numpy_sums_and_scores_over_batches_and_passes(small_chunks, passes, tokens, cap):
    data = stage_data()
    stage = stage_for(data, {"tokens": tokens, "max_tokens": cap}, passes=passes)
    want = oracle(stage, data, chosen_mask(data, tokens, cap))
    names = want["names"]
    if cap != 1:  # the features are what the tokens hold (unigram_min_count 1: every normalised string seen)
        assert "token:a" in names and "token:apple" in names and "token:b" in names and "token:<e>" not in names
        assert "prev_token:," in names and "position:<4" in names and "class:special" in names
    else:  # a single token: every share is 0 or 1, and no variance to reduce
        assert set(want["ys"].mean(1).tolist()) == {0.0, 1.0} and not want["vr"].any()
    assert stage.blocks["m"] == [slice(0, 7)] if passes == 1 else len(stage.blocks["m"]) == passes
    for p in range(passes):
        assert stage.pass_index == p and not stage.done_streaming
        for batch in batches_of(data):
            stage.update(batch)
        check_sums(stage, want)
        block = stage.blocks["m"][p]
        check_scores(stage, want, block)
        if block.stop - block.start > 1:
            check_scores(stage, want, slice(block.start + 1, block.stop))
        stage.finish_pass()
        if p < passes - 1:
            check_best(stage, want, range(block.start, block.stop))  # closed into its best features
            assert all(v is None or v.abs().sum() == 0 for k, v in stage.state["m"].items() if k.endswith("_sum"))
    assert stage.done_streaming and stage.pass_index == passes - 1
    last = stage.blocks["m"][-1]
    stage._reduce("m", last)  # what `write` does with the last block
    check_best(stage, want, range(N_NEURONS))
    if cap == 1:
        return
    # the planted neurons' best features
    top = stage.state["m"]["top_index"][0]
    assert want["names"][top[0]] == "token:a" and stage.state["m"]["top_vr"][0, 0] == pytest.approx(1.0)
    assert want["names"][top[1]] == "prev_token:," and want["names"][top[3]] == "first_letter:a"
    assert (stage.state["m"]["top_vr"][:, 5] == 0).all()  # the constant neuron


def test_stage_categories_by_hand(small_chunks):
    data = stage_data()
    stage = stage_for(data, {})
    batch = batches_of(data)[0]
    cats = stage.categories(batch)
    assert set(cats) == {"token", "prev_token", "position"}
    mask = data["counted"][0:5].reshape(-1)
    positions = np.tile(np.arange(8), 5)[mask]
    np.testing.assert_array_equal(cats["position"].numpy(), positions)
    ids = data["rows"][0:5].reshape(-1)[mask]
    previous = data["previous"][0:5].reshape(-1)[mask]
    token, prev = stage.features["token"], stage.features["prev_token"]
    for name_index, name in enumerate(token.names):
        y = token.membership.toarray()[name_index][cats["token"].numpy()].astype(bool)
        np.testing.assert_array_equal(y, holds(name, ids, previous, positions, stage.strings), err_msg=name)
    for name_index, name in enumerate(prev.names):
        y = prev.membership.toarray()[name_index][cats["prev_token"].numpy()].astype(bool)
        np.testing.assert_array_equal(y, holds(name, ids, previous, positions, stage.strings), err_msg=name)
    # the first counted token of a row (position 1 here, after BOS) has BOS as its previous token, never "none"
    assert cats["token"].dtype == torch.int64 and cats["prev_token"].dtype == torch.int64


def test_stage_with_all_tokens_gives_bos_no_previous_token(small_chunks):
    data = stage_data()
    stage = stage_for(data, {"tokens": "all"})
    batch = batches_of(data)[2]  # row 6: nothing counted, every token chosen
    from precompute.stages.base import selected_batch

    cats = stage.categories(selected_batch(batch, stage.selection))
    assert cats["position"].tolist() == list(range(8))
    assert int(cats["prev_token"][0]) == stage.no_previous
    assert stage.no_previous == stage.features["prev_token"].n_categories - 1
    assert int(stage.features["prev_token"].membership[:, stage.no_previous].sum()) == 0
    assert set(cats["prev_token"][1:].tolist()).isdisjoint({stage.no_previous})


def test_stage_state_dict_round_trip_mid_pass_and_between_passes(small_chunks):
    data = stage_data(seed=1)
    want = oracle(stage_for(data, {}), data, chosen_mask(data, "counted", None))
    batches = batches_of(data)

    def reloaded(stage: FamiliesStage) -> FamiliesStage:
        saved = io.BytesIO()
        torch.save(stage.state_dict(), saved)
        saved.seek(0)
        fresh = stage_for(data, {}, passes=2)
        fresh.load_state_dict(torch.load(saved, weights_only=False))
        return fresh

    stage = stage_for(data, {}, passes=2)
    for batch in batches[:2]:
        stage.update(batch)
    stage = reloaded(stage)  # mid pass 0
    assert stage.pass_index == 0 and not stage.done_streaming
    for batch in batches_of(data)[2:]:
        stage.update(batch)
    check_sums(stage, want)
    stage.finish_pass()
    stage = reloaded(stage)  # between the passes: block 0 closed, block 1 empty
    assert stage.pass_index == 1 and not stage.done_streaming
    check_best(stage, want, range(0, 4))
    for batch in batches_of(data)[:3]:
        stage.update(batch)
    stage = reloaded(stage)  # mid pass 1
    for batch in batches_of(data)[3:]:
        stage.update(batch)
    check_sums(stage, want)
    check_scores(stage, want, slice(4, 7))
    stage.finish_pass()
    stage = reloaded(stage)
    assert stage.done_streaming and stage.pass_index == 1
    stage._reduce("m", stage.blocks["m"][1])
    check_best(stage, want, range(N_NEURONS))
    state = stage.state_dict()
    assert set(state) == {"models", "counts", "pass_index", "done"}
    legacy = {key: value for key, value in state.items() if key != "pass_index"}  # a checkpoint from before passes
    fresh = stage_for(data, {}, passes=1)
    fresh.load_state_dict(legacy)
    assert fresh.pass_index == 0


def test_stage_empty_state_shapes(small_chunks):
    data = stage_data()
    stage = stage_for(data, {"top_features": 4}, passes=3)
    state = stage.state["m"]
    assert state["fire"].shape == (8, N_NEURONS) and state["fire"].dtype == torch.float64
    assert state["top_index"].shape == (4, N_NEURONS) and state["top_index"].dtype == np.int64
    assert state["top_vr"].shape == (4, N_NEURONS) and state["best_vr"].shape == (7, N_NEURONS)
    assert state["best_index"].shape == (7, N_NEURONS) and state["best_index"].dtype == np.int64
    assert state["letter_vr"].shape == (26, N_NEURONS)
    for key in ("top_vr", "best_vr", "letter_vr"):
        assert not state[key].any()
    assert state["pre_moments"].sums.shape == (4, N_NEURONS) and state["post_moments"].sums.shape == (4, N_NEURONS)
    for var, f in stage.features.items():
        assert state[f"{var}_sum"].shape == (f.n_categories, 3)  # block 0 of 7 neurons in 3 passes: 3 wide
        assert state[f"{var}_sum"].dtype == torch.float64 and not state[f"{var}_sum"].any()
    assert set(stage.counts) == {"token", "prev_token", "position"}


PY_VOCAB = ["<e>", "def", " f", "(", "x", "):", "\n    ", "return", " x", "\n", "y", " =", " 1"]


def test_stage_with_python_syntax_labels_streams_their_categories(small_chunks):
    rng = np.random.default_rng(5)
    line = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 9]  # "def f(x):\n    return x\ny = 1\n"
    stream = np.array([*line, 0] * 8)
    rows = np.concatenate([np.zeros((12, 1), dtype=np.int64), stream[: 12 * 7].reshape(12, 7)], axis=1)
    counted = (rows != 0) & (rng.random(rows.shape) > 0.25)
    counted[6] = False
    is_keyword = np.isin(rows, [1, 7])
    post = np.stack(
        [np.where(is_keyword, 2.0, 0.0)] + [rng.normal(size=rows.shape) for _ in range(N_NEURONS - 1)], axis=-1
    ).astype(np.float32)
    data = dict(
        rows=rows,
        counted=counted,
        post=post,
        pre=rng.normal(size=post.shape).astype(np.float32),
        spans=[(0, 2), (2, 11), (11, 12)],  # a batch of 9 rows, more than the context of 8
        ctx=8,
        previous=np.concatenate([np.full((12, 1), -1), rows[:, :-1]], axis=1),
    )
    stage = stage_for(data, {"syntax": "python"}, passes=2, vocab=PY_VOCAB)
    labels = feats.python_syntax_labels(rows, PY_VOCAB, 0).ids
    mask = counted.reshape(-1)
    v = post.reshape(-1, N_NEURONS)[mask].astype(np.float64)
    for p in range(2):
        for batch in batches_of(data):
            stage.update(batch)
            cats = stage.categories(batch)
            a, b = batch.row_start, batch.row_start + batch.tokens.shape[0]
            np.testing.assert_array_equal(cats["syntax"].numpy(), labels[a:b].reshape(-1)[counted[a:b].reshape(-1)])
        f = stage.features["syntax"]
        block = stage.blocks["m"][p]
        ys = f.membership.toarray()[:, labels.reshape(-1)[mask]].astype(bool)
        np.testing.assert_array_equal(
            stage.counts["syntax"].numpy(), np.bincount(labels.reshape(-1)[mask], minlength=108)
        )
        np.testing.assert_allclose(
            f.membership @ stage.state["m"]["syntax_sum"].numpy(), ys.astype(np.float64) @ v[:, block], atol=1e-9
        )
        vr, names, _sets, _shares = stage.scores("m", block)
        offset = names.index("syntax:keyword")
        for i in range(len(f.names)):
            for j in range(block.stop - block.start):
                assert vr[offset + i, j] == pytest.approx(r_squared(v[:, block.start + j], ys[i]), abs=1e-9)
        stage.finish_pass()
    stage._reduce("m", stage.blocks["m"][1])
    all_names = [n for f in stage.features.values() for n in f.names]
    best = stage.state["m"]["best_index"][:, 0]
    assert "syntax:keyword" in {all_names[i] for i in best}
