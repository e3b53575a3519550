"""torch.compile of the decode step, opt-in (`ModelConfig.compile_decode`, `--compile-decode`).

A batch-1 decode step of a small model on the CPU is mostly per-op overhead: some 40 small ops
per layer (norms, rotary, the casts around the low-bit kernels, attention plumbing), each a
dispatch and a pass over memory. Inductor fuses them into a few loops per layer and calls the
int4/int8 kernels and SDPA as they are. On the embedded model (2 cores) batch-1 decode went from
27 to 46 tok/s. The price is the compile: about 90 s the first time, about 35 s once inductor's
on-disk cache holds the graph, so it is off by default and pays off only for long-running work.

Only steps whose every token is a decode run compiled, with batch size and context length as
dynamic shapes (so one graph for batch 1 and one for larger batches, not one per shape). Prompt
steps stay eager: their per-sequence Python loop would trace a new graph for every prompt mix.
Encoder-decoder steps (cross-attention) stay eager too.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from miaotui.layers.attention import AttentionMetadata

logger = logging.getLogger("miaotui")


class CompiledDecode:
    """The model's forward compiled for pure decode steps; `applies` says whether a step is one."""

    def __init__(self, model: nn.Module) -> None:
        self._compiled = torch.compile(model.forward, dynamic=True)
        self._seen: set[bool] = set()  # batch 1 / batch > 1: each traces its own graph once

    @staticmethod
    def applies(ids: torch.Tensor, meta: AttentionMetadata) -> bool:
        return meta.cross is None and meta.decode is not None and meta.decode.token_idx.numel() == ids.shape[0]

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        single = ids.shape[0] == 1
        if single not in self._seen:
            self._seen.add(single)
            logger.info("compiling the decode step for %s (about a minute the first time, less once "
                        "cached on disk) ...", "batch size 1" if single else "larger batches")
        return self._compiled(ids, positions, meta)
