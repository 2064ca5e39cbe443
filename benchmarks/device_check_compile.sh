#!/usr/bin/env bash
# The model benchmark's torch.compile rows, a second device call beside device_check.sh (Inductor compiling
# ViT-B/16 afresh for every (task, batch) row does not fit that script's budget): encode_image B=256, encode_text
# B=256, train step B=128, bf16, for sdpa+compile, triton+compile and plain-clip+compile, with their uncompiled
# rows in the same run as the baselines. At most about 9 minutes (`timeout -s INT`: the JSON, rewritten after every
# row, keeps what finished).
#
#   PYTHONPATH=. bash benchmarks/device_check_compile.sh [OUTDIR]
#
# Without a CUDA device: a dry run (tiny model, aot_eager) that tests the plumbing in CI.
set -uo pipefail
source "$(dirname "$0")/device_env.sh"  # OUTDIR, PY, SMOKE (dry run without CUDA)
timeout -s INT -k 15 540 "$PY" -m benchmarks.bench_model --dtypes bf16 --image-batches 256 --text-batch 256 \
    --train-batch 128 --backends sdpa,triton,plain-clip,sdpa+compile,triton+compile,plain-clip+compile \
    --json "$OUTDIR/bench_model_compile.json" "${SMOKE[@]}" > "$OUTDIR/bench_model_compile.log" 2>&1
rc=$?
tail -n 30 "$OUTDIR/bench_model_compile.log"
echo "== done (exit $rc); results in $OUTDIR"
exit $rc
