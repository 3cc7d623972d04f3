#!/usr/bin/env bash
# The GPU measurements of issue 11 in one call (a lent GPU is held for minutes, not hours): the correlation
# engine's bench in bf16, fp8 and TF32 with its error in rho against float64, then the whole precompute of two
# random-init GPT-2-small-shaped models over 1M stdlib tokens with default settings, and its run record.
#
#   bash bench/gpu_session.sh                      # on the GPU machine, from the repository root
#   DEVICE=cpu SMALL=1 bash bench/gpu_session.sh   # the same steps at toy shapes on a CPU (a dry run of the script)
#   TUNED_SECONDS=120 bash bench/gpu_session.sh     # then the correlations alone with the card's memory and 12,288-
#                                                   # token batches (TUNED_BUDGET_GB, default 60)
#   PRECISIONS=bfloat16,fp8,fp8-fast BENCH5_SECONDS=60 SKIP_DEFAULT=1 TUNED_SECONDS=110 SCALE_SECONDS=230 \
#       bash bench/gpu_session.sh                   # the second session's selection: the bench also with five models
#                                                   # (--reference-only), no default 1M run, bench/scale.py on the GPU
#
# Needs what the GPU machine lacks as wheels in .whl/ (transformer-lens, sqlalchemy, alembic, mako, datasets, dill,
# multiprocess, greenlet: docs/performance.md says how they were fetched), the 50,257-token stdlib tokenizer in
# .whl/tokenizer and ../shared/tools/paper_shape_family.py copied to .whl/. Writes under $OUT (default /tmp/gpu-out).
set -u
OUT="${OUT:-/tmp/gpu-out}"
DEVICE="${DEVICE:-cuda}"
FAMILY="${FAMILY:-/tmp/gpu-family}"
mkdir -p "$OUT" "$FAMILY"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python3}"

if [[ "$DEVICE" == cuda* ]]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH="/tmp/site:$PWD"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
else
    export PYTHONPATH="$PWD"
fi
"$PY" -c "import torch, transformer_lens, sqlalchemy, alembic; print('torch', torch.__version__)" || exit 1

if [[ -n "${SMALL:-}" ]]; then  # toy shapes: checks the script, measures nothing
    BENCH=(--models 2 --layers 2 --d-mlp 256 --tokens 2048 --repeats 3)
    SHAPE=(2 128 512 4)
    TOKENS=4000
else
    BENCH=(--models 2 --layers 12 --d-mlp 3072 --tokens 12288 --repeats 9)
    SHAPE=()
    TOKENS=1000000
fi

echo "== correlation bench ($(date -u +%T))"
timeout "${BENCH_SECONDS:-200}" "$PY" bench/correlation.py --device "$DEVICE" "${BENCH[@]}" --skip-paper \
    --precision "${PRECISIONS:-bfloat16,fp8,tf32}" --error-reference | tee "$OUT/correlation.jsonl"
if [[ -n "${BENCH5_SECONDS:-}" ]]; then  # five models against the reference: the operands' casts shared by 4 pairs
    timeout "$BENCH5_SECONDS" "$PY" bench/correlation.py --device "$DEVICE" "${BENCH[@]}" --models 5 --reference-only \
        --skip-paper --precision "${PRECISIONS:-bfloat16,fp8,tf32}" | tee "$OUT/correlation-5.jsonl"
fi

echo "== models ($(date -u +%T))"
mkdir -p "$FAMILY/tokenizer" && cp -r .whl/tokenizer/. "$FAMILY/tokenizer/"
timeout 180 "$PY" .whl/paper_shape_family.py "$FAMILY" 2 "${SHAPE[@]}" || exit 1

