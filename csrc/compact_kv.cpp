// CPU kernel of citrus::compact_kv: gathers the kept rows of keys and values into contiguous
// outputs and appends the newest states in the same pass. Each kept index is read once per
// row (one memcpy of head_dim elements), never once per element.
#include "checks.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

namespace citrus {
namespace {

// Copies rows of one (batch, head): src rows at `idx` (or zeros for index -1), then `n_new`
// rows of `fresh`.
void gather_rows(const char* src, const int64_t* idx, int64_t n_kept, const char* fresh,
                 int64_t n_new, int64_t row_bytes, char* dst) {
  for (int64_t i = 0; i < n_kept; ++i) {
    const int64_t j = idx[i];
    if (j >= 0) {
      std::memcpy(dst + i * row_bytes, src + j * row_bytes, row_bytes);
    } else {
      std::memset(dst + i * row_bytes, 0, row_bytes);
    }
  }
  if (n_new > 0) std::memcpy(dst + n_kept * row_bytes, fresh, n_new * row_bytes);
}

std::tuple<at::Tensor, at::Tensor> compact_kv_cpu(const at::Tensor& key, const at::Tensor& value,
                                                  const at::Tensor& kept,
                                                  const std::optional<at::Tensor>& key_new,
                                                  const std::optional<at::Tensor>& value_new) {
  const int64_t K = check_compact_args(key, value, kept, key_new, value_new);
  const int64_t B = key.size(0), H = key.size(1), L = key.size(2);
  const int64_t Ln = key_new.has_value() ? key_new->size(2) : 0;
  const at::Tensor idx = kept.to(at::kLong).contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < idx.numel(); ++i) {
    TORCH_CHECK_VALUE(ip[i] >= -1 && ip[i] < L, "citrus.compact_kv: `kept` holds index ", ip[i],
                      ", outside [0, L) = [0, ", L, ") (-1 marks an empty slot)");
  }
  const at::Tensor k = key.contiguous(), v = value.contiguous();
  const at::Tensor kn = Ln ? key_new->contiguous() : at::Tensor();
  const at::Tensor vn = Ln ? value_new->contiguous() : at::Tensor();
  at::Tensor key_out = at::empty({B, H, K + Ln, key.size(3)}, key.options());
  at::Tensor value_out = at::empty({B, H, K + Ln, value.size(3)}, value.options());
  const int64_t kb = key.size(3) * key.element_size(), vb = value.size(3) * value.element_size();
  const bool shared = kept.size(1) == 1;  // layer-level: every head keeps the same rows
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t* rows = ip + (shared ? i / H : i) * K;
      const int64_t fresh_off = i * Ln;
      gather_rows(static_cast<const char*>(k.data_ptr()) + i * L * kb, rows, K,
                  Ln ? static_cast<const char*>(kn.data_ptr()) + fresh_off * kb : nullptr, Ln, kb,
                  static_cast<char*>(key_out.data_ptr()) + i * (K + Ln) * kb);
      gather_rows(static_cast<const char*>(v.data_ptr()) + i * L * vb, rows, K,
                  Ln ? static_cast<const char*>(vn.data_ptr()) + fresh_off * vb : nullptr, Ln, vb,
                  static_cast<char*>(value_out.data_ptr()) + i * (K + Ln) * vb);
    }
  });
  return {key_out, value_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(citrus, CPU, m) { m.impl("compact_kv", &compact_kv_cpu); }

}  // namespace citrus
