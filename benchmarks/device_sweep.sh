#!/usr/bin/env bash
# The config sweep of issues 17 and 18, a device call of its own beside device_check.sh: every fitting row of each
# kernel (inference and training forward, dK/dV, dQ), each checked against the reference, then timed alone from the
# profiler's device time, twice, at N = 4096 (d = 64 / 128, causal or not), N = 1024 / 8192 and the DiffCLIP shapes
# (benchmarks/sweep.py LONG), most important first under a row budget; then the winners. At most about 9 minutes
# (`timeout -s INT`: the JSON, rewritten after every row, keeps what finished).
#
#   PYTHONPATH=. bash benchmarks/device_sweep.sh [OUTDIR]
#
# Without a CUDA device: a dry run (interpreter, the smoke sweep) that tests the plumbing in CI.
set -uo pipefail
source "$(dirname "$0")/device_env.sh"  # OUTDIR, PY, SMOKE (dry run without CUDA)
# Compile the rows in parallel first (Triton's on-disk cache is shared; N = 1024/4096/8192 share one specialisation).
timeout -s INT -k 10 60 "$PY" -m benchmarks.warm_cache "${SMOKE[@]}" > "$OUTDIR/sweep.log" 2>&1
timeout -s INT -k 15 480 "$PY" -m benchmarks.bench_diff_attn --sweep long --sweep-only --sweep-budget-s 420 \
    --dtypes bf16 --json "$OUTDIR/sweep.json" "${SMOKE[@]}" >> "$OUTDIR/sweep.log" 2>&1
rc=$?
grep -E "^sweep winner" "$OUTDIR/sweep.log"
tail -n 5 "$OUTDIR/sweep.log"
echo "== done (exit $rc); results in $OUTDIR"
exit $rc
