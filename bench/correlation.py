"""Benchmark the correlation engine against the paper's way and against the raw GEMM ceiling.

Three timings on the same synthetic post-GELU activations, in one process:
- ``paper``: the paper's ``StreamingPearsonComputer`` update — one float32 matmul per (layer, layer) pair, each
  added into a float64 array on the CPU (paper-spec §2.2) — run twice, as the paper does, once on the raw and
  once on the rotated partner activations (the baseline), since the engine delivers both in one pass;
- ``engine``: `precompute.correlation.CorrelationEngine.update` for a family of ``--models`` models (all pairs),
  which also gathers what the rotated baseline needs (per-model sums and within-layer Gram matrices);
- ``ceiling``: the bare GEMMs of one batch — one [tokens x N_a]ᵀ[tokens x N_b] product per model pair, in the
  engine's precision — with nothing else; ``fraction_of_ceiling`` = ceiling time / engine time;
- ``all_gemms``: the same plus the within-layer Gram GEMMs the baseline needs: ``fraction_of_all_gemms`` says
  how close the engine is to its own unavoidable matrix work.

Throughput is tokens per second per model pair. Prints one JSON line per configuration. ``--profile N`` adds
the operators (and on a GPU the kernels) of N profiled engine updates by their own time on the device
(`profile_engine`).

    python bench/correlation.py                      # CPU: the embedded family's shapes
    python bench/correlation.py --device cuda --layers 12 --d-mlp 3072 --tokens 12288   # GPT2-small shapes
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from typing import Any

import torch

from precompute.activations import ActivationBatch
from precompute.correlation import (
    FP8_PRECISIONS,
    CorrelationConfig,
    CorrelationEngine,
    ModelShape,
    ScaledOperand,
    bf16_matmul_fp32,
    fp8_matmul_fp32,
    model_pairs,
)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(
    functions: dict[str, Callable[[], None]], device: torch.device, rounds: int
) -> dict[str, float]:
    """Median seconds per function, timing them in turn each round so that load from other processes on the
    machine falls on all of them alike (ratios stay meaningful on a shared machine)."""
    for fn in functions.values():  # warm-up: allocations, kernel selection
        fn()
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(rounds):
        for name, fn in functions.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
    return {name: sorted(values)[len(values) // 2] for name, values in samples.items()}


def synthetic_activations(n_models: int, tokens: int, layers: int, d_mlp: int, device: torch.device) -> list:
    """Post-GELU-like activations, [1, tokens, layers, d_mlp] per model, correlated across models."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    shared = torch.randn(tokens, layers, d_mlp, generator=generator)
    acts = []
    for _ in range(n_models):
        noise = torch.randn(tokens, layers, d_mlp, generator=generator)
        pre = 0.7 * shared[:, :, torch.randperm(d_mlp, generator=generator)] + 0.7 * noise - 1.0
        acts.append(torch.nn.functional.gelu(pre, approximate="tanh").unsqueeze(0).to(device))
    return acts


def paper_update(acts: list[torch.Tensor], layers: int, d_mlp: int, rotate: bool = False) -> Callable[[], None]:
    """One batch of the paper's update for the first pair: a float32 matmul per layer pair into float64 (CPU).

    With ``rotate`` it is the paper's baseline run instead: model 2's layers are first rotated (R_l V_l), as
    ``correlations_fast.py --baseline rotation`` does in a second, separate run.
    """
    x = acts[0][0].permute(1, 2, 0).contiguous()  # [layers, d_mlp, tokens]
    y_raw = acts[1][0].permute(1, 2, 0).contiguous()
    rotation = torch.randn(layers, d_mlp, d_mlp, device=x.device)
    rotation /= rotation.norm(dim=-1, keepdim=True)
    products = torch.zeros(layers, d_mlp, layers, d_mlp, dtype=torch.float64)
    sums = torch.zeros(2, layers, d_mlp, dtype=torch.float64)
    squares = torch.zeros_like(sums)

    def update() -> None:
        y = torch.bmm(rotation, y_raw) if rotate else y_raw
        for l1 in range(layers):
            for l2 in range(layers):
                products[l1, :, l2, :] += (x[l1] @ y[l2].T).cpu().double()
        for index, v in enumerate((x, y)):
            sums[index] += v.sum(dim=-1).cpu().double()
            squares[index] += v.square().sum(dim=-1).cpu().double()

    return update


