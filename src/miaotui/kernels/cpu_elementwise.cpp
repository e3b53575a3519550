// Elementwise layers for x86 with AVX2 + FMA, registered as torch ops miaotui_cpu::rms_norm,
// rotary and silu_and_mul (a fragment of the library cpu_matmul.cpp defines). Each replaces
// several torch CPU kernels (and their allocations and dispatch, ~5-20 us apiece) of a decode
// step by one pass over the data. Built by kernels/cpu_build.py.
#include <cmath>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "cpu_ops.h"
#include "cpu_simd.h"

namespace miaotui_cpu {

// RMSNorm of fp32 rows, y = x * rsqrt(mean(x^2) + eps) * weight, in one pass per row: torch's CPU
// rms_norm runs as about six kernels (~60 us a call at hidden size 576 on 2 AVX2 cores).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.is_cpu() && x.dim() >= 1,
              "rms_norm: x must be a contiguous fp32 CPU tensor");
  const int64_t H = x.size(-1);
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.numel() == H,
              "rms_norm: weight must be contiguous fp32 of the last dimension's size");
  at::Tensor y = at::empty_like(x);
  const int64_t rows = H == 0 ? 0 : x.numel() / H;
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Rows split across threads only when there are many (a decode step's few rows are cheaper alone).
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = xp + r * H;
      float* yr = yp + r * H;
      // The sum of squares in double: within an ulp of exact at any width, as torch's cascade
      // sum is (an 8-lane fp32 sum loses accuracy as the rows grow).
      __m256d acc_lo = _mm256_setzero_pd(), acc_hi = _mm256_setzero_pd();
      int64_t h = 0;
      for (; h + 8 <= H; h += 8) {
        const __m256 v = _mm256_loadu_ps(xr + h);
        const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
        const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
        acc_lo = _mm256_fmadd_pd(lo, lo, acc_lo);
        acc_hi = _mm256_fmadd_pd(hi, hi, acc_hi);
      }
      double lanes[4];
      _mm256_storeu_pd(lanes, _mm256_add_pd(acc_lo, acc_hi));
      double sum = lanes[0] + lanes[1] + lanes[2] + lanes[3];
      for (; h < H; ++h) sum += static_cast<double>(xr[h]) * xr[h];
      const float mean = static_cast<float>(sum / static_cast<double>(H));
      const float inv = 1.0f / std::sqrt(mean + static_cast<float>(eps));
      const __m256 vinv = _mm256_set1_ps(inv);
      for (h = 0; h + 8 <= H; h += 8)
        _mm256_storeu_ps(yr + h,
                         _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + h), vinv), _mm256_loadu_ps(wp + h)));
      for (; h < H; ++h) yr[h] = xr[h] * inv * wp[h];
    }
  });
  return y;
}

// Rotary embedding of x [T, H, D] (rows of any stride, heads and dims contiguous) by the tables
// of RotaryEmbedding.cos_sin, cos and signed_sin [T, 1, D] (sin with its first half negated):
// out = x * cos + rotate_half(x) * sin, rotate_half(x) = (x2, x1) with that sign folded in.
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& signed_sin) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat && x.is_cpu() && x.stride(2) == 1 &&
              x.stride(1) == x.size(2), "rotary: x must be fp32 CPU [T, H, D] with contiguous heads");
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2), half = D / 2;
  TORCH_CHECK(D % 2 == 0 && cos.is_contiguous() && signed_sin.is_contiguous() && cos.numel() == T * D &&
              signed_sin.numel() == T * D && cos.scalar_type() == at::kFloat &&
              signed_sin.scalar_type() == at::kFloat,
              "rotary: cos and signed_sin must be contiguous fp32 [T, 1, D] for an even D");
  at::Tensor out = at::empty({T, H, D}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = signed_sin.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t row_stride = x.stride(0);
  at::parallel_for(0, T * H, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i / H;
      const float* xi = xp + t * row_stride + (i % H) * D;
      const float* c = cp + t * D;
      const float* s = sp + t * D;
      float* o = op + i * D;
      int64_t d = 0;
      for (; d + 8 <= half; d += 8) {
        const __m256 x1 = _mm256_loadu_ps(xi + d), x2 = _mm256_loadu_ps(xi + half + d);
        _mm256_storeu_ps(o + d, _mm256_add_ps(_mm256_mul_ps(x1, _mm256_loadu_ps(c + d)),
                                              _mm256_mul_ps(x2, _mm256_loadu_ps(s + d))));
        _mm256_storeu_ps(o + half + d, _mm256_add_ps(_mm256_mul_ps(x2, _mm256_loadu_ps(c + half + d)),
                                                     _mm256_mul_ps(x1, _mm256_loadu_ps(s + half + d))));
      }
      for (; d < half; ++d) {
        o[d] = xi[d] * c[d] + xi[half + d] * s[d];
        o[half + d] = xi[half + d] * c[half + d] + xi[d] * s[half + d];
      }
    }
  });
  return out;
}

// silu(gate) * up of a fused gate/up projection [T, 2I] (gate first): one pass instead of a
// split, a silu and a product. silu(g) = g / (1 + exp(-g)).
at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.scalar_type() == at::kFloat && gate_up.is_contiguous() &&
              gate_up.is_cpu() && gate_up.size(1) % 2 == 0,
              "silu_and_mul: gate_up must be contiguous fp32 CPU [T, 2I]");
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2;
  at::Tensor out = at::empty({T, I}, gate_up.options());
  const float* gp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    for (int64_t t = t0; t < t1; ++t) {
      const float* g = gp + t * 2 * I;
      const float* u = g + I;
      float* o = op + t * I;
      int64_t i = 0;
      for (; i + 8 <= I; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 silu = _mm256_div_ps(gv, _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, gv))));
        _mm256_storeu_ps(o + i, _mm256_mul_ps(silu, _mm256_loadu_ps(u + i)));
      }
      for (; i < I; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
    }
  });
  return out;
}

}  // namespace miaotui_cpu

TORCH_LIBRARY_FRAGMENT(miaotui_cpu, lib) {
  lib.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  lib.def("rotary(Tensor x, Tensor cos, Tensor signed_sin) -> Tensor");
  lib.def("silu_and_mul(Tensor gate_up) -> Tensor");
}

TORCH_LIBRARY_IMPL(miaotui_cpu, CPU, lib) {
  lib.impl("rms_norm", &miaotui_cpu::rms_norm);
  lib.impl("rotary", &miaotui_cpu::rotary);
  lib.impl("silu_and_mul", &miaotui_cpu::silu_and_mul);
}
