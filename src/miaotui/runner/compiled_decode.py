"""torch.compile of the decode step, opt-in (`ModelConfig.compile_decode`, `--compile-decode`).

A batch-1 decode step of a small model on the CPU is mostly per-op overhead: some 40 small ops
per layer (norms, rotary, the casts around the low-bit kernels, attention plumbing), each a
dispatch and a pass over memory. Inductor fuses them into a few loops and calls the int4/int8
kernels and SDPA as they are.

Regional compilation: the model's repeated block (its decoder layer class) is compiled once and
that one graph serves every layer, instead of tracing the whole unrolled model. Measured on the
embedded model, 2 cores: compiling takes ~25-35 s the first time and ~7 s once inductor's on-disk
cache holds the graph (the whole model: ~230 s and ~60 s); batch-1 decode 30 -> 34-40 tok/s
(whole model: 44-50). Still more than a few seconds of start-up, so it is off by default.

Only steps whose every token is a decode run compiled, with batch size and context length as
dynamic shapes (one graph for batch 1, one for larger batches). Prompt steps stay eager: their
per-sequence Python loop would trace a new graph for every prompt mix.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch import nn

from miaotui.layers.attention import AttentionMetadata

logger = logging.getLogger("miaotui")


def repeated_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The model's longest list of blocks of one class (its decoder layers), or None."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1
             and len({type(block) for block in m}) == 1]
    return max(lists, key=len, default=None)


class CompiledDecode:
    """Routes each block's decode-only calls to one compiled graph of the block class's forward.

    Every block's forward takes the step's AttentionMetadata as its last argument (the model
    contract); the other calls (prompt steps) run the eager forward."""

    def __init__(self, model: nn.Module) -> None:
        if getattr(model, "is_encoder_decoder", False):
            raise ValueError("compile_decode: not supported for encoder-decoder models")
        blocks = repeated_blocks(model)
        if blocks is None:
            raise ValueError(f"compile_decode: {type(model).__name__} has no list of repeated blocks to compile")
        self._eager = type(blocks[0]).forward
        self._compiled = None  # made at the first decode step: torch.compile imports its stack (~3 s)
        self._seen: set[bool] = set()  # batch 1 / batch > 1: each traces its own graph once
        if getattr(model, "decode_stack", None) is not None:
            model.decode_stack = None  # the compiled blocks take the decode steps instead
        for block in blocks:
            # An instance attribute: nn.Module.__call__ finds it before the class's forward.
            block.forward = functools.partial(self._call, block)

    def _call(self, block: nn.Module, *args: Any) -> torch.Tensor:
        h, meta = args[0], args[-1]
        decode = meta.decode if isinstance(meta, AttentionMetadata) and meta.cross is None else None
        if decode is None or decode.token_idx.numel() != h.shape[0]:
            return self._eager(block, *args)
        single = h.shape[0] == 1
        if single not in self._seen:
            self._seen.add(single)
            logger.info("compiling the decode step for %s (~25-35 s the first time, less once cached on disk) ...",
                        "batch size 1" if single else "larger batches")
            if self._compiled is None:
                self._compiled = torch.compile(self._eager, dynamic=True)
        return self._compiled(block, *args)
