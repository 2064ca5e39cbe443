# The prelude the device scripts share (sourced, with the caller's arguments): the repository root as working
# folder, OUTDIR ($1, else $OUT, else benchmarks/results/latest), PYTHONPATH, PY (the interpreter with torch and
# Triton, $PYTHON or python), and SMOKE: empty on a CUDA machine; on one without, a dry run (--smoke sizes under
# Triton's interpreter) so that CI tests a script's plumbing before device time is spent on it.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUTDIR="${1:-${OUT:-benchmarks/results/latest}}"
mkdir -p "$OUTDIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python}"
SMOKE=()
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "!! no CUDA device: dry run (interpreter, smoke sizes); these numbers mean nothing"
    export TRITON_INTERPRET=1
    SMOKE=(--smoke)
fi
