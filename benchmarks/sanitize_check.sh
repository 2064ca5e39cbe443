#!/usr/bin/env bash
# compute-sanitizer over the Triton kernels, for a lent GPU: memcheck, initcheck, synccheck and racecheck, each over
# benchmarks/sanitize_calls.py (forward and backward, causal and not, N = 1, 77, 197, 1000, d = 64 and 128, strided
# inputs, the SPLIT dK/dV row forced, fp16, bf16, fp32). At most 4m40s (step timeouts 90 + 60 + 50 + 35 + 45 s).
#
#   PYTHONPATH=. bash benchmarks/sanitize_check.sh [OUTDIR]
#
# First the calls run once without the sanitizer, which compiles every kernel they use into a private Triton cache:
# the tools then spend their time on the launches, not on compiling. Configs are fixed (DIFF_ATTN_AUTOTUNE=0 and
# deterministic mode): nothing is autotuned (timed) under a sanitizer. PYTORCH_NO_CUDA_MEMORY_CACHING=1 makes every
# tensor its own cudaMalloc, so memcheck sees an access past a tensor's end (inside one of PyTorch's cached blocks it
# would not) and initcheck sees an element no kernel wrote. racecheck, the slowest tool, gets the small call list.
#
# Files in OUTDIR: sanitize_compile.log, sanitize_<tool>.log for each tool, sanitize_summary.txt (one line per
# step). Exit status non-zero if a tool reports any error, a step fails or times out, or compute-sanitizer is not
# found (looked for: $COMPUTE_SANITIZER, PATH, $CUDA_HOME/bin, /usr/local/cuda/bin, the nvidia-cuda-sanitizer-api
# wheel).
#
# Without a CUDA device it runs as a dry run: the calls under Triton's interpreter at tiny sizes, no sanitizer, for
# the memcheck and racecheck steps only (the full and the small call list), so that CI tests the plumbing.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR="${1:-${OUT:-benchmarks/results/latest}}"
mkdir -p "$OUTDIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 DIFF_ATTN_AUTOTUNE=0
PY="${PYTHON:-python}"  # the interpreter with torch and Triton
SUMMARY="$OUTDIR/sanitize_summary.txt"
: > "$SUMMARY"
status=0

find_sanitizer() {
    local c
    for c in "${COMPUTE_SANITIZER:-}" "$(command -v compute-sanitizer 2>/dev/null)" \
             "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer; do
        if [ -n "$c" ] && [ -x "$c" ]; then echo "$c"; return 0; fi
    done
    c="$("$PY" - <<'PY' 2>/dev/null
import glob, os, sys
for base in sys.path:
    for hit in glob.glob(os.path.join(base, "nvidia", "cuda_sanitizer_api", "**", "compute-sanitizer"), recursive=True):
        if os.path.isfile(hit) and os.access(hit, os.X_OK):
            print(hit)
            raise SystemExit
PY
)"
    if [ -n "$c" ]; then echo "$c"; return 0; fi
    return 1
}

if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    DRY=0
    TOOLS=(memcheck initcheck synccheck racecheck)
    if ! SAN="$(find_sanitizer)"; then
        echo "!! compute-sanitizer not found (set COMPUTE_SANITIZER=/path/to/compute-sanitizer)" | tee -a "$SUMMARY"
        exit 3
    fi
    echo "== $("$SAN" --version | tail -n 1)" | tee -a "$SUMMARY"
    export PYTORCH_NO_CUDA_MEMORY_CACHING=1
    TRITON_CACHE_DIR="$(mktemp -d)"
    export TRITON_CACHE_DIR
    echo "== compile: the calls once without a sanitizer (Triton cache $TRITON_CACHE_DIR)"
    timeout 90 "$PY" benchmarks/sanitize_calls.py --calls full > "$OUTDIR/sanitize_compile.log" 2>&1
    rc=$?
    echo "compile: exit $rc" | tee -a "$SUMMARY"
    tail -n 1 "$OUTDIR/sanitize_compile.log"
    [ "$rc" -eq 0 ] || status=1
else
    echo "!! no CUDA device: dry run (interpreter, tiny sizes, no compute-sanitizer)"
    DRY=1
    TOOLS=(memcheck racecheck)
fi

declare -A LIMIT=([memcheck]=60 [initcheck]=50 [synccheck]=35 [racecheck]=45)
for tool in "${TOOLS[@]}"; do
    calls=full
    [ "$tool" = racecheck ] && calls=small
    log="$OUTDIR/sanitize_$tool.log"
    echo "== $tool ($calls call list)"
    if [ "$DRY" -eq 1 ]; then
        echo "dry run: no compute-sanitizer" > "$log"
        TRITON_INTERPRET=1 timeout "${LIMIT[$tool]}" "$PY" benchmarks/sanitize_calls.py --calls "$calls" --dry-run \
            >> "$log" 2>&1
        rc=$?
    else
        # --error-exitcode: a reported error fails the step even when the calls themselves succeed
        timeout "${LIMIT[$tool]}" "$SAN" --tool "$tool" --error-exitcode 99 --print-limit 20 \
            "$PY" benchmarks/sanitize_calls.py --calls "$calls" > "$log" 2>&1
        rc=$?
    fi
    errors="$(grep -E "ERROR SUMMARY" "$log" | tail -n 1)"
    # A non-zero error count fails the step even if the exit code says otherwise.
    if [ "$rc" -eq 0 ] && echo "$errors" | grep -qE "SUMMARY: [1-9][0-9]* error"; then rc=99; fi
    case "$rc" in
        0) verdict=ok ;;
        99) verdict="errors reported" ;;
        124) verdict="timed out after ${LIMIT[$tool]} s" ;;
        *) verdict="failed" ;;
    esac
    echo "$tool: exit $rc, $verdict${errors:+ | ${errors#========= }}" | tee -a "$SUMMARY"
    grep -E "^ok |^sanitize_calls" "$log" | tail -n 1
    [ "$rc" -eq 0 ] || status=1
done

echo "== done (status $status); logs in $OUTDIR"
exit $status
