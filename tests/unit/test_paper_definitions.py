"""The paper's exact definitions (issue 7; paper-spec §3.1, §3.4, §4.4, §7.3; docs/analyses.md "Our definitions and
the paper's"): the paper-compatible activation frequency, the token set of the statistics, each stage's token cap,
within-layer percentiles, the alphabet family, the schema revision and the ``paper`` preset's configuration.

Each computation is checked against an independent one (a hand computation of the float32 edge, NumPy on the
concatenated data, SciPy's ``percentileofscore``), at values where a mutation of its arithmetic would show: values
exactly on the edge (``>=`` vs ``>``), between the two edges around 0 (an off-by-one edge), a cap that cuts a row
(off-by-one cap), ties (the percentile's kind).
"""

from __future__ import annotations

import sqlite3
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.stats
import torch
from alembic.config import Config
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from alembic import command
from cli.main import build_parser, parse_arguments, precompute_config
from precompute.activations import ActivationBatch
from precompute.correlation import CorrelationConfig
from precompute.data import DatasetConfig, TokenDataset
from precompute.features import token_features, vocab_buckets
from precompute.moments import PAPER_EDGES, paper_frequency_threshold, within_layer_percentiles
from precompute.pipeline import PrecomputeConfig
from precompute.presets import PAPER, PAPER_ANALYSIS_TOKENS, PILE_TEST, PRESETS
from precompute.stage_config import ConfigError, stage_config
from precompute.stages.examples import ExamplesStage
from precompute.stages.families import FamiliesStage, alphabet_neurons, variance_reduction
from precompute.stages.stats import StatsConfig, StatsStage
from precompute.store import ALEMBIC_DIR, AtlasStore, activation_stats, current_revision, sqlite_url, upgrade

# --- the paper's frequency edge -------------------------------------------------------------------------------


def hand_linspace_float32(low: float, high: float, steps: int) -> np.ndarray:
    """torch's CPU float32 ``linspace``, by hand: a float32 step; the first half counted up from ``low``, the second
    half down from ``high``, each value the exactly rounded float32 of start ± step·i (a fused multiply-add)."""
    step = float(np.float32(np.float32(high - low) / np.float32(steps - 1)))
    half = steps // 2
    values = [
        Fraction(low) + Fraction(step) * i if i < half else Fraction(high) - Fraction(step) * (steps - 1 - i)
        for i in range(steps)
    ]
    return np.array([np.float32(float(v)) for v in values], dtype=np.float32)


def test_the_paper_edge_is_the_hand_computed_float32_edge_below_the_first_edge_at_or_above_zero():
    edges = hand_linspace_float32(*PAPER_EDGES)
    np.testing.assert_array_equal(edges, torch.linspace(-10, 15, 256).numpy())  # the hand computation is torch's
    first = int(np.argmax(edges >= 0))
    assert first == 102 and edges[first] > 0  # float32 rounding: edge 102 is +1.6e-7, not 0
    assert edges[first - 1] == np.float32(-10 + Fraction(float(np.float32(25 / 255))) * 101)
    assert paper_frequency_threshold() == float(edges[first - 1]) == pytest.approx(-0.0980390534)
    assert float(np.float32(paper_frequency_threshold())) == paper_frequency_threshold()  # exact in float32
    assert paper_frequency_threshold() != float(np.float32(-10 + 101 * 25 / 255))  # NumPy's linspace differs


def paper_sparsity(pre: np.ndarray) -> np.ndarray:
    """The paper's `summary.py` + `sparsity` on float32 values [tokens, neurons]: torch.searchsorted bins over the
    float32 edges, the share of values in bins >= argmax(edges >= 0)."""
    edges = torch.linspace(-10, 15, 256)
    first = int(torch.argmax((edges >= 0).int()))
    bins = torch.searchsorted(edges, torch.from_numpy(pre).T.contiguous())  # [neurons, tokens]
    return (bins >= first).double().mean(1).numpy()


SPECIAL_VALUES = np.array(
    [
        paper_frequency_threshold(),  # exactly on the edge: not counted (bins are left-open)
        np.nextafter(np.float32(paper_frequency_threshold()), np.float32(1)),  # just above: counted
        -0.0980392,  # NumPy's edge, just below torch's: not counted
        -0.05,  # between the edges around 0: counted by the paper, not by P(pre > 0)
        0.0,
        1e-7,
        float(torch.linspace(-10, 15, 256)[102]),  # the first edge >= 0
        -0.2,
        0.3,
    ],
    dtype=np.float32,
)


