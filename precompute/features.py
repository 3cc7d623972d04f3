"""Binary features of a token and its context, grouped by the categorical variable they are functions of.

Variance reduction (paper eq. 4, `precompute.stages.families`) needs, per neuron, the count and the activation sum of
every value of a categorical variable; any binary feature that is a function of that variable is then a union of
its categories. The variables here (paper-spec §4.3, issue 3 part 4):

- ``token``: the current token (its id, or a vocabulary bucket): unigram (normalised string, lower().strip(); the
  single-letter ones, ``token:a`` ... ``token:z``, are the paper's ``<letter>_unigram`` features of the alphabet
  family), first letter (a-z of the normalised string: the paper's ``start_w_<letter>``, not the alphabet family)
  and token classes (digits, years, capitals, punctuation, leading space, ...);
- ``prev_token``: the same features of the previous token in the row (position 0 has none);
- ``position``: the position in the row, as thresholds (< 2, < 4, ...) and power-of-two bands;
- ``syntax``: Python's own `tokenize` on each document (kind of Python token, indentation depth, inside brackets),
  see `python_syntax_labels`;
- ``spacy``: part of speech and dependency label, only when spaCy and one of its pipelines are installed
  (`spacy_labels`; never downloaded).

Everything is built from the dataset and the tokenizer before any activation is seen.
"""

from __future__ import annotations

import io
import itertools
import keyword
import logging
import tokenize
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse

logger = logging.getLogger(__name__)

#: Token classes: name -> predicate on the decoded token string (paper-spec §4.3 "type", "numeric", "symbol").
TOKEN_CLASSES: dict[str, Callable[[str], bool]] = {
    "leading_space": lambda s: s[:1] == " " and s.strip() != "",
    "whitespace": lambda s: s != "" and s.strip() == "",
    "newline": lambda s: "\n" in s,
    "alpha": lambda s: s.strip().isalpha(),
    "lower": lambda s: s.strip().isalpha() and s.strip().islower(),
    "capitalised": lambda s: s.strip()[:1].isupper(),
    "all_caps": lambda s: len(s.strip()) > 1 and s.strip().isupper(),
    "digits": lambda s: s.strip().isascii() and s.strip().isdigit(),
    "contains_digit": lambda s: any(c.isdigit() for c in s),
    "year": lambda s: s.strip().isascii() and s.strip().isdigit() and len(s.strip()) == 4 and 1490 < int(s) < 2200,
    "punctuation": lambda s: s.strip() != "" and all(not c.isalnum() and not c.isspace() for c in s.strip()),
    "open_bracket": lambda s: any(c in "([{" for c in s),
    "close_bracket": lambda s: any(c in ")]}" for c in s),
    "quote": lambda s: any(c in "'\"" for c in s),
    "underscore": lambda s: "_" in s,
    "dot": lambda s: "." in s,
    "comma": lambda s: "," in s,
    "colon": lambda s: ":" in s,
    "equals": lambda s: "=" in s,
    "word_continuation": lambda s: s[:1].isalpha(),  # no leading space: the middle or end of a word
}

#: Python syntax kinds of `python_syntax_labels`, in category order.
SYNTAX_KINDS: tuple[str, ...] = (
    "keyword",
    "name",
    "operator",
    "string",
    "number",
    "comment",
    "newline",
    "whitespace",
    "unknown",
)
MAX_INDENT = 5  # indentation depths >= 5 share one category

_STRING_TYPES = {tokenize.STRING} | {
    getattr(tokenize, n) for n in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END") if hasattr(tokenize, n)
}


def normalise(text: str) -> str:
    """The unigram form of a token string (paper `get_unigram_df`).

    >>> normalise(" On"), normalise("on\\n")
    ('on', 'on')
    """
    return text.lower().strip()


def first_letter(text: str) -> str:
    """The first-letter feature of a token: the first letter a-z of its normalised form, or ''.

    >>> first_letter(" Apple"), first_letter("_x"), first_letter("  ")
    ('a', '', '')
    """
    head = normalise(text)[:1]
    return head if "a" <= head <= "z" else ""


