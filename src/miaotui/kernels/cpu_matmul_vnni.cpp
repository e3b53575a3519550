// Weight-only matmuls of many rows (batched decode, prompts) on 16-bit activations with
// AVX-512 VNNI, for the q4 and int8 ops of cpu_matmul.cpp. Built with the other cpu_*.cpp
// sources by kernels/cpu_build.py; only the functions marked MIAOTUI_VNNI use AVX-512, and
// callers check `wide_int16_available()` (the CPU's flags, at run time) before calling them.
//
// The arithmetic is the batch-1 kernels' (cpu_matmul_int16.cpp): each activation row is
// rounded to 16-bit integers per group of 32 (x ~ sx * x16, sx = max|x| / 32767, the same
// values), and a group's 32 products q * x16 are summed exactly in int32:
//   y = sum_g d_g * sx_g * (q_g . x16_g) + m_g * sum(x_g).
// What differs is the layout: vector lanes run over 16 activation rows. A weight group is
// turned into 16 words (pair j: elements j and j + 16, a q4 code byte's two nibbles; the
// activations are paired the same way), and each word, broadcast, meets the 16 rows' pairs in
// one vpdpwssd: 32 exact products per instruction, weights read as stored (no repacked copy),
// no horizontal sums. Weight rows are converted a panel at a time into a per-thread buffer
// that every block of 16 activation rows then reads from L1/L2.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <immintrin.h>

#include <ATen/Parallel.h>

#include "cpu_q4.h"

#define MIAOTUI_VNNI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")))

namespace {

using namespace miaotui_cpu;

constexpr int64_t kLanes = 16;      // activation rows per vector
constexpr int64_t kTile = 8;        // weight rows whose accumulators a tile keeps in registers
constexpr int64_t kPanelRows = 64;  // weight rows converted together (every row block passes over them)

// r[i] lane j -> r[j] lane i, for 16 vectors of 16 int32 (unpacks within 128-bit lanes, then
// a 4 x 4 transpose of the lanes themselves).
MIAOTUI_VNNI inline void transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // u[4i + k], lane L: column 4L + k of rows 4i..4i+3
    u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int k = 0; k < 4; ++k) {
    const __m512i ab_lo = _mm512_shuffle_i32x4(u[k], u[4 + k], 0x44), ab_hi = _mm512_shuffle_i32x4(u[k], u[4 + k], 0xEE);
    const __m512i cd_lo = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0x44);
    const __m512i cd_hi = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0xEE);
    r[k] = _mm512_shuffle_i32x4(ab_lo, cd_lo, 0x88);
    r[4 + k] = _mm512_shuffle_i32x4(ab_lo, cd_lo, 0xDD);
    r[8 + k] = _mm512_shuffle_i32x4(ab_hi, cd_hi, 0x88);
    r[12 + k] = _mm512_shuffle_i32x4(ab_hi, cd_hi, 0xDD);
  }
}

// The activations of row block b (rows 16b..16b+15 of x [M, K]; rows past M are zero) as
// words [G, 16 pairs, 16 rows] (x16[j] | x16[j + 16] << 16), with sx and the group's fp32 sum
// as [G, 16 rows].
MIAOTUI_VNNI void pair_block(const float* x, int64_t M, int64_t K, int64_t b, int32_t* words, float* scale,
                             float* sum) {
  const int64_t G = K / 32;
  const __m512i low16 = _mm512_set1_epi32(0xFFFF);
  for (int64_t g = 0; g < G; ++g) {
    __m512i rows[16];
    for (int64_t i = 0; i < kLanes; ++i) {
      const int64_t r = b * kLanes + i;
      if (r >= M) {
        rows[i] = _mm512_setzero_si512();
        scale[g * kLanes + i] = sum[g * kLanes + i] = 0.0f;
        continue;
      }
      const float* p = x + r * K + g * 32;
      const __m512 lo = _mm512_loadu_ps(p), hi = _mm512_loadu_ps(p + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
      const float sx = amax > 0.0f ? amax / 32767.0f : 1.0f;
      const __m512 s = _mm512_set1_ps(sx);
      // Division and round-to-nearest-even, as the batch-1 kernels round: the same x16.
      const __m512i qlo = _mm512_cvtps_epi32(_mm512_div_ps(lo, s)), qhi = _mm512_cvtps_epi32(_mm512_div_ps(hi, s));
      rows[i] = _mm512_or_si512(_mm512_and_si512(qlo, low16), _mm512_slli_epi32(qhi, 16));
      scale[g * kLanes + i] = sx;
      sum[g * kLanes + i] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
    }
    transpose16(rows);
    for (int j = 0; j < 16; ++j) _mm512_storeu_si512(words + (g * 16 + j) * kLanes, rows[j]);
  }
}

// Group g of a q4 row (cpu_q4.h) as 16 words: code byte j's low nibble (element j) and high one
// (element j + 16).
MIAOTUI_VNNI inline __m512i q4_words(const uint8_t* row, int64_t g) {
  const __m512i byte = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + g * 16)));
  const __m512i nibble = _mm512_set1_epi32(0x0F);
  return _mm512_or_si512(_mm512_and_si512(byte, nibble), _mm512_slli_epi32(_mm512_srli_epi32(byte, 4), 16));
}

