"""A synthetic atlas file of realistic size, written through the real writer (`precompute.store.AtlasStore`).

Used by bench/dashboard.py to measure the web app on a GPT-2-medium-sized model (about 100,000 neurons) without
running a precompute of that size. Values are random but every table of the schema is filled with the row counts
and BLOB sizes a real run would have for the reference model; the partner model gets the correlation tables.
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
from precompute.weights import WEIGHT_STAT_COLUMNS

logger = logging.getLogger("bench.synthetic_db")

FAMILIES = ("unigram", "alphabet", "previous_token", "position", "syntax", "semantic", "none")


def _rows(n_layers: int, d_mlp: int) -> Iterator[tuple[int, int, int]]:
    for layer in range(n_layers):
        for neuron in range(d_mlp):
            yield layer * d_mlp + neuron, layer, neuron


def build(
    path: Path,
    n_layers: int = 25,
    d_mlp: int = 4000,
    d_vocab: int = 50257,
    top_k: int = 5,
    snippet: int = 27,
    ctx: int = 64,
    seed: int = 0,
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
    store.write_vocab(run_id, [f" tok{i}" if i % 3 else f"t{i}" for i in range(d_vocab)])
    for model_id, partner_id in ((ids[0], ids[1]), (ids[1], ids[0])):
        corr = np.clip(rng.beta(2, 3, n) + 0.2, 0, 1)
        base = np.clip(rng.beta(2, 8, n), 0, 1)
        excess = corr - base
        dead = rng.random(n) < 0.002
        store.insert_rows(
            s.neurons,
            (
                {
                    "model_id": model_id,
                    "layer": layer,
                    "neuron": neuron,
                    "dead": bool(dead[f]),
                    "max_corr": None if dead[f] else float(corr[f]),
                    "mean_corr": None if dead[f] else float(corr[f]),
                    "min_corr": None if dead[f] else float(corr[f]),
                    "max_baseline": None if dead[f] else float(base[f]),
                    "mean_baseline": None if dead[f] else float(base[f]),
                    "min_baseline": None if dead[f] else float(base[f]),
                    "excess_corr": None if dead[f] else float(excess[f]),
                    "universal": None if dead[f] else bool(excess[f] > 0.5),
                }
                for f, layer, neuron in _rows(n_layers, d_mlp)
            ),
        )
        partner_layer = rng.integers(0, n_layers, n)
        partner_neuron = rng.integers(0, d_mlp, n)
        store.insert_rows(
            s.partner_scores,
            (
                {
                    "model_id": model_id,
                    "layer": layer,
                    "neuron": neuron,
                    "partner_model_id": partner_id,
                    "max_corr": float(corr[f]),
                    "max_layer": int(partner_layer[f]),
                    "max_neuron": int(partner_neuron[f]),
                    "baseline_corr": float(base[f]),
                    "baseline_layer": int(layer),
                    "baseline_unit": int(neuron),
                }
                for f, layer, neuron in _rows(n_layers, d_mlp)
                if not dead[f]
            ),
        )
        store.insert_rows(
            s.matches,
            (
                {
                    "model_id": model_id,
                    "layer": layer,
                    "neuron": neuron,
                    "partner_model_id": partner_id,
                    "rank": r,
                    "partner_layer": int(partner_layer[f]) if r == 0 else int((partner_layer[f] + r) % n_layers),
                    "partner_neuron": int(partner_neuron[f]) if r == 0 else int((partner_neuron[f] * 7 + r) % d_mlp),
                    "corr": float(corr[f]) * (1 - 0.1 * r),
                }
                for f, layer, neuron in _rows(n_layers, d_mlp)
                if not dead[f]
                for r in range(top_k)
            ),
        )
        store.insert_rows(
            s.layer_summaries,
            (
                {
                    "model_id": model_id,
                    "layer": layer,
                    "n_neurons": d_mlp,
                    "n_dead": int(dead[layer * d_mlp : (layer + 1) * d_mlp].sum()),
                    "n_universal": int((excess[layer * d_mlp : (layer + 1) * d_mlp] > 0.5).sum()),
                    "mean_excess": float(excess[layer * d_mlp : (layer + 1) * d_mlp].mean()),
                    "max_excess": float(excess[layer * d_mlp : (layer + 1) * d_mlp].max()),
                }
                for layer in range(n_layers)
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
    _analyses(store, ids[0], n_layers, d_mlp, d_vocab, snippet, ctx, rng)
    store.mark_stage_done(run_id, "correlations", time.perf_counter() - started)
    store.finish_run(run_id)
    store.close()
    logger.info("wrote %s (%d neurons per model) in %.0f s", path, n, time.perf_counter() - started)
    return path


def _analyses(
    store: s.AtlasStore,
    model_id: int,
    n_layers: int,
    d_mlp: int,
    d_vocab: int,
    snippet: int,
    ctx: int,
    rng: np.random.Generator,
) -> None:
    n = n_layers * d_mlp
    key = lambda layer, neuron: {"model_id": model_id, "layer": layer, "neuron": neuron}  # noqa: E731
    moments = rng.normal(size=(n, 8))
    store.insert_rows(
        s.activation_stats,
        (
            {
                **key(layer, neuron),
                "n_tokens": 10_000_000,
                "pre_mean": float(m[0]),
                "pre_var": abs(float(m[1])),
                "pre_skew": float(m[2]),
                "pre_kurt": 3 + abs(float(m[3])),
                "pre_min": -5.0,
                "pre_max": 8.0,
                "frequency": float(abs(m[4]) / 10),
                "post_mean": abs(float(m[5])),
                "post_var": abs(float(m[6])),
                "post_skew": 1.0,
                "post_kurt": 5.0,
                "post_min": -0.17,
                "post_max": 4 + abs(float(m[7])),
            }
            for (f, layer, neuron), m in zip(_rows(n_layers, d_mlp), moments, strict=True)
        ),
    )
    counts = s.blob(rng.integers(0, 10_000, 102).astype("<i8"))
    store.insert_rows(
        s.histograms,
        (
            {**key(layer, neuron), "hook": hook, "low": -10.0, "high": 15.0, "n_bins": 100, "counts": counts}
            for _, layer, neuron in _rows(n_layers, d_mlp)
            for hook in ("hook_pre", "hook_post")
        ),
    )
    profile = s.blob(rng.normal(size=ctx).astype("<f4"))
    count = s.blob(np.full(ctx, 1000, dtype="<i8"))
    store.insert_rows(
        s.position_profiles,
        (
            {**key(layer, neuron), "hook": "hook_post", "mean": profile, "std": profile, "count": count}
            for _, layer, neuron in _rows(n_layers, d_mlp)
        ),
    )
    weights = rng.normal(size=(n, 10))
    names = WEIGHT_STAT_COLUMNS
    store.insert_rows(
        s.weight_stats,
        (
            {**key(layer, neuron), **{name: float(abs(w[i])) for i, name in enumerate(names)}}
            for (_, layer, neuron), w in zip(_rows(n_layers, d_mlp), weights, strict=True)
        ),
    )
    store.insert_rows(
        s.percentiles,
        (
            {**key(layer, neuron), "statistic": stat, "percentile": float((f * 37 + i * 11) % 100)}
            for f, layer, neuron in _rows(n_layers, d_mlp)
            for i, stat in enumerate(
                (
                    "l2_penalty",
                    "input_bias",
                    "in_out_sim",
                    "vocab_kurt",
                    "w_out_norm",
                    "frequency",
                    "pre_skew",
                    "pre_kurt",
                    "post_mean",
                )
            )
        ),
    )
    store.insert_rows(
        s.token_tables,
        (
            {
                **key(layer, neuron),
                "kind": kind,
                "rank": r,
                "token_id": int((f * 31 + r * 977 + k * 13) % d_vocab),
                "value": float(10 - r) * (1 if kind != "unembed_bottom" else -1),
                "count": 100 + r if kind.endswith("activation") else None,
            }
            for f, layer, neuron in _rows(n_layers, d_mlp)
            for k, kind in enumerate(
                ("unembed_top", "unembed_bottom", "embed_top", "mean_activation", "max_activation")
            )
            for r in range(10)
        ),
    )
    tokens = rng.integers(0, d_vocab, (64, snippet)).astype("<i4")
    acts = rng.normal(size=(64, snippet)).astype("<f2")
    store.insert_rows(
        s.examples,
        (
            {
                **key(layer, neuron),
                "kind": kind,
                "rank": r,
                "bin": b,
                "bin_low": None if kind == "top" else float(b),
                "bin_high": None if kind == "top" else float(b + 1),
                "bin_fraction": None if kind == "top" else 0.1,
                "dataset_row": int(f % 10_000),
                "start": 0,
                "peak": snippet - 7,
                "activation": 5.0 - r,
                "token_ids": s.blob(tokens[(f + r) % 64]),
                "activations": s.blob(acts[(f + r + b) % 64]),
            }
            for f, layer, neuron in _rows(n_layers, d_mlp)
            for kind, b, r in [("top", 0, r) for r in range(10)]
            + [("quantile", b, r) for b in range(2) for r in range(2)]
        ),
    )
    store.insert_rows(
        s.families,
        (
            {
                **key(layer, neuron),
                "family": FAMILIES[f % len(FAMILIES)],
                "best_feature": f"token:{f % d_vocab}",
                "best_vr": float((f % 97) / 97),
                "position_mi": None,
                "evidence": {"synthetic": True},
            }
            for f, layer, neuron in _rows(n_layers, d_mlp)
        ),
    )
    store.insert_rows(
        s.feature_scores,
        (
            {
                **key(layer, neuron),
                "rank": r,
                "feature": f"token:{(f + r) % d_vocab}",
                "feature_set": "unigram",
                "variance_reduction": 0.5 / (r + 1),
                "fraction": 0.01,
            }
            for f, layer, neuron in _rows(n_layers, d_mlp)
            for r in range(3)
        ),
    )
    store.insert_rows(
        s.roles,
        (
            {
                **key(layer, neuron),
                "vocab_role": ("prediction", "suppression", None, None)[f % 4],
                "entropy_rank": f if f < 50 else None,
                "attention_role": "deactivation" if f % 50 == 0 else None,
                "attention_layer": layer,
                "attention_head": 0,
                "attention_score": 0.5,
            }
            for f, layer, neuron in _rows(n_layers, d_mlp)
        ),
    )
    store.insert_rows(
        s.attention_scores,
        (
            {**key(layer, neuron), "rank": r, "attention_layer": layer, "head": r, "score": 0.5 - 0.1 * r}
            for _, layer, neuron in _rows(n_layers, d_mlp)
            for r in range(2)
        ),
    )
    store.insert_rows(
        s.entropy_interventions,
        (
            {
                **key(n_layers - 1, neuron),
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
    store.insert_rows(
        s.path_ablations,
        (
            {
                **key(layer, neuron),
                "attention_layer": layer,
                "head": 0,
                "pearson_bos": 0.4,
                "spearman_bos": 0.3,
                "pearson_norm": -0.3,
                "spearman_norm": -0.2,
                "n_points": 400,
                "points": points,
            }
            for f, layer, neuron in _rows(n_layers, d_mlp)
            if f % 50 == 0
        ),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=25)
    parser.add_argument("--d-mlp", type=int, default=4000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    build(args.out, args.layers, args.d_mlp)
    print(
        json.dumps(
            {"db": str(args.out), "neurons_per_model": args.layers * args.d_mlp, "bytes": args.out.stat().st_size}
        )
    )


if __name__ == "__main__":
    main()


__all__: list[Any] = ["build"]
