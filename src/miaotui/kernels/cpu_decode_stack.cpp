// A Llama-family decoder stack's decode step in one call, registered as the torch op
// miaotui_cpu::decode_stack (a fragment of the library cpu_matmul.cpp defines).
//
// Why: on 2 CPU cores a batch-1 decode step of a small model spent about a third of its time in
// Python (module calls, views and op dispatch: ~270 us per layer against ~450 us of kernels).
// This op runs every layer's norm, QKV matmul, Q/K head norms (Qwen3), rotary, K/V write, paged
// attention, O matmul, residual, norm, gate/up matmul, silu-and-mul, down matmul and residual by
// calling the same kernels as the layers do (cpu_ops.h), in the same order on the same fp32
// values, so its output is bit for bit the eager step's. Built by kernels/cpu_build.py.
#include <cstring>

#include <immintrin.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <torch/library.h>

#include "cpu_ops.h"

namespace {

// Tensors per layer in `weights`, in this order. kQNorm / kKNorm: the RMSNorm weights [D] shared by all
// Q heads / all K heads (Qwen3), or both empty for a model without Q/K norms.
enum Slot : int64_t {
  kInNorm, kQkv, kQkvScales, kQkvBias, kQNorm, kKNorm, kO, kOScales, kPostNorm, kGateUp, kGateUpScales, kDown,
  kDownScales, kSlotsPerLayer
};

// x [M, K] @ W^T for a weight of any kind: q4 rows (cpu_q4.h; uint8 [N, K / 32 * 20 or 24]: fp16 or
// fp32 scales, told apart by the row size), per-row int8 (int8 [N, K] with fp32 scales [N]) or
// int8 with a scale per group of 32 (scales [N, K / 32]: GGUF Q8_0 / MXFP4 as stored).
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales) {
  if (weight.scalar_type() == at::kByte)
    return miaotui_cpu::q4_linear(x, weight, weight.size(1) == x.size(1) / 32 * 20);
  if (scales.dim() == 2) return miaotui_cpu::q8_group_linear(x, weight, scales);  // a scale per group of 32
  return miaotui_cpu::q8_linear(x, weight, scales);
}

// h += y, both contiguous fp32 of one shape (the residual adds; the same IEEE sums as torch's).
void add_into(at::Tensor& h, const at::Tensor& y) {
  TORCH_CHECK(y.sizes() == h.sizes() && y.is_contiguous(), "decode_stack: residual shapes differ");
  float* hp = h.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  for (int64_t i = 0, n = h.numel(); i < n; ++i) hp[i] += yp[i];
}

