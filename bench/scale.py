"""Scale benchmark: every stage on random-init families of GPT-2 shape, under the memory watchdog, and the cost
model fitted to it, extrapolated to the paper's run (issue 11).

For each token count a precompute of a random-init family (GPT-2-small shape: 12 x 3,072 neurons, d_model 768,
context 1,024, with a 50,257-token byte-level BPE trained on the standard library) runs in a subprocess under
`bench/memory_watchdog.py` (killed above ``--limit-gb``). Its wall time, peak resident memory, the run's own per-stage
timings and its memory plan make one JSON line (``"bench": "scale"``). Then the cost model (``"scale-fit"``):

- forward passes: seconds per token, model and pass (a pass runs the models its stages read: the run records them,
  and the paper's plan counts them with `precompute.pipeline.planned_forwards`);
- the correlation GEMMs: seconds per token and neuron pair (quadratic in neurons: 2·n_a·n_b FLOPs a token);
- the streaming of stats, examples and families: seconds per token and model (linear in tokens);
- writing the tables, and the roles stage: seconds per model (constant in tokens);

each fitted by least squares over the runs (time = fixed + slope × tokens), and its extrapolation
(``"scale-paper"``) to the paper's run: 5 models, 100M tokens, all pairs and ``--reference-only``, with the passes
the memory plan needs at that scale on this machine (priced by the production planner on a synthetic dataset in
which every token of the vocabulary occurs). ``--device cuda`` runs the same on a GPU (the plan against the run's
recorded peak GPU allocation); its extrapolation is labelled with the device.

    python bench/scale.py --out scale.jsonl                              # GPT-2 small, 1K, 2K and 4K tokens
    python bench/scale.py --tokens 2048 --budget-gb 6                    # one run under a budget
    python bench/scale.py --shape medium                                 # GPT-2 medium: priced first
"""

from __future__ import annotations

import argparse
import json
import platform
import sqlite3
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from memory_watchdog import watch  # a sibling script: bench/ is on sys.path when this runs

from precompute.correlation import model_pairs
from precompute.data import DatasetConfig, TokenDataset
from precompute.memory import DEFAULT_SHARE, GIB, MemoryBudgetError, available_bytes
from precompute.pipeline import PrecomputeConfig, fit_plan, memory_pricer, planned_forwards

SHAPES = {
    "small": {"n_layers": 12, "d_model": 768, "d_mlp": 3072, "n_heads": 12},
    "medium": {"n_layers": 24, "d_model": 1024, "d_mlp": 4096, "n_heads": 16},
}
VOCAB, N_CTX, CTX = 50257, 1024, 256
PAPER = {"models": 5, "tokens": 100_000_000}
STREAMED = ("stats", "examples", "families")


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    total = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if "MemTotal" in line)
    return f"{cpu}, {torch.get_num_threads()} threads, {total / 2**20:.0f} GiB, torch {torch.__version__}"


