// CUDA kernel of citrus::chunk_scores, the CItruS importance score (Bai et al., EMNLP 2024,
// arXiv 2406.12018; SPEC "Importance score"):
//   score[j] = mean over query heads h and queries t of exp(q[h,t]·k[j]·scale − lse[h,t]).
// Never materialises [Hq, Lq, L]. Each (batch, KV head) stacks its G = Hq/Hkv query heads into
// G·Lq "rows" that share one key matrix.
//   1. lse pass (only without a given lse): row-stationary, flash-style online max/sum over the
//      cache and the rows' own causal keys, key tiles double-buffered in shared memory; long key
//      ranges are split over blocks and merged by a small combine kernel.
//   2. score pass: column-stationary. A block holds W·8·NT cache keys in shared memory, each warp
//      owns 8·NT of them, and query tiles stream past (double-buffered, cp.async); every warp sums
//      exp2(logit·scale·log2e − lse·log2e) down its columns in registers, fp32 throughout.
//      fp16/bf16 logits come from mma.sync m16n8k16 (products exact in fp32, fp32 accumulate),
//      each key fragment serving two 16-row blocks when head_dim <= 128; fp32 inputs use FMAs
//      laid out as the same fragments, so both share one epilogue.
//   3. When rows are split over blocks or heads are averaged for a layer, per-split sums land in
//      a small [splits, B, Hkv, Lc] buffer reduced in a fixed order: deterministic scores.
#include "../checks.h"
#include "common.cuh"

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <climits>
#include <cmath>

namespace citrus {
namespace cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kMaxHeadDim = 256;

// ---------------------------------------------------------------------------------------------
// Warp-level logit tile: acc[j][·] = Q[16 rows] · K[8 keys of sub-tile j]ᵀ, in the m16n8k16
// accumulator layout: lane (g = lane/4, t = lane%4) holds rows g, g+8 and columns 2t, 2t+1 of
// each sub-tile j, as acc[j] = {(g,2t), (g,2t+1), (g+8,2t), (g+8,2t+1)}.

template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1);

template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4],
                                                 uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                        uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <typename T>
__device__ __forceinline__ uint32_t ld32(const T* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// sQ: the warp's 16·MT query rows, sK: its 8·NT keys; both row-major with `stride` elements per
// row and Dp (a multiple of 16) zero-padded columns. acc[m] is row block m (rows 16m..16m+15).
// MT > 1 reuses each key fragment for MT row blocks, cutting shared-memory traffic per product.
template <typename T, int NT, int MT>
__device__ __forceinline__ void warp_logits(const T* sQ, const T* sK, int stride, int Dp,
                                            float (&acc)[MT][NT][4]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int j = 0; j < NT; ++j) acc[m][j][0] = acc[m][j][1] = acc[m][j][2] = acc[m][j][3] = 0.f;
  }
  for (int kk = 0; kk < Dp; kk += 16) {
    uint32_t a[MT][4];
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const T* q = sQ + 16 * m * stride + kk + 2 * t;
      a[m][0] = ld32(q + g * stride);
      a[m][1] = ld32(q + (g + 8) * stride);
      a[m][2] = ld32(q + g * stride + 8);
      a[m][3] = ld32(q + (g + 8) * stride + 8);
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const T* k = sK + (8 * j + g) * stride + kk + 2 * t;
      const uint32_t b0 = ld32(k), b1 = ld32(k + 8);
#pragma unroll
      for (int m = 0; m < MT; ++m) mma16816<T>(acc[m][j], a[m], b0, b1);
    }
  }
}