def single_letter(text: str) -> str:
    """The letter a-z a token is, once normalised (the paper's ``<letter>_unigram``: " a", "A", "a\\n"), or ''.

    >>> single_letter(" A"), single_letter(" an"), single_letter("1")
    ('a', '', '')
    """
    norm = normalise(text)
    return norm if len(norm) == 1 and "a" <= norm <= "z" else ""


@dataclass(frozen=True)
class FeatureMatrix:
    """Binary features over the categories of one categorical variable."""

    variable: str  # token | prev_token | position | syntax | spacy
    n_categories: int
    names: tuple[str, ...]  # e.g. "token:def", "prev_class:comma", "position:<8"
    sets: tuple[str, ...]  # feature set of each feature: unigram | first_letter | token_class | previous_token | ...
    membership: scipy.sparse.csr_matrix  # [n_features, n_categories] float64 0/1

    @classmethod
    def build(cls, variable: str, n_categories: int, features: Sequence[tuple[str, str, np.ndarray]]) -> FeatureMatrix:
        """Features given as (name, set, category indices); features that hold nowhere are dropped."""
        kept = [(name, kind, np.unique(cats)) for name, kind, cats in features if len(cats)]
        rows = np.concatenate([np.full(len(c), i) for i, (_, _, c) in enumerate(kept)]) if kept else np.zeros(0)
        cols = np.concatenate([c for _, _, c in kept]) if kept else np.zeros(0)
        membership = scipy.sparse.csr_matrix(
            (np.ones(len(rows)), (rows.astype(np.int64), cols.astype(np.int64))), shape=(len(kept), n_categories)
        )
        return cls(variable, n_categories, tuple(n for n, _, _ in kept), tuple(k for _, k, _ in kept), membership)

    def restricted(self, observed: np.ndarray) -> FeatureMatrix:
        """The same features over only the observed categories (``observed``: [n_categories] bool), in order.

        A category that never occurs has no count and no activation sum, so dropping it changes no variance
        reduction; the names stay, a feature that holds nowhere observed just has n1 = 0.

        >>> f = FeatureMatrix.build("v", 3, [("a", "s", np.array([0, 2])), ("b", "s", np.array([1]))])
        >>> r = f.restricted(np.array([True, False, True]))
        >>> r.n_categories, r.names, r.membership.toarray().tolist()
        (2, ('a', 'b'), [[1.0, 1.0], [0.0, 0.0]])
        """
        keep = np.flatnonzero(observed)
        return FeatureMatrix(self.variable, len(keep), self.names, self.sets, self.membership[:, keep].tocsr())

    @staticmethod
    def observed_categories(observed: np.ndarray) -> np.ndarray:
        """Category -> its index among the observed categories, or -1: [n_categories] int64.

        >>> FeatureMatrix.observed_categories(np.array([True, False, True])).tolist()
        [0, -1, 1]
        """
        slots = np.full(len(observed), -1, dtype=np.int64)
        slots[np.flatnonzero(observed)] = np.arange(int(np.count_nonzero(observed)))
        return slots


@dataclass(frozen=True)
class VocabBuckets:
    """Token id -> category of the ``token``/``prev_token`` variables.

    Without a cap every token id is its own category (exact). With ``max_vocab`` the most frequent ids keep their
    own category and the others are pooled by their signature (first letter, the single letter they are, token
    classes), so first-letter, class and single-letter unigram (alphabet family) features stay exact while another
    pooled id no longer counts for its unigram feature (docs/analyses.md).
    """

    bucket_of: np.ndarray  # [d_vocab] int64
    representative: np.ndarray  # [n_buckets] int64: a token id of each bucket
    own: np.ndarray  # [n_buckets] bool: the bucket is one token id

    @property
    def n_buckets(self) -> int:
        return int(self.representative.shape[0])


