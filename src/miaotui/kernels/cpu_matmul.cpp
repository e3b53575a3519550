// Weight-only matmuls for x86 with AVX2 + FMA + F16C, registered as torch ops miaotui_cpu::q4_linear,
// q4_dequantize (4-bit weights), q8_linear (int8 weights, a scale per row) and q8_group_linear
// (int8 weights, a scale per group of 32: GGUF's Q8_0). Built with the
// other cpu_*.cpp sources into one library by kernels/cpu_build.py.
//
// 4-bit weights are in the q4 layout of cpu_q4.h: per row, the codes of its groups of 32, then
// their scales d, then their offsets m (fp16, or fp32 where fp16 would not hold them exactly);
// w = q * d + m, q in 0..15.
//
// Steps of fewer than kWideRows rows (batch-1 decode) take the 16-bit-activation kernels of
// cpu_matmul_int16.cpp; from kVnniRows rows, on CPUs with AVX-512 VNNI, the same arithmetic in
// cpu_matmul_vnni.cpp (exact integer products, twice the fp32 FMA rate). Other steps keep
// activations fp32: every product is an fp32 FMA on the exactly dequantized weight, so the
// result equals x @ W^T of the dequantized weight up to summation order.
#include <algorithm>
#include <utility>
#include <cmath>
#include <cstring>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu_ops.h"
#include "cpu_q4.h"
#include "cpu_simd.h"

namespace {

using namespace miaotui_cpu;

// The 32 weights of group g of a q4 row, dequantized into w[0..3] (elements 0-7, 8-15, 16-23, 24-31).
template <typename S>
inline void dequant_group(const Q4Row<S>& row, int64_t g, __m256 w[4]) {
  const __m256 d = _mm256_set1_ps(row.d(g)), m = _mm256_set1_ps(row.m(g));
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row.codes(g)));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(bytes, mask);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
  w[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), d, m);
  w[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), d, m);
  w[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), d, m);
  w[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), d, m);
}

// R activation rows (x, row stride K) against one weight row whose K / 32 groups of 32 weights
// `load(g, w)` yields as floats (w[0..3]: elements 0-7, 8-15, 16-23, 24-31):
// y[r * ldy] = scale * (x[r] . w).
template <int R, typename Load>
inline void rows_dot(const float* x, int64_t K, const Load& load, float scale, float* y, int64_t ldy) {
  // Accumulators per activation row: enough independent FMA chains to hide FMA latency, few
  // enough to keep the tile in the 16 vector registers.
  constexpr int A = R == 1 ? 4 : (R <= 4 ? 2 : 1);
  __m256 acc[R][A];
  for (int r = 0; r < R; ++r)
    for (int a = 0; a < A; ++a) acc[r][a] = _mm256_setzero_ps();
  for (int64_t g = 0; g < K / 32; ++g) {
    __m256 w[4];
    load(g, w);
    for (int r = 0; r < R; ++r) {
      const float* xr = x + r * K + g * 32;
      for (int c = 0; c < 4; ++c) acc[r][c % A] = _mm256_fmadd_ps(w[c], _mm256_loadu_ps(xr + 8 * c), acc[r][c % A]);
    }
  }
  for (int r = 0; r < R; ++r) {
    __m256 s = acc[r][0];
    for (int a = 1; a < A; ++a) s = _mm256_add_ps(s, acc[r][a]);
    y[r * ldy] = scale * hsum(s);
  }
}

// One activation tile (R rows from r) against weight rows [p0, p1); `row(n)` gives weight row n
// as (its group loader for rows_dot, the scale of its dots).
template <int R, typename Row>
inline void panel_dots(const float* x, int64_t K, float* y, int64_t N, const Row& row, int64_t r, int64_t p0,
                       int64_t p1) {
  for (int64_t n = p0; n < p1; ++n) {
    const auto [load, scale] = row(n);
    rows_dot<R>(x + r * K, K, load, scale, y + r * N + n, N);
  }
}