// fp32: plain FMAs producing the same fragment layout (tf32 products would break the SPEC's
// "equal to fp32 rounding").
template <>
__device__ __forceinline__ void warp_logits<float, 4, 1>(const float* sQ, const float* sK,
                                                         int stride, int Dp,
                                                         float (&out)[1][4][4]) {
  constexpr int NT = 4;
  float(&acc)[NT][4] = out[0];
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  for (int kk = 0; kk < Dp; kk += 4) {
    const float4 qa = *reinterpret_cast<const float4*>(sQ + g * stride + kk);
    const float4 qb = *reinterpret_cast<const float4*>(sQ + (g + 8) * stride + kk);
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const float4 k0 = *reinterpret_cast<const float4*>(sK + (8 * j + 2 * t) * stride + kk);
      const float4 k1 = *reinterpret_cast<const float4*>(sK + (8 * j + 2 * t + 1) * stride + kk);
      acc[j][0] = fmaf(qa.w, k0.w, fmaf(qa.z, k0.z, fmaf(qa.y, k0.y, fmaf(qa.x, k0.x, acc[j][0]))));
      acc[j][1] = fmaf(qa.w, k1.w, fmaf(qa.z, k1.z, fmaf(qa.y, k1.y, fmaf(qa.x, k1.x, acc[j][1]))));
      acc[j][2] = fmaf(qb.w, k0.w, fmaf(qb.z, k0.z, fmaf(qb.y, k0.y, fmaf(qb.x, k0.x, acc[j][2]))));
      acc[j][3] = fmaf(qb.w, k1.w, fmaf(qb.z, k1.z, fmaf(qb.y, k1.y, fmaf(qb.x, k1.x, acc[j][3]))));
    }
  }
}

// Key sub-tiles per warp: 8 for 16-bit types (64 keys), 4 for fp32 (32 keys, half the
// registers and shared memory of its wider elements).
template <typename T>
constexpr int kTiles = sizeof(T) == 2 ? 8 : 4;

// Elements per shared-memory row: Dp plus 16 bytes, which staggers the rows of a fragment load
// over distinct banks and keeps every row 16-byte aligned.
template <typename T>
__host__ __device__ __forceinline__ int smem_stride(int Dp) {
  return Dp + 16 / static_cast<int>(sizeof(T));
}

// ---------------------------------------------------------------------------------------------
// Arguments. Element strides; the head dim is contiguous. Row r of (b, h) is query head
// h·G + r / Lq, query t = r % Lq.
struct Attn {
  const void* q;
  const void* k;
  int64_t qsB, qsH, qsL, ksB, ksH, ksL;
  const int64_t* cache_lens;  // [B] or null (every row holds Lc valid states)
  int Hkv, G, Lq, Lc, D, Dp;
  int rows;  // G·Lq
  bool vec;  // every row of q and k is 16-byte aligned
  float c;   // scale·log2(e)
};

__device__ __forceinline__ int valid_cache(const Attn& a, int b) {
  // Out-of-range cache_lens cannot be reported without a host sync: they are clamped.
  if (a.cache_lens == nullptr) return a.Lc;
  const int64_t n = a.cache_lens[b];
  return static_cast<int>(n < 0 ? 0 : (n > a.Lc ? a.Lc : n));
}

template <typename T>
__device__ __forceinline__ const T* query_row(const Attn& a, int b, int h, int r) {
  const int hq = h * a.G + r / a.Lq, t = r % a.Lq;
  return static_cast<const T*>(a.q) + b * a.qsB + hq * a.qsH + t * a.qsL;
}

