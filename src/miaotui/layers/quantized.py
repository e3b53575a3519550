"""Weight-only quantized linear layers on low-bit CPU kernels (miaotui's own, else torch's), and
the model pass that swaps them in.

- int4: groups of 32 input features, asymmetric (w = (q - 8) * scale + zero, q in 0..15), on
  one of two kernels:
  - "q4", where miaotui's own CPU kernel builds (kernels/cpu_build.py): the q4 layout of
    layers/int4_blocks.py, fp32 activations rounded to 16 bits per group of 32 (steps of 1-3
    rows, and of 8 or more on CPUs with AVX-512 VNNI) with exact integer products, else exact
    fp32 products; without VNNI, from Q4_DENSE_MIN_ROWS rows the weight is dequantized and
    multiplied by a dense fp32 GEMM.
  - "torch", the fallback: packed by `_convert_weight_to_int4pack_for_cpu`, multiplied by
    `_weight_int4pack_mm_for_cpu` with bf16 activations; from DENSE_MIN_ROWS rows (a prompt)
    dequantized and multiplied in fp32 (layers/int4_unpack.py).
- int8: one symmetric scale per output row, multiplied by miaotui's "q8" kernel (fp32
  activations) or, as the fallback, by `_weight_int8pack_mm`.

Torch's two kernels run far faster with bf16 activations than fp32 ones on CPU (measured on a
2-core AVX2 machine, all matmuls of a SmolLM2-135M decode step: int4 8.9 ms with bf16
activations vs 125 ms with fp32), so on them activations are cast to bf16 around the matmul and
back; the rest of the model keeps its dtype. The head (logits) is quantized to int8, never int4:
it decides every token.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import fields

import torch
from torch import nn

from miaotui.kernels.cpu_build import cpu_kernels_available, cpu_op
from miaotui.layers.int4_blocks import pack_q4_blocks
from miaotui.layers.int4_unpack import dequantize_packed_t, packed_block_rows
from miaotui.layers.packed import INT4_GROUP, Q8_GROUP, Int4Weight, Int8GroupWeight, Q4Blocks, quantize_int4


logger = logging.getLogger("miaotui")

_ACT_DTYPE = torch.bfloat16
# From this many rows an int4 matmul dequantizes and runs dense (measured crossover ~64-128 rows).
DENSE_MIN_ROWS = 96
# The same for miaotui's q4 and q8 kernels, whose cost also grows with the rows: a dense GEMM
# after the C++ dequantization wins from about 20-30 rows (measured on the same machine, q4).
Q4_DENSE_MIN_ROWS = 32
# The kernels' OpOverloads, bound once: calling through `torch.ops.aten.<name>` resolves the
# overload on every call (~25 us, a tenth of a batch-1 decode step over 120 matmuls).
_INT4_MM = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
_INT4_MM = _INT4_MM.default if _INT4_MM is not None else None
_PACK_INT4 = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
_INT8_MM = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
_INT8_MM = _INT8_MM.default if _INT8_MM is not None else None


@functools.lru_cache(maxsize=1)
def _wide_int16() -> bool:
    """miaotui's kernels run steps of many rows on 16-bit activations themselves (AVX-512 VNNI,
    kernels/cpu_matmul_vnni.cpp): faster than dequantizing for a dense fp32 GEMM at every size
    measured (1.5-3x at 16-2048 rows on a 2-core AVX-512 machine, whose fp32 GEMM runs at
    ~190 GFLOP/s), and the batch-1 kernels' arithmetic, so a prompt's rows are computed as its
    decode steps are."""
    op = cpu_op("wide_int16_available")
    return op is not None and bool(op())


def quantization_supported(mode: str) -> bool:
    if mode == "int4":
        return _INT4_MM is not None and _PACK_INT4 is not None
    if mode == "int8":
        return _INT8_MM is not None
    return mode == "none"


class _WeightOnlyLinear(nn.Module):
    """y = x W^T + b with W stored low-bit. On miaotui's kernels (`own_kernel`) fp32 rows go in
    as they are, and a prompt-sized step (Q4_DENSE_MIN_ROWS rows or more) dequantizes the weight
    once for one dense fp32 GEMM; on torch's, activations go to bf16 for the kernel and back."""

    out_features: int
    own_kernel: bool
    wide_int16 = False  # set where the own kernel runs many rows itself (`_wide_int16`)

    def __init__(self, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.set_bias(bias)

    def set_bias(self, bias: torch.Tensor | None) -> None:
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:  # torch's kernel: [M, K] bf16 -> [M, N] bf16
        raise NotImplementedError

    def _own_matmul(self, x32: torch.Tensor) -> torch.Tensor:  # miaotui's: [M, K] fp32 -> [M, N] fp32
        raise NotImplementedError

    def _dense_weight(self) -> torch.Tensor:  # [N, K] fp32, for prompt-sized steps on miaotui's kernels
        raise NotImplementedError

    def _product(self, x2d: torch.Tensor) -> torch.Tensor:  # [M, K] -> [M, N], in x2d's dtype
        if not self.own_kernel:
            return self._matmul(x2d.to(_ACT_DTYPE)).to(x2d.dtype)
        x32 = x2d.float().contiguous()  # no-ops for the models' fp32 flat batches
        if x32.shape[0] >= Q4_DENSE_MIN_ROWS and not self.wide_int16:
            return torch.nn.functional.linear(x32, self._dense_weight()).to(x2d.dtype)
        return self._own_matmul(x32).to(x2d.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # the models' flat [T, K] batches: no reshapes around the kernel
            y = self._product(x)
        else:
            y = self._product(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class Int8Linear(_WeightOnlyLinear):
    """Per-row int8 weight, on the "q8" kernel (miaotui's: fp32 activations, exact fp32 products)
    where it builds, else torch's (bf16 activations). Built from a dense [N, K] weight or from a
    PackedEmbedding (a tied head), a block of rows at a time so a large vocabulary never needs
    several full fp32 copies."""

    _ROWS_PER_BLOCK = 4096

    def __init__(self, weight: torch.Tensor | PackedEmbedding, bias: torch.Tensor | None,
                 kernel: str | None = None) -> None:
        super().__init__(bias)
        self.out_features, self.in_features = weight.shape
        q8_runs = self.in_features % 32 == 0 and cpu_kernels_available()
        self.kernel = kernel or ("q8" if q8_runs else "torch")
        if self.kernel not in ("q8", "torch"):
            raise ValueError(f"int8 kernel: must be q8 or torch, got {self.kernel!r}")
        if self.kernel == "q8" and not q8_runs:
            raise ValueError("int8 kernel q8: needs miaotui's CPU kernels and in_features a multiple of 32")
        self.own_kernel = self.kernel == "q8"
        self.wide_int16 = self.own_kernel and _wide_int16()
        self.register_buffer("qweight", torch.empty(self.out_features, self.in_features, dtype=torch.int8))
        # Scales are bf16-rounded either way; the q8 kernel reads them as fp32 (the same values).
        scale_dtype = torch.float32 if self.own_kernel else _ACT_DTYPE
        self.register_buffer("scales", torch.empty(self.out_features, dtype=scale_dtype))
        for start in range(0, self.out_features, self._ROWS_PER_BLOCK):
            stop = min(start + self._ROWS_PER_BLOCK, self.out_features)
            w = (weight[start:stop] if isinstance(weight, torch.Tensor) else weight.rows_dequantized(start, stop))
            w = w.detach().float()
            # Round the scale to bf16 first, then quantize against the rounded scale.
            scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).to(_ACT_DTYPE)
            self.qweight[start:stop] = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
            self.scales[start:stop] = scale
        self._q8_linear = torch.ops.miaotui_cpu.q8_linear.default if self.own_kernel else None

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scales.float()[:, None]

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        return _INT8_MM(x2d, self.qweight, self.scales)

    def _own_matmul(self, x32: torch.Tensor) -> torch.Tensor:
        return self._q8_linear(x32, self.qweight, self.scales)

    def _dense_weight(self) -> torch.Tensor:
        return self.dequantized()


class Int4Linear(_WeightOnlyLinear):
    """A 4-bit weight on the "q4" kernel (miaotui's, the default where it builds) or the "torch"
    one (scales and zeros stored in bf16, the dtype that kernel reads); see the module doc."""

    def __init__(self, weight: Int4Weight | Q4Blocks | torch.Tensor, bias: torch.Tensor | None,
                 kernel: str | None = None) -> None:
        super().__init__(bias)
        if isinstance(weight, torch.Tensor):
            weight = quantize_int4(weight)
        n, k = weight.shape
        self.out_features, self.in_features, self.group_size = n, k, INT4_GROUP
        q4_runs = cpu_kernels_available()
        self.kernel = kernel or ("q4" if q4_runs else "torch")
        self.own_kernel = self.kernel == "q4"
        self.wide_int16 = self.own_kernel and _wide_int16()
        if isinstance(weight, Q4Blocks) and not self.own_kernel:
            weight = weight.to_int4()
        if self.own_kernel:
            if not q4_runs:
                raise ValueError("int4 kernel q4: miaotui's CPU kernels are not available here (see the log)")
            if isinstance(weight, Q4Blocks):  # already the kernel's layout (a GGUF file's Q4_0 / Q4_1)
                blocks, self.fp16_scales = weight.blocks.contiguous(), True
            else:
                blocks, self.fp16_scales = pack_q4_blocks(weight)
            self.register_buffer("blocks", blocks)
            # Bound once, like the aten kernels above.
            self._q4_linear = torch.ops.miaotui_cpu.q4_linear.default
            self._q4_dequantize = torch.ops.miaotui_cpu.q4_dequantize.default
            return
        if self.kernel != "torch":
            raise ValueError(f"int4 kernel: must be q4 or torch, got {self.kernel!r}")
        block = packed_block_rows()  # None: the packed layout cannot be read back; always the kernel
        self.dense_block = block if block and n % block == 0 else None
        self.register_buffer("qweight", _PACK_INT4(weight.codes.to(torch.int32), 1))
        # [k / group, n, 2]: the layout the kernel reads.
        self.register_buffer("scales_and_zeros", torch.stack([weight.scale, weight.zero], -1).transpose(0, 1)
                             .to(_ACT_DTYPE).contiguous())

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        return _INT4_MM(x2d, self.qweight, self.group_size, self.scales_and_zeros)

    def _own_matmul(self, x32: torch.Tensor) -> torch.Tensor:
        return self._q4_linear(x32, self.blocks, self.fp16_scales)

    def _dense_weight(self) -> torch.Tensor:
        return self._q4_dequantize(self.blocks, self.in_features, self.fp16_scales)

    def _product(self, x2d: torch.Tensor) -> torch.Tensor:
        # On torch's kernel, a prompt-sized step: dequantize once and multiply densely in fp32
        # (see int4_unpack).
        if not self.own_kernel and self.dense_block and x2d.shape[0] >= DENSE_MIN_ROWS:
            w_t = dequantize_packed_t(self.qweight, self.scales_and_zeros, self.out_features, self.in_features,
                                      self.dense_block)
            return torch.matmul(x2d.float(), w_t).to(x2d.dtype)
        return super()._product(x2d)


class Int8GroupLinear(_WeightOnlyLinear):
    """A weight a GGUF file stores with a scale per group of 32 int8 codes (Q8_0, and MXFP4
    exactly: layers/packed.py), multiplied as stored by miaotui's q8_group_linear kernel: no
    per-row requantization (which rounds the file's values a second time), the file's size.
    Build it with `group_linear`, which falls back to a per-row Int8Linear without the kernels."""

    def __init__(self, weight: Int8GroupWeight, bias: torch.Tensor | None) -> None:
        super().__init__(bias)
        self.out_features, self.in_features = weight.shape
        self.own_kernel = True
        self.wide_int16 = _wide_int16()
        self.register_buffer("codes", weight.codes.contiguous())
        self.register_buffer("group_scales", weight.scale.float().contiguous())
        self._q8_group_linear = torch.ops.miaotui_cpu.q8_group_linear.default

    def _own_matmul(self, x32: torch.Tensor) -> torch.Tensor:
        return self._q8_group_linear(x32, self.codes, self.group_scales)

    def _dense_weight(self) -> torch.Tensor:
        return Int8GroupWeight(self.codes, self.group_scales).dequantized()


def group_linear(weight: Int8GroupWeight, bias: torch.Tensor | None) -> nn.Module:
    """An Int8GroupLinear where miaotui's kernels run, else the per-row int8 layer."""
    if cpu_kernels_available() and weight.shape[1] % Q8_GROUP == 0:
        return Int8GroupLinear(weight, bias)
    return Int8Linear(weight.dequantized(), bias)


class PackedEmbedding(nn.Module):
    """An embedding table kept as a quantized file stores it (Q8_0, or 4-bit groups): a lookup
    dequantizes only the rows it reads, to exactly the values the dense path's table holds."""

    def __init__(self, weight: Int4Weight | Int8GroupWeight, dtype: torch.dtype) -> None:
        super().__init__()
        self.kind = type(weight)
        self.shape = weight.shape
        self.dtype = dtype
        for field in fields(weight):
            self.register_buffer(field.name, getattr(weight, field.name))

    def packed(self) -> Int4Weight | Int8GroupWeight:
        return self.kind(*(getattr(self, field.name) for field in fields(self.kind)))

    def rows_dequantized(self, start: int, stop: int) -> torch.Tensor:
        return self.packed().rows(start, stop - start).dequantized().to(self.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.packed().take(ids.reshape(-1)).to(self.dtype).view(*ids.shape, self.shape[1])


class Int8GroupHead(nn.Module):
    """The logits head of a tied embedding table that a GGUF file stores as Q8_0 (int8 codes, a
    scale per group of 32), multiplied as stored by miaotui's q8_group_linear kernel (exact fp32
    products of the file's own weights): no requantized copy of the table (28 MB for SmolLM2),
    no requantization at load, no second rounding of the weights."""

    def __init__(self, table: PackedEmbedding) -> None:
        super().__init__()
        if table.kind is not Int8GroupWeight or table.shape[1] % Q8_GROUP:
            raise ValueError("Int8GroupHead: needs a Q8_0 table (Int8GroupWeight) of width a multiple of 32")
        self.out_features, self.in_features = table.shape
        # The table's own tensors, shared, not buffers: the table owns (and saves) them once.
        self._codes, self._scale = table.codes, table.scale.float().contiguous()
        self._op = torch.ops.miaotui_cpu.q8_group_linear.default

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features).float().contiguous()
        y = self._op(x2d, self._codes, self._scale)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def has_low_bit_weights(model: nn.Module) -> bool:
    """Whether any of the model's linear layers holds int4 or int8 weights."""
    return any(isinstance(module, _WeightOnlyLinear) for module in model.modules())


def _tied_head(table: nn.Module) -> nn.Module:
    """The int8 head of a tied table: the Q8_0 table itself where miaotui's kernels run, else a
    per-row int8 copy."""
    if isinstance(table, PackedEmbedding) and table.kind is Int8GroupWeight and cpu_kernels_available():
        return Int8GroupHead(table)
    return Int8Linear(table if isinstance(table, PackedEmbedding) else table.weight, None)


def quantizes(module: nn.Module) -> bool:
    """Whether quantization swaps `module`: every nn.Linear but an MoE router (`keep_dense`)."""
    return isinstance(module, nn.Linear) and not getattr(module, "keep_dense", False)


@torch.no_grad()
def quantized_linear(name: str, linear: nn.Linear, mode: str, stored_lossy: bool) -> nn.Module:
    """The `mode` twin of linear `name`: int4, except the head and weights a file stores with
    more than 4 bits (`stored_lossy`), which go int8, as do rows int4 groups do not divide."""
    is_head = name.split(".")[0] == "lm_head"  # the head itself, or a tensor-parallel head's linear
    int4 = mode == "int4" and not is_head and not stored_lossy and linear.in_features % INT4_GROUP == 0
    return Int4Linear(linear.weight, linear.bias) if int4 else Int8Linear(linear.weight, linear.bias)


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str, int8_modules: frozenset[str] = frozenset()) -> nn.Module:
    """Swap every nn.Linear of a loaded CPU model for its `mode` twin; the head and the modules
    named in `int8_modules` (weights a file stores with more than 4 bits) go to int8. Layers that
    arrived already 4-bit (Int4Linear from the loader) stay as they are.

    A tied head keeps the embedding table for lookups; logits come from the table itself where it
    is Q8_0 (Int8GroupHead), else from an int8 copy."""
    if mode == "none":
        return model
    if mode not in ("int8", "int4"):
        raise ValueError(f"quantization: must be none, int8 or int4 once resolved, got {mode!r}")
    if not quantization_supported(mode):
        raise ValueError(f"quantization: {mode} needs torch's low-bit CPU kernels, which torch "
                         f"{torch.__version__} lacks")
    native = sum(isinstance(module, Int4Linear) for module in model.modules())
    swaps = [(name, module) for name, module in model.named_modules() if quantizes(module)]
    for name, linear in swaps:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, quantized_linear(name, linear, mode, name in int8_modules))
    if getattr(model, "tie_word_embeddings", False):
        model.quantized_head = _tied_head(model.input_embeddings())
    logger.info("quantized %d linear layers to %s (head: int8)%s", len(swaps), mode,
                f"; {native} kept 4-bit from the file" if native else "")
    return model