// Group g of an int8 row: elements j and j + 16, sign-extended to 16 bits each.
MIAOTUI_VNNI inline __m512i q8_words(const int8_t* row, int64_t g) {
  const __m512i lo = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + g * 32)));
  const __m512i hi = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + g * 32 + 16)));
  return _mm512_or_si512(_mm512_and_si512(lo, _mm512_set1_epi32(0xFFFF)), _mm512_slli_epi32(hi, 16));
}

// T weight rows (words [T, G, 16], d and m [T, G]) against one row block: out[t] lane i is
// row i's dot with weight row t. kOffsets adds m_g * sum(x_g) (q4's offsets).
template <int T, bool kOffsets>
MIAOTUI_VNNI void tile_dots(const int32_t* w, const float* d, const float* m, int64_t G, const int32_t* xw,
                            const float* sx, const float* sums, float* out) {
  __m512 f[T], off[T];
  for (int t = 0; t < T; ++t) f[t] = off[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512i acc[T];
    for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_si512();
    for (int j = 0; j < 16; ++j) {
      const __m512i xj = _mm512_loadu_si512(xw + (g * 16 + j) * kLanes);
      for (int t = 0; t < T; ++t) acc[t] = _mm512_dpwssd_epi32(acc[t], xj, _mm512_set1_epi32(w[(t * G + g) * 16 + j]));
    }
    const __m512 sxg = _mm512_loadu_ps(sx + g * kLanes);
    for (int t = 0; t < T; ++t)
      f[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[t]), _mm512_mul_ps(_mm512_set1_ps(d[t * G + g]), sxg), f[t]);
    if (kOffsets) {
      const __m512 sumg = _mm512_loadu_ps(sums + g * kLanes);
      for (int t = 0; t < T; ++t) off[t] = _mm512_fmadd_ps(_mm512_set1_ps(m[t * G + g]), sumg, off[t]);
    }
  }
  for (int t = 0; t < T; ++t) _mm512_storeu_ps(out + t * kLanes, kOffsets ? _mm512_add_ps(f[t], off[t]) : f[t]);
}

template <bool kOffsets>
void tile(int64_t T, const int32_t* w, const float* d, const float* m, int64_t G, const int32_t* xw, const float* sx,
          const float* sums, float* out) {
  switch (T) {
    case 8: tile_dots<8, kOffsets>(w, d, m, G, xw, sx, sums, out); break;
    case 4: tile_dots<4, kOffsets>(w, d, m, G, xw, sx, sums, out); break;
    case 2: tile_dots<2, kOffsets>(w, d, m, G, xw, sx, sums, out); break;
    default: tile_dots<1, kOffsets>(w, d, m, G, xw, sx, sums, out); break;
  }
}

// Weight rows [n0, n1) (each `row_bytes` from rows + n * row_bytes) toward L2. A panel's
// conversion reads its rows from memory and its tiles then only compute, so without this the
// two never overlap: a batch-16 step over a 262k-row head waited on memory for a quarter of
// its time. Each tile fetches its rows of the next panel while it computes.
inline void prefetch_rows(const uint8_t* rows, int64_t row_bytes, int64_t n0, int64_t n1) {
  for (const uint8_t *p = rows + n0 * row_bytes, *end = rows + n1 * row_bytes; p < end; p += 64)
    _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T1);
}

