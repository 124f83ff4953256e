// The `citrus` op library: every schema is declared here once; devices only implement them.
// Also holds the argument checks shared by all devices and `evict`, which composes the three
// building blocks through the dispatcher so that one definition serves CPU and CUDA alike.
#include "checks.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace citrus {

namespace {

std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) {
    s += (i ? ", " : "") + std::to_string(t.size(i));
  }
  return s + "]";
}

void check_floating(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf ||
                       t.scalar_type() == at::kBFloat16,
                   op, ": `", name, "` must be float32, float16 or bfloat16, got ", t.scalar_type());
}

void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                       const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": `", name, "` is on ", t.device(), " but `",
                    ref_name, "` is on ", ref.device(), "; all tensors must be on one device");
}

}  // namespace

bool is_layer_granularity(c10::string_view granularity, const char* op) {
  if (granularity == "layer") return true;
  if (granularity == "kv_head") return false;
  TORCH_CHECK_VALUE(false, op, ": `granularity` must be \"layer\" or \"kv_head\", got \"",
                    std::string(granularity), "\"");
  return false;
}

AttnDims check_attention_args(const char* op, const at::Tensor& query, const at::Tensor& key,
                              double scale, const std::optional<at::Tensor>& lse,
                              const std::optional<at::Tensor>& cache_lens) {
  TORCH_CHECK_VALUE(query.dim() == 4, op, ": `query` must be 4-D [B, Hq, Lq, D], got shape ",
                    shape_str(query));
  TORCH_CHECK_VALUE(key.dim() == 4, op, ": `key` must be 4-D [B, Hkv, L, D], got shape ",
                    shape_str(key));
  check_floating(op, "query", query);
  check_floating(op, "key", key);
  TORCH_CHECK_TYPE(query.scalar_type() == key.scalar_type(), op, ": `query` is ",
                   query.scalar_type(), " but `key` is ", key.scalar_type(),
                   "; they must share a dtype");
  check_same_device(op, "key", key, query, "query");
  AttnDims d{query.size(0), query.size(1), key.size(1), query.size(2), key.size(2), query.size(3)};
  TORCH_CHECK_VALUE(key.size(0) == d.B, op, ": `key` batch ", key.size(0),
                    " does not match `query` batch ", d.B);
  TORCH_CHECK_VALUE(key.size(3) == d.D, op, ": `key` head_dim ", key.size(3),
                    " does not match `query` head_dim ", d.D);
  TORCH_CHECK_VALUE(d.Hkv > 0 && d.Hq % d.Hkv == 0, op, ": `query` heads (", d.Hq,
                    ") must be a multiple of `key` heads (", d.Hkv, ")");
  TORCH_CHECK_VALUE(d.Lq > 0, op, ": `query` must hold at least one query (Lq = 0)");
  TORCH_CHECK_VALUE(d.Lq <= d.L, op, ": `query` length Lq = ", d.Lq, " exceeds `key` length L = ",
                    d.L, "; the last Lq keys must be the queries' own states");
  TORCH_CHECK_VALUE(d.L > d.Lq, op, ": `key` holds no cache states (L == Lq == ", d.L,
                    "); there is nothing to score or evict");
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": `scale` must be finite, got ", scale);
  if (lse.has_value()) {
    const auto& l = *lse;
    check_same_device(op, "lse", l, query, "query");
    TORCH_CHECK_TYPE(at::isFloatingType(l.scalar_type()), op, ": `lse` must be floating, got ",
                     l.scalar_type());
    TORCH_CHECK_VALUE(l.dim() == 3 && l.size(0) == d.B && l.size(1) == d.Hq && l.size(2) == d.Lq,
                      op, ": `lse` must have shape [B, Hq, Lq] = [", d.B, ", ", d.Hq, ", ", d.Lq,
                      "], got ", shape_str(l));
  }
  if (cache_lens.has_value()) {
    const auto& c = *cache_lens;
    check_same_device(op, "cache_lens", c, query, "query");
    TORCH_CHECK_TYPE(c.scalar_type() == at::kLong || c.scalar_type() == at::kInt, op,
                     ": `cache_lens` must be int32 or int64, got ", c.scalar_type());
    TORCH_CHECK_VALUE(c.dim() == 1 && c.size(0) == d.B, op,
                      ": `cache_lens` must have shape [B] = [", d.B, "], got ", shape_str(c));
  }
  return d;
}

