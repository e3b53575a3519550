// Weight-only matmuls of steps of 1-3 rows (batch-1 decode) on 16-bit activations, for the q4
// and Q8_0 ops of cpu_matmul.cpp. Built with the other cpu_*.cpp sources by kernels/cpu_build.py.
//
// Converting codes to floats costs most of a small step's time, so each activation row is first
// rounded to 16-bit integers per group of 32, x ~ sx * x16 with sx = max|x| / 32767, and a
// group's 32 products q * x16 are summed exactly in int32 by two madd_epi16:
//   y = sum_g d_g * sx_g * (q_g . x16_g) + m_g * sum(x_g),
// with sum(x_g) of the unrounded fp32 x. The only rounding beyond fp32's is x's to 16 bits: at
// most sx_g / 2 per element, 2^-16 of the group's largest |x| (bf16 activations: 2^-9 of each).
// |q . x16| <= 32 * 15 * 32767 < 2^24 for q4 and 32 * 128 * 32767 < 2^28 for int8; the q4 sum's
// float is exact.
#include <algorithm>
#include <vector>

#include <ATen/Parallel.h>

#include "cpu_q4.h"
#include "cpu_simd.h"

namespace {

using namespace miaotui_cpu;

// 16 int32 lanes (a: elements 0-7, b: the next 8) as 16 int16 in element order.
inline __m256i pack16(__m256i a, __m256i b) {
  return _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);  // packs interleaves 128-bit lanes
}

struct Int16Rows {
  std::vector<int16_t> x16;  // [M, K]
  std::vector<float> scale;  // [M, K / 32]: sx
  std::vector<float> sum;    // [M, K / 32]: sum of the group's fp32 x
  // lane_order: each group's x16 stored as elements 0-7, 16-23, 8-15, 24-31, the order in which
  // the q4 path unpacks a group's nibbles within 128-bit lanes (cheaper than across them).
  // x / sx is rounded to nearest even, as lrintf would (the default rounding mode).
  Int16Rows(const float* x, int64_t M, int64_t K, bool lane_order)
      : x16(M * K), scale(M * K / 32), sum(M * K / 32) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    for (int64_t g = 0; g < M * K / 32; ++g) {
      __m256 v[4];
      for (int c = 0; c < 4; ++c) v[c] = _mm256_loadu_ps(x + g * 32 + 8 * c);
      const __m256 amax8 = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], abs_mask), _mm256_and_ps(v[1], abs_mask)),
                                         _mm256_max_ps(_mm256_and_ps(v[2], abs_mask), _mm256_and_ps(v[3], abs_mask)));
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax8), _mm256_extractf128_ps(amax8, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
      const float sx = amax > 0.0f ? amax / 32767.0f : 1.0f;
      const __m256 sx8 = _mm256_set1_ps(sx);
      __m256i q[4];
      for (int c = 0; c < 4; ++c) q[c] = _mm256_cvtps_epi32(_mm256_div_ps(v[c], sx8));
      __m256i* out = reinterpret_cast<__m256i*>(x16.data() + g * 32);
      _mm256_storeu_si256(out, lane_order ? pack16(q[0], q[2]) : pack16(q[0], q[1]));
      _mm256_storeu_si256(out + 1, lane_order ? pack16(q[1], q[3]) : pack16(q[2], q[3]));
      scale[g] = sx;
      sum[g] = hsum(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])));
    }
  }
};

// Tiles up to this size are prefetched whole (a quarter of a 32 KiB L1 data cache).
constexpr int64_t kPrefetchTileBytes = 8192;

// Groups whose d * sx a q4 tile computes ahead of its main loop (a stack buffer of R x 64 floats).
constexpr int64_t kChunk = 64;

// Group g of R q4 rows against the activation row's x16 (lane order): acc[r][a] += d * sx * (q . x16).
template <int R>
inline void q4_group(const int16_t* x16, int64_t g, const uint8_t* row0, int64_t row_bytes, const float (*ds)[kChunk],
                     int64_t c, __m256 (*acc)[2], int a) {
  const __m256i mask = _mm256_set1_epi8(0x0F), zero = _mm256_setzero_si256();
  const __m256i xa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x16 + g * 32));       // 0-7, 16-23
  const __m256i xb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x16 + g * 32 + 16));  // 8-15, 24-31
  for (int r = 0; r < R; ++r) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row0 + r * row_bytes + g * 16));
    // [codes 0-15 | codes 16-31] as bytes; unpacking within lanes gives 0-7, 16-23 and 8-15, 24-31.
    const __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(bytes, 4), bytes), mask);
    const __m256i dot = _mm256_add_epi32(_mm256_madd_epi16(_mm256_unpacklo_epi8(q, zero), xa),
                                         _mm256_madd_epi16(_mm256_unpackhi_epi8(q, zero), xb));
    acc[r][a] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_broadcast_ss(ds[r] + c), acc[r][a]);
  }
}

