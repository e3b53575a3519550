"""miaotui's own CPU kernels (kernels/cpu_*.cpp): the 4-bit and int8 matmuls equal the fp32
matmul of the exactly dequantized weight for every row count (and both 4-bit scale widths; the
4-bit one's batch-1 rows within the 16-bit rounding of x); RMSNorm, rotary and silu-and-mul
equal their torch formulas; bad input is refused by name; without the kernels the layers fall
back to torch's."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig

from miaotui.kernels.cpu_build import cpu_kernels_available
from miaotui.layers.activations import SiluAndMul
from miaotui.layers.int4_blocks import pack_q4_blocks
from miaotui.layers.norms import RMSNorm
from miaotui.layers.packed import Int4Weight, quantize_int4
from miaotui.layers.quantized import Q4_DENSE_MIN_ROWS, Int4Linear, Int8Linear
from miaotui.layers.rotary import RotaryEmbedding, apply_rotary

Q4_WIDE_ROWS = 4  # kWideRows of cpu_matmul.cpp: fewer rows take the 16-bit activation path
VNNI_ROWS = 8  # kVnniRows of cpu_q4.h: from here, 16-bit activations again where AVX-512 VNNI runs

pytestmark = pytest.mark.skipif(not cpu_kernels_available(),
                                reason="miaotui's CPU kernels need x86 AVX2/FMA/F16C and a C++ compiler")


def _gguf_like_q4_1(n: int, k: int, gen: torch.Generator) -> Int4Weight:
    """A Q4_1-style weight: fp16 d and m (w = q * d + m), as a GGUF file stores them."""
    d = (torch.rand(n, k // 32, generator=gen) * 0.01 + 1e-3).half().float()
    m = (-torch.rand(n, k // 32, generator=gen) * 0.1).half().float()
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    return Int4Weight(codes, d, m + 8 * d)


def _fp32_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # Two fp32 summation orders of K products: each within K * 2^-24 of sum |x||w| (loose, and
    # still about 100x tighter than the bf16 rounding of torch's kernel).
    return x.shape[1] * 2**-24 * (x.abs() @ w.abs().t()) + 1e-6


def _rounds_to_int16(rows: int) -> bool:
    """Steps under Q4_WIDE_ROWS rows take the batch-1 kernels' 16-bit activations; from
    VNNI_ROWS rows too where the AVX-512 VNNI kernels run (cpu_matmul_vnni.cpp); others fp32."""
    return rows < Q4_WIDE_ROWS or (rows >= VNNI_ROWS and torch.ops.miaotui_cpu.wide_int16_available())


def _int16_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Rows rounded to 16 bits per group of 32 (step sx = the
    group's max |x| / 32767): each x moves by at most sx / 2, so y by sum_g sx_g / 2 * sum |w_g|."""
    m, k = x.shape
    step = x.view(m, k // 32, 32).abs().amax(-1) / 32767
    return (step / 2) @ w.abs().view(w.shape[0], k // 32, 32).sum(-1).t()


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 17, Q4_DENSE_MIN_ROWS - 1, Q4_DENSE_MIN_ROWS, 40])
@pytest.mark.parametrize("fp16", [True, False])
# (80, 96): three groups per row. (37, 2400): 75 groups, so the 16-bit path's scales run 8 groups
# at a time, then a tail, over two chunks of 64; 37 weight rows leave tiles of 4 a remainder.
@pytest.mark.parametrize("n, k", [(80, 96), (37, 2400)])
def test_q4_linear_is_the_fp32_matmul_of_the_dequantized_weight(rows, fp16, n, k):
    gen = torch.Generator().manual_seed(rows)
    weight = _gguf_like_q4_1(n, k, gen) if fp16 else quantize_int4(torch.randn(n, k, generator=gen) * 0.05)
    bias = torch.randn(n, generator=gen)
    layer = Int4Linear(weight, bias)
    assert layer.kernel == "q4" and layer.fp16_scales is fp16
    assert layer.blocks.shape == (n, k // 32 * (20 if fp16 else 24))
    x = torch.randn(rows, k, generator=gen)
    w = weight.dequantized()
    with torch.inference_mode():
        y = layer(x)
    ref = x @ w.t() + bias
    assert y.shape == (rows, n) and y.dtype == torch.float32
    bound = _fp32_bound(x, w) + (_int16_bound(x, w) if _rounds_to_int16(rows) else 0)
    assert ((y - ref).abs() <= bound).all()
    if _rounds_to_int16(rows):  # 16-bit activations: far inside what bf16 ones (2^-9 of each |x|) allow
        assert ((y - ref).abs() <= 2**-12 * (x.abs() @ w.abs().t())).all()


def test_q4_blocks_keep_every_weight_exactly():
    gen = torch.Generator().manual_seed(3)
    cases = ((_gguf_like_q4_1(33, 64, gen), True), (quantize_int4(torch.randn(33, 64, generator=gen)), False))
    for weight, fp16 in cases:
        blocks, is_fp16 = pack_q4_blocks(weight)
        assert is_fp16 is fp16
        w = weight.dequantized()
        got = torch.ops.miaotui_cpu.q4_dequantize(blocks, 64, fp16)
        # q * d + m in one FMA vs (q - 8) * scale + zero in two roundings: within an ulp or two.
        assert ((got - w).abs() <= 2**-22 * (w.abs() + 8 * weight.scale.abs().repeat_interleave(32, 1))).all()


def test_bf16_and_3d_inputs_go_through_the_same_kernel():
    gen = torch.Generator().manual_seed(4)
    weight = quantize_int4(torch.randn(64, 64, generator=gen))
    layer = Int4Linear(weight, None)
    x = torch.randn(2, 3, 64, generator=gen)
    with torch.inference_mode():
        y = layer(x)
        y16 = layer(x.bfloat16())
    assert y.shape == (2, 3, 64)
    w, x2d = weight.dequantized(), x.reshape(6, 64)
    bound = _fp32_bound(x2d, w) + (_int16_bound(x2d, w) if _rounds_to_int16(6) else 0)
    assert ((y.reshape(6, 64) - x2d @ w.t()).abs() <= bound).all()
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), x.bfloat16().float() @ weight.dequantized().t(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("rows", [1, 2, 5, 16, Q4_DENSE_MIN_ROWS])
def test_q8_linear_is_the_fp32_matmul_of_the_dequantized_weight(rows):
    gen = torch.Generator().manual_seed(10 + rows)
    layer = Int8Linear(torch.randn(70, 64, generator=gen) * 0.05, torch.randn(70, generator=gen))
    assert layer.kernel == "q8" and layer.scales.dtype == torch.float32
    torch_layer = Int8Linear(layer.dequantized(), None, kernel="torch")
    assert torch.equal(torch_layer.qweight, layer.qweight)  # the same int8 weights either way
    x = torch.randn(rows, 64, generator=gen)
    w = layer.dequantized()
    with torch.inference_mode():
        y = layer(x)
    ref = x @ w.t() + layer.bias
    bound = _fp32_bound(x, w) + (_int16_bound(x, w) if rows >= VNNI_ROWS and _rounds_to_int16(rows) else 0)
    assert ((y - ref).abs() <= bound).all()


@pytest.mark.parametrize("rows", [1, 3, 8, 17])
def test_q8_0_head_is_the_fp32_matmul_of_the_tables_own_weights(rows):
    """A tied Q8_0 table's head multiplies the table as stored (no copy, no requantization);
    batch-1 rows round x to 16 bits per group of 32 as the 4-bit kernel does."""
    import torch.nn as nn

    from miaotui.layers.packed import Int8GroupWeight
    from miaotui.layers.quantized import Int8GroupHead, PackedEmbedding, _tied_head

    gen = torch.Generator().manual_seed(20 + rows)
    codes = torch.randint(-127, 128, (300, 96), generator=gen, dtype=torch.int8)
    scale = (torch.rand(300, 3, generator=gen) * 0.01 + 1e-4).half().float()  # fp16 d, as Q8_0 stores it
    table = PackedEmbedding(Int8GroupWeight(codes, scale), torch.float32)
    head = _tied_head(table)
    assert isinstance(head, Int8GroupHead)
    assert head._codes.data_ptr() == table.codes.data_ptr()  # the table itself, not a copy
    w = table.rows_dequantized(0, 300)
    assert torch.equal(w, codes.float() * scale.repeat_interleave(32, dim=1))  # q * d is exact in fp32
    x = torch.randn(rows, 96, generator=gen)
    y = head(x)
    assert y.shape == (rows, 300)
    bound = _fp32_bound(x, w) + (_int16_bound(x, w) if _rounds_to_int16(rows) else 0)  # the q4 kernel's policy
    assert ((y - x @ w.t()).abs() <= bound).all()
    assert isinstance(_tied_head(nn.Embedding(300, 96)), Int8Linear)  # a dense table: an int8 copy
    with pytest.raises(RuntimeError, match="group_scales must be contiguous fp32"):
        torch.ops.miaotui_cpu.q8_group_linear(x.contiguous(), codes, scale[:, :2].contiguous())


@pytest.mark.skipif(not cpu_kernels_available() or not torch.ops.miaotui_cpu.wide_int16_available(),
                    reason="the many-row 16-bit kernels need AVX-512 VNNI (and MIAOTUI_CPU_WIDE_INT16 not 0)")
@pytest.mark.parametrize("kind", ["q4_fp16", "q4_fp32", "q8_row", "q8_group"])
def test_many_row_steps_compute_each_row_as_a_batch_1_step(kind):
    """The VNNI kernels' batches (blocks of 16 activation rows with a partial last one; tiles of
    8 weight rows, then 4, 2, 1) give every row what the batch-1 kernels give it alone, up to fp32
    summation order: the same 16-bit rounding of x, the same exact integer dots."""
    from miaotui.layers.packed import Int8GroupWeight
    from miaotui.layers.quantized import Int8GroupHead, PackedEmbedding

    gen = torch.Generator().manual_seed(30)
    n, k = 53, 160
    if kind == "q8_group":
        codes = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
        scale = (torch.rand(n, k // 32, generator=gen) * 0.01 + 1e-4).half().float()
        layer = Int8GroupHead(PackedEmbedding(Int8GroupWeight(codes, scale), torch.float32))
        w = codes.float() * scale.repeat_interleave(32, dim=1)
    elif kind == "q8_row":
        layer = Int8Linear(torch.randn(n, k, generator=gen) * 0.05, None)
        w = layer.dequantized()
    else:
        weight = (_gguf_like_q4_1(n, k, gen) if kind == "q4_fp16"
                  else quantize_int4(torch.randn(n, k, generator=gen) * 0.05))
        layer = Int4Linear(weight, None)
        w = weight.dequantized()
    x = torch.randn(23, k, generator=gen) * torch.logspace(-3, 2, 23)[:, None]  # rows of very different scales
    with torch.inference_mode():
        batch = layer(x)
        alone = torch.cat([layer(x[i:i + 1]) for i in range(23)])
    bound = _fp32_bound(x, w)
    if kind == "q8_row":  # its batch-1 kernel keeps fp32 activations: the 16-bit rounding is the difference
        bound = bound + _int16_bound(x, w)
    assert ((batch - alone).abs() <= bound).all()
    assert ((batch - x @ w.t()).abs() <= _fp32_bound(x, w) + _int16_bound(x, w)).all()


def test_bad_blocks_are_refused_by_name():
    blocks, _ = pack_q4_blocks(quantize_int4(torch.randn(8, 64)))
    with pytest.raises(RuntimeError, match="bytes per row do not fit 96 in_features"):
        torch.ops.miaotui_cpu.q4_linear(torch.randn(1, 96), blocks, False)
    with pytest.raises(RuntimeError, match="x must be a contiguous fp32"):
        torch.ops.miaotui_cpu.q4_linear(torch.randn(1, 64).half(), blocks, False)
    with pytest.raises(RuntimeError, match="not a multiple of 32"):
        torch.ops.miaotui_cpu.q4_dequantize(blocks, 48, False)
    with pytest.raises(RuntimeError, match="qweight must be contiguous int8"):
        torch.ops.miaotui_cpu.q8_linear(torch.randn(1, 64), torch.zeros(4, 32, dtype=torch.int8), torch.ones(4))


@pytest.mark.parametrize("shape", [(1, 576), (5, 64), (2, 3, 100), (130, 40)])
def test_rms_norm_equals_the_reference_formula(shape):
    gen = torch.Generator().manual_seed(5)
    norm = RMSNorm(shape[-1], 1e-5)
    norm.weight.data = torch.randn(shape[-1], generator=gen)
    x = torch.randn(shape, generator=gen) * 3
    with torch.inference_mode():
        y = norm(x)
    ref = norm.weight.data * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    assert norm._cpu_rms_norm is not None
    torch.testing.assert_close(y, ref, rtol=2e-6, atol=2e-6)


def test_rotary_equals_the_torch_formula_on_a_strided_qkv_view():
    gen = torch.Generator().manual_seed(6)
    t, heads, kv_heads, dim = 5, 6, 2, 64
    qkv = torch.randn(t, (heads + 2 * kv_heads) * dim, generator=gen)
    qk = qkv[:, : (heads + kv_heads) * dim].view(t, heads + kv_heads, dim)  # rows strided, as in the models
    rope = RotaryEmbedding(LlamaConfig(hidden_size=heads * dim, num_attention_heads=heads), dim)
    cos, sin = rope.cos_sin(torch.tensor([0, 3, 17, 100, 4095]), torch.float32)
    with torch.inference_mode():
        got = apply_rotary(qk, cos, sin, torch.ops.miaotui_cpu.rotary.default)
    torch.testing.assert_close(got, apply_rotary(qk, cos, sin), rtol=1e-6, atol=1e-6)


def test_silu_and_mul_equals_silu_of_gate_times_up():
    gen = torch.Generator().manual_seed(7)
    gate_up = torch.randn(3, 2 * 100, generator=gen) * 4  # 100: a vector tail of 4
    act = SiluAndMul()
    assert act._cpu_kernel is not None
    with torch.inference_mode():
        got = act(gate_up)
        half = act(gate_up.bfloat16())  # other dtypes take torch's path
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(got, F.silu(gate) * up, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(half.float(), F.silu(gate) * up, rtol=2e-2, atol=5e-2)


def test_without_the_kernels_the_layers_use_torchs():
    code = ("from miaotui.layers.quantized import Int4Linear; from miaotui.layers.norms import RMSNorm; "
            "from miaotui.layers.quantized import Int8Linear; import torch; "
            "print(Int4Linear(torch.randn(16, 32), None).kernel, Int8Linear(torch.randn(16, 32), None).kernel, "
            "RMSNorm(8, 1e-5)._cpu_rms_norm)")
    env = {**os.environ, "MIAOTUI_CPU_KERNELS": "0"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["torch", "torch", "None"]


def test_a_failed_build_falls_back_and_says_why(tmp_path):
    code = ("import logging; logging.basicConfig(level=logging.INFO); "
            "from miaotui.kernels.cpu_build import cpu_kernels_available; print(cpu_kernels_available())")
    env = {**os.environ, "MIAOTUI_CACHE_DIR": str(tmp_path), "CXX": "false"}  # a "compiler" that always fails
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False"]
    assert "CPU kernels off: false failed" in done.stderr and "torch's slower int4 kernel is used" in done.stderr
    assert not list((tmp_path / "kernels").glob("*.so"))  # nothing half-built left to load
