"""The SQLite store: table definitions and the only writer.

The SQLite file is the product (Datasette's lesson): `precompute/` writes it through this module alone and
`app/` only reads it. This module deliberately imports no torch so that the web app and Alembic can use the
table definitions cheaply.

Every write commits per chunk, and a run stays ``status='running'`` until `AtlasStore.finish_run` marks it
``complete`` in the same transaction that records its content hash, so an interrupted precompute never leaves
a file that looks complete. The schema is created and changed only by Alembic revisions (`upgrade`).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import sqlite3
import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from math import isfinite
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    CursorResult,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    insert,
    select,
    update,
)

from precompute.paths import package_folder

logger = logging.getLogger(__name__)

#: Where the Alembic environment lives: ``precompute/migrations`` in a wheel, the top-level ``alembic/`` in a checkout.
ALEMBIC_DIR = package_folder(Path(__file__).resolve().parent, "migrations", "alembic")

#: Rows per INSERT transaction: small enough that an interruption loses little, large enough to be fast.
WRITE_CHUNK_ROWS = 20_000

#: The Python objects of one chunk of rows being written (about 512 bytes a row), for the memory plan.
WRITE_CHUNK_BYTES = WRITE_CHUNK_ROWS * 512

RUN_STATUSES = ("running", "complete", "failed")

metadata = MetaData()

# --- revision 0001: the precompute core -------------------------------------------------------------------

runs = Table(
    "runs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("created_at", String, nullable=False, comment="UTC ISO-8601 time the run started"),
    Column("finished_at", String, comment="UTC ISO-8601 time the run was marked complete or failed"),
    Column("status", String, nullable=False, comment="running | complete | failed"),
    Column("config_hash", String, nullable=False, comment="sha256 of `config`; a re-run with it resumes"),
    Column("config", JSON, nullable=False, comment="the run's full configuration: every stage's config"),
    Column("environment", JSON, nullable=False, comment="versions of Python, torch, transformers, ..."),
    Column("dataset", JSON, nullable=False, comment="source, ctx, rows, token filter, corpus fingerprint"),
    Column("tokens_seen", Integer, comment="tokens run through the models"),
    Column("tokens_counted", Integer, comment="tokens left after the BOS/EOS/pad/newline filter"),
    Column("timings", JSON, comment="seconds per stage"),
    Column("stages", JSON, comment="stages completed, in order"),
    Column("error", Text, comment="why the run failed"),
    Column("content_hash", String, comment="hash of the finished results; the ETag of every page"),
)

models = Table(
    "models",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("name", String, nullable=False, comment="TransformerLens name or local folder basename"),
    Column("source", String, nullable=False, comment="what was loaded: a TransformerLens name or a path"),
    Column("position", Integer, nullable=False, comment="order of the model on the command line"),
    Column("is_reference", Boolean, nullable=False, comment="first model of the family"),
    Column("n_layers", Integer, nullable=False),
    Column("d_model", Integer, nullable=False),
    Column("d_mlp", Integer, nullable=False),
    Column("d_vocab", Integer, nullable=False),
    Column("n_ctx", Integer, nullable=False),
    Column("n_heads", Integer, nullable=False),
    Column("act_fn", String, nullable=False),
    Column("processing", JSON, nullable=False, comment="weight processing flags (fold_ln, center_*)"),
    Column("tokenizer_hash", String, nullable=False),
    UniqueConstraint("run_id", "name"),
)

vocab = Table(
    "vocab",
    metadata,
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    Column("token_id", Integer, primary_key=True),
    Column("text", Text, nullable=False, comment="decoded text of the token (' the', not 'Ġthe')"),
)

neurons = Table(
    "neurons",
    metadata,
    Column("model_id", Integer, ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
    Column("layer", Integer, primary_key=True),
    Column("neuron", Integer, primary_key=True),
    Column("dead", Boolean, nullable=False, comment="zero variance over the counted tokens"),
    Column("max_corr", Float, comment="max over partners of the partner's max correlation"),
    Column("mean_corr", Float, comment="mean over partners of the max correlation"),
    Column("min_corr", Float, comment="min over partners of the max correlation"),
    Column("max_baseline", Float, comment="max over partners of the max rotated-baseline correlation"),
    Column("mean_baseline", Float, comment="mean over partners of the max rotated-baseline correlation"),
    Column("min_baseline", Float, comment="min over partners of the max rotated-baseline correlation"),
    Column("excess_corr", Float, comment="mean_corr - mean_baseline (paper eq. 3)"),
    Column("universal", Boolean, comment="excess_corr > the run's threshold"),
)
Index("ix_neurons_model_excess", neurons.c.model_id, neurons.c.excess_corr)

partner_scores = Table(
    "partner_scores",
    metadata,
    Column("model_id", Integer, ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
    Column("layer", Integer, primary_key=True),
    Column("neuron", Integer, primary_key=True),
    Column("partner_model_id", Integer, ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
    Column("max_corr", Float, nullable=False, comment="max correlation with any partner neuron"),
    Column("max_layer", Integer, nullable=False),
    Column("max_neuron", Integer, nullable=False),
    Column("baseline_corr", Float, nullable=False, comment="max correlation with any rotated partner unit"),
    Column("baseline_layer", Integer, nullable=False),
    Column("baseline_unit", Integer, nullable=False),
    sqlite_with_rowid=False,  # revision 0005: the primary key is the table
)

matches = Table(
    "matches",
    metadata,
    Column("model_id", Integer, ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
    Column("layer", Integer, primary_key=True),
    Column("neuron", Integer, primary_key=True),
    Column("partner_model_id", Integer, ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
    Column("rank", Integer, primary_key=True, comment="0 = best match"),
    Column("partner_layer", Integer, nullable=False),
    Column("partner_neuron", Integer, nullable=False),
    Column("corr", Float, nullable=False),
    sqlite_with_rowid=False,  # revision 0005: the primary key is the table
)
Index("ix_matches_partner", matches.c.partner_model_id, matches.c.partner_layer, matches.c.partner_neuron)

layer_summaries = Table(
    "layer_summaries",
    metadata,
    Column("model_id", Integer, ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
    Column("layer", Integer, primary_key=True),
    Column("n_neurons", Integer, nullable=False),
    Column("n_dead", Integer, nullable=False),
    Column("n_universal", Integer, comment="excess_corr > the run's threshold"),
    Column("mean_excess", Float),
    Column("max_excess", Float),
)

distributions = Table(
    "distributions",
    metadata,
    Column("model_id", Integer, ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
    Column("quantity", String, primary_key=True, comment="e.g. mean_corr, mean_baseline, excess_corr"),
    Column("bin_edges", JSON, nullable=False),
    Column("counts", JSON, nullable=False),
    Column("quantiles", JSON, nullable=False, comment="{'0.5': ..., '0.9': ..., ...}"),
)

# --- revision 0002: neuron analyses (statistics, examples, families, roles) -------------------------------
# BLOB columns hold little-endian NumPy arrays; each column's comment names its dtype and shape.

activation_stats = Table(
    "activation_stats",
    metadata,
    Column("model_id", Integer, ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
    Column("layer", Integer, primary_key=True),
    Column("neuron", Integer, primary_key=True),
    Column("n_tokens", Integer, nullable=False, comment="counted tokens the moments cover"),
    Column("pre_mean", Float, comment="mean of mlp.hook_pre"),
    Column("pre_var", Float, comment="population variance of mlp.hook_pre"),
    Column("pre_skew", Float),
    Column("pre_kurt", Float, comment="non-excess kurtosis: a Gaussian gives 3"),
    Column("pre_min", Float),
    Column("pre_max", Float),
    Column("frequency", Float, comment="activation frequency P(hook_pre > 0)"),
    Column(
        "frequency_paper",
        Float,
        comment="the paper's sparsity: P(hook_pre > e), e = -0.0980391 the float32 edge of linspace(-10, 15, 256) "
        "just below its first edge >= 0, where the paper's code starts counting bins (revision 0003)",
    ),
    Column("post_mean", Float, comment="mean of mlp.hook_post"),
    Column("post_var", Float),
    Column("post_skew", Float),
    Column("post_kurt", Float),
    Column("post_min", Float),
    Column("post_max", Float),
    sqlite_with_rowid=False,  # revision 0005: the primary key is the table
)

histograms = Table(
    "histograms",
    metadata,
    Column("model_id", Integer, ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
    Column("layer", Integer, primary_key=True),
    Column("neuron", Integer, primary_key=True),
    Column("hook", String, primary_key=True, comment="hook_pre | hook_post"),
    Column("low", Float, nullable=False, comment="left edge of the first regular bin"),
    Column("high", Float, nullable=False, comment="right edge of the last regular bin"),
    Column("n_bins", Integer, nullable=False, comment="regular bins between low and high"),
    Column(
        "counts",
        LargeBinary,
        nullable=False,
        comment="`encode_counts` of uint[n_bins + 2] (underflow, bins..., overflow): one byte giving the width, "
        "then the zlib-compressed counts in the narrowest unsigned width that holds the largest (revision 0005)",
    ),
    sqlite_with_rowid=False,
)

position_profiles = Table(
    "position_profiles",
    metadata,
    Column("model_id", Integer, ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
    Column("layer", Integer, primary_key=True),
    Column("neuron", Integer, primary_key=True),
    Column("hook", String, primary_key=True, comment="hook_pre | hook_post"),
    Column("mean", LargeBinary, nullable=False, comment="`encode_u8` of float[ctx]: mean activation at each position"),
    Column(
        "std", LargeBinary, nullable=False, comment="`encode_u8` of float[ctx]: the standard deviation at each position"
    ),
    sqlite_with_rowid=False,
)

# revision 0005: the counted tokens at each position are the same for every neuron of a model: stored once.
position_counts = Table(
    "position_counts",
    metadata,
    Column("model_id", Integer, ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
    Column("count", LargeBinary, nullable=False, comment="int64[ctx]: counted tokens at each position"),
)

weight_stats = Table(
    "weight_stats",
    metadata,
    Column("model_id", Integer, ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
    Column("layer", Integer, primary_key=True),
    Column("neuron", Integer, primary_key=True),
    Column("w_in_norm", Float, nullable=False, comment="|w_in| of the processed weights"),
    Column("w_out_norm", Float, nullable=False),
    Column("input_bias", Float, nullable=False, comment="b_in after folding LN"),
    Column("in_out_sim", Float, nullable=False, comment="cos(w_in, w_out)"),
    Column("l2_penalty", Float, nullable=False, comment="|w_in|^2 + |w_out|^2"),
    Column("vocab_mean", Float, nullable=False, comment="mean over the vocabulary of cos(W_U[:, v], w_out)"),
    Column("vocab_var", Float, nullable=False),
    Column("vocab_skew", Float, nullable=False),
    Column("vocab_kurt", Float, nullable=False, comment="non-excess: a random direction gives about 3"),
    Column("null_space_fraction", Float, comment="share of |w_out|^2 in W_U's near-null space"),
    sqlite_with_rowid=False,  # revision 0005: the primary key is the table
)

# revision 0005: one row per neuron, the percentiles of the model's statistics (``percentile_statistics``) in an
# array, instead of one row per (neuron, statistic).
percentile_statistics = Table(
    "percentile_statistics",
    metadata,
    Column("model_id", Integer, ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
    Column("position", Integer, primary_key=True, comment="the index in ``percentiles.percentiles``"),
    Column("statistic", String, nullable=False, comment="a column of activation_stats or weight_stats"),
    sqlite_with_rowid=False,
)

percentiles = Table(
    "percentiles",
    metadata,
    Column("model_id", Integer, ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
    Column("layer", Integer, primary_key=True),
    Column("neuron", Integer, primary_key=True),
    Column(
        "percentiles",
        LargeBinary,
        nullable=False,
        comment="`encode_array` of float[statistics]: 0-100 within the neuron's layer (paper Fig. 3) of each of "
        "the model's ``percentile_statistics``, NaN where the statistic is not finite",
    ),
    sqlite_with_rowid=False,
)

# revision 0005: one row per (neuron, kind), its ranked tokens as arrays, for the neuron page; the token search
# reads ``token_postings`` instead (the one structure keyed by token).
token_tables = Table(
    "token_tables",
    metadata,
    Column("model_id", Integer, ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
    Column("layer", Integer, primary_key=True),
    Column("neuron", Integer, primary_key=True),
    Column(
        "kind",
        Integer,
        primary_key=True,
        comment="the index in TOKEN_TABLE_KINDS: 0 unembed_top, 1 unembed_bottom (W_U w_out), 2 embed_top "
        "(W_E w_in), 3 mean_activation, 4 max_activation",
    ),
    Column("token_ids", LargeBinary, nullable=False, comment="`encode_array` of uint[k]: token ids, best first"),
    Column("token_values", LargeBinary, nullable=False, comment="`encode_array` of float[k]: their values"),
    Column(
        "counts", LargeBinary, comment="`encode_array` of uint[k]: occurrences among counted tokens (activation tables)"
    ),
    sqlite_with_rowid=False,
)

# revision 0005: the token search's postings, one row per (model, kind, token): the neurons whose table lists the
# token (`posting_columns`): one primary-key lookup per searched model, kind and token.
token_postings = Table(
    "token_postings",
    metadata,
    Column("model_id", Integer, ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
    Column("kind", Integer, primary_key=True, comment="as token_tables.kind"),
    Column("token_id", Integer, primary_key=True),
    Column(
        "postings",
        LargeBinary,
        nullable=False,
        comment="`POSTING` records (uint32 layer * d_mlp + neuron, uint8 rank) by neuron: the neurons whose "
        "table of this kind lists the token, and where",
    ),
)  # a rowid table, as ``examples``: postings of up to a page stay on it

# revision 0005: one row per (neuron, kind), every example of it as arrays in (bin, rank) order (`example_columns`;
# its snippets on one scale since 0006).
examples = Table(
    "examples",
    metadata,
    Column("model_id", Integer, ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
    Column("layer", Integer, primary_key=True),
    Column("neuron", Integer, primary_key=True),
    Column("kind", String, primary_key=True, comment="top | quantile | random"),
    Column("n_examples", Integer, nullable=False, comment="the examples in the row"),
    Column("ranks", LargeBinary, nullable=False, comment="`encode_array` of uint[n]: order within (kind, bin)"),
    Column("bins", LargeBinary, nullable=False, comment="`encode_array` of uint[n]: quantile bin (0 for top, random)"),
    Column(
        "bin_ranges",
        LargeBinary,
        comment="`encode_array` of float64[bins, 4]: each quantile bin's (bin, low, high, share of counted tokens), "
        "NaN for a missing edge; NULL for top and random",
    ),
    Column("dataset_rows", LargeBinary, nullable=False, comment="`encode_array` of uint[n]; tokens: ``example_rows``"),
    Column("starts", LargeBinary, nullable=False, comment="`encode_array` of uint[n]: the snippet's first position"),
    Column("peaks", LargeBinary, nullable=False, comment="`encode_array` of uint[n]: the example's index in it"),
    Column("activations", LargeBinary, nullable=False, comment="`encode_array` of float[n]: hook_post at the example"),
    Column("lengths", LargeBinary, nullable=False, comment="`encode_array` of uint[n]: the snippets' lengths"),
    Column(
        "snippets",
        LargeBinary,
        nullable=False,
        comment="`encode_u8` of the snippets' values one after the other (one scale a row, revision 0006): "
        "hook_post of every token of each",
    ),
)
# A rowid table, not WITHOUT ROWID: a row of about a kilobyte stays on its page (a WITHOUT ROWID table's rows
# over ~1,000 bytes of a 4 KB page spill into an overflow page of their own, most of it empty).

# revision 0005 (search, issue 10): the top examples by the token they peak on, so a token search counts a
# neuron's top examples on the token without reading the examples. The primary key is the table.
example_peaks = Table(
    "example_peaks",
    metadata,
    Column("model_id", Integer, ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
    Column("peak_token", Integer, primary_key=True, comment="the token id at the top example's peak"),
    Column("layer", Integer, primary_key=True),
    Column("neuron", Integer, primary_key=True),
    Column("rank", Integer, primary_key=True, comment="the top example's rank"),
    Column("activation", Float, nullable=False, comment="hook_post at the peak"),
    sqlite_with_rowid=False,
)

# revision 0005: the token ids of the dataset rows the examples are snippets of, once per model and row (not
# once per example); the width is the narrowest that holds the model's vocabulary (`token_itemsize`).
example_rows = Table(
    "example_rows",
    metadata,
    Column("model_id", Integer, ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
    Column("dataset_row", Integer, primary_key=True),
    Column("itemsize", Integer, nullable=False, comment="bytes per token id: 2 (d_vocab <= 65536) or 4"),
    Column("token_ids", LargeBinary, nullable=False, comment="uint16 or uint32 [ctx]: the row's token ids"),
)

families = Table(
    "families",
    metadata,
    Column("model_id", Integer, ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
    Column("layer", Integer, primary_key=True),
    Column("neuron", Integer, primary_key=True),
    Column(
        "family",
        String,
        nullable=False,
        comment="unigram | alphabet | previous_token | position | syntax | semantic | none",
    ),
    Column("best_feature", String),
    Column("best_vr", Float, comment="variance reduction of the best feature (paper eq. 4)"),
    Column("position_mi", Float, comment="binary mutual information of firing with position"),
    Column("evidence", JSON, comment="how the label was reached"),
)
Index("ix_families_family", families.c.model_id, families.c.family)

# revision 0005: the features a model's neurons list, once per model; ``feature_scores`` names them by id.
feature_names = Table(
    "feature_names",
    metadata,
    Column("model_id", Integer, ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
    Column("feature_id", Integer, primary_key=True),
    Column("feature", String, nullable=False, comment="e.g. token:def, prev_token:(, syntax:keyword"),
    Column(
        "feature_set",
        String,
        nullable=False,
        comment="unigram | first_letter | token_class | previous_token | position | syntax | spacy",
    ),
    Column("fraction", Float, comment="share of counted tokens where the feature holds"),
    sqlite_with_rowid=False,
)
Index("ix_feature_names_feature", feature_names.c.model_id, feature_names.c.feature)

feature_scores = Table(
    "feature_scores",
    metadata,
    Column("model_id", Integer, ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
    Column("layer", Integer, primary_key=True),
    Column("neuron", Integer, primary_key=True),
    Column("rank", Integer, primary_key=True),
    Column("feature_id", Integer, nullable=False, comment="the feature: ``feature_names`` (revision 0005)"),
    Column("variance_reduction", Float, nullable=False),
    sqlite_with_rowid=False,
)
# revision 0004, by feature id since 0005: the neurons that list a feature (search)
Index("ix_feature_scores_feature", feature_scores.c.model_id, feature_scores.c.feature_id)

roles = Table(
    "roles",
    metadata,
    Column("model_id", Integer, ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
    Column("layer", Integer, primary_key=True),
    Column("neuron", Integer, primary_key=True),
    Column("vocab_role", String, comment="prediction | suppression | partition | NULL"),
    Column("entropy_rank", Integer, comment="rank by null_space_fraction * |w_out| among candidates"),
    Column("attention_role", String, comment="deactivation | activation | NULL, for the strongest head"),
    Column("attention_layer", Integer),
    Column("attention_head", Integer),
    Column("attention_score", Float, comment="h = w_out^T W_Q k_BOS / sqrt(d_head), unit w_out"),
    sqlite_with_rowid=False,  # revision 0005: the primary key is the table
)
# revision 0004: neurons by role (search ``role:NAME``), each a range of an index
Index("ix_roles_vocab_role", roles.c.model_id, roles.c.vocab_role)
Index("ix_roles_attention_role", roles.c.model_id, roles.c.attention_role)
Index("ix_roles_entropy_rank", roles.c.model_id, roles.c.entropy_rank)

entropy_interventions = Table(
    "entropy_interventions",
    metadata,
    Column("model_id", Integer, ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
    Column("layer", Integer, primary_key=True),
    Column("neuron", Integer, primary_key=True),
    Column("value", Float, primary_key=True, comment="the fixed activation (hook_post)"),
    Column("is_baseline", Boolean, nullable=False, comment="a random last-two-layer neuron, for comparison"),
    Column("ln_scale", Float, nullable=False, comment="mean final LN scale"),
    Column("entropy", Float, nullable=False, comment="mean next-token entropy (nats)"),
    Column("loss", Float, nullable=False),
    Column("reciprocal_rank", Float, nullable=False, comment="mean 1/(rank+1) of the true next token"),
    Column("n_tokens", Integer, nullable=False),
    Column("nominal_ln_scale", Float, comment="the same means without intervention (same for every row of a model)"),
    Column("nominal_entropy", Float),
    Column("nominal_loss", Float),
    Column("nominal_reciprocal_rank", Float),
)

attention_scores = Table(
    "attention_scores",
    metadata,
    Column("model_id", Integer, ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
    Column("layer", Integer, primary_key=True),
    Column("neuron", Integer, primary_key=True),
    Column("rank", Integer, primary_key=True, comment="0 = largest |score|"),
    Column("attention_layer", Integer, nullable=False),
    Column("head", Integer, nullable=False),
    Column("score", Float, nullable=False),
    sqlite_with_rowid=False,  # revision 0005: the primary key is the table
)

path_ablations = Table(
    "path_ablations",
    metadata,
    Column("model_id", Integer, ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
    Column("layer", Integer, primary_key=True),
    Column("neuron", Integer, primary_key=True),
    Column("attention_layer", Integer, primary_key=True),
    Column("head", Integer, primary_key=True),
    Column("pearson_bos", Float, comment="corr(activation, change in attention to BOS)"),
    Column("spearman_bos", Float),
    Column("pearson_norm", Float, comment="corr(activation, change in |z|)"),
    Column("spearman_norm", Float),
    Column("n_points", Integer, nullable=False),
    Column("points", LargeBinary, nullable=False, comment="float32[n, 3]: activation, d_bos_attention, d_norm"),
)


def utc_now() -> str:
    """The current UTC time as ISO-8601 text."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def config_hash(config: Mapping[str, Any]) -> str:
    """A stable hash of a JSON-able configuration.

    >>> config_hash({"b": 1, "a": [1, 2]}) == config_hash({"a": [1, 2], "b": 1})
    True
    """
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def sqlite_url(path: Path | str) -> str:
    return f"sqlite:///{Path(path)}"


