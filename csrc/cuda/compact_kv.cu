// CUDA kernel of citrus::compact_kv: one pass that gathers the kept rows of keys and values
// into contiguous outputs and appends the newest states (CItruS keeps the selected cache states
// in order, then the new chunk's; Bai et al., EMNLP 2024, arXiv 2406.12018).
// Grid y walks (batch, head) pairs, grid x the 16-byte pieces of that head's output rows (keys
// then values of a row side by side), so a warp streams whole rows with 16-byte loads and
// stores; the kept index is read once per piece from L1, as an int32 row index. A layer-level
// `kept` ([B, 1, K]) is broadcast over heads. Rows or pointers that are not 16-byte aligned
// fall back to element-sized copies.
// Index -1 yields a zero row, as on the CPU. An index outside [-1, L) cannot be reported without
// a host synchronisation, so on CUDA it also yields a zero row.
#include "../checks.h"
#include "common.cuh"

#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace citrus {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;  // pieces per thread in flight before the first store

// Byte strides of one [B, H, rows, ·] operand.
struct Operand {
  const char* p;
  int64_t sB, sH, sL;
};

struct Compact {
  Operand key, value, key_new, value_new;
  const void* kept;
  int64_t kept_sB, kept_sH, kept_sK;  // kept_sH = 0 broadcasts one row set over heads
  char* key_out;
  char* value_out;
  int H, L, K, rows;      // rows = K + Ln
  int kpieces, vpieces;   // pieces of sizeof(U) bytes per key / value row
  int64_t BH;
};

template <typename U, typename I>
__global__ void __launch_bounds__(kThreads) compact_kernel(Compact a) {
  const int per_row = a.kpieces + a.vpieces;
  const int per_head = a.rows * per_row;
  for (int64_t bh = blockIdx.y; bh < a.BH; bh += gridDim.y) {
    const int64_t b = bh / a.H, h = bh % a.H;
    const I* kept = static_cast<const I*>(a.kept) + b * a.kept_sB + h * a.kept_sH;
    U* kout = reinterpret_cast<U*>(a.key_out) + bh * a.rows * a.kpieces;
    U* vout = reinterpret_cast<U*>(a.value_out) + bh * a.rows * a.vpieces;
    for (int base = blockIdx.x * kThreads * kUnroll + threadIdx.x; base < per_head;
         base += gridDim.x * kThreads * kUnroll) {
      U v[kUnroll];
      U* dst[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = base + u * kThreads;
        dst[u] = nullptr;
        if (i >= per_head) continue;
        const int r = i / per_row, c = i - r * per_row;
        const bool is_key = c < a.kpieces;
        const int piece = is_key ? c : c - a.kpieces;
        const Operand& src = is_key ? a.key : a.value;
        const Operand& fresh = is_key ? a.key_new : a.value_new;
        const char* row = nullptr;
        if (r < a.K) {
          const I j = kept[r * a.kept_sK];
          if (j >= 0 && j < a.L) {
            row = src.p + b * src.sB + h * src.sH + static_cast<int>(j) * src.sL;
          }
        } else {
          row = fresh.p + b * fresh.sB + h * fresh.sH + (r - a.K) * fresh.sL;
        }
        v[u] = row != nullptr ? reinterpret_cast<const U*>(row)[piece] : U{};
        dst[u] = (is_key ? kout + static_cast<int64_t>(r) * a.kpieces
                         : vout + static_cast<int64_t>(r) * a.vpieces) +
                 piece;
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (dst[u] != nullptr) *dst[u] = v[u];
      }
    }
  }
}

Operand operand(const at::Tensor& t) {
  const int64_t es = t.element_size();
  return {static_cast<const char*>(t.data_ptr()), t.stride(0) * es, t.stride(1) * es,
          t.stride(2) * es};
}

bool operand_aligned16(const Operand& o) {
  return aligned16(o.p) && o.sB % 16 == 0 && o.sH % 16 == 0 && o.sL % 16 == 0;
}