// ---------------------------------------------------------------------------------------------
// Pass 1: base-2 log-sum-exp of every row over its visible keys: the valid cache [0, valid) and
// its own keys Lc + u for u <= t. Grid (row blocks of 16·MT·W, key splits, B·Hkv); warp w owns
// rows 16·MT·w … 16·MT·(w+1)−1 of the block. The visible keys form `nc` cache tiles then
// own-key tiles; split y takes tiles [y·per_split, (y+1)·per_split). One split writes lse2
// directly; several write (max, sum) pairs for lse_combine_kernel.
template <typename T, int MT>
__global__ void __launch_bounds__(128) lse_kernel(Attn a, int per_split, float* lse2,
                                                  float2* partial) {
  constexpr int NT = kTiles<T>;
  constexpr int KT = 8 * NT;
  extern __shared__ __align__(16) unsigned char smem[];
  const int stride = smem_stride<T>(a.Dp);
  const int nrows = 16 * MT * (blockDim.x >> 5);
  // Rows: nrows queries, then two buffers of KT keys (indexed by arithmetic, not a local array,
  // so nothing spills to local memory).
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + nrows * stride;

  const int bh = blockIdx.z, b = bh / a.Hkv, h = bh % a.Hkv;
  const int r0 = blockIdx.x * nrows;
  const int r_last = min(r0 + nrows, a.rows) - 1;
  // The largest query index among the block's rows bounds the own keys anyone here sees.
  const int tmax = (r0 / a.Lq == r_last / a.Lq) ? r_last % a.Lq : a.Lq - 1;
  const int valid = valid_cache(a, b);
  const int nc = (valid + KT - 1) / KT;
  const int ntiles = nc + tmax / KT + 1;
  const int tile0 = blockIdx.y * per_split;
  const int tile1 = min(ntiles, tile0 + per_split);
  const T* kbase = static_cast<const T*>(a.k) + b * a.ksB + h * a.ksH;

  // Key index of column c of tile i, or -1 past the end of its segment.
  auto key_index = [&](int i, int c) -> int {
    if (i < nc) {
      const int j = i * KT + c;
      return j < valid ? j : -1;
    }
    const int u = (i - nc) * KT + c;
    return u <= tmax ? a.Lc + u : -1;
  };
  auto load_keys = [&](T* dst, int i) {
    load_tile<sizeof(T)>(dst, stride, KT, a.D, a.Dp, a.vec, [&](int c) -> const T* {
      const int j = key_index(i, c);
      return j < 0 ? nullptr : kbase + j * a.ksL;
    });
  };

  load_tile<sizeof(T)>(sQ, stride, nrows, a.D, a.Dp, a.vec, [&](int r) -> const T* {
    return r0 + r < a.rows ? query_row<T>(a, b, h, r0 + r) : nullptr;
  });
  if (tile0 < tile1) load_keys(sK, tile0);
  cp_async_commit();

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
  // This thread's rows: g and g+8 of each of its warp's MT row blocks, and their query indices.
  int row[MT][2], tq[MT][2];
  float mx[MT][2], l[MT][2];
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      row[m][half] = r0 + (warp * MT + m) * 16 + g + 8 * half;
      tq[m][half] = row[m][half] % a.Lq;
      mx[m][half] = -INFINITY;
      l[m][half] = 0.f;
    }
  }

  for (int i = tile0; i < tile1; ++i) {
    const int cur = (i - tile0) & 1;
    if (i + 1 < tile1) load_keys(sK + (cur ^ 1) * KT * stride, i + 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    float acc[MT][NT][4];
    warp_logits<T, NT, MT>(sQ + warp * 16 * MT * stride, sK + cur * KT * stride, stride, a.Dp, acc);
    // Own keys are stored as u = key − Lc (>= 0); cache keys as −1 (seen by every row); absent
    // keys as INT_MAX (seen by none), so one comparison u <= t decides visibility.
    int own[NT][2];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int kj = key_index(i, 8 * j + 2 * t4 + e);
        own[j][e] = kj < 0 ? INT_MAX : (kj < a.Lc ? -1 : kj - a.Lc);
      }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float x[NT][2];
        float tile_max = -INFINITY;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            x[j][e] = own[j][e] <= tq[m][half] ? acc[m][j][2 * half + e] * a.c : -INFINITY;
            tile_max = fmaxf(tile_max, x[j][e]);
          }
        }
        const float m_new = fmaxf(mx[m][half], tile_max);
        if (m_new == -INFINITY) continue;  // nothing visible to this row yet
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < NT; ++j) sum += exp2f(x[j][0] - m_new) + exp2f(x[j][1] - m_new);
        l[m][half] = l[m][half] * exp2f(mx[m][half] - m_new) + sum;
        mx[m][half] = m_new;
      }
    }
    __syncthreads();  // the buffer just read is refilled next iteration
  }

  // Merge the four lanes sharing each row.
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float mm = mx[m][half], ll = l[m][half];
#pragma unroll
      for (int off = 1; off < 4; off <<= 1) {
        const float mo = __shfl_xor_sync(0xffffffffu, mm, off);
        const float lo = __shfl_xor_sync(0xffffffffu, ll, off);
        const float mn = fmaxf(mm, mo);
        ll = mn == -INFINITY ? 0.f : ll * exp2f(mm - mn) + lo * exp2f(mo - mn);
        mm = mn;
      }
      if (t4 == 0 && row[m][half] < a.rows) {
        const int64_t idx = static_cast<int64_t>(bh) * a.rows + row[m][half];
        if (partial == nullptr) {
          lse2[idx] = mm + log2f(ll);
        } else {
          partial[static_cast<int64_t>(blockIdx.y) * gridDim.z * a.rows + idx] = make_float2(mm, ll);
        }
      }
    }
  }
}