// Every (activation row, weight row) dot of y [M, N] = x [M, K] W^T, R activation rows at a time
// (R = 8, 4, 2, 1). Output rows are split across threads, then cut into panels of kPanelRows
// weight rows: a panel (~23 KB of 4-bit weights at K = 576) stays in L2 while every tile of
// activation rows (~18 KB for 8 rows) passes over it from L1. Streaming all of x past each
// weight row instead made batch-16 steps L2-bound.
template <typename Row>
void tiled_rows(const float* x, int64_t M, int64_t K, float* y, int64_t N, const Row& row) {
  constexpr int64_t kPanelRows = 64;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t p0 = n0; p0 < n1; p0 += kPanelRows) {
      const int64_t p1 = std::min(n1, p0 + kPanelRows);
      int64_t r = 0;
      for (; r + 8 <= M; r += 8) panel_dots<8>(x, K, y, N, row, r, p0, p1);
      for (; r + 4 <= M; r += 4) panel_dots<4>(x, K, y, N, row, r, p0, p1);
      for (; r + 2 <= M; r += 2) panel_dots<2>(x, K, y, N, row, r, p0, p1);
      for (; r < M; ++r) panel_dots<1>(x, K, y, N, row, r, p0, p1);
    }
  });
}

// y = x W^T for a q4 weight (rows of cpu_q4.h) on fp32 activations.
template <typename S>
void q4_tiled(const float* x, int64_t M, int64_t K, const uint8_t* blocks, float* y, int64_t N) {
  tiled_rows(x, M, K, y, N, [=](int64_t n) {
    const Q4Row<S> row{blocks + n * (K / 32 * q4_group_bytes<S>()), K / 32};
    return std::make_pair([row](int64_t g, __m256 w[4]) { dequant_group<S>(row, g, w); }, 1.0f);
  });
}

template <typename S>
void dequantize_rows(const uint8_t* blocks, int64_t N, int64_t K, float* w) {
  const int64_t row_bytes = K / 32 * q4_group_bytes<S>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t g = 0; g < K / 32; ++g) {
        __m256 v[4];
        dequant_group<S>(Q4Row<S>{blocks + n * row_bytes, K / 32}, g, v);
        for (int c = 0; c < 4; ++c) _mm256_storeu_ps(w + n * K + g * 32 + 8 * c, v[c]);
      }
  });
}

// int8 codes: the 32 of group g of a row, as floats (unscaled).
inline void int8_group(const int8_t* row, int64_t g, __m256 w[4]) {
  const __m128i b0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + g * 32));
  const __m128i b1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + g * 32 + 16));
  w[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b0));
  w[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b0, 8)));
  w[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b1));
  w[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b1, 8)));
}

}  // namespace

namespace miaotui_cpu {

at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.is_cpu(),
              "q8_linear: x must be a contiguous fp32 CPU [M, K] tensor");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kChar && qweight.is_contiguous() &&
              qweight.size(1) == K, "q8_linear: qweight must be contiguous int8 [N, ", K, "]");
  TORCH_CHECK(K % 32 == 0, "q8_linear: in_features ", K, " is not a multiple of 32");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == N,
              "q8_linear: scales must be contiguous fp32 [N]");
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  if (M >= kVnniRows && wide_int16_available()) {
    q8_wide_int16_matmul(x.data_ptr<float>(), M, K, qweight.data_ptr<int8_t>(), scales.data_ptr<float>(), true,
                         y.data_ptr<float>(), N);
    return y;
  }
  const int8_t* q = qweight.data_ptr<int8_t>();
  const float* s = scales.data_ptr<float>();
  tiled_rows(x.data_ptr<float>(), M, K, y.data_ptr<float>(), N, [=](int64_t n) {
    const int8_t* row = q + n * K;
    return std::make_pair([row](int64_t g, __m256 w[4]) { int8_group(row, g, w); }, s[n]);
  });
  return y;
}

at::Tensor q8_group_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& group_scales) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.is_cpu(),
              "q8_group_linear: x must be a contiguous fp32 CPU [M, K] tensor");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kChar && qweight.is_contiguous() &&
              qweight.size(1) == K, "q8_group_linear: qweight must be contiguous int8 [N, ", K, "]");
  TORCH_CHECK(K % 32 == 0, "q8_group_linear: in_features ", K, " is not a multiple of 32");
  TORCH_CHECK(group_scales.scalar_type() == at::kFloat && group_scales.is_contiguous() &&
              group_scales.numel() == N * (K / 32), "q8_group_linear: group_scales must be contiguous fp32 [N, K / 32]");
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  if (M < kWideRows) {
    q8_group_int16_matmul(x.data_ptr<float>(), M, K, qweight.data_ptr<int8_t>(), group_scales.data_ptr<float>(),
                          y.data_ptr<float>(), N);
    return y;
  }
  if (M >= kVnniRows && wide_int16_available()) {
    q8_wide_int16_matmul(x.data_ptr<float>(), M, K, qweight.data_ptr<int8_t>(), group_scales.data_ptr<float>(), false,
                         y.data_ptr<float>(), N);
    return y;
  }
  // w = d * q per group of 32 (GGUF's Q8_0; d an fp16 value held in fp32): q * d is exact in
  // fp32 (8 + 11 significant bits).
  const int8_t* q = qweight.data_ptr<int8_t>();
  const float* scales = group_scales.data_ptr<float>();
  tiled_rows(x.data_ptr<float>(), M, K, y.data_ptr<float>(), N, [=](int64_t n) {
    const int8_t* row = q + n * K;
    const float* d = scales + n * (K / 32);
    return std::make_pair([row, d](int64_t g, __m256 w[4]) {
      int8_group(row, g, w);
      const __m256 dg = _mm256_set1_ps(d[g]);
      for (int c = 0; c < 4; ++c) w[c] = _mm256_mul_ps(w[c], dg);
    }, 1.0f);
  });
  return y;
}

