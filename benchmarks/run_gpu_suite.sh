#!/usr/bin/env bash
# The whole GPU check in one call on the lent machine (no network, no installs):
#   build the extension in place for sm_90, run every pytest test (CPU and CUDA), run the CUDA
#   tests under compute-sanitizer, run the CUDA op benchmarks (and bench_reading_gpu.py when it
#   exists), then print a short table. Logs and results go to $OUT (at most 8 files; default
#   benchmarks/results/gpu_run). Each step runs under a time limit, all of them inside
#   SUITE_SECONDS (default 570: the device tool allows 600 s a command); the script keeps going
#   after a failure and exits non-zero at the end if any step failed or was cut short.
# Usage: OUT=/some/dir benchmarks/run_gpu_suite.sh   (SKIP_STEPS="tests sanitizer" skips steps by
#   name: build, tests, bench, sanitizer, reading; STEP_LIMIT_<NAME>=seconds overrides a step's
#   limit, e.g. STEP_LIMIT_READING=500 with SKIP_STEPS="bench sanitizer" for a longer reading run)
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu_run}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$CUDA_HOME/bin:$PATH"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DEADLINE=$((SECONDS + ${SUITE_SECONDS:-570}))
status=0
summary=()

# step NAME DEFAULT_LIMIT_S LOGFILE COMMAND...
step() {
  local name=$1 limit=$2 log=$3
  shift 3
  case " ${SKIP_STEPS:-} " in *" $name "*) summary+=("$(printf '%-10s skipped (SKIP_STEPS)' "$name")"); return 0;; esac
  local var="STEP_LIMIT_${name^^}"
  limit="${!var:-$limit}"
  local left=$((DEADLINE - SECONDS - 5))
  if [ "$left" -lt 15 ]; then
    status=1
    summary+=("$(printf '%-10s skipped: suite time budget spent' "$name")")
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s) -> $log"
  timeout --signal=TERM --kill-after=20 "$limit" "$@" >"$log" 2>&1
  local rc=$?
  local took=$((SECONDS - t0))
  tail -n 4 "$log"
  [ "$rc" -ne 0 ] && status=1
  summary+=("$(printf '%-10s rc=%-3s %4ss' "$name" "$rc" "$took")")
  return 0
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'; } 2>&1

# The lent machine's default CC/CXX (/opt/gcc/bin) built an extension that segfaulted whenever an
# argument error formatted a number; its system compiler is used when present (KEEP_CC=1 keeps CC).
if [ -z "${KEEP_CC:-}" ] && [ -x /usr/bin/g++ ]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++; fi
step build 180 "$OUT/build.log" env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="${MAX_JOBS:-16}" "$PY" setup.py build_ext --inplace
# The CPU-only tests are CI's; here every test that touches CUDA (TESTS overrides the list).
TESTS="${TESTS:-python_tests/test_cuda_ops.py python_tests/test_ops.py python_tests/test_hf_cuda.py}"
# shellcheck disable=SC2086
step tests 150 "$OUT/tests.log" "$PY" -m pytest -q -rfE --tb=short -p no:cacheprovider ${PYTEST_ARGS:--n 8} $TESTS
# The benchmark stops starting new shapes 40 s before its own limit.
step bench 200 "$OUT/bench_cuda_ops.log" "$PY" benchmarks/bench_cuda_ops.py \
  --max-seconds "$(( (DEADLINE - SECONDS) < 200 ? (DEADLINE - SECONDS) - 60 : 160 ))" --out "$OUT/cuda_ops.json"
step sanitizer 150 "$OUT/sanitizer.log" env PYTHON="$PY" python_tests/run_sanitizer.sh
if [ -f benchmarks/bench_reading_gpu.py ]; then
  # The benchmark stops starting rows 60 s before the step's limit.
  step reading 240 "$OUT/bench_reading_gpu.log" "$PY" benchmarks/bench_reading_gpu.py --out "$OUT/reading_gpu.json" \
    --max-seconds "$(( ${STEP_LIMIT_READING:-240} - 60 ))"
fi

echo
echo "=== pytest summary"
grep -E "passed|failed|error|skipped" "$OUT/tests.log" 2>/dev/null | tail -n 3
echo "=== sanitizer summary"
grep -E "ERROR SUMMARY|exit status|passed|failed" "$OUT/sanitizer.log" 2>/dev/null | tail -n 6
echo "=== benchmark table"
if grep -q '^op  ' "$OUT/bench_cuda_ops.log" 2>/dev/null; then
  sed -n '/^op  /,$p' "$OUT/bench_cuda_ops.log" | tail -n 45
elif [ -f "$OUT/cuda_ops.json" ]; then  # cut short: the rows saved so far
  "$PY" benchmarks/bench_cuda_ops.py --plot-only "$OUT/cuda_ops.json" 2>&1 | sed -n '/^op  /,$p' | tail -n 45
fi
echo "=== steps"
printf '%s\n' "${summary[@]}"
exit "$status"