def stats_run(analysis: dict | None = None, n_rows: int = 10, ctx: int = 9, seed: int = 0):
    """A stats context with rows that start with BOS (id 0), a counted mask and activations in batches of 4 rows;
    the activations at BOS are large, so statistics with and without BOS differ clearly."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(1, 20, size=(n_rows, ctx))
    rows[:, 0] = 0
    counted = (rows != 0) & (rng.random(rows.shape) > 0.2)
    dataset = TokenDataset(rows, counted, DatasetConfig(batch_size=4), ctx, {})
    model = SimpleNamespace(name="m", n_layers=2, d_mlp=3, n_neurons=6, d_vocab=20, d_model=4)
    config = SimpleNamespace(analysis={"stats": analysis or {}}, device="cpu")
    context = SimpleNamespace(config=config, dataset=dataset, models=[model], model_ids={"m": 1})
    pre = rng.normal(size=(n_rows, ctx, 2, 3)).astype(np.float32)
    pre[:, :, 0, 0] = rng.choice(SPECIAL_VALUES, size=(n_rows, ctx))  # neuron 0: values on and around the edges
    pre[:, 0] += 6.0  # BOS
    post = torch.nn.functional.gelu(torch.from_numpy(pre), approximate="tanh")
    batches = [
        ActivationBatch(
            s,
            torch.from_numpy(rows[s : s + 4]),
            torch.from_numpy(counted[s : s + 4]),
            {"m": post[s : s + 4].contiguous()},
            {"m": torch.from_numpy(pre[s : s + 4]).contiguous()},
        )
        for s in range(0, n_rows, 4)
    ]
    return context, batches, pre.reshape(n_rows * ctx, 6), post.numpy().reshape(n_rows * ctx, 6)


def run(stage_class, context, batches):
    stage = stage_class(context)
    while not stage.done_streaming:
        for batch in batches:
            stage.update(batch)
        stage.finish_pass()
    return stage


def test_frequency_paper_is_the_papers_histogram_count_and_frequency_stays_p_above_zero():
    context, batches, pre, _ = stats_run()
    columns = run(StatsStage, context, batches).activation_columns("m")
    counted = pre[context.dataset.counted.reshape(-1)]
    assert np.isin(SPECIAL_VALUES, counted[:, 0]).all()  # every edge case is among the counted values
    np.testing.assert_array_equal(columns["frequency_paper"], paper_sparsity(counted))  # exact: a count, not bins
    np.testing.assert_array_equal(columns["frequency"], (counted > 0).mean(0))
    assert columns["frequency_paper"][0] > columns["frequency"][0]  # -0.05 and -0.098... count only for the paper


def test_stage_config_refuses_a_token_set_it_does_not_know():
    assert stage_config(StatsConfig, {"tokens": "all", "max_tokens": 5}, "stats").tokens == "all"
    with pytest.raises(ConfigError, match=r"stats\.tokens must be one of counted, all"):
        stage_config(StatsConfig, {"tokens": "everything"}, "stats")
    with pytest.raises(ConfigError, match=r"stats\.max_tokens must be at least 1"):
        stage_config(StatsConfig, {"max_tokens": 0}, "stats")


# --- which tokens the statistics cover ------------------------------------------------------------------------


@pytest.mark.parametrize("tokens", ["counted", "all"])
def test_moments_cover_exactly_the_chosen_token_set(tokens):
    context, batches, pre, post = stats_run({"tokens": tokens})
    stage = run(StatsStage, context, batches)
    columns = stage.activation_columns("m")
    dataset = context.dataset
    chosen = dataset.counted.reshape(-1) if tokens == "counted" else np.ones(dataset.rows.size, dtype=bool)
    assert stage.state["m"]["pre_moments"].n == chosen.sum()
    for hook, x in (("pre", pre[chosen].astype(np.float64)), ("post", post[chosen].astype(np.float64))):
        np.testing.assert_allclose(columns[f"{hook}_mean"], x.mean(0), rtol=1e-10)
        np.testing.assert_allclose(columns[f"{hook}_var"], x.var(0), rtol=1e-9)
        np.testing.assert_allclose(columns[f"{hook}_kurt"], scipy.stats.kurtosis(x, 0, fisher=False), rtol=1e-8)
        np.testing.assert_array_equal(columns[f"{hook}_max"], x.max(0).astype(np.float32))
    np.testing.assert_array_equal(columns["frequency_paper"], paper_sparsity(pre[chosen]))
    bos = pre.reshape(dataset.n_rows, dataset.ctx, 6)[:, 0]
    mean, _ = stage.position_profile("m", "pre")
    if tokens == "all":  # BOS is in: position 0 has its profile, and the large BOS values lift the maximum
        np.testing.assert_allclose(mean[0], bos.mean(0), rtol=1e-5)
        assert (columns["pre_max"] >= bos.max(0)).all()
    else:
        assert np.isnan(mean[0]).all()
        assert stage.state["m"]["pre_moments"].n < dataset.tokens_seen


@pytest.mark.parametrize(("tokens", "cap"), [("all", 5 * 9 + 3), ("counted", 31), ("all", 10**9)])
def test_max_tokens_keeps_the_first_tokens_of_the_set_in_row_order(tokens, cap):
    context, batches, pre, _ = stats_run({"tokens": tokens, "max_tokens": cap})
    columns = run(StatsStage, context, batches).activation_columns("m")
    base = context.dataset.counted.reshape(-1) if tokens == "counted" else np.ones(pre.shape[0], dtype=bool)
    chosen = base & (np.cumsum(base) <= cap)  # the first `cap` of them, across rows and batches
    assert chosen.sum() == min(cap, base.sum())
    x = pre[chosen].astype(np.float64)
    np.testing.assert_allclose(columns["pre_mean"], x.mean(0), rtol=1e-10)
    np.testing.assert_allclose(columns["pre_var"], x.var(0), rtol=1e-9)
    np.testing.assert_array_equal(columns["frequency"], (x > 0).mean(0))


def letter_tokenizer():
    """A tokenizer-shaped vocabulary with single-letter tokens (" a", "A", "a") and words that start with a letter."""
    vocab = ["<eos>", "a", "A", " a", " apple", " and", "apple", " b", "B", " cat", " dog", " the", "x1", " Anna"]

    class Tokenizer:
        bos_token_id = eos_token_id = pad_token_id = 0

        def decode(self, ids: list[int]) -> str:
            return "".join(vocab[i] for i in ids)

        def __len__(self) -> int:
            return len(vocab)

    return Tokenizer(), vocab


SINGLE_A, STARTS_WITH_A, SINGLE_B = [1, 2, 3], [1, 2, 3, 4, 5, 6, 13], [7, 8]


def families_run(analysis: dict, n_rows: int = 48, ctx: int = 16, seed: int = 0):
    """Planted neurons over the letter vocabulary, one layer of 5:
    0: fires on the single letter "a"/"A"/" a" (the alphabet neuron of "a");
    1: fires on every token that starts with "a" ("a", " apple", " and", " Anna", ...): not the alphabet family;
    2: a weaker, noisier "a" detector (not the model's best for "a");
    3: fires on " b"/"B" (the alphabet neuron of "b");
    4: noise."""
    tokenizer, vocab = letter_tokenizer()
    rng = np.random.default_rng(seed)
    rows = rng.integers(1, len(vocab), size=(n_rows, ctx))
    rows[:, 0] = 0
    dataset = TokenDataset(rows, rows != 0, DatasetConfig(batch_size=8), ctx, {})
    model = SimpleNamespace(name="m", n_layers=1, d_mlp=5, n_neurons=5, d_vocab=len(vocab), tokenizer=tokenizer)
    config = SimpleNamespace(analysis={"families": {"syntax": "off", "spacy": "off"} | analysis}, device="cpu")
    context = SimpleNamespace(config=config, dataset=dataset, models=[model])
    noise = rng.normal(size=(n_rows, ctx, 1, 5)).astype(np.float32)
    pre = np.stack(
        [
            4.0 * np.isin(rows, SINGLE_A) - 1 + 0.1 * noise[..., 0, 0],
            4.0 * np.isin(rows, STARTS_WITH_A) - 1 + 0.1 * noise[..., 0, 1],
            1.0 * np.isin(rows, SINGLE_A) + 1.0 * noise[..., 0, 2],
            3.0 * np.isin(rows, SINGLE_B) - 1 + 0.1 * noise[..., 0, 3],
            noise[..., 0, 4],
        ],
        axis=-1,
    )[:, :, None].astype(np.float32)
    pre[:, 0] += 5.0  # BOS
    post = torch.nn.functional.gelu(torch.from_numpy(pre), approximate="tanh")
    batches = [
        ActivationBatch(
            s,
            torch.from_numpy(rows[s : s + 8]),
            torch.from_numpy(dataset.counted[s : s + 8]),
            {"m": post[s : s + 8].contiguous()},
            {"m": torch.from_numpy(pre[s : s + 8]).contiguous()},
        )
        for s in range(0, n_rows, 8)
    ]
    return context, batches, post.numpy().reshape(n_rows * ctx, 5)


@pytest.mark.parametrize(("tokens", "cap"), [("all", None), ("counted", None), ("all", 13 * 16 + 5)])
def test_variance_reductions_cover_exactly_the_chosen_token_set(tokens, cap):
    context, batches, post = families_run({"tokens": tokens, "max_tokens": cap})
    stage = run(FamiliesStage, context, batches)
    vr, names, _sets, shares = stage.scores("m", slice(0, 5))
    dataset = context.dataset
    base = dataset.counted.reshape(-1) if tokens == "counted" else np.ones(dataset.rows.size, dtype=bool)
    chosen = base & (np.cumsum(base) <= (cap or base.sum()))
    ids = dataset.rows.reshape(-1)[chosen]
    positions = np.tile(np.arange(dataset.ctx), dataset.n_rows)[chosen]
    for feature, y in (
        ("token:a", np.isin(ids, SINGLE_A)),
        ("first_letter:a", np.isin(ids, STARTS_WITH_A)),
        ("class:special", ids == 0),
        ("position:<2", positions < 2),
    ):
        row = names.index(feature)
        assert shares[row] == pytest.approx(y.mean())
        for neuron in range(5):
            assert vr[row, neuron] == pytest.approx(
                variance_reduction(post[chosen, neuron].astype(np.float64), y), abs=1e-9
            )
    assert (shares[names.index("class:special")] > 0) == (tokens == "all")  # BOS is in the set or not


# --- the alphabet family ----------------------------------------------------------------------------------------


def family_rows(tmp_path: Path, context, stage) -> dict[int, tuple[str, str, float]]:
    """Write the stage's tables into a real atlas; neuron -> (family, best feature, VR)."""
    db = tmp_path / "atlas.db"
    with AtlasStore(db) as store:
        run_id = store.create_run({"models": ["m"]}, {}, {})
        model_id = store.add_model(
            run_id,
            name="m",
            source="/m",
            position=0,
            is_reference=True,
            n_layers=1,
            d_model=4,
            d_mlp=5,
            d_vocab=14,
            n_ctx=16,
            n_heads=1,
            act_fn="gelu_new",
            processing={},
            tokenizer_hash="x",
        )
        stage.write(SimpleNamespace(store=store, models=context.models, model_ids={"m": model_id}))
    with sqlite3.connect(db) as conn:
        return {
            n: (f, b, v) for n, f, b, v in conn.execute("SELECT neuron, family, best_feature, best_vr FROM families")
        }


def test_alphabet_is_the_best_neuron_per_single_letter_unigram_not_a_first_letter_neuron(tmp_path):
    context, batches, _ = families_run({})
    stage = run(FamiliesStage, context, batches)
    rows = family_rows(tmp_path, context, stage)
    assert rows[0][:2] == ("alphabet", "token:a") and rows[0][2] > 0.9
    assert rows[3][:2] == ("alphabet", "token:b") and rows[3][2] > 0.9
    # fires on tokens starting with "a": a first-letter neuron (a token feature, so unigram), not the alphabet family
    assert rows[1][:2] == ("unigram", "first_letter:a")
    # responds to the single letter "a" too, but neuron 0 is the model's best for "a"
    assert rows[2][0] != "alphabet"
    assert rows[4][0] == "none"
    letter_vr = stage.state["m"]["letter_vr"]
    assert int(np.argmax(letter_vr[0])) == 0 and letter_vr[0, 2] > 0.1  # "a": neuron 2 has a real but lower VR


def test_alphabet_threshold_is_strict_and_per_letter():
    vr = np.zeros((26, 4))
    vr[0] = [0.35, 0.1, 0.0, 0.0]  # "a": best VR exactly at the threshold: no alphabet neuron
    vr[1] = [0.0, 0.36, 0.5, 0.0]  # "b": neuron 2
    vr[2] = [0.0, 0.0, 0.4, 0.2]  # "c": neuron 2 again, with a smaller VR than for "b"
    vr[25] = [0.0, 0.0, 0.0, 0.9]  # "z"
    assert alphabet_neurons(vr, 0.35) == {2: ("token:b", 0.5), 3: ("token:z", 0.9)}


def test_pooled_single_letter_ids_keep_their_unigram_feature():
    strings = [" the", " a", " apple", " and", "a", "A", " b"]
    counts = np.array([100, 1, 1, 1, 1, 1, 50])
    buckets = vocab_buckets(strings, counts, max_vocab=2, special=[])  # " the" and " b" keep their own category
    assert buckets.bucket_of[1] != buckets.bucket_of[2] == buckets.bucket_of[3]  # " a" is pooled apart from words
    features = token_features("token", strings, buckets, counts, min_count=1, special=[])
    member = features.membership[features.names.index("token:a")].toarray()[0]
    assert {t for t in range(7) if member[buckets.bucket_of[t]]} == {1, 4, 5}
    assert "token:apple" not in features.names  # another pooled id loses its unigram feature (documented)


# --- within-layer percentiles ---------------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(
    arrays(
        np.float64,
        st.tuples(st.integers(1, 3), st.integers(1, 40)),
        elements=st.one_of(
            st.integers(-3, 3).map(float),  # ties
            st.floats(-1e6, 1e6, allow_nan=False),
            st.sampled_from([np.nan, np.inf, -np.inf]),
        ),
    )
)
def test_within_layer_percentiles_are_scipys_rank_kind_with_nan_left_out(values):
    got = within_layer_percentiles(values)
    for layer, row in enumerate(values):
        for n, value in enumerate(row):
            if np.isnan(value):
                assert np.isnan(got[layer, n])  # NaN gets NaN ...
            else:  # ... and is left out of the layer's population
                expected = scipy.stats.percentileofscore(row, value, kind="rank", nan_policy="omit")
                assert got[layer, n] == expected  # the same float arithmetic: exact