namespace {

void check_blocks(const at::Tensor& blocks, int64_t K, bool fp16_scales) {
  TORCH_CHECK(blocks.dim() == 2 && blocks.scalar_type() == at::kByte && blocks.is_contiguous() && blocks.is_cpu(),
              "q4 blocks: must be a contiguous CPU uint8 [N, K / 32 * block bytes] tensor");
  TORCH_CHECK(K % 32 == 0, "q4 blocks: in_features ", K, " is not a multiple of 32");
  const int64_t per_block = fp16_scales ? q4_group_bytes<uint16_t>() : q4_group_bytes<float>();
  TORCH_CHECK(blocks.size(1) == K / 32 * per_block, "q4 blocks: ", blocks.size(1), " bytes per row do not fit ",
              K, " in_features");
}

}  // namespace

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& blocks, bool fp16_scales) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.is_cpu(),
              "q4_linear: x must be a contiguous fp32 CPU [M, K] tensor");
  const int64_t M = x.size(0), K = x.size(1), N = blocks.size(0);
  check_blocks(blocks, K, fp16_scales);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  if (M < kWideRows) {
    q4_int16_matmul(x.data_ptr<float>(), M, K, blocks.data_ptr<uint8_t>(), fp16_scales, y.data_ptr<float>(), N);
    return y;
  }
  if (M >= kVnniRows && wide_int16_available()) {
    q4_wide_int16_matmul(x.data_ptr<float>(), M, K, blocks.data_ptr<uint8_t>(), fp16_scales, y.data_ptr<float>(), N);
    return y;
  }
  (fp16_scales ? q4_tiled<uint16_t> : q4_tiled<float>)(x.data_ptr<float>(), M, K, blocks.data_ptr<uint8_t>(),
                                                        y.data_ptr<float>(), N);
  return y;
}

at::Tensor q4_dequantize(const at::Tensor& blocks, int64_t K, bool fp16_scales) {
  check_blocks(blocks, K, fp16_scales);
  at::Tensor w = at::empty({blocks.size(0), K}, blocks.options().dtype(at::kFloat));
  auto run = fp16_scales ? dequantize_rows<uint16_t> : dequantize_rows<float>;
  run(blocks.data_ptr<uint8_t>(), blocks.size(0), K, w.data_ptr<float>());
  return w;
}

}  // namespace miaotui_cpu

TORCH_LIBRARY(miaotui_cpu, lib) {
  lib.def("q4_linear(Tensor x, Tensor blocks, bool fp16_scales) -> Tensor");
  lib.def("q4_dequantize(Tensor blocks, int in_features, bool fp16_scales) -> Tensor");
  lib.def("q8_linear(Tensor x, Tensor qweight, Tensor scales) -> Tensor");
  lib.def("q8_group_linear(Tensor x, Tensor qweight, Tensor group_scales) -> Tensor");
  // No tensors to dispatch on: one implementation for every backend.
  lib.def("wide_int16_available() -> bool", &miaotui_cpu::wide_int16_available);
}

TORCH_LIBRARY_IMPL(miaotui_cpu, CPU, lib) {
  lib.impl("q4_linear", &miaotui_cpu::q4_linear);
  lib.impl("q4_dequantize", &miaotui_cpu::q4_dequantize);
  lib.impl("q8_linear", &miaotui_cpu::q8_linear);
  lib.impl("q8_group_linear", &miaotui_cpu::q8_group_linear);
}