def vocab_buckets(
    strings: Sequence[str], counts: np.ndarray, max_vocab: int | None, special: Sequence[int]
) -> VocabBuckets:
    """Buckets for a vocabulary; `counts` [d_vocab] ranks ids when ``max_vocab`` caps the categories.

    >>> b = vocab_buckets(["a", "b", " A", "c1"], np.array([5, 0, 3, 1]), max_vocab=2, special=[])
    >>> b.bucket_of.tolist(), b.own.tolist()
    ([0, 2, 1, 3], [True, True, False, False])
    """
    d_vocab = len(strings)
    if max_vocab is None or max_vocab >= d_vocab:
        ids = np.arange(d_vocab, dtype=np.int64)
        return VocabBuckets(ids, ids.copy(), np.ones(d_vocab, dtype=bool))
    order = np.lexsort((np.arange(d_vocab), -counts[:d_vocab]))
    kept = sorted(set(order[:max_vocab].tolist()) | set(special))
    bucket_of = np.full(d_vocab, -1, dtype=np.int64)
    bucket_of[kept] = np.arange(len(kept))
    representative, signatures = list(kept), {}
    for token in range(d_vocab):
        if bucket_of[token] >= 0:
            continue
        text = strings[token]
        key = (first_letter(text), single_letter(text), *(f(text) for f in TOKEN_CLASSES.values()))
        if key not in signatures:
            signatures[key] = len(representative)
            representative.append(token)
        bucket_of[token] = signatures[key]
    own = np.arange(len(representative)) < len(kept)
    return VocabBuckets(bucket_of, np.asarray(representative, dtype=np.int64), own)


def token_features(
    variable: str,
    strings: Sequence[str],
    buckets: VocabBuckets,
    counts: np.ndarray,
    min_count: int,
    special: Sequence[int],
    extra_categories: int = 0,
) -> FeatureMatrix:
    """Unigram, first-letter and token-class features over vocabulary buckets.

    Args:
        variable: ``token`` (feature sets unigram, first_letter, token_class; names ``token:``, ``first_letter:``,
            ``class:``) or ``prev_token`` (set previous_token; names ``prev_token:``, ``prev_first_letter:``, ...).
        strings: decoded text of each token id.
        buckets: the categories (`vocab_buckets`).
        counts: [d_vocab] occurrences of each id for this variable; a unigram feature needs ``min_count``.
        min_count: the least occurrences of a normalised string for it to be a unigram feature.
        special: BOS/EOS/pad ids: only the ``special`` class, never a unigram or a letter.
        extra_categories: categories after the buckets that no feature covers (``prev_token``: no previous token).
    """
    previous = variable == "prev_token"
    prefix = "prev_" if previous else ""
    n_categories = buckets.n_buckets + extra_categories
    rep = buckets.representative
    special_ids = set(special)
    is_special = np.isin(rep, np.asarray(sorted(special_ids), dtype=np.int64))
    features: list[tuple[str, str, np.ndarray]] = []
    norm_counts: dict[str, int] = {}
    for token, text in enumerate(strings):
        if token not in special_ids:
            norm_counts[normalise(text)] = norm_counts.get(normalise(text), 0) + int(counts[token])
    by_norm: dict[str, list[int]] = {}
    # a pooled bucket of single-letter ids holds one letter only (`vocab_buckets`): it keeps its unigram feature
    letter_buckets = np.array([bool(single_letter(strings[t])) for t in rep], dtype=bool)
    for bucket in np.flatnonzero((buckets.own | letter_buckets) & ~is_special):
        norm = normalise(strings[rep[bucket]])
        if norm and norm_counts.get(norm, 0) >= min_count:
            by_norm.setdefault(norm, []).append(int(bucket))
    for norm, buckets_of_norm in sorted(by_norm.items()):
        kind = "previous_token" if previous else "unigram"
        features.append((f"{prefix}token:{norm}", kind, np.asarray(buckets_of_norm)))
    letters = np.array([first_letter(strings[t]) for t in rep])
    for letter in "abcdefghijklmnopqrstuvwxyz":
        cats = np.flatnonzero((letters == letter) & ~is_special)
        features.append((f"{prefix}first_letter:{letter}", "previous_token" if previous else "first_letter", cats))
    for name, predicate in TOKEN_CLASSES.items():
        cats = np.asarray([b for b in range(buckets.n_buckets) if not is_special[b] and predicate(strings[rep[b]])])
        features.append((f"{prefix}class:{name}", "previous_token" if previous else "token_class", cats))
    features.append(
        (f"{prefix}class:special", "previous_token" if previous else "token_class", np.flatnonzero(is_special))
    )
    return FeatureMatrix.build(variable, n_categories, features)


