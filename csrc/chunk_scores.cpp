// CPU kernel of citrus::chunk_scores: the SPEC importance score of every cache state,
//   score[j] = mean over query heads h and queries t of exp(q[h,t]·k[j]·scale − lse[h,t]),
// without materialising the [Hq, Lq, L] probabilities. Each (batch, KV head) pair stacks the
// G = Hq/Hkv query heads of its group into G·Lq rows that share one key matrix; rows are taken
// a block at a time, so only a [rows, L] tile of logits ever exists (per thread).
#include "checks.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>

namespace citrus {
namespace {

// Logit tile budget per thread (floats): big enough that BLAS runs at full speed and the
// key matrix is re-read only a few times, small enough to stay far below [Hq, Lq, L].
constexpr int64_t kTileFloats = int64_t(1) << 21;

// Sums, over the rows of one (batch, KV head) group, exp(logit − lse) on the cache columns.
// q: [G*Lq, D] fp32, k: [L, D] fp32, lse: [G*Lq] fp32 or undefined, acc: [Lc] fp32 (output).
void score_group(const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse, double scale,
                 int64_t Lq, int64_t Lc, int64_t valid_cache, at::Tensor& acc) {
  const int64_t rows = q.size(0);
  const int64_t L = k.size(0);
  // With a given lse only the cache columns are needed; otherwise the own keys join the normaliser.
  const int64_t ncols = lse.defined() ? Lc : L;
  const int64_t block = std::max<int64_t>(1, std::min<int64_t>(rows, kTileFloats / ncols));
  const at::Tensor kt = k.narrow(0, 0, ncols).t();
  const float neg_inf = -std::numeric_limits<float>::infinity();
  acc.zero_();
  for (int64_t r0 = 0; r0 < rows; r0 += block) {
    const int64_t nr = std::min(block, rows - r0);
    at::Tensor logits = at::mm(q.narrow(0, r0, nr), kt);
    logits.mul_(scale);
    float* data = logits.data_ptr<float>();
    // Padding between the valid cache and the own keys is seen by no query.
    if (valid_cache < Lc) {
      for (int64_t r = 0; r < nr; ++r) {
        std::fill(data + r * ncols + valid_cache, data + r * ncols + Lc, neg_inf);
      }
    }
    at::Tensor row_lse;
    if (lse.defined()) {
      row_lse = lse.narrow(0, r0, nr);
    } else {
      // Causal mask: query t (row r, t = r mod Lq) sees the cache and own keys 0..t.
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t t = (r0 + r) % Lq;
        std::fill(data + r * ncols + Lc + t + 1, data + (r + 1) * ncols, neg_inf);
      }
      row_lse = at::logsumexp(logits, {1});
    }
    at::Tensor cache = logits.narrow(1, 0, Lc);
    cache.sub_(row_lse.unsqueeze(1)).exp_();
    acc.add_(cache.sum(0));
  }
}

at::Tensor chunk_scores_cpu(const at::Tensor& query, const at::Tensor& key, double scale,
                            const std::optional<at::Tensor>& lse, c10::string_view granularity,
                            const std::optional<at::Tensor>& cache_lens) {
  const char* op = "citrus.chunk_scores";
  const AttnDims d = check_attention_args(op, query, key, scale, lse, cache_lens);
  const bool layer = is_layer_granularity(granularity, op);
  const int64_t G = d.group(), Lc = d.cache();

  // [B, Hkv, G*Lq, D]: the query heads of one KV group stacked as rows (a view for contiguous q).
  const at::Tensor q = query.reshape({d.B, d.Hkv, G * d.Lq, d.D});
  const at::Tensor l =
      lse.has_value() ? lse->to(at::kFloat).reshape({d.B, d.Hkv, G * d.Lq}) : at::Tensor();
  std::vector<int64_t> valid(d.B, Lc);
  if (cache_lens.has_value()) {
    const at::Tensor c = cache_lens->to(at::kLong).contiguous();
    for (int64_t b = 0; b < d.B; ++b) {
      const int64_t n = c.data_ptr<int64_t>()[b];
      TORCH_CHECK_VALUE(n >= 0 && n <= Lc, op, ": `cache_lens[", b, "]` = ", n,
                        " must lie in [0, L - Lq] = [0, ", Lc, "]");
      valid[b] = n;
    }
  }
  at::Tensor per_head = at::empty({d.B, d.Hkv, Lc}, query.options().dtype(at::kFloat));

  auto run = [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / d.Hkv, h = i % d.Hkv;
      const at::Tensor qg = q[b][h].to(at::kFloat).contiguous();
      const at::Tensor kg = key[b][h].to(at::kFloat).contiguous();
      at::Tensor acc = per_head[b][h];
      score_group(qg, kg, l.defined() ? l[b][h] : at::Tensor(), scale, d.Lq, Lc, valid[b], acc);
    }
  };
  // Many groups: one per thread. Few groups: run them in turn and let BLAS use every thread.
  if (d.B * d.Hkv >= at::get_num_threads()) {
    at::parallel_for(0, d.B * d.Hkv, 1, run);
  } else {
    run(0, d.B * d.Hkv);
  }
  if (layer) {
    return per_head.sum(1, /*keepdim=*/true).div_(static_cast<double>(d.Hq * d.Lq));
  }
  return per_head.div_(static_cast<double>(G * d.Lq));
}

}  // namespace

TORCH_LIBRARY_IMPL(citrus, CPU, m) { m.impl("chunk_scores", &chunk_scores_cpu); }

}  // namespace citrus