if [[ -z "${SKIP_DEFAULT:-}" ]]; then
echo "== precompute, default settings, $TOKENS stdlib:all tokens ($(date -u +%T))"
rm -f /tmp/gpu-atlas.db*
started=$(date +%s)
timeout "${PRECOMPUTE_SECONDS:-330}" "$PY" -m cli.main precompute --db /tmp/gpu-atlas.db --device "$DEVICE" \
    --dataset stdlib:all --tokens "$TOKENS" "$FAMILY/seed-0" "$FAMILY/seed-1" >"$OUT/precompute.log" 2>&1
status=$?
echo "precompute exit $status after $(($(date +%s) - started)) s"
tail -c 3000 "$OUT/precompute.log" | tr '\r' '\n' | tail -25

"$PY" - "$OUT/run.json" <<'EOF'
import json, sqlite3, sys
try:
    with sqlite3.connect("/tmp/gpu-atlas.db") as conn:
        row = conn.execute("SELECT status, timings, environment, tokens_counted FROM runs").fetchone()
except Exception as exc:  # no file: the run did not get that far
    print("no run record:", exc)
    raise SystemExit(0)
status, timings, environment, counted = row
timings, environment = json.loads(timings or "{}"), json.loads(environment or "{}")
plan = environment.get("memory_plan", {})
summary = {"status": status, "tokens_counted": counted, "timings": timings,
           "plan_total_gib": round(plan.get("total", 0) / 2**30, 2),
           "measured_peak_rss_gib": round(plan.get("measured_peak_rss", 0) / 2**30, 2),
           "measured_peak_cuda_allocated_gib": round(plan.get("measured_peak_cuda_allocated", 0) / 2**30, 2),
           "split": plan.get("split")}
if timings.get("correlations") and counted:
    summary["correlation_tokens_per_s_per_pair"] = round(counted / timings["correlations"], 1)
json.dump({"summary": summary, "environment": environment}, open(sys.argv[1], "w"), indent=1)
print(json.dumps(summary))
EOF
ls -la /tmp/gpu-atlas.db 2>/dev/null
[[ -f /tmp/gpu-atlas.db ]] && "$PY" -m bench.atlas_size /tmp/gpu-atlas.db \
    --project gpt2-small-5=184320:5 gpt2-medium-5=491520:5 >"$OUT/atlas_size.json" 2>&1
fi

# The correlation stage as the bench runs it: the whole card (one pass) and 12,288-token batches (48 rows of 256).
if [[ -n "${TUNED_SECONDS:-}" ]]; then
    echo "== precompute, correlations only, --memory-budget-gb 60 --batch-size 48 ($(date -u +%T))"
    rm -f /tmp/gpu-tuned.db*
    timeout "$TUNED_SECONDS" "$PY" -m cli.main precompute --db /tmp/gpu-tuned.db --device "$DEVICE" \
        --dataset stdlib:all --tokens "$TOKENS" --stages correlations --memory-budget-gb "${TUNED_BUDGET_GB:-60}" \
        --batch-size 48 "$FAMILY/seed-0" "$FAMILY/seed-1" >"$OUT/tuned.log" 2>&1
    echo "exit $?"
    "$PY" -c "import sqlite3; print(sqlite3.connect('/tmp/gpu-tuned.db').execute(
        'SELECT status, tokens_counted, timings FROM runs').fetchone())"
fi
# bench/scale.py on the GPU: every stage of the family at a few token counts, its cost model and extrapolation.
if [[ -n "${SCALE_SECONDS:-}" ]]; then
    echo "== bench/scale.py --device $DEVICE --tokens ${SCALE_TOKENS:-16384 65536} ($(date -u +%T))"
    # shellcheck disable=SC2086  # the token counts are words
    timeout "$SCALE_SECONDS" "$PY" bench/scale.py --device "$DEVICE" --family "$FAMILY" --tokens ${SCALE_TOKENS:-16384 65536} \
        --budget-gb "${TUNED_BUDGET_GB:-60}" --limit-gb "${SCALE_LIMIT_GB:-100}" --out "$OUT/scale.jsonl" 2>&1 | tail -c 4000
fi
echo "== done ($(date -u +%T))"
