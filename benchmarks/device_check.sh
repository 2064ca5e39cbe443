#!/usr/bin/env bash
# One command for a lent GPU, about 6-7 minutes (step timeouts 180 + 150 + 70 + 45 s; the first H200 run of the old
# 160 + 120 + 70 s script took 240 s): prints the GPU/driver/torch/Triton, runs the GPU tests (two pytest processes
# side by side: kernels, and model + benchmarks), then the op benchmark (forward, and forward+backward) at the
# DiffCLIP shapes and N=4096 against eager PyTorch and SDPA with a time-boxed config sweep, then a reduced end-to-end
# model benchmark, then a profile of one forward+backward at the DiffCLIP shapes. At most 8 files go to $OUT (or the
# folder given as $1): the device tool returns no more.
#
#   PYTHONPATH=. bash benchmarks/device_check.sh [OUTDIR]
#
# Copy the JSON files into benchmarks/results/ named with the date and the card, and commit them.
#
# Without a CUDA device it runs as a dry run (Triton interpreter, --smoke sizes, a few CPU tests) so that the
# script's own plumbing is tested in CI before device time is spent on it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR="${1:-${OUT:-benchmarks/results/latest}}"
mkdir -p "$OUTDIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python}"  # the interpreter with torch and Triton
status=0
SMOKE=()
# GPU-only checks: bf16 numerics (incl. correlated maps), determinism, the model, 64-bit row offsets (fused-QKV
# layout, rows > 2^31 elements apart), the autotune disk cache, a second GPU when there is one.
# (The ahead-of-time compile check is marked "aot" and runs in CPU CI, not here.)
TEST_FILTER="(bfloat16 or deterministic or test_model or lambda_zero or saved_for_backward"
TEST_FILTER+=" or past_2_pow_31 or disk_cache or second_gpu"
# torch.library op under Inductor: fullgraph forward+backward, dynamic shapes, CUDA-graph capture, reduce-overhead,
# and the model's encoders compiled with the triton backend.
TEST_FILTER+=" or (test_ops and (fullgraph or dynamic or cuda_graph or reduce_overhead or autocast or opcheck))"
TEST_FILTER+=" or encoders_compile_fullgraph) and not test_model_smoke"  # (the smoke compiles ViT-B 6 times)
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "!! no CUDA device: dry run (interpreter, smoke sizes); these numbers mean nothing"
    export TRITON_INTERPRET=1
    SMOKE=(--smoke)
    TEST_FILTER="deterministic"
fi

echo "== environment"
if [ ${#SMOKE[@]} -eq 0 ]; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || status=1; fi
"$PY" - <<'PY' | tee "$OUTDIR/environment.txt"
import torch, triton
print("torch", torch.__version__, "| cuda", torch.version.cuda, "| triton", triton.__version__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE")
PY

echo "== GPU tests (bf16 numerics, determinism, model backends; the compile check runs in CPU CI)"
# No -x: one failure must not hide the others. Two processes (Triton compiles on one CPU core each).
TESTS_TMP="$(mktemp -d)"
run_tests() {  # name, test paths...
    local name="$1"; shift
    timeout 180 "$PY" -m pytest "$@" -q -p no:cacheprovider -rfE --durations=8 -m "not aot" -k "$TEST_FILTER" \
        > "$TESTS_TMP/$name.log" 2>&1
    echo "$?" > "$TESTS_TMP/$name.rc"
}
run_tests kernels tests/kernels &
run_tests model tests/diffclip tests/benchmarks &
wait
for name in kernels model; do
    rc="$(cat "$TESTS_TMP/$name.rc")"
    { echo "===== $name tests: exit $rc"; cat "$TESTS_TMP/$name.log"; } >> "$OUTDIR/gpu_tests.log"
    echo "-- $name tests: exit $rc"; grep -E "^(FAILED|ERROR)|passed|failed" "$TESTS_TMP/$name.log" | tail -n 15
    # 5: no test selected (a group the filter leaves empty) is not a failure
    [ "$rc" -eq 0 ] || [ "$rc" -eq 5 ] || status=1
done

echo "== op benchmark: forward and forward+backward, bf16, and a reduced config sweep"
timeout 150 "$PY" -m benchmarks.bench_diff_attn --shapes device-check --modes fwd,fwd+bwd --dtypes bf16 \
    --providers triton,eager,sdpa2,sdpa4 --sweep reduced --sweep-budget-s 40 \
    --json "$OUTDIR/bench_diff_attn.json" --plot "$OUTDIR/bench_diff_attn.png" \
    "${SMOKE[@]}" \
    2>&1 | tee "$OUTDIR/bench_diff_attn.log" | tail -n 30
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== model benchmark: encode_image B=256, encode_text B=256, train step B=128, bf16"
# (The +compile rows are left to full runs: Inductor compiling ViT-B/16 three times would not fit the budget. No
# plot: the JSON holds it, and $OUT returns at most 8 files.)
timeout 70 "$PY" -m benchmarks.bench_model --dtypes bf16 --image-batches 256 --text-batch 256 --train-batch 128 \
    --backends eager,sdpa,triton \
    --json "$OUTDIR/bench_model.json" "${SMOKE[@]}" \
    2>&1 | tee "$OUTDIR/bench_model.log" | tail -n 20
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== profile: one forward+backward, triton and two SDPA calls, text and vision (GPU time per kernel, host time)"
timeout 45 "$PY" -m benchmarks.profile_op --shapes text,vision --providers triton,sdpa2 \
    --json "$OUTDIR/profile.json" "${SMOKE[@]}" \
    2>&1 | tee -a "$OUTDIR/bench_diff_attn.log" | grep -E "^(==|   (GPU|host))" | head -n 60
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== done (status $status); results in $OUTDIR"
exit $status
