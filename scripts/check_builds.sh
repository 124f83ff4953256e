#!/usr/bin/env bash
# Builds the other two ways the README documents and loads each result:
#   1. CMake -> libcitrus_ops.so, loaded with torch.ops.load_library;
#   2. a wheel (pip wheel --no-build-isolation), installed into a scratch target and imported.
# Expects scripts/setup.sh to have run (uses .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
VPY=$PWD/.venv/bin/python
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

cmake_args=(-S . -B "$scratch/cmake" -G Ninja -DCMAKE_MAKE_PROGRAM="$PWD/.venv/bin/ninja"
  -DCMAKE_PREFIX_PATH="$($VPY -c 'import torch; print(torch.utils.cmake_prefix_path)')"
  -DPython_EXECUTABLE="$VPY" -DPython3_EXECUTABLE="$VPY")
if [ -n "${CUDA_HOME:-}" ] && [ "${CITRUS_FORCE_CPU:-0}" != 1 ]; then
  cmake_args+=(-DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc" -DCUDAToolkit_ROOT="$CUDA_HOME" -DCUDA_TOOLKIT_ROOT_DIR="$CUDA_HOME")
else
  cmake_args+=(-DCITRUS_FORCE_CPU=ON)
fi
"$PWD/.venv/bin/cmake" "${cmake_args[@]}" > "$scratch/cmake.log" 2>&1 || { cat "$scratch/cmake.log"; exit 1; }
"$PWD/.venv/bin/cmake" --build "$scratch/cmake" -j "$(nproc)" > "$scratch/build.log" 2>&1 || { tail -50 "$scratch/build.log"; exit 1; }
$VPY - "$scratch/cmake/libcitrus_ops.so" <<'PY'
import sys, torch
torch.ops.load_library(sys.argv[1])
q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 10, 8)
k2, v2, kept = torch.ops.citrus.evict(q, k, k, 4, 0.3)
assert k2.shape == (1, 2, 7, 8) and kept.shape == (1, 1, 4), (k2.shape, kept.shape)
print("cmake library: torch.ops.citrus.evict runs;", torch.ops.citrus.evict.default._schema)
PY

$VPY -m pip wheel -q --no-build-isolation --no-deps -w "$scratch/dist" . > "$scratch/wheel.log" 2>&1 || { tail -50 "$scratch/wheel.log"; exit 1; }
$VPY -m pip install -q --no-deps --target "$scratch/site" "$scratch"/dist/citrus_ext-*.whl
(cd "$scratch" && PYTHONPATH="$scratch/site" $VPY -c "
import citrus_ext, torch
assert citrus_ext.__file__.startswith('$scratch/site'), citrus_ext.__file__
print('wheel:', citrus_ext.__file__, 'with CUDA:', citrus_ext._C.with_cuda)
")