#: SQLite page size of the atlas files, in bytes. The examples rows (one per neuron and kind: about 970, 220 and
#: 350 bytes at the GPT-2-small shape) packed into 4 KB pages left 18% of the table's pages unused (a page holds two
#: neurons' rows and the third's first row does not fit); in 8 KB pages the atlas is 5% smaller (6,886 -> 6,550
#: bytes a neuron, docs/performance.md "A compact atlas"). Set when a file is created, and by every `vacuum`.
PAGE_SIZE = 8192


def _enable_foreign_keys(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    # before anything is written: the page size of a new file (a no-op on an existing one, until `vacuum`)
    cursor.execute(f"PRAGMA page_size={PAGE_SIZE}")
    # WAL keeps readers (the dashboard) working while a precompute writes; NORMAL sync is safe with WAL.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_engine(path: Path | str) -> Engine:
    engine = create_engine(sqlite_url(path))
    event.listen(engine, "connect", _enable_foreign_keys)
    return engine


#: The revisions that rewrite large tables more compactly: a file migrated across one is vacuumed afterwards.
COMPACT_REVISIONS = ("0005", "0006")


def vacuum(path: Path | str) -> None:
    """Give the freed pages back (``VACUUM``) and fold the write-ahead log into the file.

    VACUUM cannot run inside a transaction, so it runs here, on its own connection, after a precompute's run is
    complete (`AtlasStore.compact`) and after a migration across one of `COMPACT_REVISIONS` (`upgrade`).
    """
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        # a file's page size changes only by a VACUUM outside WAL mode; with another connection open (a dashboard
        # reading the file) the mode stays WAL, and the VACUUM keeps the page size the file has
        try:
            (mode,) = conn.execute("PRAGMA journal_mode=DELETE").fetchone()
        except sqlite3.OperationalError:  # "database is locked": another connection is in the file
            mode = "wal"
        if mode.lower() != "wal":
            conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
        conn.execute("VACUUM")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def upgrade(path: Path | str, revision: str = "head") -> None:
    """Create or migrate the SQLite file at `path` with Alembic (``alembic upgrade head``); a file that crossed
    one of `COMPACT_REVISIONS` is vacuumed (its old tables' pages are free, not yet given back)."""
    # lazy: the web app and the Alembic environment import the table definitions without Alembic's command API
    from alembic.config import Config

    from alembic import command

    cfg = Config()
    cfg.set_main_option("script_location", str(ALEMBIC_DIR))
    cfg.set_main_option("sqlalchemy.url", sqlite_url(path))
    cfg.attributes["configure_logger"] = False
    before = current_revision(path) if Path(path).exists() else None
    if before is None and not Path(path).exists():
        # a new file: its page size is fixed when its header is first written (WAL mode writes it)
        conn = sqlite3.connect(path)
        try:
            conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
            conn.execute("PRAGMA journal_mode=WAL")
        finally:
            conn.close()
    command.upgrade(cfg, revision)
    after = current_revision(path) or ""
    if before is not None and any(before < compact <= after for compact in COMPACT_REVISIONS):
        logger.info("vacuuming %s after migrating it to the compact tables", path)
        # the migration's SQLite connection can outlive it in a reference cycle (Alembic's and SQLAlchemy's
        # objects) until the garbage collector runs; while it is open, `vacuum` cannot change the page size
        gc.collect()
        vacuum(path)


def current_revision(path: Path | str) -> str | None:
    """The Alembic revision a file is at, or None for a file Alembic never touched."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        try:
            row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        except sqlite3.OperationalError:
            return None
    return row[0] if row else None


def _inserted_id(result: CursorResult[Any]) -> int:
    """The primary key of the one row an INSERT added."""
    key = result.inserted_primary_key
    if key is None:  # pragma: no cover - SQLite returns the rowid of every single-row INSERT
        raise RuntimeError("the INSERT returned no primary key")
    return int(key[0])


def _finite_or_none(values: Sequence[Any]) -> list[Any]:
    """Float values with NaN and ±inf as None: SQLite stores them badly and JSON cannot hold them."""
    return [v if v is None or isfinite(v) else None for v in values]


def _clean_column(column: Column[Any], values: Sequence[Any]) -> Sequence[Any]:
    """Values of one column ready for the SQLite driver (as SQLAlchemy's types would bind them)."""
    if isinstance(column.type, Float):
        return _finite_or_none(values)
    if isinstance(column.type, JSON):
        return [json.dumps(v) for v in values]
    return values


def _column_values(values: Any, start: int, stop: int, length: int) -> Sequence[Any]:
    """Rows [start, stop) of a column given as an array, a list, or one value for every row."""
    if isinstance(values, np.ndarray):
        part = values[start:stop]
        if part.dtype.kind == "f":
            objects = part.astype(object)
            objects[~np.isfinite(part)] = None  # NaN handling for the whole chunk at once
            return list(objects)
        return part.tolist()
    if isinstance(values, list | tuple):
        return values[start:stop]
    return [values] * (stop - start)


class AtlasStore:
    """The one writer of an atlas SQLite file.

    Opening a store applies the Alembic migrations first, so a file is always at the newest schema before
    anything is written to it.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        upgrade(self.path)
        self.engine = make_engine(self.path)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> AtlasStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- runs ---------------------------------------------------------------------------------------------

    def find_run(self, config_digest: str) -> Mapping[str, Any] | None:
        """The newest run with this configuration hash, if any."""
        with self.engine.connect() as conn:
            row = (
                conn.execute(
                    select(runs).where(runs.c.config_hash == config_digest).order_by(runs.c.id.desc()).limit(1)
                )
                .mappings()
                .first()
            )
        return dict(row) if row else None

    def create_run(self, config: Mapping[str, Any], environment: Mapping[str, Any], dataset: Mapping[str, Any]) -> int:
        with self.engine.begin() as conn:
            result = conn.execute(
                insert(runs).values(
                    created_at=utc_now(),
                    status="running",
                    config_hash=config_hash(config),
                    config=dict(config),
                    environment=dict(environment),
                    dataset=dict(dataset),
                    timings={},
                    stages=[],
                )
            )
            return _inserted_id(result)

    def update_run(self, run_id: int, **values: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(runs).where(runs.c.id == run_id).values(**values))

    def get_run(self, run_id: int) -> dict[str, Any]:
        with self.engine.connect() as conn:
            row = conn.execute(select(runs).where(runs.c.id == run_id)).mappings().one()
        return dict(row)

    def mark_stage_done(self, run_id: int, stage: str, seconds: float) -> None:
        """Record that a stage finished (its tables are written) and its streaming seconds."""
        stages = [s for s in (self.get_run(run_id)["stages"] or []) if s != stage] + [stage]
        self.update_run(run_id, stages=stages)
        self.record_timing(run_id, stage, seconds)

    def record_timing(self, run_id: int, name: str, seconds: float) -> None:
        timings = dict(self.get_run(run_id)["timings"] or {})
        timings[name] = round(seconds, 3)
        self.update_run(run_id, timings=timings)

    def finish_run(self, run_id: int) -> str:
        """Mark a run complete, recording a content hash of its results (used as the ETag)."""
        digest = self.content_hash(run_id)
        self.update_run(run_id, status="complete", finished_at=utc_now(), content_hash=digest, error=None)
        return digest

    def compact(self) -> None:
        """``VACUUM`` the file (at the end of a precompute): rewriting tables leaves free pages behind."""
        self.engine.dispose()
        vacuum(self.path)

    def fail_run(self, run_id: int, error: str) -> None:
        self.update_run(run_id, status="failed", finished_at=utc_now(), error=error)

    def content_hash(self, run_id: int) -> str:
        """Hash of the run's configuration, stage list and per-model result counts and sums."""
        digest = hashlib.sha256()
        run = self.get_run(run_id)
        digest.update(run["config_hash"].encode())
        digest.update(json.dumps(run["stages"], sort_keys=True).encode())
        with self.engine.connect() as conn:
            model_ids = [r[0] for r in conn.execute(select(models.c.id).where(models.c.run_id == run_id))]
            for table in [t for t in metadata.sorted_tables if "model_id" in t.c]:
                for model_id in model_ids:
                    count = conn.exec_driver_sql(
                        f"SELECT count(*) FROM {table.name} WHERE model_id = ?", (model_id,)
                    ).scalar()
                    digest.update(f"{table.name}:{model_id}:{count};".encode())
            excess_sum = conn.exec_driver_sql(
                "SELECT total(excess_corr) FROM neurons JOIN models ON models.id = neurons.model_id "
                "WHERE models.run_id = ?",
                (run_id,),
            ).scalar()
            digest.update(f"{excess_sum:.9g}".encode())
        return digest.hexdigest()[:16]

    # --- models and vocab ---------------------------------------------------------------------------------

    def add_model(self, run_id: int, **values: Any) -> int:
        """Insert a model row, or return the id of the existing one with the same name (resume)."""
        with self.engine.begin() as conn:
            existing = conn.execute(
                select(models.c.id).where(models.c.run_id == run_id, models.c.name == values["name"])
            ).scalar()
            if existing is not None:
                return int(existing)
            result = conn.execute(insert(models).values(run_id=run_id, **values))
            return _inserted_id(result)

    def model_ids(self, run_id: int) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(models.c.name, models.c.id).where(models.c.run_id == run_id))
            return {name: model_id for name, model_id in rows}

    def write_vocab(self, run_id: int, token_texts: Sequence[str]) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(vocab).where(vocab.c.run_id == run_id))
        ids = np.arange(len(token_texts))
        self.insert_columns(vocab, {"run_id": run_id, "token_id": ids, "text": list(token_texts)})

    # --- results ------------------------------------------------------------------------------------------

    def clear_model_tables(self, model_ids: Iterable[int], tables: Iterable[Table]) -> None:
        """Delete the rows these tables hold for these models (before a stage or an import writes them again, so
        that re-writing is idempotent; the tables a stage owns are its `precompute.stages.base.Stage.tables`)."""
        ids = list(model_ids)
        with self.engine.begin() as conn:
            for table in tables:
                conn.execute(delete(table).where(table.c.model_id.in_(ids)))

    def insert_rows(self, table: Table, rows: Iterable[Mapping[str, Any]], chunk: int = WRITE_CHUNK_ROWS) -> int:
        """Insert rows in chunks, one transaction per chunk. Returns the number of rows written.

        Rows of one chunk with the same keys go in one ``executemany`` of plain tuples; NaN and ±inf in Float
        columns become NULL, JSON columns are serialised.
        """
        written = 0
        buffer: list[Mapping[str, Any]] = []
        for row in rows:
            buffer.append(row)
            if len(buffer) >= chunk:
                written += self._insert_mappings(table, buffer)
                buffer = []
        if buffer:
            written += self._insert_mappings(table, buffer)
        return written

    def insert_columns(self, table: Table, columns: Mapping[str, Any], chunk: int = WRITE_CHUNK_ROWS) -> int:
        """Insert rows given column by column: NumPy arrays or lists of equal length, or one value for every row
        (e.g. the model id). Converted a chunk at a time, NaN handled per array. Returns the rows written.

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder, AtlasStore(Path(folder) / "a.db") as store:
        ...     run = store.create_run({}, {}, {})
        ...     store.insert_columns(vocab, {"run_id": run, "token_id": np.arange(3), "text": ["a", "b", "c"]})
        3
        """
        lengths = {len(v) for v in columns.values() if isinstance(v, np.ndarray | list | tuple)}
        if len(lengths) > 1:
            raise ValueError(f"columns of {table.name} differ in length: {sorted(lengths)}")
        length = lengths.pop() if lengths else 1
        names = list(columns)
        for start in range(0, length, chunk):
            stop = min(start + chunk, length)
            values = [_column_values(columns[name], start, stop, length) for name in names]
            self._execute_insert(table, names, values)
        return length

    def model_columns(self, table: Table, model_id: int, columns: Sequence[str]) -> dict[str, np.ndarray]:
        """Numeric columns of one model's rows of a per-neuron table, in (layer, neuron) order, float64 with NULL
        as NaN (empty arrays when the table holds none): a stage reading what an earlier stage of the run wrote."""
        names = ", ".join(f'"{name}"' for name in columns)
        sql = f'SELECT {names} FROM "{table.name}" WHERE model_id = ? ORDER BY layer, neuron'
        with self.engine.connect() as conn:
            rows = conn.exec_driver_sql(sql, (model_id,)).fetchall()
        values = np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=np.float64)
        values = values.reshape(len(rows), len(columns))
        return {name: values[:, i] for i, name in enumerate(columns)}

    def _insert_mappings(self, table: Table, rows: Sequence[Mapping[str, Any]]) -> int:
        groups: dict[tuple[str, ...], list[Mapping[str, Any]]] = {}
        for row in rows:
            groups.setdefault(tuple(row), []).append(row)
        for names, group in groups.items():
            self._execute_insert(table, list(names), [[row[name] for row in group] for name in names])
        return len(rows)

    def _execute_insert(self, table: Table, names: Sequence[str], columns: Sequence[Sequence[Any]]) -> None:
        """One transaction: INSERT the rows of these columns with ``executemany`` (no per-row SQLAlchemy work)."""
        cleaned = [_clean_column(table.c[name], values) for name, values in zip(names, columns, strict=True)]
        quoted = ", ".join(f'"{name}"' for name in names)
        sql = f'INSERT INTO "{table.name}" ({quoted}) VALUES ({", ".join("?" * len(names))})'
        with self.engine.begin() as conn:
            conn.exec_driver_sql(sql, list(zip(*cleaned, strict=True)))


