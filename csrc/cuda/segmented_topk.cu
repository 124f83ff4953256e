// CUDA kernel of citrus::segmented_topk: per segment, the indices of the k largest scores in
// ascending index order, ties toward the lower index (the budgeted selection of CItruS, Bai et
// al., EMNLP 2024, arXiv 2406.12018). Sorting is never needed:
//   1. radix select finds the k-th largest key thr over the float-to-uint32 map of sortable.h
//      (the CPU's ranking exactly), 8 bits per pass, plus `ties` = how many thr-valued states
//      fit after all states above thr;
//   2. an order-preserving compaction writes index i at (#kept before i), kept meaning
//      key > thr, or key == thr among the first `ties` of those (block prefix sums).
// The cost does not grow with k, which suits budgets that are a large fraction of the row.
// Short rows (or many segments) take one block per segment; long rows with few segments split
// each row over blocks: 4 histogram launches into global counters, a count launch, a write
// launch. No host synchronisation; invalid `lengths` are clamped to [0, L] (checking would sync).
#include "../checks.h"
#include "../sortable.h"
#include "common.cuh"

#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace citrus {
namespace cuda {
namespace {

constexpr int kThreads = 256;             // one radix bin per thread when picking a digit
constexpr int kItems = 8;                 // consecutive scores per thread in the ordered write
constexpr int kTile = kThreads * kItems;  // scores per block-wide scan step
constexpr int kChunk = 2 * kTile;         // scores per block on the split-row path

struct Topk {
  const void* scores;
  int64_t row_stride;
  const int64_t* lengths;  // [S] or null
  int64_t* out;            // [S, kmax]
  int S, L, kmax;
  int nchunks;  // split-row path: blocks per segment
  int* hist;    // split-row path: [4, S, 256] digit counts
  int* counts;  // split-row path: [S, nchunks, 2] (above thr, equal to thr) per chunk
};

template <typename T>
__device__ __forceinline__ uint32_t key_at(const Topk& a, int s, int i) {
  const T* row = static_cast<const T*>(a.scores) + s * a.row_stride;
  return sortable_key(static_cast<float>(row[i]));
}

__device__ __forceinline__ int segment_length(const Topk& a, int s) {
  if (a.lengths == nullptr) return a.L;
  const int64_t n = a.lengths[s];
  return static_cast<int>(n < 0 ? 0 : (n > a.L ? a.L : n));
}

// Shared state of one block.
struct Smem {
  int hist[kThreads];
  unsigned long long scan[kThreads / 32];
  int pick[2];
};

// Given per-digit candidate counts (this thread reads the count of digit 255 - tid) and how many
// of the largest candidates are still wanted, returns the digit holding the k_rem-th largest and
// how many of that digit's candidates are wanted.
__device__ __forceinline__ void pick_digit(int count, int& k_rem, uint32_t& prefix, int shift,
                                           Smem& sm) {
  unsigned long long total;
  // Descending digits: `above` counts candidates with a larger digit than this thread's.
  const int above = static_cast<int>(
      block_exclusive_scan<unsigned long long>(static_cast<unsigned long long>(count), total, sm.scan));
  if (above < k_rem && k_rem <= above + count) {
    sm.pick[0] = 255 - static_cast<int>(threadIdx.x);
    sm.pick[1] = k_rem - above;
  }
  __syncthreads();
  prefix |= static_cast<uint32_t>(sm.pick[0]) << shift;
  k_rem = sm.pick[1];
}

__device__ __forceinline__ uint32_t prefix_mask(int pass) {
  return pass == 0 ? 0u : ~0u << (32 - 8 * pass);
}

// Histograms digit `pass` of the keys in [begin, end) that match `prefix` on earlier digits.
template <typename T>
__device__ __forceinline__ void histogram(const Topk& a, int s, int begin, int end, int pass,
                                          uint32_t prefix, Smem& sm) {
  sm.hist[threadIdx.x] = 0;
  __syncthreads();
  const uint32_t mask = prefix_mask(pass);
  const int shift = 24 - 8 * pass;
  for (int i = begin + threadIdx.x; i < end; i += kThreads) {
    const uint32_t key = key_at<T>(a, s, i);
    if (((key ^ prefix) & mask) == 0) atomicAdd(&sm.hist[(key >> shift) & 255], 1);
  }
  __syncthreads();
}

// Writes the kept indices among [begin, end), given the kept-state counts before `begin`.
template <typename T>
__device__ void ordered_write(const Topk& a, int s, int begin, int end, uint32_t thr, int ties,
                              int above_before, int equal_before, Smem& sm) {
  int64_t* out = a.out + static_cast<int64_t>(s) * a.kmax;
  for (int base = begin; base < end; base += kTile) {
    const int i0 = base + threadIdx.x * kItems;
    uint32_t keys[kItems];
    int above = 0, equal = 0;
#pragma unroll
    for (int e = 0; e < kItems; ++e) {
      keys[e] = i0 + e < end ? key_at<T>(a, s, i0 + e) : 0u;
      above += i0 + e < end && keys[e] > thr;
      equal += i0 + e < end && keys[e] == thr;
    }
    // Both counts in one 64-bit scan: `above` high, `equal` low (neither exceeds 2^31).
    unsigned long long total;
    const unsigned long long before = block_exclusive_scan<unsigned long long>(
        (static_cast<unsigned long long>(above) << 32) | static_cast<unsigned>(equal), total,
        sm.scan);
    int ab = above_before + static_cast<int>(before >> 32);
    int eb = equal_before + static_cast<int>(before & 0xffffffffu);
#pragma unroll
    for (int e = 0; e < kItems; ++e) {
      if (i0 + e >= end) break;
      if (keys[e] > thr) {
        out[ab + min(eb, ties)] = i0 + e;
        ++ab;
      } else if (keys[e] == thr) {
        if (eb < ties) out[ab + eb] = i0 + e;
        ++eb;
      }
    }
    above_before += static_cast<int>(total >> 32);
    equal_before += static_cast<int>(total & 0xffffffffu);
  }
}

// A segment keeping everything it has (n <= kmax): 0..n-1, then -1, over [begin, end).
__device__ __forceinline__ void write_all(const Topk& a, int s, int n, int begin, int end) {
  int64_t* out = a.out + static_cast<int64_t>(s) * a.kmax;
  for (int i = begin + threadIdx.x; i < end; i += kThreads) out[i] = i < n ? i : -1;
}

// One block per segment: four histogram passes over the row, then the ordered write.
template <typename T>
__global__ void __launch_bounds__(kThreads) topk_block_kernel(Topk a) {
  __shared__ Smem sm;
  const int s = blockIdx.x;
  const int n = segment_length(a, s);
  const int kk = min(a.kmax, n);
  if (kk == n) {
    write_all(a, s, n, 0, a.kmax);
    return;
  }
  uint32_t prefix = 0;
  int k_rem = kk;
  for (int pass = 0; pass < 4; ++pass) {
    histogram<T>(a, s, 0, n, pass, prefix, sm);
    pick_digit(sm.hist[255 - threadIdx.x], k_rem, prefix, 24 - 8 * pass, sm);
  }
  ordered_write<T>(a, s, 0, n, prefix, k_rem, 0, 0, sm);
}

// Split-row path. Every block re-derives the digits chosen so far from the global histograms
// (a few 256-bin scans), which saves a launch per pass.
__device__ __forceinline__ void replay_digits(const Topk& a, int s, int passes, int kk,
                                              uint32_t& prefix, int& k_rem, Smem& sm) {
  prefix = 0;
  k_rem = kk;
  for (int pass = 0; pass < passes; ++pass) {
    const int* h = a.hist + (static_cast<int64_t>(pass) * a.S + s) * 256;
    pick_digit(h[255 - threadIdx.x], k_rem, prefix, 24 - 8 * pass, sm);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) topk_hist_kernel(Topk a, int pass) {
  __shared__ Smem sm;
  const int s = blockIdx.x / a.nchunks, c = blockIdx.x % a.nchunks;
  const int n = segment_length(a, s);
  const int kk = min(a.kmax, n);
  const int begin = c * kChunk, end = min(n, begin + kChunk);
  if (kk == n || begin >= end) return;
  uint32_t prefix;
  int k_rem;
  replay_digits(a, s, pass, kk, prefix, k_rem, sm);
  histogram<T>(a, s, begin, end, pass, prefix, sm);
  const int v = sm.hist[threadIdx.x];
  if (v != 0) atomicAdd(a.hist + (static_cast<int64_t>(pass) * a.S + s) * 256 + threadIdx.x, v);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) topk_count_kernel(Topk a) {
  __shared__ Smem sm;
  const int s = blockIdx.x / a.nchunks, c = blockIdx.x % a.nchunks;
  const int n = segment_length(a, s);
  const int kk = min(a.kmax, n);
  if (kk == n) return;
  uint32_t thr;
  int ties;
  replay_digits(a, s, 4, kk, thr, ties, sm);
  const int begin = c * kChunk, end = min(n, begin + kChunk);
  unsigned long long mine = 0;
  for (int i = begin + threadIdx.x; i < end; i += kThreads) {
    const uint32_t key = key_at<T>(a, s, i);
    mine += key > thr ? (1ull << 32) : (key == thr ? 1ull : 0ull);
  }
  unsigned long long total;
  block_exclusive_scan<unsigned long long>(mine, total, sm.scan);
  if (threadIdx.x == 0) {
    int* dst = a.counts + (static_cast<int64_t>(s) * a.nchunks + c) * 2;
    dst[0] = static_cast<int>(total >> 32);
    dst[1] = static_cast<int>(total & 0xffffffffu);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) topk_write_kernel(Topk a) {
  __shared__ Smem sm;
  const int s = blockIdx.x / a.nchunks, c = blockIdx.x % a.nchunks;
  const int n = segment_length(a, s);
  const int kk = min(a.kmax, n);
  const int begin = c * kChunk;
  if (kk == n) {
    write_all(a, s, n, min(begin, a.kmax), min(begin + kChunk, a.kmax));
    return;
  }
  uint32_t thr;
  int ties;
  replay_digits(a, s, 4, kk, thr, ties, sm);
  int above = 0, equal = 0;
  const int* cnt = a.counts + static_cast<int64_t>(s) * a.nchunks * 2;
  for (int p = 0; p < c; ++p) {
    above += cnt[2 * p];
    equal += cnt[2 * p + 1];
  }
  ordered_write<T>(a, s, begin, min(n, begin + kChunk), thr, ties, above, equal, sm);
}

template <typename T>
void launch(Topk& a, bool split_rows, const at::Tensor& scores, cudaStream_t stream) {
  if (!split_rows) {
    topk_block_kernel<T><<<a.S, kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  at::Tensor hist = at::empty({4, a.S, 256}, scores.options().dtype(at::kInt));
  at::Tensor counts = at::empty({a.S, a.nchunks, 2}, scores.options().dtype(at::kInt));
  C10_CUDA_CHECK(cudaMemsetAsync(hist.data_ptr<int>(), 0, hist.numel() * sizeof(int), stream));
  a.hist = hist.data_ptr<int>();
  a.counts = counts.data_ptr<int>();
  const unsigned blocks = static_cast<unsigned>(static_cast<int64_t>(a.S) * a.nchunks);
  for (int pass = 0; pass < 4; ++pass) {
    topk_hist_kernel<T><<<blocks, kThreads, 0, stream>>>(a, pass);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  topk_count_kernel<T><<<blocks, kThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  topk_write_kernel<T><<<blocks, kThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor segmented_topk_cuda(const at::Tensor& scores, int64_t k,
                               const std::optional<at::Tensor>& lengths) {
  check_topk_args(scores, k, lengths);
  const int64_t S = scores.size(0), L = scores.size(1);
  const int64_t kmax = std::min(k, L);
  TORCH_CHECK_VALUE(L < (int64_t(1) << 31) - kChunk && S < (int64_t(1) << 31), 
                    "citrus.segmented_topk: sizes exceed the CUDA kernel's 32-bit indexing (S = ", S,
                    ", L = ", L, ")");
  const c10::cuda::CUDAGuard guard(scores.device());
  at::Tensor out = at::empty({S, kmax}, scores.options().dtype(at::kLong));
  if (S == 0 || kmax == 0) return out;
  const at::Tensor s = scores.stride(1) == 1 ? scores : scores.contiguous();
  at::Tensor lens;
  if (lengths.has_value()) lens = lengths->to(at::kLong).contiguous();

  const int64_t nchunks = ceil_div(L, kChunk);
  const int device = scores.get_device();
  // Split rows only when one block per segment would leave most of the GPU idle.
  const bool split_rows = nchunks > 1 && S < 2 * sm_count(device);
  TORCH_CHECK_VALUE(!split_rows || S * nchunks < (int64_t(1) << 31),
                    "citrus.segmented_topk: too many blocks (S = ", S, ", L = ", L, ")");
  Topk a{s.data_ptr(),
         s.stride(0),
         lens.defined() ? lens.data_ptr<int64_t>() : nullptr,
         out.data_ptr<int64_t>(),
         static_cast<int>(S),
         static_cast<int>(L),
         static_cast<int>(kmax),
         static_cast<int>(nchunks),
         nullptr,
         nullptr};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);
  switch (s.scalar_type()) {
    case at::kFloat:
      launch<float>(a, split_rows, s, stream);
      break;
    case at::kHalf:
      launch<c10::Half>(a, split_rows, s, stream);
      break;
    case at::kBFloat16:
      launch<c10::BFloat16>(a, split_rows, s, stream);
      break;
    default:
      TORCH_CHECK_TYPE(false, "citrus.segmented_topk: unsupported dtype ", s.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(citrus, CUDA, m) { m.impl("segmented_topk", &segmented_topk_cuda); }

}  // namespace cuda
}  // namespace citrus