// Row b's `width` floats at src + b * stride go to cache row slots[b] (a cache row is one token's
// KVH * D values: caches are [blocks, block_size, KVH, D], contiguous), fp32 as they are, fp16
// rounded to nearest even as torch's conversion (the layers' index_copy_ of key.to(fp16)) does.
void write_rows(const float* src, int64_t stride, int64_t width, const int64_t* slots, int64_t rows,
                at::Tensor& cache) {
  const int64_t cache_rows = cache.size(0) * cache.size(1);
  const bool half = cache.scalar_type() == at::kHalf;
  for (int64_t b = 0; b < rows; ++b) {
    TORCH_CHECK(slots[b] >= 0 && slots[b] < cache_rows, "decode_stack: slot ", slots[b], " is outside the cache");
    const float* from = src + b * stride;
    if (!half) {
      std::memcpy(cache.data_ptr<float>() + slots[b] * width, from, width * sizeof(float));
      continue;
    }
    uint16_t* to = reinterpret_cast<uint16_t*>(cache.data_ptr<at::Half>()) + slots[b] * width;
    int64_t i = 0;
    for (; i + 8 <= width; i += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(to + i),
                       _mm256_cvtps_ph(_mm256_loadu_ps(from + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < width; ++i) to[i] = _cvtss_sh(from[i], _MM_FROUND_TO_NEAREST_INT);
  }
}

}  // namespace

namespace miaotui_cpu {

// h [B, hidden]: the embeddings of B single-token sequences (row b is sequence b). cos and
// signed_sin [B, 1, D]: RotaryEmbedding.cos_sin of their positions. weights: kSlotsPerLayer
// tensors per layer (an absent QKV bias or Q/K norm is an empty tensor). k_caches / v_caches: one pair per
// layer, written at slot_mapping [B]. block_tables [B, nb] and seq_lens [B] as the paged
// attention kernel takes them. Returns the last layer's output (before the final norm).
at::Tensor decode_stack(const at::Tensor& h_in, const at::Tensor& cos, const at::Tensor& signed_sin,
                        at::TensorList weights, at::TensorList k_caches, at::TensorList v_caches,
                        const at::Tensor& slot_mapping, const at::Tensor& block_tables, const at::Tensor& seq_lens,
                        int64_t num_heads, int64_t num_kv_heads, double scale, double eps) {
  const int64_t layers = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == layers * kSlotsPerLayer &&
              static_cast<int64_t>(v_caches.size()) == layers,
              "decode_stack: need ", kSlotsPerLayer, " weights and one K and one V cache per layer");
  TORCH_CHECK(h_in.dim() == 2 && h_in.scalar_type() == at::kFloat && h_in.is_cpu(),
              "decode_stack: h must be fp32 CPU [B, hidden]");
  const int64_t B = h_in.size(0);
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() && slot_mapping.numel() == B,
              "decode_stack: slot_mapping must be contiguous int64 [B]");
  TORCH_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, "decode_stack: bad head counts");
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  at::Tensor h = h_in.contiguous().clone();
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor* w = weights.data() + l * kSlotsPerLayer;
    at::Tensor k_cache = k_caches[l], v_cache = v_caches[l];
    TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(2) == num_kv_heads &&
                (k_cache.scalar_type() == at::kFloat || k_cache.scalar_type() == at::kHalf) &&
                k_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes() && v_cache.is_contiguous() &&
                v_cache.scalar_type() == k_cache.scalar_type(), "decode_stack: layer ", l,
                ": caches must be contiguous fp32 or fp16 [blocks, block_size, ", num_kv_heads,
                ", D] of one shape and dtype");
    const int64_t D = k_cache.size(3), q_width = num_heads * D, kv_width = num_kv_heads * D;
    // Attention: norm, QKV (+ bias), Q/K head norms, rotary of the Q and K heads together, K/V into the cache.
    at::Tensor qkv = linear(rms_norm(h, w[kInNorm], eps), w[kQkv], w[kQkvScales]);
    if (w[kQkvBias].numel() != 0) qkv = qkv.add(w[kQkvBias]);
    TORCH_CHECK(qkv.size(1) == q_width + 2 * kv_width, "decode_stack: layer ", l, ": QKV width ", qkv.size(1),
                " does not match the head counts");
    at::Tensor heads = qkv.narrow(1, 0, q_width + kv_width).view({B, num_heads + num_kv_heads, D});
    TORCH_CHECK((w[kQNorm].numel() == 0) == (w[kKNorm].numel() == 0), "decode_stack: layer ", l,
                ": give both Q and K norm weights or neither");
    if (w[kQNorm].numel() != 0) {
      // As the layers: each head's D values normalized by the kernel, Q heads then K heads, before RoPE.
      const at::Tensor q_heads = heads.narrow(1, 0, num_heads).contiguous();
      const at::Tensor k_heads = heads.narrow(1, num_heads, num_kv_heads).contiguous();
      heads = at::cat({rms_norm(q_heads, w[kQNorm], eps), rms_norm(k_heads, w[kKNorm], eps)}, 1);
    }
    const at::Tensor qk = rotary(heads, cos, signed_sin);  // [B, H + KVH, D], contiguous
    write_rows(qk.data_ptr<float>() + q_width, q_width + kv_width, kv_width, slots, B, k_cache);
    write_rows(qkv.data_ptr<float>() + q_width + kv_width, qkv.size(1), kv_width, slots, B, v_cache);
    const at::Tensor q = qk.narrow(1, 0, num_heads).contiguous();
    const at::Tensor attn = paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale);
    add_into(h, linear(attn.view({B, q_width}), w[kO], w[kOScales]));
    // MLP.
    const at::Tensor gate_up = linear(rms_norm(h, w[kPostNorm], eps), w[kGateUp], w[kGateUpScales]);
    add_into(h, linear(silu_and_mul(gate_up), w[kDown], w[kDownScales]));
  }
  return h;
}

}  // namespace miaotui_cpu

TORCH_LIBRARY_FRAGMENT(miaotui_cpu, lib) {
  lib.def("decode_stack(Tensor h, Tensor cos, Tensor signed_sin, Tensor[] weights, Tensor(a!)[] k_caches, "
          "Tensor(b!)[] v_caches, Tensor slot_mapping, Tensor block_tables, Tensor seq_lens, int num_heads, "
          "int num_kv_heads, float scale, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(miaotui_cpu, CPU, lib) {
  lib.impl("decode_stack", &miaotui_cpu::decode_stack);
}
