// Maps a float to a uint32 whose unsigned order is the float order, shared by the CPU and CUDA
// top-k so both rank scores identically: -0.0 equals +0.0, and NaN ranks below -inf.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define CITRUS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define CITRUS_HOST_DEVICE inline
#endif

namespace citrus {

CITRUS_HOST_DEVICE uint32_t sortable_key(float f) {
  if (f != f) return 0u;  // NaN
  if (f == 0.0f) f = 0.0f;  // fold -0.0 onto +0.0
  uint32_t bits;
#if defined(__CUDA_ARCH__)
  bits = __float_as_uint(f);
#else
  std::memcpy(&bits, &f, sizeof(bits));
#endif
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

}  // namespace citrus