def build_family(folder: Path, shape: str, n_models: int) -> list[Path]:
    """Random-init GPT-2 models of a shape with a 50,257-token BPE of the standard library (made once; a folder of
    ``seed-*`` models from ``../shared/tools/paper_shape_family.py`` is GPT-2-small's and is used as it is)."""
    made = sorted(folder.glob("seed-*"))
    if shape == "small" and len(made) >= n_models:
        return made[:n_models]
    from transformers import GPT2Config, GPT2LMHeadModel

    from precompute.stdlib_corpus import stdlib_documents
    from precompute.training.tokenizer import load_tokenizer, save_tokenizer, train_bpe_tokenizer

    tokenizer_folder = folder / "tokenizer"
    if not (tokenizer_folder / "tokenizer.json").exists():
        save_tokenizer(train_bpe_tokenizer(stdlib_documents("all"), vocab_size=VOCAB), tokenizer_folder)
    tokenizer = load_tokenizer(tokenizer_folder)
    dims = SHAPES[shape]
    models = []
    for seed in range(n_models):
        model_folder = folder / f"{shape}-seed-{seed}"
        if not (model_folder / "config.json").exists():
            torch.manual_seed(seed)
            config = GPT2Config(
                vocab_size=len(tokenizer),
                n_positions=N_CTX,
                n_embd=dims["d_model"],
                n_layer=dims["n_layers"],
                n_head=dims["n_heads"],
                n_inner=dims["d_mlp"],
                activation_function="gelu_new",
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            GPT2LMHeadModel(config).eval().save_pretrained(model_folder)
            tokenizer.save_pretrained(model_folder)
        models.append(model_folder)
    return models


def run_once(
    models: list[Path],
    tokens: int,
    budget_gb: float | None,
    limit_gb: float,
    device: str = "cpu",
    keep: Path | None = None,
) -> dict[str, Any]:
    """One precompute under the watchdog: the JSON line of its wall time, peak memory, timings and plan (on CUDA
    the plan is held against the GPU's peak allocation, which the run records, instead of the host's RSS).
    ``keep``: a folder where the atlas stays (``scale-TOKENS.db``), its size a neuron in the line."""
    with tempfile.TemporaryDirectory() as folder:
        db = (keep or Path(folder)) / f"scale-{tokens}.db"
        if keep:
            keep.mkdir(parents=True, exist_ok=True)
            for stale in keep.glob(f"{db.name}*"):  # a kept atlas of an earlier run would be resumed, not made
                stale.unlink()
        command = [sys.executable, "-m", "cli.main", "precompute", "--db", str(db), "--tokens", str(tokens)]
        command += ["--device", device, "--dataset", "stdlib:all"] if device != "cpu" else []
        command += [str(m) for m in models] + (["--memory-budget-gb", str(budget_gb)] if budget_gb else [])
        watched = watch(command, int(limit_gb * GIB), interval=0.2, cwd=Path(__file__).resolve().parents[1])
        line: dict[str, Any] = {
            "bench": "scale",
            "device": device,
            "models": len(models),
            "tokens": tokens,
            "budget_gb": budget_gb,
            "returncode": watched.returncode,
            "killed": watched.killed,
            "wall_seconds": round(watched.seconds, 1),
            "peak_rss_gib": round(watched.peak_rss / GIB, 3),
        }
        if watched.returncode != 0 or not db.exists():
            line["error"] = watched.stderr.strip().splitlines()[-1:] if watched.stderr else None
            return line
        with sqlite3.connect(db) as conn:
            timings, environment = conn.execute("SELECT timings, environment FROM runs").fetchone()
            neurons = conn.execute("SELECT COUNT(*) FROM neurons").fetchone()[0]
        if keep and neurons:
            line["atlas_bytes"] = db.stat().st_size
            line["atlas_bytes_per_neuron"] = round(db.stat().st_size / neurons, 1)
    recorded = json.loads(environment)
    plan = recorded["memory_plan"]
    line["timings"] = json.loads(timings)
    if "forward_models_by_pass" in recorded:  # the models each pass over the rows ran
        line["forward_model_passes"] = sum(map(len, recorded["forward_models_by_pass"]))
    line["plan"] = {
        "total_gib": round(plan["total"] / GIB, 3),
        "runtime_gib": round(plan["runtime"] / GIB, 3),
        "models_gib": round(plan["models"] / GIB, 3),
        "phases_gib": {k: round(v / GIB, 3) for k, v in plan["phases"].items()},
        "stages_peak_gib": {k: round(v["peak"] / GIB, 3) for k, v in plan["stages"].items()},
        "split": plan["split"],
    }
    if device == "cpu":
        line["plan_vs_measured"] = round((watched.peak_rss - plan["runtime"]) / plan["total"], 3)
    elif plan.get("measured_peak_cuda_allocated"):
        line["peak_cuda_allocated_gib"] = round(plan["measured_peak_cuda_allocated"] / GIB, 3)
        line["plan_vs_measured"] = round(plan["measured_peak_cuda_allocated"] / plan["total"], 3)
    return line


def fit(runs: list[dict[str, Any]], n_neurons: int) -> dict[str, Any]:
    """Least-squares cost model over the runs (one shape, one family size): see the module docstring."""
    done = [r for r in runs if "timings" in r]
    if len(done) < 2:
        return {"bench": "scale-fit", "error": "needs two completed runs"}
    tokens = np.array([r["tokens"] for r in done], dtype=np.float64)
    n_models = done[0]["models"]
    pairs = len(model_pairs(n_models, reference_only=False))
    passes = np.array([max(r["plan"]["split"]["passes"].values(), default=1) for r in done], dtype=np.float64)
    # the models' forward passes the runs made: recorded by the run (a pass runs the models it reads), else as
    # runs before that record ran them, every model in every pass
    model_passes = np.array(
        [r.get("forward_model_passes", n_models * p) for r, p in zip(done, passes, strict=True)], dtype=np.float64
    )

    def line(values: np.ndarray, x: np.ndarray) -> tuple[float, float]:
        slope, fixed = np.polyfit(x, values, 1)
        return float(slope), float(fixed)

    # The process's CPU seconds when every run recorded them (`pipeline._Clock`): they hold when other work shares
    # the machine; else, and on a GPU (whose work is not the process's CPU time), the wall clock.
    on_cpu = all(r.get("device", "cpu") == "cpu" and "forward_cpu" in r["timings"] for r in done)
    clock = "cpu" if on_cpu else "wall"
    names = {key.removesuffix("_cpu") for key in done[0]["timings"]}

    def seconds_of(name: str) -> np.ndarray:
        key = f"{name}_cpu" if clock == "cpu" else name
        return np.array([r["timings"].get(key, 0.0) for r in done], dtype=np.float64)

    timings = {name: seconds_of(name) for name in names}
    forward, forward_fixed = line(timings["forward"], tokens * model_passes)
    correlations, _ = line(timings.get("correlations", 0 * tokens), tokens * pairs * n_neurons**2)
    streamed = {stage: line(timings[stage], tokens * n_models)[0] for stage in STREAMED if stage in timings}
    writes = {key: float(v.mean()) / n_models for key, v in timings.items() if key.endswith("_write")}
    slopes = {"forward": forward, "correlations": correlations, **streamed}
    if any(slope <= 0 for slope in slopes.values()):
        # Work that grows with tokens measured as shrinking: the runs saw different load (wall clocks on a shared
        # machine), and an extrapolation from them would be meaningless (it once gave negative days).
        return {
            "bench": "scale-fit",
            "error": "a per-token cost fitted as zero or negative: the runs were timed under different load; rerun "
            "them on a quieter machine",
            "clock": clock,
            "slopes": slopes,
        }
    return {
        "bench": "scale-fit",
        "clock": clock,
        "forward_seconds_per_token_model_pass": forward,
        "forward_fixed_seconds": forward_fixed,
        "correlation_seconds_per_token_neuron_pair": correlations,
        "streaming_seconds_per_token_model": streamed,
        "write_seconds_per_model": writes,
    }


def paper_plan(shape: str, n_models: int, tokens: int, reference_only: bool, budget: int | None) -> dict[str, Any]:
    """The production planner on the paper's run: every vocabulary token occurs, GPT-2 shapes, this budget."""
    dims = SHAPES[shape]
    n_neurons = dims["n_layers"] * dims["d_mlp"]
    models = [
        SimpleNamespace(name=f"m{i}", n_neurons=n_neurons, d_vocab=VOCAB, tokenizer=range(VOCAB), **dims)
        for i in range(n_models)
    ]
    # A stand-in dataset of at most 1M tokens in which every vocabulary token occurs (as in 100M tokens of text):
    # the plan depends on the tokens seen, the row length and the batch, not on the token count itself, except for
    # the families' syntax label of every dataset token (4 bytes a token: 0.4 GB more at 100M tokens).
    n_rows = -(-min(tokens, 1_000_000) // CTX)
    rows = np.resize(np.arange(VOCAB, dtype=np.int64), (n_rows, CTX))
    rows[:, 0] = 0
    dataset = TokenDataset(rows, rows != 0, DatasetConfig(tokens=rows.size, ctx=CTX), CTX, {})
    from precompute.correlation import CorrelationConfig

    config = PrecomputeConfig(
        db=Path("paper.db"),
        models=tuple(m.name for m in models),
        correlation=CorrelationConfig(reference_only=reference_only),
    )
    held = n_models * (12 * dims["d_model"] ** 2 * dims["n_layers"] + 2 * VOCAB * dims["d_model"]) * 4
    budget = budget if budget is not None else held + int(DEFAULT_SHARE * available_bytes("cpu"))
    price = memory_pricer(config, models, dataset, budget, held)  # type: ignore[arg-type]
    try:
        plan = fit_plan(price, config, models, max_passes=4096)  # type: ignore[arg-type]
    except MemoryBudgetError as exc:
        return {"fits": False, "budget_gib": round(budget / GIB, 2), "error": str(exc)}
    passes = max(plan.split.passes.values(), default=1)
    forwards = planned_forwards(config, models, dataset, plan.split)  # type: ignore[arg-type]
    return {
        "fits": True,
        "budget_gib": round(budget / GIB, 2),
        "total_gib": round(plan.total / GIB, 2),
        "passes": passes,
        "forward_model_passes": sum(map(len, forwards)),  # a pass runs only the models its stages read
        "split": plan.split.record(),
    }


def extrapolate(model: dict[str, Any], shape: str, budget: int | None, device: str = "cpu") -> list[dict[str, Any]]:
    """The fitted cost model at the paper's scale, all pairs and reference-only."""
    dims = SHAPES[shape]
    n_neurons = dims["n_layers"] * dims["d_mlp"]
    lines = []
    for reference_only in (False, True):
        plan = paper_plan(shape, PAPER["models"], PAPER["tokens"], reference_only, budget)
        pairs = len(model_pairs(PAPER["models"], reference_only))
        model_passes = plan.get("forward_model_passes", PAPER["models"] * plan.get("passes", 1))
        seconds = {
            "forward": model["forward_seconds_per_token_model_pass"] * PAPER["tokens"] * model_passes,
            "correlations": model["correlation_seconds_per_token_neuron_pair"] * PAPER["tokens"] * pairs * n_neurons**2,
            **{
                stage: slope * PAPER["tokens"] * PAPER["models"]
                for stage, slope in model["streaming_seconds_per_token_model"].items()
            },
            "writes": sum(model["write_seconds_per_model"].values()) * PAPER["models"],
        }
        total = sum(seconds.values())
        lines.append(
            {
                "bench": "scale-paper",
                "shape": shape,
                "models": PAPER["models"],
                "tokens": PAPER["tokens"],
                "reference_only": reference_only,
                "pairs": pairs,
                "plan": plan,
                "device": device,
                "clock": model["clock"],  # cpu: CPU seconds of the process (all its threads), wall: elapsed
                "seconds": {k: round(v) for k, v in seconds.items()},
                "days": round(total / 86400, 2),
            }
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--models", type=int, default=2, help="models in the measured family")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--budget-gb", type=float, default=None, help="--memory-budget-gb of every run")
    parser.add_argument("--paper-budget-gb", type=float, default=None, help="budget for the paper's plan")
    parser.add_argument("--limit-gb", type=float, default=9.0, help="the watchdog kills a run above this")
    parser.add_argument("--family", type=Path, default=Path(tempfile.gettempdir()) / "scale-family")
    parser.add_argument("--out", type=Path, default=None, help="also append the JSON lines to this file")
    parser.add_argument("--keep", type=Path, default=None, help="keep each run's atlas in this folder")
    parser.add_argument(
        "--device", default="cpu", help="the runs' --device (cuda: stdlib:all tokens, the held-out files are ~1M)"
    )
    args = parser.parse_args()

    def emit(line: dict[str, Any]) -> None:
        text = json.dumps(line)
        print(text, flush=True)
        if args.out:
            with args.out.open("a") as handle:
                handle.write(text + "\n")

    emit({"bench": "scale-machine", "machine": machine(), "shape": args.shape})
    smallest = paper_plan(args.shape, args.models, min(args.tokens), False, int(args.limit_gb * GIB))
    if not smallest["fits"]:  # GPT-2 medium: its Gram matrices alone are 3 GiB a model
        emit({"bench": "scale", "shape": args.shape, "skipped": "does not fit the watchdog's limit", **smallest})
        return
    models = build_family(args.family, args.shape, args.models)
    runs = []
    for tokens in args.tokens:  # never two at once: one paper-shape run at a time on a shared machine
        run = run_once(models, tokens, args.budget_gb, args.limit_gb, args.device, args.keep)
        runs.append(run | {"shape": args.shape})
        emit(runs[-1])
    dims = SHAPES[args.shape]
    model = fit(runs, dims["n_layers"] * dims["d_mlp"])
    emit(model)
    if "error" not in model:
        paper_budget = int(args.paper_budget_gb * GIB) if args.paper_budget_gb else None
        for line in extrapolate(model, args.shape, paper_budget, args.device):
            emit(line)


if __name__ == "__main__":
    main()