// R consecutive q4 weight rows (from row0, row_bytes apart) against one activation row:
// y[i] = its dot with row i. Every row's arithmetic is the same whatever R, so results do not
// depend on how rows are split between threads and tiles.
template <int R, typename S>
inline void q4_tile(const int16_t* x16, const float* sx, const float* sum, int64_t G, const uint8_t* row0,
                    int64_t row_bytes, float* y) {
  __m256 acc[R][2], off[R];
  float off_tail[R];
  for (int r = 0; r < R; ++r) {
    acc[r][0] = acc[r][1] = off[r] = _mm256_setzero_ps();
    off_tail[r] = 0.0f;
  }
  alignas(32) float ds[R][kChunk];
  // The tile after next into L1 now: a batch-1 step streams each weight row once, and its
  // first touches (the scales, read ahead of the codes) would otherwise wait on memory. A tile
  // too large for a few to sit in L1 (long rows) gets only its scales and first code bytes
  // fetched; the hardware follows the code stream from there. Prefetches never fault, so
  // running past the matrix's end is harmless.
  const uint8_t* next = row0 + 2 * R * row_bytes;
  if (R * row_bytes <= kPrefetchTileBytes) {
    for (int64_t at = 0; at < R * row_bytes; at += 64) _mm_prefetch(reinterpret_cast<const char*>(next + at), _MM_HINT_T0);
  } else {
    for (int r = 0; r < R; ++r) {
      const uint8_t* row = next + r * row_bytes;
      _mm_prefetch(reinterpret_cast<const char*>(row), _MM_HINT_T0);
      for (int64_t at = G * 16; at < row_bytes; at += 64) _mm_prefetch(reinterpret_cast<const char*>(row + at), _MM_HINT_T0);
    }
  }
  for (int64_t c0 = 0; c0 < G; c0 += kChunk) {
    const int64_t c1 = std::min(G, c0 + kChunk);
    for (int r = 0; r < R; ++r) {  // d * sx and the offsets, 8 groups at a time
      const Q4Row<S> w{row0 + r * row_bytes, G};
      int64_t g = c0;
      for (; g + 8 <= c1; g += 8) {
        _mm256_store_ps(ds[r] + (g - c0), _mm256_mul_ps(scalars8<S>(w.d_at(g)), _mm256_loadu_ps(sx + g)));
        off[r] = _mm256_fmadd_ps(scalars8<S>(w.m_at(g)), _mm256_loadu_ps(sum + g), off[r]);
      }
      for (; g < c1; ++g) {
        ds[r][g - c0] = w.d(g) * sx[g];
        off_tail[r] += w.m(g) * sum[g];
      }
    }
    // Groups alternate between two accumulators per row (two FMA chains); written out, not
    // indexed by g & 1, so that the accumulators stay in registers.
    int64_t g = c0;
    for (; g + 2 <= c1; g += 2) {
      q4_group<R>(x16, g, row0, row_bytes, ds, g - c0, acc, 0);
      q4_group<R>(x16, g + 1, row0, row_bytes, ds, g + 1 - c0, acc, 1);
    }
    if (g < c1) q4_group<R>(x16, g, row0, row_bytes, ds, g - c0, acc, 0);
  }
  for (int r = 0; r < R; ++r) y[r] = hsum(_mm256_add_ps(acc[r][0], acc[r][1])) + (hsum(off[r]) + off_tail[r]);
}

template <typename S>
void q4_rows(const float* x, int64_t M, int64_t K, const uint8_t* rows, float* y, int64_t N) {
  const Int16Rows xs(x, M, K, /*lane_order=*/true);
  const int64_t G = K / 32, row_bytes = G * q4_group_bytes<S>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t r = 0; r < M; ++r) {
      const int16_t* x16 = xs.x16.data() + r * K;
      const float* sx = xs.scale.data() + r * G;
      const float* sum = xs.sum.data() + r * G;
      int64_t n = n0;
      for (; n + 4 <= n1; n += 4) q4_tile<4, S>(x16, sx, sum, G, rows + n * row_bytes, row_bytes, y + r * N + n);
      for (; n < n1; ++n) q4_tile<1, S>(x16, sx, sum, G, rows + n * row_bytes, row_bytes, y + r * N + n);
    }
  });
}

// One activation row against one Q8_0 row (codes -128..127, w = q * d).
inline float q8_row_dot(const Int16Rows& xs, int64_t r, int64_t K, const int8_t* row, const float* d) {
  const int64_t G = K / 32;
  const int16_t* x16 = xs.x16.data() + r * K;
  const float* sx = xs.scale.data() + r * G;
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const __m256i q_lo = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + g * 32)));
    const __m256i q_hi = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + g * 32 + 16)));
    const __m256i dot = _mm256_add_epi32(
        _mm256_madd_epi16(q_lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x16 + g * 32))),
        _mm256_madd_epi16(q_hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x16 + g * 32 + 16))));
    const __m256 scaled = _mm256_set1_ps(d[g] * sx[g]);
    if (g & 1)
      acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scaled, acc1);
    else
      acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scaled, acc0);
  }
  return hsum(_mm256_add_ps(acc0, acc1));
}

}  // namespace

namespace miaotui_cpu {

void q4_int16_matmul(const float* x, int64_t M, int64_t K, const uint8_t* rows, bool fp16_scales, float* y,
                     int64_t N) {
  (fp16_scales ? q4_rows<uint16_t> : q4_rows<float>)(x, M, K, rows, y, N);
}

void q8_group_int16_matmul(const float* x, int64_t M, int64_t K, const int8_t* q, const float* d, float* y,
                           int64_t N) {
  const Int16Rows xs(x, M, K, /*lane_order=*/false);
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t r = 0; r < M; ++r)
      for (int64_t n = n0; n < n1; ++n) y[r * N + n] = q8_row_dot(xs, r, K, q + n * K, d + n * (K / 32));
  });
}

}  // namespace miaotui_cpu