def blob(array: Any) -> bytes:
    """Serialise a NumPy array's raw bytes for a BLOB column (dtype recorded by the column's contract)."""
    return bytes(memoryview(array).cast("B"))


# --- compact arrays (revision 0005, issue 11 "A compact atlas") ---------------------------------------------

#: The token-table kinds, by their code in ``token_tables.kind``.
TOKEN_TABLE_KINDS: tuple[str, ...] = ("unembed_top", "unembed_bottom", "embed_top", "mean_activation", "max_activation")

#: ``encode_u8``'s code for a non-finite value (NaN: a position without counted tokens).
U8_MISSING = 255
#: `encode_u8`'s header: the lowest value and the step between codes (float32).
U8_HEADER = struct.Struct("<ff")


def token_kind_code(kind: str) -> int:
    """The code a token-table kind is stored as.

    >>> token_kind_code("mean_activation")
    3
    """
    if kind not in TOKEN_TABLE_KINDS:
        raise ValueError(f"unknown token-table kind {kind!r}; valid: {', '.join(TOKEN_TABLE_KINDS)}")
    return TOKEN_TABLE_KINDS.index(kind)


def token_itemsize(d_vocab: int) -> int:
    """Bytes per stored token id: 2 when every id of the vocabulary fits an uint16, else 4.

    >>> token_itemsize(50257), token_itemsize(65536), token_itemsize(100_000)
    (2, 2, 4)
    """
    return 2 if d_vocab <= 1 << 16 else 4