// y [M, N] = x [M, K] W^T. convert(n, words, d, m) writes weight row n's words [G, 16] and its
// d and m [G]; weight row n's codes lie at rows + n * row_bytes (for prefetching).
template <bool kOffsets, typename Convert>
void wide_matmul(const float* x, int64_t M, int64_t K, float* y, int64_t N, const uint8_t* rows, int64_t row_bytes,
                 const Convert& convert) {
  const int64_t G = K / 32, row_blocks = (M + kLanes - 1) / kLanes;
  std::vector<int32_t> xw(row_blocks * G * 16 * kLanes);
  std::vector<float> sx(row_blocks * G * kLanes), sums(row_blocks * G * kLanes);
  at::parallel_for(0, row_blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      pair_block(x, M, K, b, xw.data() + b * G * 16 * kLanes, sx.data() + b * G * kLanes, sums.data() + b * G * kLanes);
  });
  at::parallel_for(0, N, kTile, [&](int64_t n0, int64_t n1) {
    std::vector<int32_t> w(kPanelRows * G * 16);
    std::vector<float> d(kPanelRows * G), m(kPanelRows * G), out(kTile * kLanes);
    for (int64_t p0 = n0; p0 < n1; p0 += kPanelRows) {
      const int64_t p1 = std::min(n1, p0 + kPanelRows);
      for (int64_t n = p0; n < p1; ++n)
        convert(n, w.data() + (n - p0) * G * 16, d.data() + (n - p0) * G, m.data() + (n - p0) * G);
      for (int64_t b = 0; b < row_blocks; ++b) {
        const int64_t live = std::min(kLanes, M - b * kLanes);
        for (int64_t t0 = p0; t0 < p1;) {
          const int64_t T = p1 - t0 >= 8 ? 8 : (p1 - t0 >= 4 ? 4 : (p1 - t0 >= 2 ? 2 : 1));
          if (b == 0) prefetch_rows(rows, row_bytes, std::min(n1, t0 + kPanelRows), std::min(n1, t0 + kPanelRows + T));
          tile<kOffsets>(T, w.data() + (t0 - p0) * G * 16, d.data() + (t0 - p0) * G, m.data() + (t0 - p0) * G, G,
                         xw.data() + b * G * 16 * kLanes, sx.data() + b * G * kLanes, sums.data() + b * G * kLanes,
                         out.data());
          for (int64_t t = 0; t < T; ++t)
            for (int64_t i = 0; i < live; ++i) y[(b * kLanes + i) * N + t0 + t] = out[t * kLanes + i];
          t0 += T;
        }
      }
    }
  });
}

template <typename S>
MIAOTUI_VNNI void convert_q4(const uint8_t* rows, int64_t row_bytes, int64_t G, int64_t n, int32_t* w, float* d,
                             float* m) {
  const Q4Row<S> row{rows + n * row_bytes, G};
  for (int64_t g = 0; g < G; ++g) _mm512_storeu_si512(w + g * 16, q4_words(row.row, g));
  for (int64_t g = 0; g < G; ++g) {
    d[g] = row.d(g);
    m[g] = row.m(g);
  }
}

MIAOTUI_VNNI void convert_q8(const int8_t* q, const float* scales, bool per_row, int64_t K, int64_t n, int32_t* w,
                             float* d) {
  const int64_t G = K / 32;
  for (int64_t g = 0; g < G; ++g) _mm512_storeu_si512(w + g * 16, q8_words(q + n * K, g));
  for (int64_t g = 0; g < G; ++g) d[g] = per_row ? scales[n] : scales[n * G + g];
}

}  // namespace

namespace miaotui_cpu {

bool wide_int16_available() {
  static const bool available = !(std::getenv("MIAOTUI_CPU_WIDE_INT16") && std::strcmp(std::getenv("MIAOTUI_CPU_WIDE_INT16"), "0") == 0) &&
                                __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                                __builtin_cpu_supports("avx512vnni");
  return available;
}

void q4_wide_int16_matmul(const float* x, int64_t M, int64_t K, const uint8_t* rows, bool fp16_scales, float* y,
                          int64_t N) {
  const int64_t G = K / 32;
  if (fp16_scales) {
    const int64_t row_bytes = G * q4_group_bytes<uint16_t>();
    wide_matmul<true>(x, M, K, y, N, rows, row_bytes, [=](int64_t n, int32_t* w, float* d, float* m) {
      convert_q4<uint16_t>(rows, row_bytes, G, n, w, d, m);
    });
  } else {
    const int64_t row_bytes = G * q4_group_bytes<float>();
    wide_matmul<true>(x, M, K, y, N, rows, row_bytes, [=](int64_t n, int32_t* w, float* d, float* m) {
      convert_q4<float>(rows, row_bytes, G, n, w, d, m);
    });
  }
}

void q8_wide_int16_matmul(const float* x, int64_t M, int64_t K, const int8_t* q, const float* scales, bool per_row,
                          float* y, int64_t N) {
  wide_matmul<false>(x, M, K, y, N, reinterpret_cast<const uint8_t*>(q), K, [=](int64_t n, int32_t* w, float* d, float*) {
    convert_q8(q, scales, per_row, K, n, w, d);
  });
}

}  // namespace miaotui_cpu