# --- examples under a token cap ---------------------------------------------------------------------------------


def test_examples_come_only_from_the_first_max_tokens_counted_tokens():
    context, batches, _, _ = stats_run()
    context.config.analysis = {"examples": {"max_tokens": 23, "top": 3, "random": 4, "per_bin": 2}}
    stage = run(ExamplesStage, context, batches)
    allowed = set(context.dataset.selection("counted", 23).flat_indices().tolist())
    assert len(allowed) == 23
    state, ctx = stage.state["m"], context.dataset.ctx
    for prefix in ("top_", "random_", *(f"bin{b}_" for b in range(5))):
        rows, positions = state[f"{prefix}row"].numpy(), state[f"{prefix}pos"].numpy()
        flat = (rows * ctx + positions)[rows >= 0]
        assert set(flat.tolist()) <= allowed, prefix
        assert flat.size or prefix.startswith("bin"), prefix  # a quantile bin may have no token among 23


# --- the schema revision and the published sparsity -------------------------------------------------------------


def test_revision_0003_adds_frequency_paper_to_a_0002_file_and_back(tmp_path):
    db = tmp_path / "old.db"
    upgrade(db, "0002")
    with sqlite3.connect(db) as conn:
        conn.execute(
            "INSERT INTO runs (id, created_at, status, config_hash, config, environment, dataset) "
            "VALUES (1, '2026-01-01', 'complete', 'h', '{}', '{}', '{}')"
        )
        conn.execute(
            "INSERT INTO models (id, run_id, name, source, position, is_reference, n_layers, d_model, d_mlp, "
            "d_vocab, n_ctx, n_heads, act_fn, processing, tokenizer_hash) "
            "VALUES (1, 1, 'm', '/m', 0, 1, 1, 4, 2, 10, 8, 1, 'gelu_new', '{}', 'x')"
        )
        conn.execute("INSERT INTO activation_stats (model_id, layer, neuron, n_tokens, frequency) VALUES (1,0,0,9,0.5)")
    upgrade(db, "0003")  # (later revisions build on it)
    assert current_revision(db) == "0003"
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT n_tokens, frequency, frequency_paper FROM activation_stats").fetchone()
    assert row == (9, 0.5, None)  # kept, and the new column is NULL for the old row
    assert "frequency_paper" in activation_stats.c
    cfg = Config()  # and back down (store.upgrade only goes up)
    cfg.set_main_option("script_location", str(ALEMBIC_DIR))
    cfg.set_main_option("sqlalchemy.url", sqlite_url(db))
    command.downgrade(cfg, "0002")
    with sqlite3.connect(db) as conn:
        columns = {r[1] for r in conn.execute("PRAGMA table_info(activation_stats)")}
        assert "frequency_paper" not in columns
        assert conn.execute("SELECT n_tokens, frequency FROM activation_stats").fetchone() == (9, 0.5)


