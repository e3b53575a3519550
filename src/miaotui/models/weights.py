"""Filling a model built on the meta device with checkpoint tensors.

Unfused parameters are assigned the loaded tensor itself when dtype and device already match
(zero copy: a safetensors mmap stays an mmap). Fused parameters (QKV, gate/up) are allocated
once and filled shard by shard. A weight that arrives packed (layers/packed.py: a GGUF file's Q4,
Q8_0 or MXFP4 blocks as stored) is collected the same way and, at `finish`, its module is
replaced: an nn.Linear by an Int4Linear or Int8GroupLinear (with the linear's bias, loaded by
then), an nn.Embedding by a PackedEmbedding. A 4-bit weight is packed into its Int4Linear as soon as it is complete, so the
unpacked codes (2.5x the packed size) of only one matrix are alive at a time; a Q4Blocks weight
(a GGUF file's Q4_0 / Q4_1, already in the kernel's layout) is never unpacked at all. A fused
weight whose shards arrive some 4-bit and some not is filled dense.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from miaotui.errors import ModelLoadError
from miaotui.layers.packed import GGUFRows, Int4Weight, Int8GroupWeight, Q4Blocks
from miaotui.layers.quantized import Int4Linear, PackedEmbedding, group_linear

Int4Packed = (Int4Weight, Q4Blocks)  # the two forms a 4-bit weight arrives in
LinearPacked = (*Int4Packed, Int8GroupWeight)  # the forms a linear's weight stays in
Packed = (*LinearPacked, GGUFRows)  # GGUFRows: embedding tables only


def _packed_linear(weight):
    """The layer of a complete packed linear weight (its bias is set at `finish`)."""
    return group_linear(weight, None) if isinstance(weight, Int8GroupWeight) else Int4Linear(weight, None)


class WeightSink:
    """Receives (name, tensor) pairs for a model's parameters and checks nothing is missing."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, device: torch.device,
                 on_linear_loaded: Callable[[str, nn.Linear, set[str]], nn.Module | None] | None = None) -> None:
        """`on_linear_loaded(name, linear, its checkpoint sources)`: called as soon as a dense
        linear's weight and bias are all in; a module it returns replaces the linear (the loader
        quantizes there, so the fp32 weights of only a few matrices are alive at a time)."""
        self.model = model
        self.on_linear_loaded = on_linear_loaded
        self.dtype = dtype
        self.device = device
        self.params = dict(model.named_parameters())
        self.pending: dict[str, set[str]] = {}  # fused param -> shards still missing
        self.loaded: set[str] = set()
        self.packed: dict[str, Int4Weight | Q4Blocks | Int8GroupWeight | GGUFRows | nn.Module] = {}  # weight name -> its packed form
        self.sources: dict[str, set[str]] = {}  # parameter name -> checkpoint tensors it came from

    def _param(self, name: str, source: str) -> nn.Parameter:
        self.sources.setdefault(name, set()).add(source)
        try:
            return self.params[name]
        except KeyError:
            raise ModelLoadError(f"checkpoint tensor {source!r} has no place in the model ({name})") from None

    def _set(self, name: str, tensor: torch.Tensor) -> None:
        module_name, _, attr = name.rpartition(".")
        module = self.model.get_submodule(module_name) if module_name else self.model
        param = nn.Parameter(tensor, requires_grad=False)
        setattr(module, attr, param)
        self.params[name] = param

    def _check_shape(self, expected: torch.Size, got: torch.Size, source: str) -> None:
        if tuple(expected) != tuple(got):
            raise ModelLoadError(
                f"checkpoint tensor {source!r} has shape {tuple(got)}, the config implies {tuple(expected)}"
            )

    def assign(self, name: str, tensor: torch.Tensor | Int4Weight | Q4Blocks | Int8GroupWeight, source: str) -> None:
        param = self._param(name, source)
        self._check_shape(param.shape, tensor.shape, source)
        if isinstance(tensor, LinearPacked) and isinstance(self.model.get_submodule(name.rpartition(".")[0]), nn.Linear):
            self.packed[name] = _packed_linear(tensor)
        elif isinstance(tensor, Packed):
            self.packed[name] = tensor
        else:
            self._set(name, tensor.to(device=self.device, dtype=self.dtype))
        self.loaded.add(name)
        self._linear_done(name)

    def copy_shard(self, name: str, tensor: torch.Tensor, offset: int, shard: str,
                   shards: tuple[str, ...], source: str) -> None:
        """Copy `tensor` into rows [offset, offset + len) of fused parameter `name`."""
        param = self._param(name, source)
        if name not in self.pending:
            if isinstance(tensor, LinearPacked):
                self.packed[name] = type(tensor).empty(*param.shape)
            else:
                self._set(name, torch.empty(param.shape, dtype=self.dtype, device=self.device))
                param = self.params[name]
            self.pending[name] = set(shards)
        packed = self.packed.get(name)
        if isinstance(packed, nn.Module):
            raise ModelLoadError(f"checkpoint tensor {source!r}: {name} is already complete (a repeated shard)")
        if (packed is not None) != isinstance(tensor, LinearPacked) or (packed is not None and type(packed) is not type(tensor)):
            # Mixed shards: llama.cpp's Q4_K_M keeps Q and K 4-bit but stores attn_v as Q6_K in
            # some layers. The fused weight then goes dense (the 4-bit rows dequantized), and the
            # loader quantizes it to int8 as any matrix stored with more than 4 bits.
            if packed is not None:
                self._set(name, packed.dequantized().to(device=self.device, dtype=self.dtype))
                del self.packed[name]
                packed, param = None, self.params[name]
            if isinstance(tensor, LinearPacked):
                tensor = tensor.dequantized()
        if packed is not None:
            rows = packed.rows(offset, tensor.shape[0])
        else:
            rows = param.data.narrow(0, offset, tensor.shape[0])
        self._check_shape(rows.shape, tensor.shape, source)
        rows.copy_(tensor)
        self.pending[name].discard(shard)
        if not self.pending[name]:
            self.loaded.add(name)
            if packed is not None:
                self.packed[name] = _packed_linear(packed)
            self._linear_done(name)

    def _linear_done(self, name: str) -> None:
        """Hand a dense nn.Linear whose parameters have all arrived to `on_linear_loaded`."""
        module_name = name.rpartition(".")[0]
        if self.on_linear_loaded is None or f"{module_name}.weight" in self.packed:
            return
        module = self.model.get_submodule(module_name)
        own = [f"{module_name}.{p}" for p, _ in module.named_parameters(recurse=False)]
        if not isinstance(module, nn.Linear) or any(p not in self.loaded for p in own):
            return
        sources = set().union(*(self.sources.get(p, set()) for p in own))
        replacement = self.on_linear_loaded(module_name, module, sources)
        if replacement is not None:
            parent_name, _, attr = module_name.rpartition(".")
            setattr(self.model.get_submodule(parent_name) if parent_name else self.model, attr, replacement)
            for p in own:  # the dense tensors go with the linear (they stay counted as loaded)
                del self.params[p]

    def finish(self) -> None:
        missing = sorted(set(self.params) - self.loaded)
        if missing:
            shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
            raise ModelLoadError(f"checkpoint is missing {len(missing)} tensors: {shown}")
        for name, weight in self.packed.items():
            module_name = name.rpartition(".")[0]
            parent_name, _, attr = module_name.rpartition(".")
            module = self.model.get_submodule(module_name)
            if isinstance(module, nn.Linear) and isinstance(weight, nn.Module):  # Int4Linear, Int8GroupLinear, ...
                packed_module = weight
                packed_module.set_bias(module.bias)
            elif isinstance(module, nn.Embedding):
                packed_module = PackedEmbedding(weight, self.dtype)
            else:
                raise ModelLoadError(f"{name}: a {type(weight).__name__} does not fit a {type(module).__name__}")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, attr, packed_module)
        self.packed.clear()