def encode_u8_rows(values: np.ndarray) -> list[bytes]:
    """Rows of floats as `encode_u8` BLOBs, vectorised over the rows of a 2-D array [rows, n]."""
    x = np.asarray(values, dtype=np.float64).reshape(len(values), -1)
    finite = np.isfinite(x)
    low = np.where(finite, x, np.inf).min(axis=1)
    high = np.where(finite, x, -np.inf).max(axis=1)
    low = np.where(np.isfinite(low), low, 0.0).astype(np.float32)
    high = np.where(np.isfinite(high), high, 0.0)
    step = ((high - low) / (U8_MISSING - 1)).astype(np.float32)
    safe = np.where(step > 0, step, 1.0).astype(np.float64)
    codes = np.rint((np.where(finite, x, 0.0) - low[:, None]) / safe[:, None])
    codes = np.where(finite, np.clip(codes, 0, U8_MISSING - 1), U8_MISSING).astype(np.uint8)
    return [U8_HEADER.pack(lo, st) + row.tobytes() for lo, st, row in zip(low, step, codes, strict=True)]


def encode_u8(values: np.ndarray) -> bytes:
    """A float array as ``float32 low, float32 step, uint8 codes``: value = low + code × step, code 255 for NaN.

    The error is at most half a step, 1/508 of the array's range: a plot 200 pixels tall cannot show it, and a
    snippet's colour (its share of the largest |activation|) moves by less than a shade.

    >>> decode_u8(encode_u8(np.array([0.0, 0.5, np.nan, 1.0]))).tolist()
    [0.0, 0.5, nan, 1.0]
    """
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    low, high = (float(x.min()), float(x.max())) if x.size else (np.nan, np.nan)
    if not (np.isfinite(low) and np.isfinite(high)):  # NaN (missing values): the general path
        return encode_u8_rows(x.reshape(1, -1))[0]
    # the same bytes as `encode_u8_rows` in a third of its operations (`example_columns` handed values, the
    # migrations: one call a row of examples)
    low32 = np.float32(low)
    step = np.float32((high - np.float64(low32)) / (U8_MISSING - 1))
    codes = np.rint((x - np.float64(low32)) / (np.float64(step) if step > 0 else 1.0))
    return U8_HEADER.pack(low32, step) + np.clip(codes, 0, U8_MISSING - 1, out=codes).astype(np.uint8).tobytes()


