#!/usr/bin/env bash
# The GPU measurements of issue 11 in one call (a lent GPU is held for minutes, not hours): the correlation
# engine's bench in bf16, fp8 and TF32 with its error in rho against float64, then the whole precompute of two
# random-init GPT-2-small-shaped models over 1M stdlib tokens with default settings, and its run record.
#
#   bash bench/gpu_session.sh                      # on the GPU machine, from the repository root
#   DEVICE=cpu SMALL=1 bash bench/gpu_session.sh   # the same steps at toy shapes on a CPU (a dry run of the script)
#
# STEPS picks the steps and their order (default: "bench models default", plus those the older variables below
# ask for): gpu-tests (the `slow` CUDA tests), bench, profile, bench5, models, default, tuned, scale. Each has a
# time limit:
#   bench    bench/correlation.py, one pair, at each of BENCH_TOKENS (default 12288) tokens a batch, PRECISIONS
#            (default bfloat16,fp8,tf32), BENCH_REPEATS rounds; the error against float64 at the first size unless
#            BENCH_ERROR=0; BENCH_SECONDS in all (200)
#   profile  bench/correlation.py --profile PROFILE_UPDATES (3) at the first of BENCH_TOKENS, PRECISIONS: the CUDA
#            kernels taking the engine's time, beside its throughput (PROFILE_SECONDS, 120)
#   bench5   the same as bench with five models, --reference-only (BENCH5_SECONDS); BENCH5_ALL=1: all 10 pairs
#   default  the whole precompute, default settings, 1M tokens (PRECOMPUTE_SECONDS, 330)
#   tuned    the correlations alone with the card's memory (TUNED_BUDGET_GB, 60) and 12,288-token batches
#            (TUNED_SECONDS)
#   scale    bench/scale.py at SCALE_TOKENS (default "16384 65536") under --memory-budget-gb SCALE_BUDGET_GB (default
#            TUNED_BUDGET_GB; empty: the default budget), every atlas kept and sized (SCALE_SECONDS)
# Earlier sessions' selections, in the older variables (each still sets its step):
#   TUNED_SECONDS=120 bash bench/gpu_session.sh
#   PRECISIONS=bfloat16,fp8,fp8-fast BENCH5_SECONDS=60 SKIP_DEFAULT=1 TUNED_SECONDS=110 SCALE_SECONDS=230 \
#       bash bench/gpu_session.sh
# The third session's (an H200): STEPS="models gpu-tests bench scale" PRECISIONS=bfloat16,fp8,fp8-fast BENCH_ERROR=0
#   BENCH_REPEATS=5 BENCH_TOKENS="12288 24576" SCALE_TOKENS="1000000 65536" SCALE_BUDGET_GB= bash bench/gpu_session.sh
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
    BENCH=(--models 2 --layers 2 --d-mlp 256)
    BENCH_SIZES="${BENCH_TOKENS:-2048}"
    SHAPE=(2 128 512 4)
    TOKENS=4000
else
    BENCH=(--models 2 --layers 12 --d-mlp 3072)
    BENCH_SIZES="${BENCH_TOKENS:-12288}"
    SHAPE=()
    TOKENS=1000000
fi
PRECISIONS="${PRECISIONS:-bfloat16,fp8,tf32}"

step_gpu_tests() {
    echo "== the slow (CUDA) tests ($(date -u +%T))"
    timeout "${GPU_TESTS_SECONDS:-90}" "$PY" -m pytest -q -p no:cacheprovider --run-slow tests/unit/test_weights.py \
        -k gpu 2>&1 | tail -n 15 | tee "$OUT/gpu-tests.txt"
}

step_bench() {
    echo "== correlation bench at ${BENCH_SIZES} tokens a batch ($(date -u +%T))"
    local error=(--error-reference) deadline=$(($(date +%s) + ${BENCH_SECONDS:-200})) size
    [[ "${BENCH_ERROR:-1}" == 0 ]] && error=()
    for size in $BENCH_SIZES; do
        (($(date +%s) < deadline)) || break
        timeout $((deadline - $(date +%s))) "$PY" bench/correlation.py --device "$DEVICE" "${BENCH[@]}" --tokens "$size" \
            --repeats "${BENCH_REPEATS:-9}" --skip-paper --precision "$PRECISIONS" "${error[@]}" \
            | tee -a "$OUT/correlation.jsonl"
        error=()  # the error against float64 once, at the first size
    done
}

step_profile() {  # where the engine's time beyond the bare GEMMs goes, kernel by kernel
    echo "== correlation bench with a profile of ${PROFILE_UPDATES:-3} updates ($(date -u +%T))"
    timeout "${PROFILE_SECONDS:-120}" "$PY" bench/correlation.py --device "$DEVICE" "${BENCH[@]}" \
        --tokens "${BENCH_SIZES%% *}" --repeats "${BENCH_REPEATS:-9}" --skip-paper --precision "$PRECISIONS" \
        --profile "${PROFILE_UPDATES:-3}" 2>/dev/null | tee -a "$OUT/correlation-profile.jsonl" | "$PY" -c '
import json, sys
for line in sys.stdin:
    row = json.loads(line)
    print(row["precision"], row["engine_tokens_per_s_per_pair"], "of", row["ceiling_tokens_per_s_per_pair"])
    for kind in ("operators", "kernels"):
        for op in row.get(kind, []):
            print("   ", kind[:-1], op["ms_per_update"], "ms", op["share"], op["calls_per_update"], op["op"][:90])
'
}