template <typename U>
void launch_unit(Compact& a, int64_t row_bytes_k, int64_t row_bytes_v, bool int32_kept,
                 int device) {
  a.kpieces = static_cast<int>(row_bytes_k / sizeof(U));
  a.vpieces = static_cast<int>(row_bytes_v / sizeof(U));
  const int64_t per_head = static_cast<int64_t>(a.rows) * (a.kpieces + a.vpieces);
  TORCH_CHECK_VALUE(per_head < (int64_t(1) << 31) - kThreads * kUnroll,
                    "citrus.compact_kv: one head's output is too large for 32-bit indexing");
  const int64_t xblocks = ceil_div(per_head, kThreads * kUnroll);
  // About 64 blocks per SM in all; further heads loop inside the kernel.
  const int64_t ycap = std::max<int64_t>(1, 64 * sm_count(device) / xblocks);
  const dim3 grid(static_cast<unsigned>(xblocks),
                  static_cast<unsigned>(std::min<int64_t>({a.BH, ycap, 65535})));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);
  if (int32_kept) {
    compact_kernel<U, int32_t><<<grid, kThreads, 0, stream>>>(a);
  } else {
    compact_kernel<U, int64_t><<<grid, kThreads, 0, stream>>>(a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> compact_kv_cuda(const at::Tensor& key, const at::Tensor& value,
                                                   const at::Tensor& kept,
                                                   const std::optional<at::Tensor>& key_new,
                                                   const std::optional<at::Tensor>& value_new) {
  const int64_t K = check_compact_args(key, value, kept, key_new, value_new);
  const int64_t B = key.size(0), H = key.size(1), L = key.size(2);
  const int64_t Ln = key_new.has_value() ? key_new->size(2) : 0;
  TORCH_CHECK_VALUE(L < (int64_t(1) << 31) && K + Ln < (int64_t(1) << 31),
                    "citrus.compact_kv: L = ", L, " and K + Ln = ", K + Ln,
                    " must fit 32-bit row indices");
  const c10::cuda::CUDAGuard guard(key.device());
  at::Tensor key_out = at::empty({B, H, K + Ln, key.size(3)}, key.options());
  at::Tensor value_out = at::empty({B, H, K + Ln, value.size(3)}, value.options());
  if (key_out.numel() == 0 && value_out.numel() == 0) return {key_out, value_out};

  auto last_dense = [](const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); };
  const at::Tensor k = last_dense(key), v = last_dense(value);
  const at::Tensor kn = Ln ? last_dense(*key_new) : at::Tensor();
  const at::Tensor vn = Ln ? last_dense(*value_new) : at::Tensor();
  const Operand none{nullptr, 0, 0, 0};
  Compact a{operand(k),
            operand(v),
            Ln ? operand(kn) : none,
            Ln ? operand(vn) : none,
            kept.data_ptr(),
            kept.stride(0),
            kept.size(1) == 1 ? 0 : kept.stride(1),
            kept.stride(2),
            static_cast<char*>(key_out.data_ptr()),
            static_cast<char*>(value_out.data_ptr()),
            static_cast<int>(H),
            static_cast<int>(L),
            static_cast<int>(K),
            static_cast<int>(K + Ln),
            0,
            0,
            B * H};
  const int64_t es = key.element_size();
  const int64_t kbytes = key.size(3) * es, vbytes = value.size(3) * es;
  const bool vec = kbytes % 16 == 0 && vbytes % 16 == 0 && operand_aligned16(a.key) &&
                   operand_aligned16(a.value) && (!Ln || (operand_aligned16(a.key_new) &&
                                                          operand_aligned16(a.value_new))) &&
                   aligned16(a.key_out) && aligned16(a.value_out);
  const bool int32_kept = kept.scalar_type() == at::kInt;
  const int device = key.get_device();
  if (vec) {
    launch_unit<uint4>(a, kbytes, vbytes, int32_kept, device);
  } else if (es == 2) {
    launch_unit<uint16_t>(a, kbytes, vbytes, int32_kept, device);
  } else {
    launch_unit<uint32_t>(a, kbytes, vbytes, int32_kept, device);
  }
  return {key_out, value_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(citrus, CUDA, m) { m.impl("compact_kv", &compact_kv_cuda); }

}  // namespace cuda
}  // namespace citrus