// Merges the (max, sum) pairs of `splits` key ranges into lse2 for `n` rows.
__global__ void lse_combine_kernel(const float2* partial, int splits, int64_t n, float* lse2) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float m = -INFINITY;
  for (int s = 0; s < splits; ++s) m = fmaxf(m, partial[s * n + i].x);
  float l = 0.f;
  for (int s = 0; s < splits; ++s) {
    const float2 p = partial[s * n + i];
    if (p.x != -INFINITY) l += p.y * exp2f(p.x - m);
  }
  lse2[i] = m + log2f(l);
}

// ---------------------------------------------------------------------------------------------
// Pass 2: column sums. Grid (column blocks of W·8·NT cache keys, row splits, B·Hkv); split y
// covers rows [y·rows_per_split, …). lse of row r (hq, t) is lse[b·lsB + hq·lsH + t·lsL]·lse_mul
// in base 2. Writes out[bh, j]·inv directly, or raw sums to partial[y, bh, j].
struct LseIn {
  const float* p;
  int64_t sB, sH, sL;
  float mul;  // log2(e) for a natural-log lse, 1 for our own base-2 buffer
};

template <typename T, int MT>
__global__ void __launch_bounds__(128) score_kernel(Attn a, LseIn lse, int rows_per_split,
                                                    float inv, float* out) {
  constexpr int NT = kTiles<T>;
  constexpr int qrows = 16 * MT;  // queries per pipeline stage: one row block per MT
  extern __shared__ __align__(16) unsigned char smem[];
  const int stride = smem_stride<T>(a.Dp);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
  const int KC = (blockDim.x >> 5) * 8 * NT;
  // KC keys, two buffers of qrows queries, two buffers of qrows lse values.
  T* sK = reinterpret_cast<T*>(smem);
  T* sQ = sK + KC * stride;
  float* sL = reinterpret_cast<float*>(sQ + 2 * qrows * stride);

  const int bh = blockIdx.z, b = bh / a.Hkv, h = bh % a.Hkv;
  const int j0 = blockIdx.x * KC;
  const int valid = valid_cache(a, b);
  const int r_begin = blockIdx.y * rows_per_split;
  const int r_end = min(a.rows, r_begin + rows_per_split);
  const T* kbase = static_cast<const T*>(a.k) + b * a.ksB + h * a.ksH;

  load_tile<sizeof(T)>(sK, stride, KC, a.D, a.Dp, a.vec, [&](int c) -> const T* {
    return j0 + c < valid ? kbase + (j0 + c) * a.ksL : nullptr;
  });
  auto load_queries = [&](int buf, int r0) {
    load_tile<sizeof(T)>(sQ + buf * qrows * stride, stride, qrows, a.D, a.Dp, a.vec, [&](int r) -> const T* {
      return r0 + r < r_end ? query_row<T>(a, b, h, r0 + r) : nullptr;
    });
    for (int r = threadIdx.x; r < qrows; r += blockDim.x) {
      const int rr = r0 + r;
      // Padding rows get lse = +inf: exp2(x − inf) = 0 removes them from the sums.
      float v = INFINITY;
      if (rr < r_end) {
        const int hq = h * a.G + rr / a.Lq, t = rr % a.Lq;
        v = lse.p[b * lse.sB + hq * lse.sH + t * lse.sL] * lse.mul;
      }
      sL[buf * qrows + r] = v;
    }
  };
  load_queries(0, r_begin);
  cp_async_commit();

  float colsum[NT][2];
#pragma unroll
  for (int j = 0; j < NT; ++j) colsum[j][0] = colsum[j][1] = 0.f;
  const T* myK = sK + warp * 8 * NT * stride;
  for (int r0 = r_begin, it = 0; r0 < r_end; r0 += qrows, ++it) {
    const int cur = it & 1;
    if (r0 + qrows < r_end) load_queries(cur ^ 1, r0 + qrows);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    float acc[MT][NT][4];
    warp_logits<T, NT, MT>(sQ + cur * qrows * stride, myK, stride, a.Dp, acc);
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const float la = sL[cur * qrows + 16 * m + g], lb = sL[cur * qrows + 16 * m + g + 8];
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        colsum[j][0] += exp2f(fmaf(acc[m][j][0], a.c, -la)) + exp2f(fmaf(acc[m][j][2], a.c, -lb));
        colsum[j][1] += exp2f(fmaf(acc[m][j][1], a.c, -la)) + exp2f(fmaf(acc[m][j][3], a.c, -lb));
      }
    }
    __syncthreads();  // the buffer just read is refilled next iteration
  }

  // Sum the 8 row groups (lanes 4g + t) of each column; lanes 0..3 then hold the totals.
