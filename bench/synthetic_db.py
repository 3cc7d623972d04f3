"""A synthetic atlas file of realistic size, written through the real writer (`precompute.store.AtlasStore`).

Used by bench/dashboard.py to measure the web app on a GPT-2-medium-sized model (about 100,000 neurons) without
running a precompute of that size. Values are random but every table of the schema (revision 0005, the compact
atlas) is filled with the row counts and BLOB sizes a real run would have for the reference model, encoded by the
precompute's own builders (`precompute.store.token_table_columns` and `posting_columns` through
`precompute.stages.stats.write_token_tables`, `example_columns`, `percentile_columns`, `feature_columns`,
`encode_u8_rows`, `encode_counts`); the partner model gets the correlation tables.

The top examples are snippets of 64 hot dataset-row patterns: the token at each example's peak is one of 64 hot
tokens, so a search for one of them (``bench.synthetic_db.hot_tokens``) finds the top examples of about 10/64 of
the neurons (15,600 of 100,000): the heavy case of the token search.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from precompute import store as s
from precompute.rows import neuron_key_columns, ranked_columns
from precompute.stages.stats import write_token_tables
from precompute.weights import WEIGHT_STAT_COLUMNS

logger = logging.getLogger("bench.synthetic_db")

FAMILIES = ("unigram", "alphabet", "previous_token", "position", "syntax", "semantic", "none")
#: The activation_stats columns the synthetic file fills (the percentiles' statistics with the weight columns).
ACTIVATION_COLUMNS = (
    "pre_mean",
    "pre_var",
    "pre_skew",
    "pre_kurt",
    "pre_min",
    "pre_max",
    "frequency",
    "frequency_paper",
    "post_mean",
    "post_var",
    "post_skew",
    "post_kurt",
    "post_min",
    "post_max",
)
#: Distinct dataset-row patterns of the examples: the peak token of row r is ``hot_tokens(d_vocab)[r % HOT]``.
HOT = 64
#: Dataset rows the examples are snippets of (``example_rows``), a multiple of `HOT`.
DATASET_ROWS = 9_984


def vocab_texts(d_vocab: int) -> list[str]:
    return [f" tok{i}" if i % 3 else f"t{i}" for i in range(d_vocab)]


def hot_tokens(d_vocab: int) -> np.ndarray:
    """The tokens the top examples peak on (row pattern i peaks on token ``hot[i]``)."""
    return (np.arange(HOT) * 7919 + 11) % d_vocab


def _unless(dead: np.ndarray) -> Any:
    """A function giving values with NaN (written as NULL) where a neuron is dead."""
    return lambda values: np.where(dead, np.nan, values)


def build(
    path: Path,
    n_layers: int = 25,
    d_mlp: int = 4000,
    d_vocab: int = 50257,
    top_k: int = 5,
    snippet: int = 27,
    ctx: int = 64,
    seed: int = 0,
    top_examples: int = 10,
    quantile_bins: int = 2,
    per_bin: int = 2,
    table_k: int = 10,
    top_features: int = 3,
) -> Path:
    """Write a complete run with two models of ``n_layers × d_mlp`` neurons (analyses for the first)."""
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    n = n_layers * d_mlp
    store = s.AtlasStore(path)
    config = {"synthetic": True, "n_layers": n_layers, "d_mlp": d_mlp, "seed": seed, "threshold": 0.5}
    run_id = store.create_run(config, {"synthetic": True}, {"source": "synthetic", "bos_id": 0, "ctx": ctx})
    shape = {
        "n_layers": n_layers,
        "d_model": 1024,
        "d_mlp": d_mlp,
        "d_vocab": d_vocab,
        "n_ctx": 1024,
        "n_heads": 16,
        "act_fn": "gelu_new",
        "processing": {"fold_ln": True},
        "tokenizer_hash": "synthetic",
    }
    ids = [
        store.add_model(run_id, name=name, source=f"/nonexistent/{name}", position=i, is_reference=i == 0, **shape)
        for i, name in enumerate(("synthetic-a", "synthetic-b"))
    ]
    vocab = vocab_texts(d_vocab)
    store.write_vocab(run_id, vocab)
    flat = np.arange(n)
    layer, neuron = flat // d_mlp, flat % d_mlp
    for model_id, partner_id in ((ids[0], ids[1]), (ids[1], ids[0])):
        corr = np.clip(rng.beta(2, 3, n) + 0.2, 0, 1)
        base = np.clip(rng.beta(2, 8, n), 0, 1)
        excess = corr - base
        dead = rng.random(n) < 0.002
        alive = ~dead
        unless_dead = _unless(dead)

        store.insert_columns(
            s.neurons,
            {
                "model_id": model_id,
                "layer": layer,
                "neuron": neuron,
                "dead": dead.astype(np.int64),
                "max_corr": unless_dead(corr),
                "mean_corr": unless_dead(corr),
                "min_corr": unless_dead(corr),
                "max_baseline": unless_dead(base),
                "mean_baseline": unless_dead(base),
                "min_baseline": unless_dead(base),
                "excess_corr": unless_dead(excess),
                "universal": [None if d else bool(e > 0.5) for d, e in zip(dead, excess, strict=True)],
            },
        )
        partner_layer = rng.integers(0, n_layers, n)
        partner_neuron = rng.integers(0, d_mlp, n)
        store.insert_columns(
            s.partner_scores,
            {
                "model_id": model_id,
                "layer": layer[alive],
                "neuron": neuron[alive],
                "partner_model_id": partner_id,
                "max_corr": corr[alive],
                "max_layer": partner_layer[alive],
                "max_neuron": partner_neuron[alive],
                "baseline_corr": base[alive],
                "baseline_layer": layer[alive],
                "baseline_unit": neuron[alive],
            },
        )
        live = np.repeat(flat[alive], top_k)
        r = np.tile(np.arange(top_k), int(alive.sum()))
        store.insert_columns(
            s.matches,
            {
                "model_id": model_id,
                "layer": live // d_mlp,
                "neuron": live % d_mlp,
                "partner_model_id": partner_id,
                "rank": r,
                "partner_layer": np.where(r == 0, partner_layer[live], (partner_layer[live] + r) % n_layers),
                "partner_neuron": np.where(r == 0, partner_neuron[live], (partner_neuron[live] * 7 + r) % d_mlp),
                "corr": corr[live] * (1 - 0.1 * r),
            },
        )
        store.insert_rows(
            s.layer_summaries,
            (
                {
                    "model_id": model_id,
                    "layer": li,
                    "n_neurons": d_mlp,
                    "n_dead": int(dead[li * d_mlp : (li + 1) * d_mlp].sum()),
                    "n_universal": int((excess[li * d_mlp : (li + 1) * d_mlp] > 0.5).sum()),
                    "mean_excess": float(excess[li * d_mlp : (li + 1) * d_mlp].mean()),
                    "max_excess": float(excess[li * d_mlp : (li + 1) * d_mlp].max()),
                }
                for li in range(n_layers)
            ),
        )
        edges = np.linspace(-1, 1, 201)
        store.insert_rows(
            s.distributions,
            (
                {
                    "model_id": model_id,
                    "quantity": q,
                    "bin_edges": edges.round(6).tolist(),
                    "counts": np.histogram(v, edges)[0].tolist(),
                    "quantiles": {str(p): float(np.quantile(v, p)) for p in (0.1, 0.5, 0.9)},
                }
                for q, v in (("max_corr", corr), ("mean_corr", corr), ("mean_baseline", base), ("excess_corr", excess))
            ),
        )
    sizes = {"top_examples": top_examples, "quantile_bins": quantile_bins, "per_bin": per_bin}
    _analyses(store, ids[0], n_layers, d_mlp, vocab, snippet, ctx, rng, sizes, table_k, top_features)
    store.mark_stage_done(run_id, "correlations", time.perf_counter() - started)
    store.finish_run(run_id)
    store.compact()  # as a precompute ends
    store.close()
    logger.info("wrote %s (%d neurons per model) in %.0f s", path, n, time.perf_counter() - started)
    return path


def _analyses(
    store: s.AtlasStore,
    model_id: int,
    n_layers: int,
    d_mlp: int,
    vocab: list[str],
    snippet: int,
    ctx: int,
    rng: np.random.Generator,
    sizes: dict[str, int],
    table_k: int,
    top_features: int,
) -> None:
    n, d_vocab = n_layers * d_mlp, len(vocab)
    flat = np.arange(n)
    key = neuron_key_columns(model_id, d_mlp, flat)
    m = rng.normal(size=(8, n))
    stats = {
        "pre_mean": m[0],
        "pre_var": np.abs(m[1]),
        "pre_skew": m[2],
        "pre_kurt": 3 + np.abs(m[3]),
        "pre_min": np.full(n, -5.0),
        "pre_max": np.full(n, 8.0),
        "frequency": np.abs(m[4]) / 10,
        "frequency_paper": np.abs(m[4]) / 9,
        "post_mean": np.abs(m[5]),
        "post_var": np.abs(m[6]),
        "post_skew": np.ones(n),
        "post_kurt": np.full(n, 5.0),
        "post_min": np.full(n, -0.17),
        "post_max": 4 + np.abs(m[7]),
    }
    store.insert_columns(s.activation_stats, key | {"n_tokens": 10_000_000} | stats)
    # histograms (`encode_counts`) and position profiles (`encode_u8`): a pool of distinct arrays, reused
    pool = 64
    counts = [s.encode_counts(c) for c in rng.integers(0, 10_000, (pool, 102))]
    for hook in ("hook_pre", "hook_post"):
        store.insert_columns(
            s.histograms,
            key | {"hook": hook, "low": -10.0, "high": 15.0, "n_bins": 100, "counts": [counts[f % pool] for f in flat]},
        )
    profiles = s.encode_u8_rows(rng.normal(size=(pool, ctx)))
    store.insert_columns(s.position_counts, {"model_id": [model_id], "count": [s.blob(np.full(ctx, 1000, "<i8"))]})
    for hook in ("hook_pre", "hook_post"):
        blobs = [profiles[f % pool] for f in flat]
        store.insert_columns(s.position_profiles, key | {"hook": hook, "mean": blobs, "std": blobs})
    w = np.abs(rng.normal(size=(len(WEIGHT_STAT_COLUMNS), n)))
    weights = dict(zip(WEIGHT_STAT_COLUMNS, w, strict=True))
    store.insert_columns(s.weight_stats, key | weights)
    names = sorted(stats | weights)
    values = ((flat[:, None] * 37 + np.arange(len(names))[None] * 11) % 100).astype(np.float64)
    store.insert_columns(
        s.percentile_statistics, {"model_id": model_id, "position": np.arange(len(names)), "statistic": names}
    )
    store.insert_columns(s.percentiles, s.percentile_columns(model_id, d_mlp, values))
    tables = []
    rank = np.arange(table_k)
    for k, kind in enumerate(s.TOKEN_TABLE_KINDS):
        ids = (flat[:, None] * 31 + rank[None] * 977 + k * 13) % d_vocab
        sign = -1 if kind == "unembed_bottom" else 1
        value = np.broadcast_to(sign * (10.0 - rank), (n, table_k))
        count = np.broadcast_to(100 + rank, (n, table_k)) if kind.endswith("activation") else None
        tables.append(ranked_columns(model_id, d_mlp, kind, ids, value, count) | {"kind": s.token_kind_code(kind)})
    write_token_tables(store, model_id, d_mlp, tables)  # token_tables and the search's token_postings
    del tables
    _examples(store, model_id, n, d_mlp, d_vocab, snippet, ctx, rng, **sizes)
    store.insert_rows(
        s.families,
        (
            {
                "model_id": model_id,
                "layer": int(f // d_mlp),
                "neuron": int(f % d_mlp),
                "family": FAMILIES[f % len(FAMILIES)],
                "best_feature": f"token:{vocab[f % d_vocab]}",
                "best_vr": float((f % 97) / 97),
                "position_mi": None,
                "evidence": {"synthetic": True},
            }
            for f in range(n)
        ),
    )
    scored = np.repeat(flat, top_features)
    feature_rank = np.tile(np.arange(top_features), n)
    features = [f"token:{vocab[t]}" for t in ((scored + feature_rank) % d_vocab).tolist()]
    dictionary, feature_ids = s.feature_columns(
        model_id, features, ["unigram"] * len(features), np.full(len(features), 0.01)
    )
    store.insert_columns(s.feature_names, dictionary)
    store.insert_columns(
        s.feature_scores,
        neuron_key_columns(model_id, d_mlp, scored)
        | {"rank": feature_rank, "feature_id": feature_ids, "variance_reduction": 0.5 / (feature_rank + 1)},
    )
    store.insert_rows(
        s.roles,
        (
            {
                "model_id": model_id,
                "layer": int(f // d_mlp),
                "neuron": int(f % d_mlp),
                "vocab_role": ("prediction", "suppression", None, None)[f % 4],
                "entropy_rank": f if f < 50 else None,
                "attention_role": "deactivation" if f % 50 == 0 else None,
                "attention_layer": int(f // d_mlp),
                "attention_head": 0,
                "attention_score": 0.5,
            }
            for f in range(n)
        ),
    )
    store.insert_columns(
        s.attention_scores,
        neuron_key_columns(model_id, d_mlp, np.repeat(flat, 2))
        | {
            "rank": np.tile([0, 1], n),
            "attention_layer": np.repeat(flat // d_mlp, 2),
            "head": np.tile([0, 1], n),
            "score": np.tile([0.5, 0.4], n),
        },
    )
    last = n_layers - 1
    store.insert_rows(
        s.entropy_interventions,
        (
            {
                "model_id": model_id,
                "layer": last,
                "neuron": neuron,
                "value": v,
                "is_baseline": False,
                "ln_scale": 1 + v / 10,
                "entropy": 2.6 + v / 10,
                "loss": 3.0,
                "reciprocal_rank": 0.3,
                "n_tokens": 12_000,
            }
            for neuron in range(50)
            for v in (-0.17, 0, 1, 2, 3, 4, 5, 6)
        ),
    )
    points = s.blob(rng.normal(size=(400, 3)).astype("<f4"))
    ablated = flat[flat % 50 == 0]
    store.insert_columns(
        s.path_ablations,
        neuron_key_columns(model_id, d_mlp, ablated)
        | {
            "attention_layer": ablated // d_mlp,
            "head": 0,
            "pearson_bos": 0.4,
            "spearman_bos": 0.3,
            "pearson_norm": -0.3,
            "spearman_norm": -0.2,
            "n_points": 400,
            "points": [points] * len(ablated),
        },
    )


def _examples(
    store: s.AtlasStore,
    model_id: int,
    n: int,
    d_mlp: int,
    d_vocab: int,
    snippet: int,
    ctx: int,
    rng: np.random.Generator,
    top_examples: int,
    quantile_bins: int,
    per_bin: int,
) -> None:
    """``examples`` (`example_columns`, one row per neuron and kind), ``example_rows`` (the dataset rows' tokens)
    and ``example_peaks`` (the top examples by peak token), as the examples stage writes them."""
    n_rows, peak = DATASET_ROWS, snippet - 7
    rows = rng.integers(0, d_vocab, (n_rows, ctx))
    starts = (np.arange(n_rows) // HOT) % (ctx - snippet + 1)
    rows[np.arange(n_rows), starts + peak] = hot_tokens(d_vocab)[np.arange(n_rows) % HOT]
    itemsize = s.token_itemsize(d_vocab)
    store.insert_columns(
        s.example_rows,
        {
            "model_id": model_id,
            "dataset_row": np.arange(n_rows),
            "itemsize": itemsize,
            "token_ids": [s.blob(np.ascontiguousarray(r, dtype=f"<u{itemsize}")) for r in rows],
        },
    )
    snippets = s.encode_u8_rows(rng.normal(size=(HOT, snippet)))

    def dataset_row(f: int, r: int) -> int:
        """A row of pattern (f + r) % HOT (so its peak token is that pattern's hot token)."""
        return ((f // HOT) * HOT + (f + r) % HOT) % n_rows

    def packed() -> Iterator[dict[str, Any]]:
        for f in range(n):
            layer, neuron = f // d_mlp, f % d_mlp
            for kind, examples in (
                ("top", [(0, r) for r in range(top_examples)]),
                ("quantile", [(b, r) for b in range(quantile_bins) for r in range(per_bin)]),
            ):
                if not examples:
                    continue
                group = []
                for b, r in examples:
                    row = dataset_row(f, r + 3 * b)
                    group.append(
                        {
                            "model_id": model_id,
                            "layer": layer,
                            "neuron": neuron,
                            "kind": kind,
                            "rank": r,
                            "bin": b,
                            "bin_low": None if kind == "top" else float(b),
                            "bin_high": None if kind == "top" else float(b + 1),
                            "bin_fraction": None if kind == "top" else 0.1,
                            "dataset_row": row,
                            "start": int(starts[row]),
                            "peak": peak,
                            "activation": 5.0 - r,
                            "activations": snippets[(f + r + b) % HOT],
                        }
                    )
                yield s.example_columns(group)

    store.insert_rows(s.examples, packed(), chunk=5_000)
    top = np.repeat(np.arange(n), top_examples)
    r = np.tile(np.arange(top_examples), n)
    row = ((top // HOT) * HOT + (top + r) % HOT) % n_rows
    peak_token = rows[row, starts[row] + peak]
    order = np.lexsort((r, top, peak_token))
    store.insert_columns(
        s.example_peaks,
        {
            "model_id": model_id,
            "peak_token": peak_token[order],
            "layer": top[order] // d_mlp,
            "neuron": top[order] % d_mlp,
            "rank": r[order],
            "activation": 5.0 - r[order],
        },
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=25)
    parser.add_argument("--d-mlp", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    build(args.out, args.layers, args.d_mlp, seed=args.seed)
    print(
        json.dumps(
            {
                "db": str(args.out),
                "neurons_per_model": args.layers * args.d_mlp,
                "bytes": args.out.stat().st_size,
                "hot_tokens": hot_tokens(50257)[:3].tolist(),
            }
        )
    )


if __name__ == "__main__":
    main()


__all__: list[Any] = ["build", "hot_tokens"]
