"""The ``universal-neurons`` command: train the embedded family, precompute an atlas, import the paper's tables,
compare two runs, migrate, serve.

Every input error ends the command with one clear line on stderr and a non-zero exit code, before any file
that could look like a finished result is written.

This package sits above `precompute` and `app` and may import both; neither imports it. The trainer and the web
stack are imported only by the commands that use them, so a precompute never loads either.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from precompute.compare import ComparisonError, RunComparison, compare_runs, parse_spec, resolve_spec
from precompute.correlation import BASELINES, PRECISIONS, CorrelationConfig, CorrelationError
from precompute.data import CUDA_BATCH_TOKENS, DataError, DatasetConfig, default_batch_rows
from precompute.distributed import log_prefix, process_group, rank_device
from precompute.memory import DEFAULT_SHARE
from precompute.models import ModelLoadError
from precompute.pipeline import PrecomputeConfig, run_precompute
from precompute.presets import PRESETS, merged_analysis
from precompute.published import PUBLISHED_MODELS, PublishedTableError, import_paper
from precompute.stage_config import ConfigError
from precompute.stages import DEFAULT_STAGES, STAGES_BY_NAME
from precompute.store import upgrade

logger = logging.getLogger("universal_neurons")

#: Errors that mean "the input is wrong": reported as one line, exit code 2.
USER_ERRORS: tuple[type[Exception], ...] = (ModelLoadError, DataError, CorrelationError, ConfigError, FileNotFoundError)
#: The same for the paper's tables and for comparisons (issue 7).
USER_ERRORS += (PublishedTableError, ComparisonError)


def _positive_int(text: str) -> int:
    value = int(text.replace("_", ""))
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _stage_list(text: str) -> tuple[str, ...]:
    stages = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in stages if s not in STAGES_BY_NAME]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown stage {unknown[0]!r}; choose from {', '.join(STAGES_BY_NAME)}")
    return stages


def _add_train(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("train", help="train the embedded family of tiny GPT-2s on the stdlib corpus")
    parser.add_argument("--out", type=Path, required=True, help="folder for seed-*/ model folders")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="init seeds")
    parser.add_argument("--tokens", type=int, default=None, help="training tokens per seed")
    parser.add_argument("--layers", type=int, default=None, help="number of layers")
    parser.add_argument("--d-model", type=int, default=None)
    parser.add_argument("--d-mlp", type=int, default=None)
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--ctx", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="rows per step")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate")
    parser.add_argument("--data-seed", type=int, default=None, help="seed of the one shared data order")
    parser.add_argument("--no-bf16", action="store_true", help="train in float32 instead of bf16 autocast")
    parser.add_argument(
        "--save-dtype", choices=["float32", "float16"], default="float32", help="dtype of the saved weights"
    )
    parser.add_argument("--device", default="cpu")


def _add_precompute(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "precompute",
        help="find universal neurons of a model family and write them to SQLite",
        description="MODELS: TransformerLens names (stanford-gpt2-small-a ...) or local Hugging Face folders; "
        "the first is the reference model.",
    )
    parser.add_argument("models", nargs="+", help="two or more models trained from different seeds")
    parser.add_argument("--db", type=Path, required=True, help="SQLite file to write (created or resumed)")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="set many options and stage settings at once (recorded in the run); options and --set given with it "
        "win. " + "; ".join(f"{p.name}: {p.summary}" for p in PRESETS.values()),
    )
    data = parser.add_argument_group("dataset")
    data.add_argument("--tokens", type=int, default=DatasetConfig.tokens, help="tokens to run (default %(default)s)")
    data.add_argument(
        "--dataset",
        default="stdlib",
        help="stdlib (held-out stdlib files), stdlib:all, a .txt/.jsonl file or folder, or hf:NAME",
    )
    data.add_argument("--ctx", type=int, default=None, help="tokens per row (default: min(--max-ctx, model context))")
    data.add_argument(
        "--max-ctx",
        type=int,
        default=DatasetConfig.max_ctx,
        help="tokens per row when --ctx is not given, unless the models' context is shorter (default %(default)s)",
    )
    data.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help=f"rows per batch, at most (the memory plan may take fewer; default {DatasetConfig.batch_size} on a CPU, "
        f"{CUDA_BATCH_TOKENS:,} tokens' worth on CUDA)",
    )
    data.add_argument("--text-field", default="text", help="text field of .jsonl files and HF datasets")
    data.add_argument("--hf-split", default="train", help="split of a Hugging Face dataset")
    data.add_argument("--keep-newlines", action="store_true", help="count newline tokens (the paper skips them)")
    data.add_argument("--keep-special", action="store_true", help="count BOS/EOS/pad tokens (the paper skips them)")
    corr = parser.add_argument_group("correlation")
    corr.add_argument(
        "--reference-only",
        action="store_true",
        help="correlate the first model with each other one only (not all pairs)",
    )
    corr.add_argument(
        "--baseline",
        choices=BASELINES,
        default="gaussian",
        help="rotation baseline: the paper's row-normalised Gaussian, or a Haar orthogonal matrix",
    )
    corr.add_argument("--baseline-seed", type=int, default=0)
    corr.add_argument("--top-k", type=_positive_int, default=5, help="best partner neurons kept per partner")
    corr.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="per-batch products (default float32 on CPU, bfloat16 on CUDA; fp8: e4m3 operands with a scale per "
        "neuron through torch._scaled_mm, for Hopper GPUs; fp8-fast: the same with the GEMM's fast accumulation, "
        "faster and less exact; their errors against float64 are in docs/performance.md)",
    )
    corr.add_argument(
        "--memory-budget-gb",
        type=float,
        default=None,
        help="memory the run may plan beyond its loaded models and the Python runtime (a batch, every stage's "
        "state and temporaries); it is split into more passes or smaller batches to fit, or refused before any "
        f"work. Default: {int(DEFAULT_SHARE * 100)}%% of the memory available once the models are loaded",
    )
    corr.add_argument("--threshold", type=float, default=0.5, help="excess correlation that counts as universal")
    run = parser.add_argument_group("run")
    run.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    run.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="model weights")
    run.add_argument(
        "--stages",
        type=_stage_list,
        default=None,
        help=f"comma-separated stages to run (all by default): {', '.join(STAGES_BY_NAME)}",
    )
    run.add_argument("--checkpoint-seconds", type=float, default=300.0, help="seconds between checkpoints")
    run.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="STAGE.KEY=VALUE",
        help="a stage setting, e.g. roles.intervention_rows=24 or stats.pre_range=[-10,15] (JSON values; "
        "repeatable; see docs/analyses.md and docs/roles.md). stats.tokens and families.tokens: counted (default: "
        "BOS/EOS/pad and newlines left out, the correlations' tokens) or all (every token, as the paper's "
        "statistics); stats/families/examples.max_tokens: use only the first N of those tokens",
    )


def _add_db(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("db", help="database maintenance")
    db_commands = parser.add_subparsers(dest="db_command", required=True)
    upgrade = db_commands.add_parser("upgrade", help="apply Alembic migrations to an existing atlas file")
    upgrade.add_argument("path", type=Path)


def _add_import_paper(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "import-paper",
        help="add the paper's published universal-neuron tables to an atlas, one complete run per model",
        description="Imports Gurnee et al. (2024)'s released universal.csv of each model (shipped with this package) "
        "as a 'published' run: its universal neurons with their correlations, weight statistics and pre-activation "
        "moments. Runs already in the file are kept; importing a table again does nothing.",
    )
    parser.add_argument("--db", type=Path, required=True, help="SQLite file to add the runs to (created or migrated)")
    parser.add_argument(
        "--model",
        dest="models",
        action="append",
        default=None,
        metavar="NAME",
        help=f"a published model (repeatable; default: all of {', '.join(PUBLISHED_MODELS)})",
    )


def _add_compare(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "compare",
        help="compare two runs of the same model: overlap of the universal sets, per layer, statistics",
        description="MODEL[@RUN]: a model's name, optionally with the run id (default: the newest complete run "
        "that has it). B is the reference: precision is the share of A's universal neurons that B confirms, "
        "recall the share of B's that A finds.",
    )
    parser.add_argument("--db", type=Path, required=True, help="the atlas file (opened read-only)")
    parser.add_argument("--a", required=True, metavar="MODEL[@RUN]", help="the run under test")
    parser.add_argument("--b", required=True, metavar="MODEL[@RUN]", help="the reference, e.g. the published run")
    parser.add_argument("--top", type=int, default=20, help="largest disagreements to list (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the comparison as JSON")


def _add_serve(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("serve", help="serve the dashboard and JSON API for an atlas file")
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--workers",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="server processes (default: 2, or 1 on a one-core machine; see docs/performance.md)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="universal-neurons", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_train(commands)
    _add_precompute(commands)
    _add_db(commands)
    _add_serve(commands)
    _add_import_paper(commands)
    _add_compare(commands)
    return parser


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    """Parse a command line. A precompute ``--preset`` becomes the defaults of the options it sets, and the line
    is parsed again, so options given alongside the preset win (its stage settings merge in `precompute_config`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    preset = PRESETS.get(getattr(args, "preset", None) or "")
    if preset is not None:
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        commands._name_parser_map["precompute"].set_defaults(**preset.options)
        args = parser.parse_args(argv)
    return args


def parse_settings(items: Sequence[str]) -> dict[str, dict[str, object]]:
    """``["roles.intervention_rows=24"]`` -> ``{"roles": {"intervention_rows": 24}}``; values are JSON or text.

    >>> parse_settings(["stats.bins=100", "examples.models=reference", "stats.pre_range=[-5, 5]"])
    {'stats': {'bins': 100, 'pre_range': [-5, 5]}, 'examples': {'models': 'reference'}}
    """
    settings: dict[str, dict[str, object]] = {}
    for item in items:
        key, equals, text = item.partition("=")
        stage, dot, name = key.partition(".")
        if not (equals and dot and stage and name):
            raise ConfigError(f"--set takes STAGE.KEY=VALUE, got {item!r}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        settings.setdefault(stage, {})[name] = value
    return settings


def precompute_config(args: argparse.Namespace) -> PrecomputeConfig:
    dataset = DatasetConfig(
        source=args.dataset,
        tokens=args.tokens,
        ctx=args.ctx,
        max_ctx=args.max_ctx,
        batch_size=args.batch_size or default_batch_rows(args.device, args.ctx or args.max_ctx),
        text_field=args.text_field,
        hf_split=args.hf_split,
        skip_special=not args.keep_special,
        skip_newline=not args.keep_newlines,
    )
    correlation = CorrelationConfig(
        baseline=args.baseline,
        baseline_seed=args.baseline_seed,
        top_k=args.top_k,
        precision=args.precision,
        reference_only=args.reference_only,
        memory_budget_gb=args.memory_budget_gb,
    )
    return PrecomputeConfig(
        db=args.db,
        models=tuple(args.models),
        dataset=dataset,
        correlation=correlation,
        threshold=args.threshold,
        device=args.device,
        dtype=args.dtype,
        stages=args.stages or DEFAULT_STAGES,
        checkpoint_seconds=args.checkpoint_seconds,
        analysis=merged_analysis(PRESETS.get(args.preset or ""), parse_settings(args.settings)),
        preset=args.preset,
    )


def _train(args: argparse.Namespace, argv: Sequence[str]) -> None:
    # lazy: only this command trains; a precompute must not load the trainer (precompute.training)
    from precompute.training.trainer import TrainConfig, train_family

    overrides = {
        "tokens_per_seed": args.tokens,
        "n_layers": args.layers,
        "d_model": args.d_model,
        "d_mlp": args.d_mlp,
        "n_heads": args.heads,
        "ctx": args.ctx,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "data_seed": args.data_seed,
    }
    config = TrainConfig(
        out_dir=args.out,
        seeds=tuple(args.seeds),
        bf16=not args.no_bf16,
        device=args.device,
        save_dtype=args.save_dtype,
        **{k: v for k, v in overrides.items() if v is not None},
    )
    train_family(config, command="universal-neurons " + shlex.join(argv))


def _precompute(args: argparse.Namespace) -> None:
    config = precompute_config(args)
    # under torchrun (docs/distributed.md): one rank per GPU, each on cuda:LOCAL_RANK; the group is torn down at
    # the end, whatever happens
    config = dataclasses.replace(config, device=rank_device(config.device))
    with process_group(config.device) as group:
        run_precompute(config, group)


def _import_paper(args: argparse.Namespace) -> None:
    if not args.db.parent.is_dir():
        raise FileNotFoundError(f"no folder {args.db.parent} for the atlas file")
    runs = import_paper(args.db, args.models)
    logger.info("the paper's tables are runs %s of %s", ", ".join(map(str, runs)), args.db)


def _compare(args: argparse.Namespace) -> None:
    if not args.db.is_file():
        raise FileNotFoundError(f"no atlas file at {args.db}")
    if args.top < 0:
        raise ComparisonError(f"--top must be at least 0, got {args.top}")
    (name_a, _), (name_b, _) = parse_spec(args.a), parse_spec(args.b)
    if name_a != name_b:
        raise ComparisonError(f"A is {name_a} and B is {name_b}: only two runs of the same model can be compared")
    result = compare_runs(args.db, resolve_spec(args.db, args.a), resolve_spec(args.db, args.b), top_k=args.top)
    sys.stdout.write(comparison_json(result) if args.json else comparison_text(result))


def comparison_json(result: RunComparison) -> str:
    """The comparison as JSON: every field of `RunComparison`, and each disagreement's difference."""
    body = dataclasses.asdict(result)
    for item, disagreement in zip(body["disagreements"], result.disagreements, strict=True):
        item["difference"] = disagreement.difference
    return json.dumps(body, indent=2) + "\n"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def comparison_text(result: RunComparison) -> str:
    """The comparison as a short report for a terminal."""
    agreement = result.agreement
    lines = [
        *(
            f"{label}: {side.model}@{side.run_id}: {side.n_universal} universal (excess > {side.threshold:g}) "
            f"of {side.n_neurons} neurons stored"
            for label, side in (("A", result.a), ("B", result.b))
        ),
        f"universal in both: {agreement.n_both}; Jaccard {_ratio(agreement.jaccard)}, "
        f"precision {_ratio(agreement.precision)} (of A's, B confirms), "
        f"recall {_ratio(agreement.recall)} (of B's, A finds)",
        "",
        f"{'layer':>5} {'A':>7} {'B':>7} {'both':>7}",
        *(f"{c.layer:>5} {c.universal_a:>7} {c.universal_b:>7} {c.universal_both:>7}" for c in result.layers),
        "",
        f"Pearson r over the {result.n_shared_neurons} neurons both runs hold:",
        *(f"  {c.statistic:<20} {_ratio(c.pearson):>8}  (n = {c.n_shared})" for c in result.correlations if c.n_shared),
        "",
        "largest disagreements of the excess correlation (A - B):",
        *(
            f"  L{d.layer}N{d.neuron:<6} {d.excess_a:8.4f} {d.excess_b:8.4f} {d.difference:+8.4f}"
            for d in result.disagreements
        ),
    ]
    return "\n".join(lines) + "\n"


#: Seconds a ``serve --workers N`` worker may take to answer uvicorn's health check (uvicorn >= 0.37 reads it).
WORKER_HEALTHCHECK_S = 120


def _serve(args: argparse.Namespace) -> None:
    # lazy: only this command needs the web stack (uvicorn, FastAPI, the templates)
    import uvicorn

    from app.main import create_app
    from app.settings import Settings

    if not args.db.is_file():
        raise FileNotFoundError(f"no atlas file at {args.db}; run `universal-neurons precompute` first")
    if args.workers > 1:  # several processes need an importable factory; it reads UNA_* settings
        os.environ["UNA_DB_PATH"] = str(args.db.resolve())
        # Each worker is a spawned process that first re-imports this command's module, and with it the precompute
        # (torch): seconds, 10 s on a busy two-core machine. uvicorn kills a worker that does not answer its health
        # check within 5 s by default, so workers were killed and respawned forever (tests/integration/test_serve.py).
        uvicorn.run(
            "app.main:app_from_environment",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            timeout_worker_healthcheck=WORKER_HEALTHCHECK_S,
        )
    else:
        settings = Settings(db_path=args.db)  # type: ignore[call-arg]  # the other fields have defaults
        uvicorn.run(create_app(settings), host=args.host, port=args.port)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_arguments(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=f"%(asctime)s %(levelname)s {log_prefix()}%(name)s: %(message)s",  # "[rank 1/2] " under torchrun
    )
    try:
        if args.command == "train":
            _train(args, argv)
        elif args.command == "precompute":
            _precompute(args)
        elif args.command == "db":
            if not args.path.is_file():
                raise FileNotFoundError(f"no atlas file at {args.path}")
            upgrade(args.path)
        elif args.command == "serve":
            _serve(args)
        elif args.command == "import-paper":
            _import_paper(args)
        elif args.command == "compare":
            _compare(args)
    except USER_ERRORS as exc:
        sys.stderr.write(f"universal-neurons: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("universal-neurons: interrupted; run the same command again to resume\n")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