# --- the paper preset ---------------------------------------------------------------------------------------------


def test_the_paper_preset_builds_the_papers_configuration_with_local_overrides(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "hello"}\n')
    models = [str(tmp_path / "model-a"), str(tmp_path / "model-b")]  # local model folders (not loaded here)
    args = parse_arguments(
        ["precompute", "--preset", "paper", "--db", str(tmp_path / "a.db"), "--dataset", str(corpus), *models]
    )
    config = precompute_config(args)
    assert config == PrecomputeConfig(
        db=tmp_path / "a.db",
        models=tuple(models),
        dataset=DatasetConfig(
            source=str(corpus),  # the explicit --dataset wins over the preset's hf: source
            tokens=100_000_000,
            ctx=None,
            max_ctx=512,
            hf_split="test",
            text_field="text",
            skip_special=True,
            skip_newline=True,
        ),
        correlation=CorrelationConfig(baseline="gaussian"),
        threshold=0.5,
        analysis={
            "stats": {"tokens": "all", "max_tokens": PAPER_ANALYSIS_TOKENS},
            "families": {"tokens": "all", "max_tokens": PAPER_ANALYSIS_TOKENS, "unigram_min_count": 3001},
            "examples": {"max_tokens": PAPER_ANALYSIS_TOKENS},
        },
        preset="paper",
    )
    record = config.record()
    assert record["preset"] == "paper" and record["dataset"]["max_ctx"] == 512
    assert record["analysis"]["stats"] == {"tokens": "all", "max_tokens": 10_000_384}


