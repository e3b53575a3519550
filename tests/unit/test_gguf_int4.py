"""GGUF 4-bit blocks kept 4-bit: the repacked codes reproduce the file's weights exactly, the int4
kernel multiplies them within a stated bound of an fp32 matmul, and a quantized GGUF loads with
its Q4 matrices native (no dequantize + requantize) and its other quantized matrices in int8."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from miaotui.config import ModelConfig
from miaotui.layers.packed import Int4Weight, Int8GroupWeight
from miaotui.kernels.cpu_build import cpu_kernels_available
from miaotui.layers.quantized import Int4Linear, Int8GroupLinear, Int8Linear, PackedEmbedding, quantization_supported
from miaotui.loader import load_model, resolve_model
from miaotui.loader.gguf_quant import unpack_int4
from tests.conftest import make_tiny_checkpoint
from tests.gguf_writer import write_llama_gguf

pytestmark = pytest.mark.skipif(not quantization_supported("int4"), reason="this torch lacks the int4 CPU kernel")


class _Tensor:  # the fields of a GGUF reader tensor that unpack_int4 reads
    def __init__(self, data: np.ndarray, kind: GGMLQuantizationType, n: int, k: int) -> None:
        self.data, self.tensor_type, self.shape, self.name = data, kind, [k, n], "blk.0.test.weight"


def _random_q4_k(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Random Q4_K super-blocks (the gguf package cannot quantize to Q4_K): any bytes are valid
    codes and 6-bit scales; d and dmin are set to ordinary fp16 values."""
    raw = rng.integers(0, 256, (n, k // 256, 144), dtype=np.uint8)
    raw[..., 0:2] = np.full((n, k // 256, 1), 0.004, np.float16).view(np.uint8)
    raw[..., 2:4] = np.full((n, k // 256, 1), 0.002, np.float16).view(np.uint8)
    return raw.reshape(n, -1)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q4_K"])
def test_unpacked_codes_reproduce_the_files_weights_exactly(kind):
    rng = np.random.default_rng(0)
    n, k = 48, 512
    qtype = GGMLQuantizationType[kind]
    if kind == "Q4_K":
        data = _random_q4_k(n, k, rng)
    else:
        data = quants.quantize((rng.standard_normal((n, k)) * 0.05).astype(np.float32), qtype)
    expected = quants.dequantize(data, qtype).reshape(n, k)
    weight = unpack_int4(_Tensor(data, qtype, n, k))
    assert weight.codes.dtype == torch.uint8 and int(weight.codes.max()) <= 15
    # Both sides compute d * q + m in fp32 from the same fp16 fields: equal to the last bit.
    np.testing.assert_array_equal(weight.dequantized().numpy(), expected)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_q4_blocks_are_the_files_weights_in_the_kernels_layout(kind):
    """Q4_0 / Q4_1 go straight to the q4 kernel's blocks: the same bytes as packing the unpacked
    codes, the file's weights exactly, and a layer built from them keeps those bytes."""
    from miaotui.kernels.cpu_build import cpu_kernels_available
    from miaotui.layers.int4_blocks import pack_q4_blocks
    from miaotui.layers.packed import Q4Blocks
    from miaotui.loader.gguf_quant import q4_blocks

    rng = np.random.default_rng(3)
    n, k = 48, 256  # N a multiple of 16, as torch's int4 packing needs
    qtype = GGMLQuantizationType[kind]
    data = quants.quantize((rng.standard_normal((n, k)) * 0.05).astype(np.float32), qtype)
    tensor = _Tensor(data, qtype, n, k)
    direct = q4_blocks(tensor)
    assert isinstance(direct, Q4Blocks) and direct.shape == (n, k)
    packed, fp16 = pack_q4_blocks(unpack_int4(tensor))
    assert fp16 and torch.equal(direct.blocks, packed)
    expected = quants.dequantize(data, qtype).reshape(n, k)
    np.testing.assert_array_equal(direct.dequantized().numpy(), expected)
    rows = direct.permute_rows(torch.arange(n - 1, -1, -1)).rows(3, 5)  # the loader's row operations
    np.testing.assert_array_equal(rows.dequantized().numpy(), expected[::-1][3:8])
    if cpu_kernels_available():
        layer = Int4Linear(direct, None)
        assert layer.kernel == "q4" and layer.fp16_scales and torch.equal(layer.blocks, packed)
    fallback = Int4Linear(direct, None, kernel="torch")  # torch's kernel gets the unpacked weight
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(fallback(x), x @ torch.from_numpy(expected).t(), rtol=2e-2, atol=2e-2)


def test_unpack_rejects_other_formats():
    data = quants.quantize(np.zeros((4, 32), np.float32), GGMLQuantizationType.Q8_0)
    with pytest.raises(ValueError, match="Q8_0 is not a 4-bit block format"):
        unpack_int4(_Tensor(data, GGMLQuantizationType.Q8_0, 4, 32))


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q4_K"])
def test_torch_int4_kernel_matches_the_fp32_matmul_of_the_files_weights(kind):
    """Torch's kernel (the fallback where miaotui's own does not build) meets bf16 activations
    with bf16 scales and zeros and rounds its output to bf16. Each rounding is at most 2^-9 relative (8-bit significand, round to nearest), so per output
    |y - x W^T| <= 2^-9 * (|x| |W|^T + |x| (8 |scale| + |zero|)^T + |y|) with fp32 accumulation
    adding nothing measurable; the test allows 1.5x that."""
    rng = np.random.default_rng(1)
    n, k = 96, 512
    qtype = GGMLQuantizationType[kind]
    data = _random_q4_k(n, k, rng) if kind == "Q4_K" else quants.quantize(
        (rng.standard_normal((n, k)) * 0.05).astype(np.float32), qtype)
    weight = unpack_int4(_Tensor(data, qtype, n, k))
    w = weight.dequantized()
    x = torch.randn(7, k, generator=torch.Generator().manual_seed(2))
    ref = x @ w.t()
    out = Int4Linear(weight, None, kernel="torch")(x)
    spread = lambda t: t.repeat_interleave(32, 1)  # noqa: E731
    grid = (8 * spread(weight.scale).abs() + spread(weight.zero).abs())
    bound = 2**-9 * (x.abs() @ w.abs().t() + x.abs() @ grid.t() + ref.abs())
    err = (out - ref).abs()
    assert (err <= 1.5 * bound + 1e-6).all(), f"worst excess {(err - 1.5 * bound).max():.3g}"
    assert err.max() > 0  # the bf16 path really ran (an fp32 path would be exact here)


def _quant_types(name: str) -> str:
    if "norm" in name:
        return "F32"
    if name == "token_embd.weight" or name == "blk.1.ffn_down.weight":
        return "Q8_0"
    if name == "output.weight":
        return "F16"
    return "Q4_0" if ".attn_" in name else "Q4_1"


@pytest.fixture(scope="module")
def quantized_gguf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf_int4")
    # hidden 64, intermediate 128: every matrix's input width is a multiple of the 32-wide group.
    _, hf_model = make_tiny_checkpoint(folder / "hf", "llama", tie_word_embeddings=False)
    return write_llama_gguf(folder / "tiny.gguf", hf_model, _quant_types)


def test_auto_keeps_q4_blocks_native_and_other_quantized_matrices_int8(quantized_gguf):
    path = str(quantized_gguf)
    model, _ = load_model(resolve_model(path), ModelConfig(model=path))  # quantization="auto"
    dense, _ = load_model(resolve_model(path), ModelConfig(model=path, quantization="none"))
    layer0 = model.model.layers[0]
    assert isinstance(layer0.self_attn.qkv_proj, Int4Linear) and isinstance(layer0.mlp.down_proj, Int4Linear)
    # Q8_0 in the file: not cut to 4 bits, nor requantized per row: the file's codes and scales.
    down = model.model.layers[1].mlp.down_proj
    if cpu_kernels_available():
        assert isinstance(down, Int8GroupLinear)
        assert torch.equal(down._dense_weight(), dense.model.layers[1].mlp.down_proj.weight)
    else:
        assert isinstance(down, Int8Linear)
    assert isinstance(model.lm_head, Int8Linear)  # the head is never int4
    # The Q8_0 embedding table stays Q8_0; a lookup gives exactly the dense table's rows.
    assert isinstance(model.model.embed_tokens, PackedEmbedding)
    ids = torch.tensor([[0, 5, 255], [17, 17, 3]])
    assert torch.equal(model.model.embed_tokens(ids), dense.model.embed_tokens(ids))
    # Native: the kernel's weights are the file's values, not a requantization of them, which
    # would move weights by up to half a 4-bit step.
    for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj"):
        layer = layer0.get_submodule(name)
        file_w = dense.model.layers[0].get_submodule(name).weight
        if layer.kernel == "q4":
            # The file's fp16 d and m kept as they are; q * d + m in one FMA against the
            # reference's two roundings: within one fp32 ulp.
            assert layer.fp16_scales, name
            kernel_w = torch.ops.miaotui_cpu.q4_dequantize(layer.blocks, 64, True)
            assert ((kernel_w - file_w).abs() <= 2**-23 * file_w.abs() + 1e-12).all(), name
            continue
        # torch's kernel: up to the bf16 rounding of scale and zero.
        eye = torch.eye(64, dtype=torch.bfloat16)
        kernel_w = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, layer.qweight, 32, layer.scales_and_zeros)
        sz = layer.scales_and_zeros.float()  # [groups, n, 2]
        grid = (8 * sz[..., 0].abs() + sz[..., 1].abs()).t().repeat_interleave(32, 1)
        assert ((kernel_w.float().t() - file_w).abs() <= 2**-8 * (grid + file_w.abs()) + 1e-7).all(), name


def test_tied_head_from_a_packed_table_is_its_int8_requantization():
    """The tied head of a packed embedding is built block by block from the exact table."""
    weight = Int8GroupWeight(torch.randint(-127, 128, (5000, 64), dtype=torch.int8), torch.rand(5000, 2) * 0.01)
    table = PackedEmbedding(weight, torch.float32)
    head, reference = Int8Linear(table, None), Int8Linear(weight.dequantized(), None)
    assert torch.equal(head.qweight, reference.qweight) and torch.equal(head.scales, reference.scales)
    assert torch.equal(table(torch.arange(5000)), weight.dequantized())


def test_int4_weight_rows_fill_a_fused_layer():
    whole = Int4Weight.empty(6, 64)
    part = Int4Weight(torch.full((2, 64), 3, dtype=torch.uint8), torch.ones(2, 2), torch.zeros(2, 2))
    whole.rows(2, 2).copy_(part)
    assert (whole.codes[2:4] == 3).all() and (whole.scale[2:4] == 1).all()
    assert whole.rows(0, 6).shape == (6, 64)


@pytest.mark.parametrize("q4_blocks", [True, False])
def test_fused_qkv_of_4_bit_q_k_and_a_wider_v_loads_int8(tmp_path, monkeypatch, q4_blocks):
    """llama.cpp's Q4_K_M keeps attn_q / attn_k 4-bit and stores attn_v as Q6_K in some layers:
    the fused qkv_proj of such a layer is filled dense and runs int8 (a matrix stored with more
    than 4 bits is not cut to 4); the other layers stay 4-bit. Both 4-bit forms: Q4Blocks (the
    q4 kernel's, where it builds) and Int4Weight (Q4_K's, and every 4-bit type without it)."""
    from miaotui.kernels.cpu_build import cpu_kernels_available

    if q4_blocks and not cpu_kernels_available():
        pytest.skip("the q4 kernel is not built here")
    if not q4_blocks:
        import miaotui.loader.gguf as gguf_loader

        monkeypatch.setattr(gguf_loader, "cpu_kernels_available", lambda: False)

    def quant_for(name: str) -> str:
        if "norm" in name or name in ("token_embd.weight", "output.weight"):
            return "F32"
        return "Q8_0" if name == "blk.0.attn_v.weight" else "Q4_0"

    _, hf_model = make_tiny_checkpoint(tmp_path / "hf", "llama", tie_word_embeddings=False)
    path = str(write_llama_gguf(tmp_path / "mixed.gguf", hf_model, quant_for))
    model, _ = load_model(resolve_model(path), ModelConfig(model=path))
    dense, _ = load_model(resolve_model(path), ModelConfig(model=path, quantization="none"))
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, Int8Linear)
    assert isinstance(model.model.layers[1].self_attn.qkv_proj, Int4Linear)
    x = torch.randn(3, hf_model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    ref = dense.model.layers[0].self_attn.qkv_proj(x)
    torch.testing.assert_close(qkv(x).float(), ref, rtol=0.05, atol=0.05 * ref.abs().max().item())