def decode_u8(data: bytes) -> np.ndarray:
    """The float32 array of an `encode_u8` BLOB."""
    low, step = U8_HEADER.unpack_from(data)
    codes = np.frombuffer(data, dtype=np.uint8, offset=U8_HEADER.size)
    values = (low + codes * np.float64(step)).astype(np.float32)
    values[codes == U8_MISSING] = np.nan
    return values


def u8_length(data: bytes) -> int:
    """The number of values of an `encode_u8` BLOB."""
    return len(data) - U8_HEADER.size


def encode_counts(counts: np.ndarray) -> bytes:
    """Non-negative integer counts as one byte for the width (1, 2, 4 or 8) and the zlib-compressed counts in it.

    >>> data = encode_counts(np.array([0, 3, 0, 70000]))
    >>> data[0], decode_counts(data).tolist()
    (4, [0, 3, 0, 70000])
    """
    array = np.asarray(counts, dtype=np.int64)
    if array.size and array.min() < 0:
        raise ValueError("counts must be non-negative")
    largest = int(array.max()) if array.size else 0
    width = next(w for w in (1, 2, 4, 8) if largest < 1 << (8 * w))
    return bytes([width]) + zlib.compress(array.astype(f"<u{width}").tobytes(), 6)


def decode_counts(data: bytes) -> np.ndarray:
    """The int64 array of an `encode_counts` BLOB."""
    return np.frombuffer(zlib.decompress(data[1:]), dtype=f"<u{data[0]}").astype(np.int64)


