// CPU kernel of citrus::segmented_topk: per segment, the indices of the k largest scores in
// ascending index order, ties broken toward the lower index. Selection finds the k-th largest
// key with nth_element (O(L)), then one ordered scan emits the winners already sorted.
#include "checks.h"
#include "sortable.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace citrus {
namespace {

// Writes the kept indices of one segment (n valid scores, keep kk <= n) to out[0, kk).
void topk_segment(const float* scores, int64_t n, int64_t kk, int64_t* out,
                  std::vector<uint32_t>& keys, std::vector<uint32_t>& scratch) {
  if (kk == n) {
    for (int64_t i = 0; i < n; ++i) out[i] = i;
    return;
  }
  if (kk == 0) return;
  keys.resize(n);
  for (int64_t i = 0; i < n; ++i) keys[i] = sortable_key(scores[i]);
  scratch.assign(keys.begin(), keys.end());
  // After nth_element, scratch[n - kk] is the kk-th largest key: the threshold.
  std::nth_element(scratch.begin(), scratch.begin() + (n - kk), scratch.end());
  const uint32_t thr = scratch[n - kk];
  int64_t above = 0;
  for (int64_t i = 0; i < n; ++i) above += keys[i] > thr;
  int64_t ties_left = kk - above;  // threshold-valued states to keep, lowest indices first
  int64_t w = 0;
  for (int64_t i = 0; i < n && w < kk; ++i) {
    const uint32_t key = keys[i];
    if (key > thr || (key == thr && ties_left-- > 0)) out[w++] = i;
  }
}

at::Tensor segmented_topk_cpu(const at::Tensor& scores, int64_t k,
                              const std::optional<at::Tensor>& lengths) {
  check_topk_args(scores, k, lengths);
  const int64_t S = scores.size(0), L = scores.size(1);
  const int64_t kmax = std::min(k, L);
  const at::Tensor s = scores.to(at::kFloat).contiguous();
  at::Tensor n_valid;
  if (lengths.has_value()) {
    n_valid = lengths->to(at::kLong).contiguous();
    const int64_t* n = n_valid.data_ptr<int64_t>();
    for (int64_t i = 0; i < S; ++i) {
      TORCH_CHECK_VALUE(n[i] >= 0 && n[i] <= L, "citrus.segmented_topk: `lengths[", i, "]` = ",
                        n[i], " must lie in [0, L] = [0, ", L, "]");
    }
  }
  // Segments shorter than k keep all their states; the unused slots hold -1.
  at::Tensor out = at::full({S, kmax}, -1, scores.options().dtype(at::kLong));
  if (kmax == 0) return out;
  const float* sp = s.data_ptr<float>();
  const int64_t* np = n_valid.defined() ? n_valid.data_ptr<int64_t>() : nullptr;
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, S, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> keys, scratch;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = np ? np[i] : L;
      topk_segment(sp + i * L, n, std::min(kmax, n), op + i * kmax, keys, scratch);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(citrus, CPU, m) { m.impl("segmented_topk", &segmented_topk_cpu); }

}  // namespace citrus
