// CPU kernel of citrus::chunk_scores: the SPEC importance score of every cache state,
//   score[j] = mean over query heads h and queries t of exp(q[h,t]·k[j]·scale − lse[h,t]),
// without materialising the [Hq, Lq, L] probabilities. Each (batch, KV head) pair stacks the
// G = Hq/Hkv query heads of its group into G·Lq rows that share one key matrix; rows are taken
// a block at a time, so only a [rows, L] tile of logits exists per thread; ATen's vectorised
// exp runs once per logit, in place, and column sums (or a gemv with the rows' 1/sum) add the
// tile into the scores.
#include "checks.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>

namespace citrus {
namespace {

// Logit tile budget per thread (floats): big enough that BLAS runs at full speed and the key
// matrix is re-read only a few times, small enough to stay far below [Hq, Lq, L].
constexpr int64_t kTileFloats = int64_t(1) << 20;

// Adds, over the rows of one (batch, KV head) group, exp(logit − lse) on the cache columns.
// q: [rows, D] fp32 scaled, k: [L, D] fp32, lse: [rows] fp32 or undefined, acc: [Lc] fp32.
// Rows [r0, r0 + nr) are row r's query t = r mod Lq.
void score_rows(const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse, int64_t r0,
                int64_t nr, int64_t Lq, int64_t Lc, int64_t valid_cache, at::Tensor& acc) {
  // With a given lse only the cache columns are needed; otherwise the own keys join the normaliser.
  const int64_t ncols = lse.defined() ? Lc : k.size(0);
  at::Tensor logits = at::mm(q.narrow(0, r0, nr), k.narrow(0, 0, ncols).t());
  float* data = logits.data_ptr<float>();
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < nr; ++r) {
    float* x = data + r * ncols;
    // Padding between the valid cache and the own keys is seen by no query; query t sees its
    // own keys 0..t only (causal).
    std::fill(x + valid_cache, x + Lc, neg_inf);
    if (!lse.defined()) std::fill(x + Lc + (r0 + r) % Lq + 1, x + ncols, neg_inf);
  }
  if (lse.defined()) {
    logits.sub_(lse.narrow(0, r0, nr).unsqueeze(1)).exp_();
    acc.add_(logits.sum(0));
  } else {
    // exp(x − max) once per logit; the rows' 1/sum then weigh the cache columns (one gemv).
    logits.sub_(at::amax(logits, {1}, /*keepdim=*/true)).exp_();
    acc.addmv_(logits.narrow(1, 0, Lc).t(), logits.sum(1).reciprocal_());
  }
}

at::Tensor chunk_scores_cpu(const at::Tensor& query, const at::Tensor& key, double scale,
                            const std::optional<at::Tensor>& lse, c10::string_view granularity,
                            const std::optional<at::Tensor>& cache_lens) {
  const char* op = "citrus.chunk_scores";
  const AttnDims d = check_attention_args(op, query, key, scale, lse, cache_lens);
  const bool layer = is_layer_granularity(granularity, op);
  const int64_t G = d.group(), Lc = d.cache(), rows = G * d.Lq, groups = d.B * d.Hkv;

  // [B, Hkv, G*Lq, D]: the query heads of one KV group stacked as rows.
  const at::Tensor q = query.reshape({d.B, d.Hkv, rows, d.D});
  const at::Tensor l =
      lse.has_value() ? lse->to(at::kFloat).reshape({d.B, d.Hkv, rows}).contiguous() : at::Tensor();
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
  at::Tensor per_head = at::zeros({d.B, d.Hkv, Lc}, query.options().dtype(at::kFloat));
  const int64_t ncols = lse.has_value() ? Lc : d.L;
  const int64_t max_block = std::max<int64_t>(1, kTileFloats / ncols);
  const int64_t threads = at::get_num_threads();
  auto group_inputs = [&](int64_t i) {
    const int64_t b = i / d.Hkv, h = i % d.Hkv;
    return std::make_tuple(b, (q[b][h].to(at::kFloat) * scale).contiguous(),
                           key[b][h].to(at::kFloat).contiguous(),
                           l.defined() ? l[b][h] : at::Tensor());
  };

  if (groups % threads == 0 || groups >= 4 * threads) {
    // Enough groups to share out evenly: one group per task, BLAS single-threaded inside.
    at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        auto [b, qg, kg, lg] = group_inputs(i);
        at::Tensor acc = per_head[b][i % d.Hkv];
        for (int64_t r0 = 0; r0 < rows; r0 += max_block) {
          score_rows(qg, kg, lg, r0, std::min(max_block, rows - r0), d.Lq, Lc, valid[b], acc);
        }
      }
    });
  } else {
    // Few groups: split each group's rows across threads, each adding into its own partial sum.
    const int64_t block = std::min(max_block, (rows + threads - 1) / threads);
    const int64_t nblocks = (rows + block - 1) / block;
    at::Tensor partial = at::zeros({threads, Lc}, per_head.options());
    for (int64_t i = 0; i < groups; ++i) {
      auto [b, qg, kg, lg] = group_inputs(i);
      partial.zero_();
      at::parallel_for(0, nblocks, 1, [&](int64_t begin, int64_t end) {
        at::Tensor acc = partial[at::get_thread_num()];
        for (int64_t blk = begin; blk < end; ++blk) {
          const int64_t r0 = blk * block;
          score_rows(qg, kg, lg, r0, std::min(block, rows - r0), d.Lq, Lc, valid[b], acc);
        }
      });
      per_head[b][i % d.Hkv].copy_(partial.sum(0));
    }
  }
  if (layer) {
    return per_head.sum(1, /*keepdim=*/true).div_(static_cast<double>(d.Hq * d.Lq));
  }
  return per_head.div_(static_cast<double>(G * d.Lq));
}

}  // namespace

TORCH_LIBRARY_IMPL(citrus, CPU, m) { m.impl("chunk_scores", &chunk_scores_cpu); }

}  // namespace citrus
