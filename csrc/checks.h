// Argument validation shared by every device's kernels, so errors read the same everywhere.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <string>

namespace citrus {

// Sizes of an attention call: queries [B, Hq, Lq, D] against keys [B, Hkv, L, D], the first
// L - Lq keys being the cache and the last Lq the queries' own (causal) states.
struct AttnDims {
  int64_t B, Hq, Hkv, Lq, L, D;
  int64_t cache() const { return L - Lq; }
  int64_t group() const { return Hq / Hkv; }
};

// "layer" -> true, "kv_head" -> false; anything else is an error naming `granularity`.
bool is_layer_granularity(c10::string_view granularity, const char* op);

// Validates query/key/lse/scale/cache_lens for score reduction and returns the sizes.
AttnDims check_attention_args(const char* op, const at::Tensor& query, const at::Tensor& key,
                              double scale, const std::optional<at::Tensor>& lse,
                              const std::optional<at::Tensor>& cache_lens);

// Validates `value` against `key` ([B, H, L, Dv], same dtype and device).
void check_value_like_key(const char* op, const at::Tensor& key, const at::Tensor& value);

// Validates compact_kv's arguments; returns the number of kept states per row.
int64_t check_compact_args(const at::Tensor& key, const at::Tensor& value, const at::Tensor& kept,
                           const std::optional<at::Tensor>& key_new,
                           const std::optional<at::Tensor>& value_new);

// Validates segmented_topk's arguments.
void check_topk_args(const at::Tensor& scores, int64_t k, const std::optional<at::Tensor>& lengths);

}  // namespace citrus