step_bench5() {  # five models against the reference: the operands' casts shared by 4 pairs (all pairs: by 10)
    local pairs=(--reference-only) name="reference-only"
    [[ -n "${BENCH5_ALL:-}" ]] && pairs=() && name="all pairs"
    echo "== correlation bench, five models, $name ($(date -u +%T))"
    timeout "${BENCH5_SECONDS:-60}" "$PY" bench/correlation.py --device "$DEVICE" "${BENCH[@]}" --models 5 \
        "${pairs[@]}" --tokens "${BENCH_SIZES%% *}" --repeats "${BENCH_REPEATS:-9}" --skip-paper \
        --precision "$PRECISIONS" | tee -a "$OUT/correlation-5.jsonl"
}

step_models() {
    echo "== models ($(date -u +%T))"
    mkdir -p "$FAMILY/tokenizer" && cp -r .whl/tokenizer/. "$FAMILY/tokenizer/"
    timeout 180 "$PY" .whl/paper_shape_family.py "$FAMILY" 2 "${SHAPE[@]}" || exit 1
}

step_default() {
    echo "== precompute, default settings, $TOKENS stdlib:all tokens ($(date -u +%T))"
    rm -f /tmp/gpu-atlas.db*
    local started status
    started=$(date +%s)
    timeout "${PRECOMPUTE_SECONDS:-330}" "$PY" -m cli.main precompute --db /tmp/gpu-atlas.db --device "$DEVICE" \
        --dataset stdlib:all --tokens "$TOKENS" "$FAMILY/seed-0" "$FAMILY/seed-1" >"$OUT/precompute.log" 2>&1
    status=$?
    echo "precompute exit $status after $(($(date +%s) - started)) s"
    tail -c 3000 "$OUT/precompute.log" | tr '\r' '\n' | tail -25
    run_record /tmp/gpu-atlas.db "$OUT/run.json"
    ls -la /tmp/gpu-atlas.db 2>/dev/null
    [[ -f /tmp/gpu-atlas.db ]] && atlas_size /tmp/gpu-atlas.db "$OUT/atlas_size.json"
}

# The correlation stage as the bench runs it: the whole card (one pass) and 12,288-token batches (48 rows of 256).
step_tuned() {
    echo "== precompute, correlations only, --memory-budget-gb ${TUNED_BUDGET_GB:-60} --batch-size 48 ($(date -u +%T))"
    rm -f /tmp/gpu-tuned.db*
    timeout "${TUNED_SECONDS:-110}" "$PY" -m cli.main precompute --db /tmp/gpu-tuned.db --device "$DEVICE" \
        --dataset stdlib:all --tokens "$TOKENS" --stages correlations --memory-budget-gb "${TUNED_BUDGET_GB:-60}" \
        --batch-size 48 "$FAMILY/seed-0" "$FAMILY/seed-1" >"$OUT/tuned.log" 2>&1
    echo "exit $?"
    "$PY" -c "import sqlite3; print(sqlite3.connect('/tmp/gpu-tuned.db').execute(
        'SELECT status, tokens_counted, timings FROM runs').fetchone())"
}

# bench/scale.py on the GPU: every stage of the family at a few token counts, its cost model and extrapolation.
step_scale() {
    local tokens="${SCALE_TOKENS:-16384 65536}" budget="${SCALE_BUDGET_GB-${TUNED_BUDGET_GB:-60}}" largest
    local options=(--limit-gb "${SCALE_LIMIT_GB:-100}" --keep /tmp/gpu-scale --out "$OUT/scale.jsonl")
    [[ -n "$budget" ]] && options+=(--budget-gb "$budget")
    echo "== bench/scale.py --device $DEVICE --tokens $tokens ${options[*]} ($(date -u +%T))"
    # shellcheck disable=SC2086  # the token counts are words
    timeout "${SCALE_SECONDS:-230}" "$PY" bench/scale.py --device "$DEVICE" --family "$FAMILY" --tokens $tokens \
        "${options[@]}" 2>&1 | tail -c 4000
    largest=$(printf '%s\n' $tokens | sort -n | tail -1)
    run_record "/tmp/gpu-scale/scale-$largest.db" "$OUT/scale-run.json"
    [[ -f "/tmp/gpu-scale/scale-$largest.db" ]] && atlas_size "/tmp/gpu-scale/scale-$largest.db" "$OUT/atlas_size.json"
}

atlas_size() {  # the atlas's bytes by table, and the projected 5-seed atlases
    "$PY" -m bench.atlas_size "$1" --project gpt2-small-5=184320:5 gpt2-medium-5=491520:5 >"$2" 2>&1
    head -c 600 "$2"; echo
}

run_record() {  # a run's status, timings and memory plan against its measured peaks
    "$PY" - "$1" "$2" <<'EOF'
import json, sqlite3, sys
try:
    with sqlite3.connect(sys.argv[1]) as conn:
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
json.dump({"summary": summary, "environment": environment}, open(sys.argv[2], "w"), indent=1)
print(json.dumps(summary))
EOF
}

if [[ -z "${STEPS:-}" ]]; then  # the older variables
    STEPS="bench"
    [[ -n "${BENCH5_SECONDS:-}" ]] && STEPS+=" bench5"
    STEPS+=" models"
    [[ -z "${SKIP_DEFAULT:-}" ]] && STEPS+=" default"
    [[ -n "${TUNED_SECONDS:-}" ]] && STEPS+=" tuned"
    [[ -n "${SCALE_SECONDS:-}" ]] && STEPS+=" scale"
fi
for step in $STEPS; do
    "step_${step//-/_}"
done
echo "== done ($(date -u +%T))"