def position_features(ctx: int) -> FeatureMatrix:
    """Position thresholds ``position:<k`` and bands ``position:[a,b)`` for powers of two k < ctx.

    >>> position_features(8).names
    ('position:<2', 'position:<4', 'position:[2,4)', 'position:[4,8)')
    """
    features = []
    k = 2
    while k < ctx:
        features.append((f"position:<{k}", "position", np.arange(k)))
        k *= 2
    k = 2
    while k < ctx:
        features.append((f"position:[{k},{min(2 * k, ctx)})", "position", np.arange(k, min(2 * k, ctx))))
        k *= 2
    return FeatureMatrix.build("position", ctx, features)


@dataclass(frozen=True)
class ContextLabels:
    """A categorical variable computed from whole documents: a category per dataset token, and its features."""

    ids: np.ndarray  # [n_rows, ctx] int64 category of every token
    features: FeatureMatrix
    error_rate: float  # share of documents the labeller could not fully parse


def documents_of(rows: np.ndarray, eos_id: int) -> list[np.ndarray]:
    """Split the packed stream (rows without their leading BOS, in order) back into documents at EOS.

    Returns the flat stream indices of each document's tokens (`precompute.packing.pack_documents` layout).

    >>> [d.tolist() for d in documents_of(np.array([[9, 1, 2, 0], [9, 3, 0, 4]]), eos_id=0)]
    [[0, 1], [3], [5]]
    """
    stream = rows[:, 1:].reshape(-1)
    cuts = np.flatnonzero(stream == eos_id)
    bounds = np.concatenate([[-1], cuts, [stream.size]])
    return [np.arange(a + 1, b) for a, b in itertools.pairwise(bounds) if b > a + 1]


def _syntax_kind(tok: tokenize.TokenInfo) -> int | None:
    if tok.type == tokenize.NAME:
        return SYNTAX_KINDS.index("keyword" if keyword.iskeyword(tok.string) else "name")
    if tok.type == tokenize.OP:
        return SYNTAX_KINDS.index("operator")
    if tok.type in _STRING_TYPES:
        return SYNTAX_KINDS.index("string")
    if tok.type == tokenize.NUMBER:
        return SYNTAX_KINDS.index("number")
    if tok.type == tokenize.COMMENT:
        return SYNTAX_KINDS.index("comment")
    if tok.type in (tokenize.NEWLINE, tokenize.NL):
        return SYNTAX_KINDS.index("newline")
    if tok.type == tokenize.INDENT:
        return SYNTAX_KINDS.index("whitespace")
    if tok.type == tokenize.ERRORTOKEN:
        return SYNTAX_KINDS.index("unknown")
    return None  # DEDENT, ENDMARKER, ENCODING: empty spans