def ceiling_update(
    acts: list[torch.Tensor], pairs: list[tuple[int, int]], precision: str, with_gram: bool
) -> Callable[[], None]:
    """The bare GEMMs of one batch in the engine's precision: the cross products of every pair, and (with_gram)
    the within-layer Gram products of every model that the rotated baseline needs. For fp8 the operands are
    quantized beforehand (`ScaledOperand`), so only the scaled GEMMs are timed."""
    if precision in FP8_PRECISIONS:
        fast = precision == "fp8-fast"
        scaled = [ScaledOperand.quantize(a[0].reshape(a.shape[1], -1).float().clone()) for a in acts]
        d_mlp = acts[0].shape[-1]
        layers = [[s.columns(slice(i * d_mlp, (i + 1) * d_mlp)) for i in range(acts[0].shape[2])] for s in scaled]

        def update_fp8() -> None:
            for a, b in pairs:
                fp8_matmul_fp32(scaled[a], scaled[b], fast)
            if with_gram:
                for model in layers:
                    for layer in model:
                        fp8_matmul_fp32(layer, layer, fast)

        return update_fp8
    dtype = {"float64": torch.float64, "float32": torch.float32, "tf32": torch.float32, "bfloat16": torch.bfloat16}
    flat = [a[0].reshape(a.shape[1], -1).to(dtype[precision]) for a in acts]
    per_layer = [a[0].transpose(0, 1).to(dtype[precision]) for a in acts]  # [layers, tokens, d_mlp]
    product = bf16_matmul_fp32 if precision == "bfloat16" else torch.matmul

    def update() -> None:
        for a, b in pairs:
            product(flat[a].T, flat[b])
        if with_gram:
            for layers in per_layer:
                product(layers.transpose(1, 2), layers)

    return update


