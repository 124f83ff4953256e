#!/usr/bin/env bash
# Runs the small CUDA op tests under compute-sanitizer: memcheck (out-of-bounds and misaligned
# device accesses, leaks) and racecheck (shared-memory hazards between threads of a block).
# The caching allocator is switched off so memcheck sees every tensor's true bounds.
# Usage: python_tests/run_sanitizer.sh [extra pytest args]; exit status non-zero if any tool
# reports an error or a test fails.
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
SAN="${COMPUTE_SANITIZER:-compute-sanitizer}"
if ! command -v "$SAN" >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/compute-sanitizer ]; then
  SAN=/usr/local/cuda/bin/compute-sanitizer
fi
# Small shapes only; top-k's dtype only changes its loads, so one dtype covers its kernels. The
# CUDA-graph test needs the caching allocator, which is off here.
SELECT="small and not graph and not (test_segmented_topk and (f16 or bf16))"
status=0
for tool in memcheck racecheck; do
  echo "=== compute-sanitizer --tool $tool"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool "$tool" --error-exitcode 3 --target-processes all \
    "$PY" -m pytest -q -x -p no:cacheprovider python_tests/test_cuda_ops.py -k "$SELECT" "$@"
  rc=$?
  echo "=== $tool exit status $rc"
  [ "$rc" -ne 0 ] && status=1
done
exit "$status"