#pragma unroll
  for (int j = 0; j < NT; ++j) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
#pragma unroll
      for (int off = 4; off < 32; off <<= 1) {
        colsum[j][e] += __shfl_xor_sync(0xffffffffu, colsum[j][e], off);
      }
    }
  }
  if (g == 0) {
    float* dst = out + static_cast<int64_t>(blockIdx.y) * gridDim.z * a.Lc +
                 static_cast<int64_t>(bh) * a.Lc;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = j0 + warp * 8 * NT + 8 * j + 2 * t4 + e;
        // Padding columns were zero keys, not absent ones: they score 0 by definition.
        if (col < a.Lc) dst[col] = col < valid ? colsum[j][e] * inv : 0.f;
      }
    }
  }
}

// out[b, rr, j] = inv · Σ_split Σ_h partial[split, b, h, j], h over the heads of output row rr
// (all Hkv heads for a layer, head rr alone otherwise), in a fixed order.
__global__ void reduce_kernel(const float* partial, int splits, int B, int Hkv, int R, int Lc,
                              float inv, float* out) {
  const int64_t n = static_cast<int64_t>(B) * R * Lc;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int j = static_cast<int>(i % Lc);
  const int64_t br = i / Lc;
  const int b = static_cast<int>(br / R), rr = static_cast<int>(br % R);
  const int h0 = R == 1 ? 0 : rr, h1 = R == 1 ? Hkv : rr + 1;
  const int64_t split_stride = static_cast<int64_t>(B) * Hkv * Lc;
  float sum = 0.f;
  for (int h = h0; h < h1; ++h) {
    const float* p = partial + (static_cast<int64_t>(b) * Hkv + h) * Lc + j;
    for (int s = 0; s < splits; ++s) sum += p[s * split_stride];
  }
  out[i] = sum * inv;
}

// ---------------------------------------------------------------------------------------------