#: The dtypes an `encode_array` BLOB may hold, by the code in its first byte.
ARRAY_DTYPES: tuple[str, ...] = ("<u1", "<u2", "<u4", "<u8", "<f4", "<f8")


def encode_array(values: Any, dtype: str) -> bytes:
    """An array as one byte naming its dtype (the index in `ARRAY_DTYPES`) and its little-endian bytes.

    >>> decode_array(encode_array([3, 70000], unsigned_dtype(70000))).tolist()
    [3, 70000]
    """
    return bytes([ARRAY_DTYPES.index(dtype)]) + np.ascontiguousarray(values, dtype=dtype).tobytes()


def decode_array(data: bytes) -> np.ndarray:
    """The array of an `encode_array` BLOB (read-only, its stored dtype)."""
    return np.frombuffer(data, dtype=ARRAY_DTYPES[data[0]], offset=1)


def unsigned_dtype(largest: int) -> str:
    """The narrowest unsigned dtype that holds 0..largest.

    >>> unsigned_dtype(255), unsigned_dtype(50256), unsigned_dtype(100_000)
    ('<u1', '<u2', '<u4')
    """
    return next(d for d in ("<u1", "<u2", "<u4", "<u8") if largest < 1 << (8 * int(d[2])))


def float_dtype(values: np.ndarray) -> str:
    """float32 when every value is one exactly (NaN included), else float64: values keep every digit they have.

    >>> float_dtype(np.array([0.5, np.nan])), float_dtype(np.array([0.1]))
    ('<f4', '<f8')
    """
    x = np.asarray(values, dtype=np.float64)
    with np.errstate(over="ignore"):
        exact = np.array_equal(x.astype(np.float32).astype(np.float64), x, equal_nan=True)
    return "<f4" if exact else "<f8"