def closed_results(
    shapes: list[ModelShape], config: CorrelationConfig, batch: ActivationBatch, device: torch.device
) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One batch through a fresh engine, pass closed: per ordered pair (best partner correlation, its index, best
    rotated-baseline correlation), on the CPU."""
    engine = CorrelationEngine(shapes, config, device=str(device), n_passes=1)
    engine.update(batch)
    engine.finish_pass()
    results = {}
    for key, result in engine.results.items():
        results[key] = (result.top_corr[:, 0].cpu(), result.top_index[:, 0].cpu(), result.baseline_corr.cpu())
    del engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def error_against(
    results: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    reference: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> dict[str, float]:
    """How far a precision's results are from float64's: max and mean |Δρ| of every neuron's best partner and of
    its best rotated unit, and the share of neurons whose best partner is the same neuron."""
    best = torch.cat([(results[k][0] - reference[k][0]).abs() for k in reference])
    baseline = torch.cat([(results[k][2] - reference[k][2]).abs() for k in reference])
    same = torch.cat([results[k][1] == reference[k][1] for k in reference])
    finite = best.isfinite()
    return {
        "max_abs_error_best_rho": round(float(best[finite].max()), 6),
        "mean_abs_error_best_rho": round(float(best[finite].mean()), 7),
        "max_abs_error_baseline_rho": round(float(baseline[baseline.isfinite()].max()), 6),
        "same_best_partner": round(float(same.double().mean()), 5),
    }


#: Rows of each table (operators, kernels) `profile_engine` reports, the most expensive first.
PROFILE_TOP = 15


def profile_engine(update: Callable[[], None], device: torch.device, n_updates: int) -> dict[str, list[dict]]:
    """Where ``n_updates`` engine updates spend their time, after one update unprofiled (warm caches): the
    operators by their own time on the device (their own kernels' time on a GPU; the CPU's time on a CPU), and on a
    GPU the kernels themselves by their time. Per row its calls and milliseconds per update and its share of the
    profiled time, the most expensive first (`PROFILE_TOP` of each). An operator's device time is its kernels'
    time, so operators and kernels are listed apart, each summing to the whole."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    update()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(n_updates):
            update()
        synchronize(device)

    def own_time(event: Any) -> float:  # microseconds; the attribute's name depends on the torch version
        if device.type == "cuda":
            return float(getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)))
        return float(event.self_cpu_time_total)

    def table(events: list[Any]) -> list[dict]:
        events = [event for event in events if own_time(event) > 0]
        total = sum(own_time(event) for event in events) or 1.0
        events.sort(key=own_time, reverse=True)
        return [
            {
                "op": event.key,
                "calls_per_update": round(event.count / n_updates, 2),
                "ms_per_update": round(own_time(event) / 1e3 / n_updates, 3),
                "share": round(own_time(event) / total, 4),
            }
            for event in events[:PROFILE_TOP]
        ]

    averages = list(profiler.key_averages())
    operators = table([event for event in averages if event.device_type == DeviceType.CPU])
    kernels = table([event for event in averages if event.device_type != DeviceType.CPU])
    return {"operators": operators, "kernels": kernels}


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    acts = synthetic_activations(args.models, args.tokens, args.layers, args.d_mlp, device)
    shapes = [ModelShape(f"model-{i}", args.layers, args.d_mlp) for i in range(args.models)]
    pairs = model_pairs(args.models, args.reference_only)
    batch = ActivationBatch(
        row_start=0,
        tokens=torch.zeros(1, args.tokens, dtype=torch.int64, device=device),
        counted=torch.ones(1, args.tokens, dtype=torch.bool, device=device),
        hook_post={shape.name: act for shape, act in zip(shapes, acts, strict=True)},
        hook_pre={},
    )
    precisions = args.precision.split(",") if args.precision else [None]
    reference = None
    if args.error_reference:
        reference = closed_results(shapes, CorrelationConfig(precision="float64"), batch, device)
    rows = []
    for precision in precisions:
        config = CorrelationConfig(precision=precision, reference_only=args.reference_only)  # type: ignore[arg-type]
        engine = CorrelationEngine(shapes, config, device=str(device))
        torch.backends.cuda.matmul.allow_tf32 = engine.precision == "tf32"
        functions = {
            "engine": lambda engine=engine: engine.update(batch),
            "ceiling": ceiling_update(acts, pairs, engine.precision, with_gram=False),
            "all_gemms": ceiling_update(acts, pairs, engine.precision, with_gram=True),
        }
        if not args.skip_paper:
            functions["paper"] = paper_update(acts, args.layers, args.d_mlp)
            functions["paper_baseline"] = paper_update(acts, args.layers, args.d_mlp, rotate=True)
        seconds = interleaved_medians(functions, device, args.repeats)
        profiled = profile_engine(functions["engine"], device, args.profile) if args.profile else None
        engine_seconds, ceiling_seconds, all_gemm_seconds = seconds["engine"], seconds["ceiling"], seconds["all_gemms"]
        n_passes = engine.n_passes
        del engine, functions
        if device.type == "cuda":
            torch.cuda.empty_cache()
        paper_seconds = seconds.get("paper")
        n_neurons = args.layers * args.d_mlp
        pair_tokens = args.tokens * len(pairs)
        result = {
            "bench": "correlation",
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "models": args.models,
            "pairs": len(pairs),
            "neurons_per_model": n_neurons,
            "tokens_per_batch": args.tokens,
            "precision": config.resolved_precision(device),
            "passes": n_passes,
            "engine_tokens_per_s_per_pair": round(pair_tokens / engine_seconds, 1),
            "ceiling_tokens_per_s_per_pair": round(pair_tokens / ceiling_seconds, 1),
            "fraction_of_ceiling": round(ceiling_seconds / engine_seconds, 3),
            "fraction_of_all_gemms": round(all_gemm_seconds / engine_seconds, 3),
            "engine_tflops_cross_products": round(2 * n_neurons**2 * pair_tokens / engine_seconds / 1e12, 3),
        }
        if paper_seconds is not None:
            # The paper needs two runs for what the engine gives in one: correlations, then the rotated baseline.
            paper_total = paper_seconds + seconds["paper_baseline"]
            result["paper_tokens_per_s_per_pair"] = round(args.tokens / paper_total, 1)
            result["paper_tokens_per_s_per_pair_without_baseline"] = round(args.tokens / paper_seconds, 1)
            result["ratio_to_paper"] = round((pair_tokens / engine_seconds) / (args.tokens / paper_total), 2)
        if profiled is not None:
            result["profiled_updates"] = args.profile
            result.update(profiled)
        if reference is not None:
            result["error_against"] = "float64"
            result.update(error_against(closed_results(shapes, config, batch, device), reference))
        rows.append(result)
        print(json.dumps(result), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", type=int, default=5, help="family size (all pairs)")
    parser.add_argument("--reference-only", action="store_true")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d-mlp", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=4096, help="counted tokens per batch")
    parser.add_argument(
        "--precision",
        default=None,
        help="comma-separated: float32/float64 (CPU), tf32/bfloat16/fp8/fp8-fast (CUDA; fp8 also on CPUs)",
    )
    parser.add_argument(
        "--error-reference",
        action="store_true",
        help="also close one batch's pass in each precision and in float64 and report the error in rho",
    )
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-paper", action="store_true", help="skip the (slow) paper-way timing")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="also profile N engine updates (torch.profiler) and report the operators taking most of the device's "
        "time (the CPU's on a CPU): where the engine's time beyond the bare GEMMs goes",
    )
    run(parser.parse_args())


if __name__ == "__main__":
    main()
