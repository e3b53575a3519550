"""--compile-decode: the compiled decode step gives the eager step's tokens and logprobs, prompt
steps stay eager, and one graph serves every layer (regional compilation). Compiling takes a
while (a C++ compiler builds inductor's kernels), so one generate covers it: two prompts of
different lengths decode together (batch and context length are the graph's dynamic shapes)."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from miaotui import LLM, SamplingParams
from miaotui.layers.quantized import quantization_supported
from tests.conftest import make_tiny_checkpoint

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="torch.compile on the CPU needs a C++ compiler")


def _prompts() -> list[dict]:
    g = torch.Generator().manual_seed(5)
    return [{"prompt_token_ids": torch.randint(20, 256, (n,), generator=g).tolist()} for n in (7, 19)]


def test_compiled_decode_matches_eager(tmp_path, embedded_gguf):
    folder, _ = make_tiny_checkpoint(tmp_path / "tiny", "llama")
    quantization = "int4" if quantization_supported("int4") else "none"
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=2, ignore_eos=True)
    runs = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        llm = LLM(str(folder), tokenizer=embedded_gguf, block_size=4, num_kv_blocks=256,
                  quantization=quantization, compile_decode=compiled)
        runs[compiled] = [o.outputs[0] for o in llm.generate(_prompts(), params, use_tqdm=False)]
        runner = llm.engine.runner
        if compiled:  # the decode steps (batch 2) really went through the compiled graph ...
            assert runner.compiled_decode is not None and runner.compiled_decode._seen == {False}
            # ... and both layers shared it: one graph, not one per layer or per context length.
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
        else:
            assert runner.compiled_decode is None
    for eager, comp in zip(runs[False], runs[True]):
        assert comp.token_ids == eager.token_ids
        for a, b in zip(eager.logprobs, comp.logprobs):
            for token, entry in a.items():
                assert math.isclose(entry.logprob, b[token].logprob, rel_tol=1e-4, abs_tol=1e-4)


def test_repeated_blocks_are_the_decoder_layers(tmp_path):
    from miaotui.config import ModelConfig
    from miaotui.loader import load_model, resolve_model
    from miaotui.runner.compiled_decode import repeated_blocks

    folder, _ = make_tiny_checkpoint(tmp_path / "tiny", "llama")
    model, _ = load_model(resolve_model(str(folder)), ModelConfig(model=str(folder)))
    assert repeated_blocks(model) is model.model.layers


def test_compile_decode_refuses_tensor_parallelism():
    from miaotui.config import ModelConfig

    with pytest.raises(ValueError, match="compile_decode"):
        ModelConfig(compile_decode=True, tensor_parallel_size=2)