void check_value_like_key(const char* op, const at::Tensor& key, const at::Tensor& value) {
  TORCH_CHECK_VALUE(value.dim() == 4, op, ": `value` must be 4-D [B, Hkv, L, Dv], got shape ",
                    shape_str(value));
  TORCH_CHECK_VALUE(value.size(0) == key.size(0) && value.size(1) == key.size(1) &&
                        value.size(2) == key.size(2),
                    op, ": `value` shape ", shape_str(value), " does not match `key` shape ",
                    shape_str(key), " in batch, heads and length");
  TORCH_CHECK_TYPE(value.scalar_type() == key.scalar_type(), op, ": `value` is ",
                   value.scalar_type(), " but `key` is ", key.scalar_type(),
                   "; they must share a dtype");
  check_same_device(op, "value", value, key, "key");
}

int64_t check_compact_args(const at::Tensor& key, const at::Tensor& value, const at::Tensor& kept,
                           const std::optional<at::Tensor>& key_new,
                           const std::optional<at::Tensor>& value_new) {
  const char* op = "citrus.compact_kv";
  TORCH_CHECK_VALUE(key.dim() == 4, op, ": `key` must be 4-D [B, H, L, D], got shape ",
                    shape_str(key));
  check_value_like_key(op, key, value);
  TORCH_CHECK_TYPE(kept.scalar_type() == at::kLong || kept.scalar_type() == at::kInt, op,
                   ": `kept` must be int64 or int32, got ", kept.scalar_type());
  check_same_device(op, "kept", kept, key, "key");
  TORCH_CHECK_VALUE(kept.dim() == 3 && kept.size(0) == key.size(0) &&
                        (kept.size(1) == 1 || kept.size(1) == key.size(1)),
                    op, ": `kept` must have shape [B, 1 or H, K] with B = ", key.size(0),
                    " and H = ", key.size(1), ", got ", shape_str(kept));
  TORCH_CHECK_VALUE(key_new.has_value() == value_new.has_value(), op,
                    ": `key_new` and `value_new` must be given together");
  if (key_new.has_value()) {
    const auto& kn = *key_new;
    const auto& vn = *value_new;
    TORCH_CHECK_VALUE(kn.dim() == 4 && kn.size(0) == key.size(0) && kn.size(1) == key.size(1) &&
                          kn.size(3) == key.size(3),
                      op, ": `key_new` must have shape [B, H, Ln, D] = [", key.size(0), ", ",
                      key.size(1), ", Ln, ", key.size(3), "], got ", shape_str(kn));
    TORCH_CHECK_VALUE(vn.dim() == 4 && vn.size(0) == value.size(0) &&
                          vn.size(1) == value.size(1) && vn.size(2) == kn.size(2) &&
                          vn.size(3) == value.size(3),
                      op, ": `value_new` must have shape [B, H, Ln, Dv] = [", value.size(0), ", ",
                      value.size(1), ", ", kn.size(2), ", ", value.size(3), "], got ",
                      shape_str(vn));
    TORCH_CHECK_TYPE(kn.scalar_type() == key.scalar_type() &&
                         vn.scalar_type() == key.scalar_type(),
                     op, ": `key_new` and `value_new` must have `key`'s dtype ", key.scalar_type());
    check_same_device(op, "key_new", kn, key, "key");
    check_same_device(op, "value_new", vn, key, "key");
  }
  return kept.size(2);
}

