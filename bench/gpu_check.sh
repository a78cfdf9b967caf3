#!/usr/bin/env bash
# GPU validation in one command, for the GPU machine (torch + CUDA + triton
# preinstalled, no network): install without touching torch, build the CUDA
# library, run the whole suite on CUDA (cuda-marked and slow tests included),
# compute-sanitizer memcheck on one short run of each kernel, every benchmark,
# and the report with plots. Logs and JSON go to bench/results/ (and to $OUT
# when the device tool sets it).
#
#   bash bench/gpu_check.sh            # everything
#   SKIP_BENCH=1 bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=$(date -u +%Y%m%d-%H%M%S)
RESULTS=bench/results
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu-check-$STAMP.log"
status=0
step() {  # step NAME CMD...: run, log, remember failure, keep going
    local name=$1; shift
    echo "=== $name: $*" | tee -a "$LOG"
    local t0=$SECONDS
    "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || status=1
}

$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || { echo "gpu_check: no CUDA device" >&2; exit 2; }
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
step install $PY -m pip install --no-deps --no-build-isolation -e .
step doctor $PY -m spark_ext.cli doctor
step tests $PY -m pytest -q -rs tests
if command -v compute-sanitizer >/dev/null; then
    step memcheck compute-sanitizer --tool memcheck --error-exitcode 1 $PY bench/sanitize_kernels.py
else
    echo "compute-sanitizer not found: memcheck skipped" | tee -a "$LOG"
fi
if [ -z "${SKIP_BENCH:-}" ]; then
    for script in bench/bench_*.py; do
        step "$(basename "$script" .py)" $PY "$script" --out "$RESULTS"
    done
    step report $PY -m spark_ext.cli bench --from $(ls -t "$RESULTS"/*.json | head -n 20) --plot "$RESULTS/plots"
fi
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    cp "$LOG" "$OUT/" && tar czf "$OUT/results-$STAMP.tgz" "$RESULTS"
fi
echo "gpu_check: $([ $status -eq 0 ] && echo PASSED || echo FAILED); log: $LOG"
exit $status