def _groups(*keys: np.ndarray) -> np.ndarray:
    """The starts of the runs of equal keys (sorted input) followed by the length: runs are ``[b[i], b[i + 1])``."""
    n = len(keys[0])
    change = np.zeros(n, dtype=bool)
    if n:
        change[0] = True
        for key in keys:
            change[1:] |= key[1:] != key[:-1]
    return np.append(np.flatnonzero(change), n)


def token_table_columns(
    model_id: int,
    layer: np.ndarray,
    neuron: np.ndarray,
    kind: np.ndarray,
    token_id: np.ndarray,
    value: np.ndarray,
    count: np.ndarray | None,
) -> dict[str, Any]:
    """``token_tables`` columns (one row per neuron and kind) from ranked entries sorted by (layer, neuron, kind,
    rank). Widths are the model's: token ids as narrow as the largest, values float32 when exact."""
    bounds = _groups(layer, neuron, kind)
    starts = bounds[:-1]
    ids_dtype = unsigned_dtype(int(token_id.max()) if token_id.size else 0)
    value_dtype = float_dtype(value)
    columns: dict[str, Any] = {
        "model_id": model_id,
        "layer": layer[starts],
        "neuron": neuron[starts],
        "kind": kind[starts],
        "token_ids": [encode_array(token_id[a:b], ids_dtype) for a, b in zip(starts, bounds[1:], strict=True)],
        "token_values": [encode_array(value[a:b], value_dtype) for a, b in zip(starts, bounds[1:], strict=True)],
    }
    if count is None:
        columns["counts"] = None
    else:
        known = np.where(count < 0, 0, count)
        count_dtype = unsigned_dtype(int(known.max()) if known.size else 0)
        columns["counts"] = [encode_array(known[a:b], count_dtype) for a, b in zip(starts, bounds[1:], strict=True)]
    return columns


#: A ``token_postings`` record: the neuron (layer * d_mlp + neuron) and the token's rank in its table.
POSTING = np.dtype([("neuron", "<u4"), ("rank", "<u1")])


def posting_columns(
    model_id: int, kind: np.ndarray, token_id: np.ndarray, flat: np.ndarray, rank: np.ndarray
) -> dict[str, Any]:
    """``token_postings`` columns (one row per kind and token) from every ranked entry of one model's token tables
    (any order; ``flat`` = layer * d_mlp + neuron): a (kind, token)'s entries as `POSTING` records by neuron then
    rank. The values are not repeated here: the neuron's ``token_tables`` row holds them."""
    order = np.lexsort((rank, flat, token_id, kind))
    kind, token_id = kind[order], token_id[order]
    records = np.empty(len(order), dtype=POSTING)
    records["neuron"], records["rank"] = flat[order], rank[order]
    bounds = _groups(kind, token_id)
    starts = bounds[:-1]
    postings = [records[a:b].tobytes() for a, b in zip(starts.tolist(), bounds[1:].tolist(), strict=True)]
    return {"model_id": model_id, "kind": kind[starts], "token_id": token_id[starts], "postings": postings}


def decode_postings(data: bytes) -> np.ndarray:
    """The `POSTING` records of a ``token_postings.postings`` BLOB."""
    return np.frombuffer(data, dtype=POSTING)


def percentile_columns(model_id: int, d_mlp: int, values: np.ndarray) -> dict[str, Any]:
    """``percentiles`` columns from [neurons, statistics] percentiles (NaN: not finite), one row per neuron, as
    float32: a percentile (0 to 100) is shown with two decimals, and float32 keeps seven significant digits, so the
    page and the JSON answer are those of float64; half the bytes (issue 11: 216 of 6,929 bytes a neuron)."""
    flat = np.arange(values.shape[0])
    dtype = "<f4"
    return {
        "model_id": model_id,
        "layer": flat // d_mlp,
        "neuron": flat % d_mlp,
        "percentiles": [encode_array(row, dtype) for row in values],
    }


def _snippet_values(activations: Any) -> np.ndarray:
    """A snippet's hook_post values: a float array, or an `encode_u8` BLOB of them (decoded)."""
    if isinstance(activations, np.ndarray):
        return activations
    if isinstance(activations, bytes | bytearray | memoryview):
        return decode_u8(bytes(activations))
    return np.asarray(activations, dtype=np.float64)