void check_topk_args(const at::Tensor& scores, int64_t k, const std::optional<at::Tensor>& lengths) {
  const char* op = "citrus.segmented_topk";
  TORCH_CHECK_VALUE(scores.dim() == 2, op, ": `scores` must be 2-D [S, L], got shape ",
                    shape_str(scores));
  check_floating(op, "scores", scores);
  TORCH_CHECK_VALUE(k >= 0, op, ": `k` must be >= 0, got ", k);
  if (lengths.has_value()) {
    const auto& n = *lengths;
    check_same_device(op, "lengths", n, scores, "scores");
    TORCH_CHECK_TYPE(n.scalar_type() == at::kLong || n.scalar_type() == at::kInt, op,
                     ": `lengths` must be int32 or int64, got ", n.scalar_type());
    TORCH_CHECK_VALUE(n.dim() == 1 && n.size(0) == scores.size(0), op,
                      ": `lengths` must have shape [S] = [", scores.size(0), "], got ",
                      shape_str(n));
  }
}

// evict = chunk_scores -> segmented_topk -> compact_kv. The shapes are known on the host, so
// nothing here synchronises with the device.
std::tuple<at::Tensor, at::Tensor, at::Tensor> evict(const at::Tensor& query, const at::Tensor& key,
                                                     const at::Tensor& value, int64_t keep,
                                                     double scale,
                                                     const std::optional<at::Tensor>& lse,
                                                     c10::string_view granularity, bool keep_own) {
  const char* op = "citrus.evict";
  const AttnDims d = check_attention_args(op, query, key, scale, lse, std::nullopt);
  check_value_like_key(op, key, value);
  TORCH_CHECK_VALUE(keep >= 0, op, ": `keep` must be >= 0, got ", keep);
  const bool layer = is_layer_granularity(granularity, op);
  const int64_t R = layer ? 1 : d.Hkv;
  const int64_t Lc = d.cache();
  const int64_t kk = std::min(keep, Lc);

  at::Tensor kept;
  if (kk == Lc) {
    // The budget holds the whole cache: nothing to score.
    kept = at::arange(Lc, query.options().dtype(at::kLong)).expand({d.B, R, Lc}).contiguous();
  } else {
    static auto scores_op = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("citrus::chunk_scores", "")
                                .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double,
                                                  const std::optional<at::Tensor>&,
                                                  c10::string_view,
                                                  const std::optional<at::Tensor>&)>();
    static auto topk_op = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("citrus::segmented_topk", "")
                              .typed<at::Tensor(const at::Tensor&, int64_t,
                                                const std::optional<at::Tensor>&)>();
    at::Tensor scores = scores_op.call(query, key, scale, lse, granularity, std::nullopt);
    kept = topk_op.call(scores.view({d.B * R, Lc}), kk, std::nullopt).view({d.B, R, kk});
  }

  static auto compact_op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("citrus::compact_kv", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&)>();
  std::optional<at::Tensor> key_new, value_new;
  if (keep_own) {
    key_new = key.narrow(2, Lc, d.Lq);
    value_new = value.narrow(2, Lc, d.Lq);
  }
  auto [key_out, value_out] = compact_op.call(key, value, kept, key_new, value_new);
  return {key_out, value_out, kept};
}

TORCH_LIBRARY(citrus, m) {
  m.def(
      "chunk_scores(Tensor query, Tensor key, float scale, Tensor? lse=None, "
      "str granularity=\"layer\", Tensor? cache_lens=None) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def("segmented_topk(Tensor scores, int k, Tensor? lengths=None) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def(
      "compact_kv(Tensor key, Tensor value, Tensor kept, Tensor? key_new=None, "
      "Tensor? value_new=None) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "evict(Tensor query, Tensor key, Tensor value, int keep, float scale, Tensor? lse=None, "
      "str granularity=\"layer\", bool keep_own=True) -> (Tensor key_out, Tensor value_out, "
      "Tensor kept)",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(citrus, CPU, m) { m.impl("evict", &evict); }

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(citrus, CUDA, m) { m.impl("evict", &evict); }
#endif

}  // namespace citrus