// Both passes (the first only without a given lse), then the head/split reduction when needed.
// Each warp step covers MT row blocks of 16 queries.
template <typename T, int MT>
void launch(const Attn& a, int B, const std::optional<at::Tensor>& lse, bool layer,
            const at::Tensor& out) {
  constexpr int NT = kTiles<T>, KT = 8 * NT, qrows = 16 * MT;
  const int device = out.get_device();
  const int sms = sm_count(device);
  const size_t optin = smem_optin(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);
  const at::TensorOptions fopts = out.options();
  const int stride = smem_stride<T>(a.Dp);
  const int BH = B * a.Hkv;

  // Pass 1: our own lse, in base 2, laid out [B, Hq, Lq] = [B·Hkv, rows].
  LseIn lin;
  at::Tensor lse_buf;  // outlives the launches that read it (stream-ordered allocator)
  if (lse.has_value()) {
    lse_buf = lse->to(at::kFloat);
    lin = {lse_buf.data_ptr<float>(), lse_buf.stride(0), lse_buf.stride(1), lse_buf.stride(2), kLog2e};
  } else {
    constexpr int W = 4;
    const int nrows = 16 * MT * W;
    const size_t smem = static_cast<size_t>(nrows + 2 * KT) * stride * sizeof(T);
    TORCH_CHECK(smem <= optin, "citrus.chunk_scores: head_dim ", a.D, " needs ", smem,
                " bytes of shared memory; this GPU allows ", optin);
    allow_dynamic_smem(lse_kernel<T, MT>, smem, device);
    const int row_blocks = static_cast<int>(ceil_div(a.rows, nrows));
    const int max_tiles = static_cast<int>(ceil_div(a.Lc, KT) + ceil_div(a.Lq, KT));
    // Enough blocks to fill the GPU about four times, each still walking >= 8 key tiles.
    const int64_t base = static_cast<int64_t>(row_blocks) * BH;
    int splits = static_cast<int>(std::min<int64_t>(ceil_div(4 * sms, base), ceil_div(max_tiles, 8)));
    splits = std::max(splits, 1);
    const int per_split = static_cast<int>(ceil_div(max_tiles, splits));
    splits = static_cast<int>(ceil_div(max_tiles, per_split));
    lse_buf = at::empty({BH, a.rows}, fopts);
    at::Tensor partial;
    if (splits > 1) partial = at::empty({splits, BH, a.rows, 2}, fopts);
    float2* pp = splits > 1 ? reinterpret_cast<float2*>(partial.data_ptr<float>()) : nullptr;
    lse_kernel<T, MT><<<dim3(row_blocks, splits, BH), 32 * W, smem, stream>>>(
        a, per_split, lse_buf.data_ptr<float>(), pp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (splits > 1) {
      const int64_t n = static_cast<int64_t>(BH) * a.rows;
      lse_combine_kernel<<<static_cast<unsigned>(ceil_div(n, 256)), 256, 0, stream>>>(
          pp, splits, n, lse_buf.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    lin = {lse_buf.data_ptr<float>(), static_cast<int64_t>(a.Hkv) * a.rows, a.Lq, 1, 1.f};
  }

  // Pass 2. Large head dims get fewer warps (keys) per block rather than failing.
  int W = 4;
  auto smem_for = [&](int w) {
    return static_cast<size_t>(w * 8 * NT + 2 * qrows) * stride * sizeof(T) +
           2 * qrows * sizeof(float);
  };
  while (W > 1 && smem_for(W) > optin) W /= 2;
  const size_t smem = smem_for(W);
  TORCH_CHECK(smem <= optin, "citrus.chunk_scores: head_dim ", a.D, " needs ", smem,
              " bytes of shared memory; this GPU allows ", optin);
  allow_dynamic_smem(score_kernel<T, MT>, smem, device);
  const int KC = W * 8 * NT;
  const int col_blocks = static_cast<int>(ceil_div(a.Lc, KC));
  // Split rows over blocks until the grid covers the GPU twice.
  const int64_t base = static_cast<int64_t>(col_blocks) * BH;
  int splits = static_cast<int>(std::min<int64_t>(ceil_div(2 * sms, base), ceil_div(a.rows, qrows)));
  splits = std::max(splits, 1);
  const int rows_per_split = static_cast<int>(ceil_div(ceil_div(a.rows, splits), qrows) * qrows);
  splits = static_cast<int>(ceil_div(a.rows, rows_per_split));
  const int R = layer ? 1 : a.Hkv;
  const float inv = static_cast<float>(1.0 / (static_cast<double>(layer ? a.Hkv * a.G : a.G) * a.Lq));
  const bool direct = splits == 1 && R == a.Hkv;
  at::Tensor partial;
  if (!direct) partial = at::empty({splits, BH, a.Lc}, fopts);
  score_kernel<T, MT><<<dim3(col_blocks, splits, BH), 32 * W, smem, stream>>>(
      a, lin, rows_per_split, direct ? inv : 1.f,
      direct ? out.data_ptr<float>() : partial.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!direct) {
    const int64_t n = static_cast<int64_t>(B) * R * a.Lc;
    reduce_kernel<<<static_cast<unsigned>(ceil_div(n, 256)), 256, 0, stream>>>(
        partial.data_ptr<float>(), splits, B, a.Hkv, R, a.Lc, inv, out.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// 16-bit inputs with head_dim <= 128 take two row blocks per warp step (key fragments reused
// twice); larger heads and fp32 take one, which keeps shared memory and registers in bounds.
template <typename T>
void launch_for(const Attn& a, int B, const std::optional<at::Tensor>& lse, bool layer,
                const at::Tensor& out) {
  if constexpr (sizeof(T) == 2) {
    if (a.Dp <= 128) return launch<T, 2>(a, B, lse, layer, out);
  }
  launch<T, 1>(a, B, lse, layer, out);
}

at::Tensor chunk_scores_cuda(const at::Tensor& query, const at::Tensor& key, double scale,
                             const std::optional<at::Tensor>& lse, c10::string_view granularity,
                             const std::optional<at::Tensor>& cache_lens) {
  const char* op = "citrus.chunk_scores";
  const AttnDims d = check_attention_args(op, query, key, scale, lse, cache_lens);
  const bool layer = is_layer_granularity(granularity, op);
  TORCH_CHECK_VALUE(d.D <= kMaxHeadDim, op, ": head_dim ", d.D, " exceeds the CUDA kernel's limit ",
                    kMaxHeadDim);
  TORCH_CHECK_VALUE(d.L < (int64_t(1) << 31) && d.Hq * d.Lq < (int64_t(1) << 31) &&
                        d.B * d.Hkv <= 65535,
                    op, ": sizes exceed the CUDA kernel's 32-bit indexing (L = ", d.L,
                    ", Hq·Lq = ", d.Hq * d.Lq, ", B·Hkv = ", d.B * d.Hkv, " must be <= 65535)");
  const c10::cuda::CUDAGuard guard(query.device());
  const at::Tensor q = query.stride(3) == 1 ? query : query.contiguous();
  const at::Tensor k = key.stride(3) == 1 ? key : key.contiguous();
  at::Tensor lens;
  if (cache_lens.has_value()) lens = cache_lens->to(at::kLong).contiguous();

  const at::TensorOptions fopts = query.options().dtype(at::kFloat);
  const int64_t R = layer ? 1 : d.Hkv;
  at::Tensor out = at::empty({d.B, R, d.cache()}, fopts);

  const int64_t es = q.element_size();
  const bool vec = aligned16(q.data_ptr()) && aligned16(k.data_ptr()) && (d.D * es) % 16 == 0 &&
                   (q.stride(0) * es) % 16 == 0 && (q.stride(1) * es) % 16 == 0 &&
                   (q.stride(2) * es) % 16 == 0 && (k.stride(0) * es) % 16 == 0 &&
                   (k.stride(1) * es) % 16 == 0 && (k.stride(2) * es) % 16 == 0;
  Attn a{q.data_ptr(),
         k.data_ptr(),
         q.stride(0),
         q.stride(1),
         q.stride(2),
         k.stride(0),
         k.stride(1),
         k.stride(2),
         lens.defined() ? lens.data_ptr<int64_t>() : nullptr,
         static_cast<int>(d.Hkv),
         static_cast<int>(d.group()),
         static_cast<int>(d.Lq),
         static_cast<int>(d.cache()),
         static_cast<int>(d.D),
         static_cast<int>(ceil_div(d.D, 16) * 16),
         static_cast<int>(d.group() * d.Lq),
         vec,
         static_cast<float>(scale * M_LOG2E)};
  switch (q.scalar_type()) {
    case at::kFloat:
      launch_for<float>(a, static_cast<int>(d.B), lse, layer, out);
      break;
    case at::kHalf:
      launch_for<__half>(a, static_cast<int>(d.B), lse, layer, out);
      break;
    case at::kBFloat16:
      launch_for<__nv_bfloat16>(a, static_cast<int>(d.B), lse, layer, out);
      break;
    default:
      TORCH_CHECK_TYPE(false, op, ": unsupported dtype ", q.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(citrus, CUDA, m) { m.impl("chunk_scores", &chunk_scores_cuda); }

}  // namespace cuda
}  // namespace citrus