def example_columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One ``examples`` row from the examples of one neuron and kind, each a mapping with the neuron's key,
    ``kind``, ``rank``, ``bin``, ``bin_low``, ``bin_high``, ``bin_fraction``, ``dataset_row``, ``start``,
    ``peak``, ``activation`` and ``activations`` (its snippet's values: a float array, or an `encode_u8` BLOB) or,
    already encoded on one scale for the row, ``snippet_codes`` (uint8 codes) and ``snippet_scale`` (the
    `encode_u8` header, the same for every example of the row); stored in (bin, rank) order.

    The snippets are one `encode_u8` of their values one after the other: one scale (low and step) for the row,
    not one a snippet (revision 0006; 8 bytes of about 40 a snippet). Every snippet of a neuron is coloured on
    one scale, the neuron's (`app.viewmodels.examples.example_scale`), so a code of the row's range is within a
    shade of its own range's."""
    rows = sorted(rows, key=lambda r: (r["bin"], r["rank"]))
    first = rows[0]

    def narrow(name: str) -> bytes:
        values = [int(r[name]) for r in rows]
        return encode_array(values, unsigned_dtype(max(values)))

    ranges: dict[int, list[float]] = {}
    for r in rows:
        bounds = (r.get("bin_low"), r.get("bin_high"), r.get("bin_fraction"))
        if r["bin"] not in ranges and any(b is not None for b in bounds):
            ranges[r["bin"]] = [float(r["bin"]), *(np.nan if b is None else float(b) for b in bounds)]
    activation = np.array([r["activation"] for r in rows], dtype=np.float64)
    if "snippet_codes" in first:  # already encoded on the row's scale (the examples stage, a block at a time)
        if any(r["snippet_scale"] != first["snippet_scale"] for r in rows):
            raise ValueError("the snippets of an examples row must share one scale")
        lengths = [len(r["snippet_codes"]) for r in rows]
        snippets = first["snippet_scale"] + b"".join(r["snippet_codes"] for r in rows)
    else:
        values = [_snippet_values(r["activations"]) for r in rows]
        lengths = [len(v) for v in values]
        snippets = encode_u8(np.concatenate(values))
    return {
        "model_id": first["model_id"],
        "layer": first["layer"],
        "neuron": first["neuron"],
        "kind": first["kind"],
        "n_examples": len(rows),
        "ranks": narrow("rank"),
        "bins": narrow("bin"),
        "bin_ranges": encode_array(list(ranges.values()), "<f8") if ranges else None,
        "dataset_rows": narrow("dataset_row"),
        "starts": narrow("start"),
        "peaks": narrow("peak"),
        "activations": encode_array(activation, float_dtype(activation)),
        "lengths": encode_array(lengths, unsigned_dtype(max(lengths))),
        "snippets": snippets,
    }


def decode_snippets(lengths: bytes, snippets: bytes) -> list[np.ndarray]:
    """The float32 values of each snippet of an ``examples`` row.

    Revision 0006 stores one `encode_u8` for all of them; a row written by revision 0005 (not yet migrated) holds
    one `encode_u8` BLOB a snippet, told apart by its length (the two are the same bytes for a single snippet).

    >>> one_scale = encode_u8(np.array([0.0, 1.0, 0.5]))
    >>> [a.tolist() for a in decode_snippets(encode_array([2, 1], "<u1"), one_scale)]
    [[0.0, 1.0], [0.5]]
    >>> each = encode_u8(np.array([0.0, 1.0])) + encode_u8(np.array([0.5]))
    >>> [a.tolist() for a in decode_snippets(encode_array([2, 1], "<u1"), each)]
    [[0.0, 1.0], [0.5]]
    """
    sizes = decode_array(lengths).astype(np.int64)
    if len(snippets) == int(sizes.sum()) + U8_HEADER.size:
        return np.split(decode_u8(snippets), np.cumsum(sizes)[:-1])
    sizes = sizes + U8_HEADER.size
    ends = np.cumsum(sizes)
    return [decode_u8(snippets[a:b]) for a, b in zip((ends - sizes).tolist(), ends.tolist(), strict=True)]


def decode_examples(row: Sequence[Any]) -> list[dict[str, Any]]:
    """The examples of an ``examples`` row given as (ranks, bins, bin_ranges, dataset_rows, starts, peaks,
    activations, lengths, snippets), in (bin, rank) order: the mappings `example_columns` packed (``activations``
    the snippet's decoded float32 array), without the key and kind."""
    ranks, bins, ranges, dataset_rows, starts, peaks, activation, lengths, snippets = row
    by_bin: dict[int, tuple[float | None, ...]] = {}
    if ranges is not None:
        for b, *bounds in decode_array(ranges).reshape(-1, 4).tolist():
            by_bin[int(b)] = tuple(None if np.isnan(v) else v for v in bounds)
    out = []
    columns = zip(
        decode_array(ranks).tolist(),
        decode_array(bins).tolist(),
        decode_array(dataset_rows).tolist(),
        decode_array(starts).tolist(),
        decode_array(peaks).tolist(),
        decode_array(activation).tolist(),
        decode_snippets(lengths, snippets),
        strict=True,
    )
    for rank, bin_, dataset_row, start, peak, value, values in columns:
        low, high, fraction = by_bin.get(bin_, (None, None, None))
        out.append(
            {
                "rank": rank,
                "bin": bin_,
                "bin_low": low,
                "bin_high": high,
                "bin_fraction": fraction,
                "dataset_row": dataset_row,
                "start": start,
                "peak": peak,
                "activation": value,
                "activations": values,
            }
        )
    return out


def feature_columns(
    model_id: int, features: Sequence[str], sets: Sequence[str], fractions: np.ndarray
) -> tuple[dict[str, Any], np.ndarray]:
    """``feature_names`` columns for the distinct (feature, feature set, fraction) of one model's feature scores,
    and each score's feature id.

    >>> names, ids = feature_columns(1, ["a", "b", "a"], ["s", "s", "s"], np.array([0.5, 0.25, 0.5]))
    >>> names["feature"], ids.tolist()
    (['a', 'b'], [0, 1, 0])
    """
    found: dict[tuple[str, str, float], int] = {}
    ids = np.empty(len(features), dtype=np.int64)
    for i, entry in enumerate(zip(features, sets, np.asarray(fractions, dtype=np.float64).tolist(), strict=True)):
        fraction = np.nan if entry[2] is None or entry[2] != entry[2] else entry[2]  # one NaN object: one key
        key = (entry[0], entry[1], fraction)
        ids[i] = found.setdefault(key, len(found))
    names = list(found)
    columns = {
        "model_id": model_id,
        "feature_id": np.arange(len(names)),
        "feature": [n[0] for n in names],
        "feature_set": [n[1] for n in names],
        "fraction": np.array([n[2] for n in names], dtype=np.float64),
    }
    return columns, ids


__all__ = [
    "ALEMBIC_DIR",
    "ARRAY_DTYPES",
    "COMPACT_REVISIONS",
    "PAGE_SIZE",
    "POSTING",
    "TOKEN_TABLE_KINDS",
    "U8_HEADER",
    "U8_MISSING",
    "WRITE_CHUNK_BYTES",
    "WRITE_CHUNK_ROWS",
    "AtlasStore",
    "blob",
    "config_hash",
    "current_revision",
    "decode_array",
    "decode_counts",
    "decode_examples",
    "decode_postings",
    "decode_snippets",
    "decode_u8",
    "distributions",
    "encode_array",
    "encode_counts",
    "encode_u8",
    "encode_u8_rows",
    "example_columns",
    "example_peaks",
    "feature_columns",
    "feature_names",
    "float_dtype",
    "layer_summaries",
    "make_engine",
    "matches",
    "metadata",
    "models",
    "neurons",
    "partner_scores",
    "percentile_columns",
    "percentile_statistics",
    "posting_columns",
    "runs",
    "token_itemsize",
    "token_kind_code",
    "token_postings",
    "token_table_columns",
    "u8_length",
    "unsigned_dtype",
    "upgrade",
    "vacuum",
    "vocab",
]
