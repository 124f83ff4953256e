// Helpers shared by the citrus CUDA kernels: device queries, asynchronous 16-byte copies into
// shared memory, tile loading with zero padding, and a block-wide scan. Kept free of heavy
// headers (no torch/extension.h, no ATen/cuda/CUDAContext.h) so each kernel file builds fast.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <utility>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "citrus CUDA kernels need sm_80 or newer (bf16 tensor-core products, cp.async)"
#endif

namespace citrus {
namespace cuda {

// Driver attribute lookups are cached by the runtime, so calling them per launch is cheap and
// never synchronises.
inline int device_attribute(cudaDeviceAttr attr, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

inline int sm_count(int device) {
  return device_attribute(cudaDevAttrMultiProcessorCount, device);
}

inline size_t smem_optin(int device) {
  return static_cast<size_t>(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
}

// Lets `kernel` use `bytes` of dynamic shared memory on `device` (above 48 KB needs an explicit
// opt-in). Each (kernel, device) is raised once to the largest size asked, so warm-up calls keep
// the attribute change out of later CUDA-graph captures.
template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, size_t bytes, int device) {
  if (bytes <= 48 * 1024) return;
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, size_t> granted;
  const std::lock_guard<std::mutex> lock(mutex);
  size_t& have = granted[{reinterpret_cast<const void*>(kernel), device}];
  if (bytes <= have) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
  have = bytes;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// An unsigned integer type as wide as one element of `ES` bytes (raw copies ignore the dtype).
template <int ES>
struct Unit;
template <>
struct Unit<2> {
  using type = uint16_t;
};
template <>
struct Unit<4> {
  using type = uint32_t;
};

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits until at most `N` of this thread's committed copy groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Copies `rows` rows of `D` elements (ES bytes each) into shared memory rows of `Dp >= D`
// elements spaced `stride` elements apart, zero-filling columns D..Dp-1 and every row whose
// source `row_ptr(r)` is null. With `vec` (all row pointers 16-byte aligned) whole 16-byte
// pieces travel by cp.async, so the caller must commit and wait before reading the tile.
template <int ES, typename RowPtr>
__device__ __forceinline__ void load_tile(void* smem, int stride, int rows, int D, int Dp,
                                          bool vec, RowPtr row_ptr) {
  using U = typename Unit<ES>::type;
  constexpr int kPer = 16 / ES;  // elements per 16-byte piece
  const int pieces = Dp / kPer;
  for (int i = threadIdx.x; i < rows * pieces; i += blockDim.x) {
    const int r = i / pieces;
    const int e0 = (i - r * pieces) * kPer;
    U* dst = static_cast<U*>(smem) + static_cast<int64_t>(r) * stride + e0;
    const U* src = reinterpret_cast<const U*>(row_ptr(r));
    if (src != nullptr && vec && e0 + kPer <= D) {
      cp_async16(dst, src + e0);
    } else {
#pragma unroll
      for (int e = 0; e < kPer; ++e) {
        dst[e] = (src != nullptr && e0 + e < D) ? src[e0 + e] : U(0);
      }
    }
  }
}

// Exclusive prefix sum of `v` over the threads of a block (blockDim.x a multiple of 32, at most
// 1024); `total` receives the block-wide sum. `scratch` holds one V per warp. Every thread of the
// block must call it; it ends with a barrier so `scratch` can be reused at once.
template <typename V>
__device__ __forceinline__ V block_exclusive_scan(V v, V& total, V* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  V x = v;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const V y = __shfl_up_sync(0xffffffffu, x, off);
    if (lane >= off) x += y;
  }
  if (lane == 31) scratch[warp] = x;
  __syncthreads();
  V before = 0, sum = 0;
  for (int w = 0; w < nwarps; ++w) {
    if (w < warp) before += scratch[w];
    sum += scratch[w];
  }
  __syncthreads();
  total = sum;
  return before + x - v;
}

}  // namespace cuda
}  // namespace citrus
