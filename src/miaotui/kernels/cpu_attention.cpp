// Paged decode attention for x86 with AVX2 + FMA, registered as the torch op
// miaotui_cpu::paged_decode_attention (a fragment of the library cpu_matmul.cpp defines).
// Built by kernels/cpu_build.py.
#include <cmath>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "cpu_ops.h"
#include "cpu_simd.h"

namespace {

using miaotui_cpu::exp8;
using miaotui_cpu::hsum;
using miaotui_cpu::hsum8;

// 8 cache values as floats: fp32 caches as they are, fp16 ones (stored as their bits) widened.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// The attention of paged_decode_attention below over caches of element type C (float or fp16 bits).
template <typename C>
void attend(const float* qp, const C* kp, const C* vp, const int64_t* tables, const int64_t* lens, int64_t B,
            int64_t H, int64_t KVH, int64_t D, int64_t BS, int64_t nb, float fscale, int64_t window, float* op) {
  const int64_t G = H / KVH;
  // One task per (sequence, KV head): its G query heads share every K and V row it reads. With
  // fewer such tasks than a few per thread (a batch-1 step has KVH of them, 3 for SmolLM2 on
  // 2 threads), a task is one query head instead, so no thread idles for a third of the step.
  const int64_t slices = B * KVH >= 4 * at::get_num_threads() ? 1 : G, per_slice = G / slices;
  at::parallel_for(0, B * KVH * slices, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> probs;
    std::vector<int64_t> offsets;  // token t's K (and V) row of this KV head, from the cache start
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / (KVH * slices), kvh = task / slices % KVH, g0 = task % slices * per_slice;
      const int64_t L = lens[b], Lp = (L + 7) / 8 * 8;
      // A sliding window w attends only the last w tokens: [S, L). Positions before S are never
      // read (their blocks may already be released and point at a placeholder) and weigh 0.
      const int64_t S = window > 0 && L > window ? L - window : 0;
      probs.assign(per_slice * Lp, -INFINITY);
      offsets.resize(L);
      for (int64_t t = S, j = S / BS; t < L; ++j)  // block by block: no division per token
        for (int64_t i = t % BS, base = (tables[b * nb + j] * BS * KVH + kvh) * D; i < BS && t < L; ++i, ++t)
          offsets[t] = base + i * KVH * D;
      auto row = [&](const C* cache, int64_t t) { return cache + offsets[t]; };
      for (int64_t g = 0; g < per_slice; ++g) {
        const float* qh = qp + (b * H + kvh * G + g0 + g) * D;
        float* scores = probs.data() + g * Lp;
        int64_t t = S;
        for (; t + 8 <= L; t += 8) {  // 8 tokens: 8 independent FMA chains, one 8-score store
          __m256 acc[8];
          for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
          for (int64_t d = 0; d < D; d += 8) {
            const __m256 qv = _mm256_loadu_ps(qh + d);
            for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(qv, load8(row(kp, t + i) + d), acc[i]);
          }
          _mm256_storeu_ps(scores + t, _mm256_mul_ps(hsum8(acc), _mm256_set1_ps(fscale)));
        }
        for (; t < L; ++t) {
          __m256 acc = _mm256_setzero_ps();
          for (int64_t d = 0; d < D; d += 8)
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(qh + d), load8(row(kp, t) + d), acc);
          scores[t] = hsum(acc) * fscale;
        }
      }
      for (int64_t g = 0; g < per_slice; ++g) {
        float* p = probs.data() + g * Lp;
        __m256 vmax = _mm256_set1_ps(-INFINITY);
        for (int64_t t = 0; t < Lp; t += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(p + t));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const __m256 mx = _mm256_set1_ps(_mm_cvtss_f32(m4));
        __m256 vsum = _mm256_setzero_ps();
        for (int64_t t = 0; t < Lp; t += 8) {  // padding holds -inf: exp8 clamps it to ~1e-38, zeroed below
          const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + t), mx));
          _mm256_storeu_ps(p + t, e);
        }
        for (int64_t t = L; t < Lp; ++t) p[t] = 0.0f;
        for (int64_t t = 0; t < S; ++t) p[t] = 0.0f;
        for (int64_t t = 0; t < Lp; t += 8) vsum = _mm256_add_ps(vsum, _mm256_loadu_ps(p + t));
        const float inv = 1.0f / hsum(vsum);
        float* o = op + (b * H + kvh * G + g0 + g) * D;
        // The weighted sum of V rows, 64 dimensions at a time in registers (then any rest).
        int64_t d0 = 0;
        for (; d0 + 64 <= D; d0 += 64) {
          __m256 acc[8];
          for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
          for (int64_t t = S; t < L; ++t) {
            const __m256 w = _mm256_set1_ps(p[t] * inv);
            const C* v = row(vp, t) + d0;
            for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(w, load8(v + 8 * i), acc[i]);
          }
          for (int i = 0; i < 8; ++i) _mm256_storeu_ps(o + d0 + 8 * i, acc[i]);
        }
        for (int64_t d = d0; d < D; ++d) o[d] = 0.0f;
        for (int64_t t = S; d0 < D && t < L; ++t) {
          const __m256 w = _mm256_set1_ps(p[t] * inv);
          const C* v = row(vp, t);
          for (int64_t d = d0; d < D; d += 8)
            _mm256_storeu_ps(o + d, _mm256_fmadd_ps(w, load8(v + d), _mm256_loadu_ps(o + d)));
        }
      }
    }
  });
}

}  // namespace