def test_options_and_settings_given_with_the_preset_win(tmp_path):
    argv = ["precompute", "--preset", "paper", "--db", str(tmp_path / "a.db"), "--tokens", "3000"]
    argv += ["--threshold", "0.4", "--baseline", "haar", "--ctx", "64", "--keep-newlines"]
    argv += ["--set", "stats.tokens=counted", "--set", "families.top_features=3", "a", "b"]
    config = precompute_config(parse_arguments(argv))
    assert (config.dataset.tokens, config.dataset.ctx, config.dataset.skip_newline) == (3000, 64, False)
    assert (config.threshold, config.correlation.baseline) == (0.4, "haar")
    assert config.dataset.source == PILE_TEST and config.dataset.hf_split == "test"  # not overridden: the preset's
    assert config.analysis["stats"] == {"tokens": "counted", "max_tokens": PAPER_ANALYSIS_TOKENS}
    assert config.analysis["families"]["top_features"] == 3 and config.analysis["families"]["tokens"] == "all"
    plain = precompute_config(parse_arguments(["precompute", "--db", "a.db", "a", "b"]))
    assert plain.preset is None and plain.analysis == {} and plain.dataset == DatasetConfig()  # defaults unchanged


def test_a_cuda_run_reads_batches_of_the_benchs_12288_tokens_unless_told_otherwise(monkeypatch):
    """On CUDA the default batch is the correlation bench's 12,288 tokens (48 rows of 256; 24 of the paper preset's
    512), on a CPU 16 rows; an explicit --batch-size wins on both."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the config checks for a device; none is used

    def rows(*argv: str) -> int:
        return precompute_config(parse_arguments(["precompute", "--db", "a.db", *argv, "a", "b"])).dataset.batch_size

    assert rows() == rows("--device", "cpu") == DatasetConfig.batch_size == 16
    assert rows("--device", "cuda") == rows("--device", "cuda:1") == 48
    assert rows("--device", "cuda", "--preset", "paper") == 24
    assert rows("--device", "cuda", "--ctx", "1024") == 12
    assert rows("--device", "cuda", "--batch-size", "16") == rows("--batch-size", "5") * 16 // 5 == 16


def test_every_preset_option_is_a_precompute_option_and_is_in_the_help():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    precompute = commands.choices["precompute"]
    destinations = {action.dest for action in precompute._actions}
    for preset in PRESETS.values():
        assert set(preset.options) <= destinations, set(preset.options) - destinations
    text = " ".join(precompute.format_help().split())
    assert "--preset {paper}" in text and "stats.tokens and families.tokens: counted (default" in text
    assert "hf:monology/pile-uncopyrighted" in text and PAPER.summary.split(":")[0] in text
    with pytest.raises(SystemExit):
        parse_arguments(["precompute", "--preset", "gpt4", "--db", "a.db", "a", "b"])
