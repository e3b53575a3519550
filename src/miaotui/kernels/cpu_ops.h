// The ops of miaotui's CPU kernel library as C++ functions, for kernels that call others
// directly (cpu_decode_stack.cpp) instead of through the torch dispatcher. Each is also
// registered as the torch op miaotui_cpu::<name> by the file that defines it.
#pragma once

#include <ATen/core/Tensor.h>

namespace miaotui_cpu {

// cpu_matmul.cpp
at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& blocks, bool fp16_scales);
at::Tensor q4_dequantize(const at::Tensor& blocks, int64_t K, bool fp16_scales);
at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales);
at::Tensor q8_group_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& group_scales);
// cpu_elementwise.cpp
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& signed_sin);
at::Tensor silu_and_mul(const at::Tensor& gate_up);
// cpu_attention.cpp
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                                  int64_t window = 0);

}  // namespace miaotui_cpu
