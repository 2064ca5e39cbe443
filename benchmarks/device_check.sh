#!/usr/bin/env bash
# One command for a lent GPU, at most about 7 minutes: benchmarks first (what a device window is for), then the
# GPU tests.
#   0. the plan's Triton configs compiled in parallel processes (benchmarks/warm_cache.py);
#   1. op benchmark (bf16): the plan in bench_diff_attn.DEVICE_CHECK, most important rows first (N = 4096 d = 64,
#      the DiffCLIP shapes, d = 128, causal, N = 1024 / 8192) against every baseline a user would run, with a row
#      budget, then a time-boxed config sweep (each kernel timed alone, two passes);
#   1b. LM benchmark (bf16, benchmarks/bench_lm.py): decode steps at B = 1 and 32 with 4k and 32k caches against
#      two SDPA calls and the bandwidth floor, then varlen against padding; its rows go under "lm" in
#      bench_diff_attn.json (the device tool returns at most 8 files);
#   2. model benchmark (encode_image/encode_text B=256, train step B=128; eager, sdpa, triton, plain CLIP, then
#      the +compile rows as the row budget allows);
#   3. profiles: one op forward+backward at the DiffCLIP shapes (GPU time per kernel, host time), and one
#      training step per backend (GPU busy vs wall time, GPU time by category, launches per step);
#   4. GPU tests (bf16 numerics, determinism, the model, 64-bit offsets, Inductor/CUDA graphs), two processes.
# Every step runs under `timeout -s INT`: Python sees KeyboardInterrupt, so the benchmarks keep the JSON they rewrite
# after every row and pytest prints its summary; a step that ignores it is killed 10-15 s later. Each test also has
# its own limit (DIFFCLIP_TEST_TIMEOUT_S, tests/conftest.py), so one hung test cannot eat the step. No output is
# piped through `head` (an early-closing pipe kills the writer with BrokenPipeError). At most 8 files go to $OUT
# (or the folder given as $1): the device tool returns no more.
#
#   PYTHONPATH=. bash benchmarks/device_check.sh [OUTDIR]
#
# Copy the files into benchmarks/results/<date>-<card>/ unedited and commit them (`python -m benchmarks.plots
# OUTDIR/bench_diff_attn.json plot.png` redraws the plot locally).
#
# Without a CUDA device it runs as a dry run (Triton interpreter, --smoke sizes, a few CPU tests) so that the
# script's own plumbing is tested in CI before device time is spent on it.
set -uo pipefail
source "$(dirname "$0")/device_env.sh"  # OUTDIR, PY, SMOKE (dry run without CUDA)
status=0
# Step limits in seconds (the sum is 415 s; a step that ignores SIGINT is killed 10 s after its limit). The LM step's
# 30 s came out of the op (110 -> 100) and model (120 -> 100) steps, whose row budgets shrank with them.
T_WARM=60 T_OP=100 T_LM=30 T_MODEL=100 T_PROFILE=25 T_TESTS=75
export DIFFCLIP_TEST_TIMEOUT_S="${DIFFCLIP_TEST_TIMEOUT_S:-60}"
# GPU-only checks: bf16 numerics (incl. correlated maps), determinism, the model, 64-bit row offsets (fused-QKV
# layout, rows > 2^31 elements apart), the autotune disk cache, a second GPU when there is one.
# (The ahead-of-time compile check is marked "aot" and runs in CPU CI, not here.)
TEST_FILTER="(bfloat16 or deterministic or test_model or lambda_zero or saved_for_backward"
TEST_FILTER+=" or past_2_pow_31 or disk_cache or second_gpu"
# torch.library op under Inductor: fullgraph forward+backward, dynamic shapes, CUDA-graph capture, reduce-overhead,
# and the model's encoders compiled with the triton backend.
TEST_FILTER+=" or (test_ops and (fullgraph or dynamic or cuda_graph or reduce_overhead or autocast or opcheck))"
TEST_FILTER+=" or encoders_compile_fullgraph"
# The launch policy on a real GPU: no autotuning inside a CUDA-graph capture, one choice for the training and the
# inference forward (same bits), the policy tests, double backward's error, no zero gradients.
TEST_FILTER+=" or capture_at_unseen_batch or same_bits_with_and_without_saved_state or test_autotune_policy"
TEST_FILTER+=" or double_backward or zero_gradients"
# The long-sequence forward rows on a GPU (the SPLIT form hands O2 between threads through global memory).
TEST_FILTER+=" or test_fwd_long) and not test_model_smoke"  # (the smoke compiles ViT-B 6 times)
# "test_ops" above also matches tests/kernels/test_ops_lm.py: its Inductor compiles do not fit this step's limit
# next to the dense op's; CPU CI runs them under aot_eager.
TEST_FILTER+=" and not test_ops_lm"
if [ ${#SMOKE[@]} -gt 0 ]; then TEST_FILTER="deterministic"; fi  # dry run: a few CPU tests

# step NAME LIMIT LOG COMMAND...: run with `timeout -s INT`, output appended to LOG (its tail to the console).
step() {
    local name="$1" limit="$2" log="$3"; shift 3
    echo "== $name (limit ${limit} s)" | tee -a "$log"
    timeout -s INT -k 10 "$limit" "$@" >> "$log" 2>&1
    local rc=$?
    tail -n 25 "$log"
    echo "-- $name: exit $rc"
    [ "$rc" -eq 0 ] || status=1
}

echo "== environment (also at the top of bench_diff_attn.log)"
{
    if [ ${#SMOKE[@]} -eq 0 ]; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; fi
    "$PY" - <<'PY'
import torch, triton
print("torch", torch.__version__, "| cuda", torch.version.cuda, "| cudnn", torch.backends.cudnn.version(),
      "| triton", triton.__version__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE")
PY
} 2>&1 | tee "$OUTDIR/bench_diff_attn.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

# Autotuning compiles every candidate on first sight, one after the other: compile them first, in parallel processes
# (Triton's on-disk cache is shared), so that the op benchmark's budget goes to timing.
step "warm the kernel cache (compile the plan's configs in parallel)" "$T_WARM" "$OUTDIR/bench_diff_attn.log" \
    "$PY" -m benchmarks.warm_cache "${SMOKE[@]}"

step "op benchmark: DEVICE_CHECK plan, bf16, then a reduced config sweep" "$T_OP" "$OUTDIR/bench_diff_attn.log" \
    "$PY" -m benchmarks.bench_diff_attn --shapes device-check --dtypes bf16 --budget-s 67 \
    --sweep reduced --sweep-budget-s 20 --json "$OUTDIR/bench_diff_attn.json" "${SMOKE[@]}"

# Decode rows first (the Llama-like H = 16, Hkv = 4, d = 128), then varlen; rows past the budget are recorded as
# skipped. Written under the key "lm" of the op benchmark's JSON, after that benchmark has finished with it.
step "LM benchmark: decode B=1/32 cache 4k/32k vs sdpa x2 and the bandwidth floor, varlen vs padding, bf16" \
    "$T_LM" "$OUTDIR/bench_diff_attn.log" \
    "$PY" -m benchmarks.bench_lm --budget-s 22 --json "$OUTDIR/bench_diff_attn.json" --json-key lm "${SMOKE[@]}"

# The +compile rows last (Inductor compiles ViT-B/16 afresh per row): what the row budget leaves out is recorded
# as skipped; benchmarks/device_check_compile.sh runs them all in a call of their own.
step "model benchmark: encode_image B=256, encode_text B=256, train step B=128, bf16" "$T_MODEL" \
    "$OUTDIR/bench_model.log" \
    "$PY" -m benchmarks.bench_model --dtypes bf16 --image-batches 256 --text-batch 256 --train-batch 128 \
    --backends eager,sdpa,triton,plain-clip,triton+compile,plain-clip+compile,sdpa+compile --budget-s 75 \
    --json "$OUTDIR/bench_model.json" "${SMOKE[@]}"

step "profile: one op forward+backward, triton and sdpa2, text and vision" "$T_PROFILE" "$OUTDIR/profile.log" \
    "$PY" -m benchmarks.profile_op --shapes text,vision --providers triton,sdpa2 --json "$OUTDIR/profile.json" \
    "${SMOKE[@]}"
step "profile: one training step B=128 per backend (GPU busy vs wall, time by category)" "$T_PROFILE" \
    "$OUTDIR/profile.log" \
    "$PY" -m benchmarks.profile_model --backends sdpa,triton,plain-clip --batch 128 \
    --json "$OUTDIR/profile_model.json" "${SMOKE[@]}"

echo "== GPU tests (limit ${T_TESTS} s, ${DIFFCLIP_TEST_TIMEOUT_S} s per test; the compile check runs in CPU CI)"
# No -x: one failure must not hide the others. Two processes (Triton compiles on one CPU core each).
TESTS_TMP="$(mktemp -d)"
run_tests() {  # name, test paths...
    local name="$1"; shift
    timeout -s INT -k 15 "$T_TESTS" "$PY" -m pytest "$@" -q -p no:cacheprovider -rfE --durations=8 -m "not aot" \
        -k "$TEST_FILTER" > "$TESTS_TMP/$name.log" 2>&1
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

echo "== done (status $status); results in $OUTDIR"
exit $status