def _char_labels(text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """Kind, indentation depth and bracket depth of every character of one document, and whether it parsed.

    On a tokenize error the rest of the failing line is ``unknown`` and tokenizing restarts on the next line with
    fresh state; a document cut mid-statement at the end of the dataset has an ``unknown`` tail.
    """
    lines = text.splitlines(keepends=True)
    line_start = np.concatenate([[0], np.cumsum([len(line) for line in lines])]).astype(np.int64)
    events: list[tuple[int, int, int, int]] = []  # (char, kind, indent, bracket) from this char on
    unknown, whitespace = SYNTAX_KINDS.index("unknown"), SYNTAX_KINDS.index("whitespace")
    clean, first = True, 0
    while first < len(lines):
        indent = bracket = 0
        attempt, last_row = len(events), first
        readline = io.StringIO("".join(lines[first:])).readline
        try:
            for tok in tokenize.generate_tokens(readline):
                if tok.type == tokenize.INDENT:
                    indent += 1
                elif tok.type == tokenize.DEDENT:
                    indent = max(0, indent - 1)
                kind = _syntax_kind(tok)
                if kind is None:
                    continue
                start = int(line_start[first + tok.start[0] - 1] + tok.start[1])
                end = int(line_start[first + tok.end[0] - 1] + tok.end[1])
                if tok.type == tokenize.ERRORTOKEN and tok.string.strip():
                    clean = False
                if tok.type == tokenize.OP and tok.string in ")]}":
                    bracket = max(0, bracket - 1)
                events.append((start, kind, min(indent, MAX_INDENT), int(bracket > 0)))
                if tok.type == tokenize.OP and tok.string in "([{":
                    bracket += 1
                events.append((end, whitespace, min(indent, MAX_INDENT), int(bracket > 0)))
                last_row = first + tok.end[0] - 1
            break
        except (tokenize.TokenError, SyntaxError) as exc:
            clean = False
            lineno = getattr(exc, "lineno", None) or (exc.args[1][0] if len(exc.args) > 1 else None)
            error_row = min(max(first + int(lineno) - 1 if lineno else last_row, last_row), len(lines) - 1)
            last_end = events[-1][0] if len(events) > attempt else int(line_start[first])
            events.append((last_end, unknown, 0, 0))  # the rest of the failing line(s)
            events.append((int(line_start[error_row + 1]), whitespace, 0, 0))
            first = error_row + 1
    n_chars = len(text)
    if not events:
        fill = np.full(n_chars, whitespace, dtype=np.int64)
        return fill, np.zeros(n_chars, dtype=np.int64), np.zeros(n_chars, dtype=np.int64), clean
    table = np.asarray(events, dtype=np.int64)
    at = np.searchsorted(table[:, 0], np.arange(n_chars), side="right") - 1  # last event at or before each char
    valid = at >= 0
    at = np.maximum(at, 0)
    kinds = np.where(valid, table[at, 1], whitespace)
    return kinds, np.where(valid, table[at, 2], 0), np.where(valid, table[at, 3], 0), clean


def syntax_features() -> FeatureMatrix:
    """``syntax:<kind>``, ``syntax:indent=<d>`` and ``syntax:in_brackets`` over (kind, indent, bracket) combos."""
    n_indent = MAX_INDENT + 1
    combos = np.arange(len(SYNTAX_KINDS) * n_indent * 2)
    kind, indent, bracket = combos // (n_indent * 2), (combos // 2) % n_indent, combos % 2
    features = [(f"syntax:{k}", "syntax", combos[kind == i]) for i, k in enumerate(SYNTAX_KINDS) if k != "unknown"]
    features += [
        (f"syntax:indent={d}", "syntax", combos[(indent == d) & (kind != SYNTAX_KINDS.index("unknown"))])
        for d in range(n_indent)
    ]
    features.append(("syntax:in_brackets", "syntax", combos[bracket == 1]))
    return FeatureMatrix.build("syntax", len(combos), features)


def _documents(rows: np.ndarray, strings: Sequence[str], eos_id: int) -> Iterator[tuple[np.ndarray, str, np.ndarray]]:
    """Each document's stream indices, its text, and the character each of its tokens is labelled by.

    The character is the token's first non-space one (its first one when the token is all whitespace).
    """
    lengths = np.array([len(s) for s in strings], dtype=np.int64)
    # an all-whitespace token (a newline and the next line's indentation) is labelled by its first character
    lead = np.array([len(s) - len(s.lstrip()) if s.strip() else 0 for s in strings], dtype=np.int64)
    stream = rows[:, 1:].reshape(-1)
    for doc in documents_of(rows, eos_id):
        tokens = stream[doc]
        text = "".join(strings[t] for t in tokens)
        starts = np.concatenate([[0], np.cumsum(lengths[tokens])[:-1]]).astype(np.int64)
        yield doc, text, np.minimum(starts + lead[tokens], max(len(text) - 1, 0))


def _stream_to_rows(rows: np.ndarray, stream_ids: np.ndarray, fill: int) -> np.ndarray:
    ids = np.full(rows.shape, fill, dtype=np.int64)  # the BOS column gets ``fill``
    ids[:, 1:] = stream_ids.reshape(rows.shape[0], -1)
    return ids


def python_syntax_labels(rows: np.ndarray, strings: Sequence[str], eos_id: int) -> ContextLabels:
    """Label every token of the dataset with its Python syntax, tokenizing each document whole.

    The rows are the packed stream of `precompute.packing.pack_documents`, so a document is re-joined across rows
    before `tokenize` sees it; each model token takes the labels of its first non-space character (a token that
    is all whitespace: ``newline`` if it holds one, else ``whitespace``). BOS and EOS positions get ``unknown``.
    """
    n_indent, unknown = MAX_INDENT + 1, SYNTAX_KINDS.index("unknown")
    blank = np.array([s.strip() == "" for s in strings])
    blank_kind = np.where(["\n" in s for s in strings], SYNTAX_KINDS.index("newline"), SYNTAX_KINDS.index("whitespace"))
    stream_ids = np.full(rows[:, 1:].size, unknown * n_indent * 2, dtype=np.int64)
    documents = list(_documents(rows, strings, eos_id))
    failed = 0
    for index, (doc, text, probe) in enumerate(documents):
        if not text:
            continue
        kinds, indents, brackets, clean = _char_labels(text)
        failed += int(not clean and index < len(documents) - 1)  # the last document is cut by the dataset's end
        tokens = rows[:, 1:].reshape(-1)[doc]
        kind = np.where(blank[tokens], blank_kind[tokens], kinds[probe])
        stream_ids[doc] = (kind * n_indent + indents[probe]) * 2 + brackets[probe]
    error_rate = failed / max(1, len(documents) - 1)
    ids = _stream_to_rows(rows, stream_ids, unknown * n_indent * 2)
    return ContextLabels(ids=ids, features=syntax_features(), error_rate=error_rate)


def spacy_labels(rows: np.ndarray, strings: Sequence[str], eos_id: int) -> ContextLabels | None:
    """Part-of-speech and dependency labels from an installed spaCy pipeline, or None when there is none.

    Nothing is downloaded: only pipelines already installed (``spacy.util.get_installed_models``) are used,
    English ones first. A model token takes the labels of the spaCy token holding its first non-space character.
    """
    try:
        import spacy  # lazy: an optional package, used only when it is installed
    except ImportError:
        return None
    installed = sorted(spacy.util.get_installed_models(), key=lambda name: (not name.startswith("en"), name))
    if not installed:
        return None
    nlp = spacy.load(installed[0], exclude=["ner", "lemmatizer", "textcat"])
    logger.info("families: spaCy features from %s", installed[0])
    pairs: dict[tuple[str, str], int] = {("NONE", "NONE"): 0}
    stream_ids = np.zeros(rows[:, 1:].size, dtype=np.int64)
    for doc, text, probe in _documents(rows, strings, eos_id):
        char_pair = np.zeros(len(text), dtype=np.int64)
        for word in nlp(text[: nlp.max_length]):
            key = (word.pos_ or "NONE", word.dep_ or "NONE")
            char_pair[word.idx : word.idx + len(word.text)] = pairs.setdefault(key, len(pairs))
        stream_ids[doc] = char_pair[probe] if len(text) else 0
    keys = list(pairs)
    features = []
    for i, label in enumerate(("pos", "dep")):
        for value in sorted({k[i] for k in keys} - {"NONE"}):
            cats = np.asarray([c for c, k in enumerate(keys) if k[i] == value])
            features.append((f"spacy:{label}={value}", "spacy", cats))
    matrix = FeatureMatrix.build("spacy", len(keys), features)
    return ContextLabels(ids=_stream_to_rows(rows, stream_ids, 0), features=matrix, error_rate=0.0)


__all__ = [
    "SYNTAX_KINDS",
    "TOKEN_CLASSES",
    "ContextLabels",
    "FeatureMatrix",
    "VocabBuckets",
    "documents_of",
    "first_letter",
    "normalise",
    "position_features",
    "python_syntax_labels",
    "single_letter",
    "spacy_labels",
    "syntax_features",
    "token_features",
    "vocab_buckets",
]
