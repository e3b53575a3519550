// The q4 weight layout of miaotui's CPU kernels (made by layers/int4_blocks.py and, from GGUF
// Q4_0 / Q4_1, by loader/gguf_quant.py), and the 16-bit-activation matmuls of
// cpu_matmul_int16.cpp that cpu_matmul.cpp calls for steps of few rows.
//
// A weight [N, K] is N rows of G = K / 32 groups of 32 weights, w = q * d + m with q in 0..15.
// A row is [G x 16 code bytes][G scales d][G offsets m]: group g's byte j holds element j in its
// low nibble and element j + 16 in its high one (GGUF's order); d and m are fp16 (a row of 20 G
// bytes, the Q4_1 file's size) where fp16 holds them all exactly, else fp32 (24 G bytes).
// Scales apart from codes let a kernel convert 8 groups' d and m with one instruction instead
// of two scalar conversions per group (about 1.5x the throughput of the interleaved GGUF blocks
// on AVX2, where a batch-1 step is bound by arithmetic, not memory).
#pragma once

#include <cstdint>
#include <cstring>

#include <immintrin.h>

namespace miaotui_cpu {

template <typename S> inline float scalar(const uint8_t* p);
template <> inline float scalar<uint16_t>(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}
template <> inline float scalar<float>(const uint8_t* p) {
  float f;
  std::memcpy(&f, p, 4);
  return f;
}

// 8 consecutive scales as floats.
template <typename S> inline __m256 scalars8(const uint8_t* p);
template <> inline __m256 scalars8<uint16_t>(const uint8_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
template <> inline __m256 scalars8<float>(const uint8_t* p) { return _mm256_loadu_ps(reinterpret_cast<const float*>(p)); }

// Bytes per group of 32 weights: 16 of codes, a d and an m.
template <typename S> constexpr int64_t q4_group_bytes() { return 16 + 2 * sizeof(S); }

// One weight row of the layout above.
template <typename S>
struct Q4Row {
  const uint8_t* row;
  int64_t G;
  const uint8_t* codes(int64_t g) const { return row + g * 16; }
  const uint8_t* d_at(int64_t g) const { return row + G * 16 + g * sizeof(S); }
  const uint8_t* m_at(int64_t g) const { return row + G * (16 + sizeof(S)) + g * sizeof(S); }
  float d(int64_t g) const { return scalar<S>(d_at(g)); }
  float m(int64_t g) const { return scalar<S>(m_at(g)); }
};

// Steps of fewer rows than this take the 16-bit-activation paths below.
constexpr int64_t kWideRows = 4;

// y [M, N] = x [M, K] @ W^T for M < kWideRows on 16-bit activations (cpu_matmul_int16.cpp):
// a q4 weight (rows as above), and int8 codes [N, K] with a scale per group of 32 [N, K / 32]
// (GGUF's Q8_0).
void q4_int16_matmul(const float* x, int64_t M, int64_t K, const uint8_t* rows, bool fp16_scales, float* y,
                     int64_t N);
void q8_group_int16_matmul(const float* x, int64_t M, int64_t K, const int8_t* q, const float* d, float* y, int64_t N);

// The same arithmetic for kVnniRows rows or more, on AVX-512 VNNI (cpu_matmul_vnni.cpp), where
// `wide_int16_available()`: the CPU has it and MIAOTUI_CPU_WIDE_INT16 is not "0". int8 codes
// [N, K] take a scale per row (`per_row`, scales [N]) or per group of 32 ([N, K / 32]). Its
// vectors hold 16 activation rows, so a step of 4-7 rows costs it what 16 do: those keep the
// fp32 kernels (measured: 2x faster there on a 262k-row head, 1.7x slower from 8 rows).
constexpr int64_t kVnniRows = 8;
bool wide_int16_available();
void q4_wide_int16_matmul(const float* x, int64_t M, int64_t K, const uint8_t* rows, bool fp16_scales, float* y,
                          int64_t N);
void q8_wide_int16_matmul(const float* x, int64_t M, int64_t K, const int8_t* q, const float* scales, bool per_row,
                          float* y, int64_t N);

}  // namespace miaotui_cpu
