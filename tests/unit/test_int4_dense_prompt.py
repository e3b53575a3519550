"""Prompt-sized int4 steps on torch's kernel (the fallback where miaotui's own does not build):
its packed layout read back gives exactly the weight that was packed, and from DENSE_MIN_ROWS
rows an Int4Linear multiplies that weight densely in fp32."""

from __future__ import annotations

import sys

import pytest
import torch

from miaotui.layers.int4_unpack import dequantize_packed_t, packed_block_rows
from miaotui.layers.packed import quantize_int4
from miaotui.layers.quantized import DENSE_MIN_ROWS, Int4Linear, quantization_supported
from miaotui.runner.cpu_allocator import return_large_blocks, settle_after_load

pytestmark = pytest.mark.skipif(not quantization_supported("int4"), reason="this torch lacks the int4 CPU kernel")


@pytest.fixture(scope="module")
def block() -> int:
    block = packed_block_rows()
    if block is None:  # an unknown layout is allowed (every step then uses the kernel), but say so
        pytest.skip(f"torch {torch.__version__} packs int4 in a layout other than the blocked AVX2/AVX512 one")
    return block


@pytest.mark.parametrize("n,k", [(64, 96), (192, 256), (128, 1536)])
def test_packed_weight_reads_back_exactly(block, n, k):
    weight = quantize_int4(torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)) * 0.05)
    layer = Int4Linear(weight, None, kernel="torch")
    # The kernel's scales and zeros are the bf16 values quantize_int4 already rounded to: exact.
    got = dequantize_packed_t(layer.qweight, layer.scales_and_zeros, n, k, block).t()
    torch.testing.assert_close(got, weight.dequantized(), rtol=1e-6, atol=1e-7)


def test_prompt_rows_multiply_the_dequantized_weight_in_fp32(block):
    gen = torch.Generator().manual_seed(1)
    n, k = 128, 256
    weight = quantize_int4(torch.randn(n, k, generator=gen) * 0.05)
    bias = torch.randn(n, generator=gen)
    layer = Int4Linear(weight, bias, kernel="torch")
    x = torch.randn(DENSE_MIN_ROWS, k, generator=gen)
    dense = x @ weight.dequantized().t() + bias
    with torch.inference_mode():
        y = layer(x)
        kernel = layer(x[: DENSE_MIN_ROWS - 1])  # one row fewer: the bf16-activation kernel
    # fp32 all the way: only summation order differs from the reference matmul.
    torch.testing.assert_close(y, dense, rtol=1e-5, atol=1e-5)
    # The kernel rounds x to bf16 (relative 2^-9), so it may not match to fp32 precision, but it
    # multiplies the same weight: within the bf16 bound of |x| |W|^T.
    bound = 2 ** -8 * (x[: DENSE_MIN_ROWS - 1].abs() @ weight.dequantized().abs().t()) + 1e-3
    assert ((kernel - dense[: DENSE_MIN_ROWS - 1]).abs() <= bound).all()
    assert not torch.equal(kernel, dense[: DENSE_MIN_ROWS - 1])  # the two paths really differ


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt exists on Linux only")
def test_allocator_thresholds_are_set_on_glibc():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not a glibc system")
    assert return_large_blocks() is True
    assert settle_after_load() is True
