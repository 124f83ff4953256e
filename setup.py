"""Build citrus_ext: the `citrus` torch ops (C++ CPU kernels, CUDA kernels when available).

CUDA kernels are built when torch is a CUDA build and nvcc is found (CUDA_HOME); set
``CITRUS_FORCE_CPU=1`` to build CPU kernels only. ``TORCH_CUDA_ARCH_LIST`` picks the GPU
architectures (default "8.0;9.0").
"""
import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    if os.environ.get("CITRUS_FORCE_CPU", "0") == "1":
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def extension():
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cxx = ["-O3", "-fopenmp"]  # at::parallel_for is an inline OpenMP region: it needs -fopenmp
    if not want_cuda():
        return cpp_extension.CppExtension(
            "citrus_ext._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    return cpp_extension.CUDAExtension(
        "citrus_ext._C",
        cpp + cu,
        define_macros=[("WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]},
        extra_link_args=["-fopenmp"],
    )


setup(
    name="citrus_ext",
    version="0.1.0",
    description="CItruS chunked instruction-aware KV-cache eviction as compiled torch ops",
    packages=find_packages(include=["citrus_ext", "citrus_ext.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "transformers>=5.0", "tqdm"],
    entry_points={"console_scripts": ["citrus=citrus_ext.cli:main"]},
)