namespace miaotui_cpu {

// Decode attention straight from the paged cache: one query token per sequence, causal over its
// seq_len cached tokens (with window > 0, over the last `window` of them), fp32 throughout (scores, an exact two-pass softmax, the weighted sum)
// over fp32 caches or fp16 ones (--kv-cache-dtype float16: half the cache memory).
// Reading K and V where they lie replaces gathering every sequence's blocks into a padded copy
// and masking it (the copy cost as much as the attention at batch 16).
// q [B, H, D]; caches [blocks, block_size, KVH, D]; block_tables [B, nb] int64; seq_lens [B].
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                                  int64_t window) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous() && q.is_cpu(),
              "paged_decode_attention: q must be contiguous fp32 CPU [B, H, D]");
  TORCH_CHECK(k_cache.dim() == 4 && (k_cache.scalar_type() == at::kFloat || k_cache.scalar_type() == at::kHalf) &&
              k_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes() &&
              v_cache.scalar_type() == k_cache.scalar_type() && v_cache.is_contiguous(),
              "paged_decode_attention: caches must be contiguous fp32 or fp16 [blocks, block_size, KVH, D] of one "
              "shape and dtype");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t BS = k_cache.size(1), KVH = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D && D % 8 == 0 && H % KVH == 0,
              "paged_decode_attention: head sizes do not match (D a multiple of 8, H a multiple of KVH)");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == B && block_tables.scalar_type() == at::kLong &&
              block_tables.is_contiguous() && seq_lens.numel() == B && seq_lens.scalar_type() == at::kLong &&
              seq_lens.is_contiguous(),
              "paged_decode_attention: block_tables [B, nb] and seq_lens [B] must be int64");
  const int64_t nb = block_tables.size(1);
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(lens[b] >= 1 && lens[b] <= nb * BS, "paged_decode_attention: seq_len ", lens[b], " of row ", b,
                " does not fit its ", nb, " blocks of ", BS);
  at::Tensor out = at::empty_like(q);
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const float fscale = static_cast<float>(scale);
  TORCH_CHECK(window >= 0, "paged_decode_attention: window must be >= 0 (0: none), got ", window);
  if (k_cache.scalar_type() == at::kFloat)
    attend(q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), tables, lens, B, H, KVH, D,
           BS, nb, fscale, window, out.data_ptr<float>());
  else
    attend(q.data_ptr<float>(), reinterpret_cast<const uint16_t*>(k_cache.data_ptr<at::Half>()),
           reinterpret_cast<const uint16_t*>(v_cache.data_ptr<at::Half>()), tables, lens, B, H, KVH, D, BS, nb,
           fscale, window, out.data_ptr<float>());
  return out;
}

}  // namespace miaotui_cpu

TORCH_LIBRARY_FRAGMENT(miaotui_cpu, lib) {
  lib.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
          "float scale, int window=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(miaotui_cpu, CPU, lib) {
  lib.impl("paged_decode_attention", &miaotui_cpu::paged_decode_attention);
}
