"""The ``universal-neurons`` command: train the embedded family, precompute an atlas, migrate, serve.

Every input error ends the command with one clear line on stderr and a non-zero exit code, before any file
that could look like a finished result is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from precompute.correlation import BASELINES, PRECISIONS, CorrelationConfig, CorrelationError
from precompute.data import DataError, DatasetConfig
from precompute.models import ModelLoadError
from precompute.pipeline import DEFAULT_STAGES, STAGE_FACTORIES, PrecomputeConfig
from precompute.stage_config import ConfigError

logger = logging.getLogger("universal_neurons")

#: Errors that mean "the input is wrong": reported as one line, exit code 2.
USER_ERRORS: tuple[type[Exception], ...] = (ModelLoadError, DataError, CorrelationError, ConfigError, FileNotFoundError)


def _positive_int(text: str) -> int:
    value = int(text.replace("_", ""))
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _stage_list(text: str) -> tuple[str, ...]:
    stages = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in stages if s not in STAGE_FACTORIES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown stage {unknown[0]!r}; choose from {', '.join(STAGE_FACTORIES)}")
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
    data = parser.add_argument_group("dataset")
    data.add_argument("--tokens", type=int, default=DatasetConfig.tokens, help="tokens to run (default %(default)s)")
    data.add_argument(
        "--dataset",
        default="stdlib",
        help="stdlib (held-out stdlib files), stdlib:all, a .txt/.jsonl file or folder, or hf:NAME",
    )
    data.add_argument("--ctx", type=int, default=None, help="tokens per row (default: min(256, model context))")
    data.add_argument("--batch-size", type=_positive_int, default=DatasetConfig.batch_size, help="rows per batch")
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
        help="per-batch products (default float32 on CPU, bfloat16 on CUDA)",
    )
    corr.add_argument("--memory-budget-gb", type=float, default=None, help="memory for accumulators")
    corr.add_argument("--threshold", type=float, default=0.5, help="excess correlation that counts as universal")
    run = parser.add_argument_group("run")
    run.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    run.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="model weights")
    run.add_argument(
        "--stages",
        type=_stage_list,
        default=None,
        help=f"comma-separated stages to run (all by default): {', '.join(STAGE_FACTORIES)}",
    )
    run.add_argument("--checkpoint-seconds", type=float, default=300.0, help="seconds between checkpoints")
    run.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="STAGE.KEY=VALUE",
        help="a stage setting, e.g. roles.intervention_rows=24 or stats.pre_range=[-10,15] (JSON values; "
        "repeatable; see docs/analyses.md and docs/roles.md)",
    )


def _add_db(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("db", help="database maintenance")
    db_commands = parser.add_subparsers(dest="db_command", required=True)
    upgrade = db_commands.add_parser("upgrade", help="apply Alembic migrations to an existing atlas file")
    upgrade.add_argument("path", type=Path)


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
    return parser


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
        batch_size=args.batch_size,
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
        analysis=parse_settings(args.settings),
    )


def _train(args: argparse.Namespace, argv: Sequence[str]) -> None:
    from precompute.gpt_train import TrainConfig, train_family

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
    from precompute.pipeline import run_precompute

    run_precompute(precompute_config(args))


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    from app.main import create_app
    from app.settings import Settings

    if not args.db.is_file():
        raise FileNotFoundError(f"no atlas file at {args.db}; run `universal-neurons precompute` first")
    if args.workers > 1:  # several processes need an importable factory; it reads UNA_* settings
        os.environ["UNA_DB_PATH"] = str(args.db.resolve())
        uvicorn.run("app.main:app_from_environment", factory=True, host=args.host, port=args.port, workers=args.workers)
    else:
        uvicorn.run(create_app(Settings(db_path=args.db)), host=args.host, port=args.port)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "train":
            _train(args, argv)
        elif args.command == "precompute":
            _precompute(args)
        elif args.command == "db":
            from precompute.store import upgrade

            if not args.path.is_file():
                raise FileNotFoundError(f"no atlas file at {args.path}")
            upgrade(args.path)
        elif args.command == "serve":
            _serve(args)
    except USER_ERRORS as exc:
        sys.stderr.write(f"universal-neurons: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("universal-neurons: interrupted; run the same command again to resume\n")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
