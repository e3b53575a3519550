"""Accuracy proof for the weight-only quantized CPU paths (int8, int4) on the embedded model.

Against the fp32 path (the GGUF dequantized to fp32, quantization="none"):
- teacher forcing: fed the fp32 path's own 32 greedy tokens after each of 3 chat prompts, the
  quantized path's top-1 pick equals the fp32 token at >= 31 of the 32 positions;
- perplexity over a fixed ~2,000-token public-domain English text (tests/data) is within 1%.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from miaotui.layers.quantized import quantization_supported

pytestmark = [pytest.mark.embedded,
              pytest.mark.skipif(not (quantization_supported("int4") and quantization_supported("int8")),
                                 reason="this torch lacks the low-bit CPU kernels")]

TEXT = Path(__file__).parent.parent / "data" / "public_domain_english.txt"
NEW_TOKENS = 32
MIN_AGREEMENT = 31
MAX_PPL_REL_DIFF = 0.01
PROMPTS = [
    "What is the tallest mountain in the world, and how tall is it?",
    "Write a short poem about the sea at night.",
    "Explain how a refrigerator keeps food cold.",
]


def _paged(model: torch.nn.Module, ids: list[int], max_len: int):
    """A model runner, a KV cache manager and a request for `ids`, the cache sized for `max_len`."""
    from miaotui.config import CacheConfig, ModelConfig
    from miaotui.engine.kv_cache import KVCacheManager
    from miaotui.request import Request
    from miaotui.runner.model_runner import ModelRunner
    from miaotui.sampling_params import SamplingParams

    block_size = 16
    num_blocks = -(-max_len // block_size)
    runner = ModelRunner(model, ModelConfig(), CacheConfig(block_size=block_size, num_blocks=num_blocks),
                         num_blocks * block_size)
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=False)
    req = Request("r", ids, SamplingParams(temperature=0), frozenset(), num_blocks * block_size, "r")
    return runner, kv, req


def _step(runner, kv, req, all_rows: bool = False) -> torch.Tensor:
    """Run the request's not yet computed tokens in one step; logits of its last row, or of
    every row in the step."""
    from miaotui.step_plan import ScheduledSeq, SchedulerOutput

    start, n = req.num_computed_tokens, req.num_tokens - req.num_computed_tokens
    assert kv.allocate_slots(req, n)
    inputs = runner.step_inputs(SchedulerOutput([ScheduledSeq(req, start, n)]))
    if all_rows:
        inputs.sample_rows = list(range(n))
    logits = runner.forward_inputs(inputs)
    req.num_computed_tokens += n
    return logits


def forward_all_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """One whole sequence through the paged model in one step: logits at every position
    [len(ids), vocab] fp32."""
    return _step(*_paged(model, ids, len(ids)), all_rows=True)


def greedy(model: torch.nn.Module, ids: list[int], n: int) -> list[int]:
    """`n` greedy tokens after `ids`: a prefill step, then one decode step per token."""
    runner, kv, req = _paged(model, ids, len(ids) + n)
    for _ in range(n):
        req.append_output_token(int(_step(runner, kv, req)[-1].argmax()))
    return req.output_token_ids


def _load(path: str, mode: str) -> torch.nn.Module:
    from miaotui.config import ModelConfig
    from miaotui.loader import load_model, resolve_model

    model, _ = load_model(resolve_model(path), ModelConfig(model=path, quantization=mode))
    return model


def _perplexity(model: torch.nn.Module, ids: list[int]) -> float:
    logprobs = forward_all_logits(model, ids)[:-1].log_softmax(-1)
    nll = -logprobs.gather(1, torch.tensor(ids[1:])[:, None]).mean().item()
    return math.exp(nll)


@pytest.fixture(scope="module")
def fp32_model(embedded_gguf):
    return _load(embedded_gguf, "none")


@dataclass
class Quantized:
    mode: str
    model: torch.nn.Module = field(repr=False)  # keeps failure reports short


@pytest.fixture(scope="module", params=["int8", "int4"])
def quantized(request, embedded_gguf) -> Quantized:
    return Quantized(request.param, _load(embedded_gguf, request.param))


@pytest.fixture(scope="module")
def text_ids(embedded_tokenizer) -> list[int]:
    return embedded_tokenizer.encode(TEXT.read_text(encoding="utf-8"), add_special_tokens=False)


@pytest.fixture(scope="module")
def fp32_ppl(fp32_model, text_ids) -> float:
    return _perplexity(fp32_model, text_ids)


@pytest.fixture(scope="module")
def fp32_greedy(fp32_model, embedded_tokenizer) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, the fp32 path's 32 greedy tokens) per prompt."""
    from miaotui.tokenizer import chat_prompt_ids

    out = []
    for prompt in PROMPTS:
        ids = chat_prompt_ids(embedded_tokenizer, [{"role": "user", "content": prompt}])
        new = greedy(fp32_model, ids, NEW_TOKENS)
        print(f"\nfp32 greedy for {prompt!r}: {embedded_tokenizer.decode(new)!r}")
        out.append((ids, new))
    return out


def test_text_is_about_2000_tokens(text_ids):
    assert 1900 <= len(text_ids) <= 2300, len(text_ids)


def test_teacher_forced_top1_agrees_with_fp32(quantized, fp32_greedy):
    mode, model = quantized.mode, quantized.model
    counts = []
    for ids, new in fp32_greedy:
        logits = forward_all_logits(model, ids + new)[len(ids) - 1:-1]  # the rows predicting `new`
        counts.append(int((logits.argmax(-1) == torch.tensor(new)).sum()))
    print(f"\n{mode}: teacher-forced top-1 agreement with fp32 per prompt: "
          f"{', '.join(f'{c}/{NEW_TOKENS}' for c in counts)}")
    assert all(c >= MIN_AGREEMENT for c in counts), counts


def test_perplexity_within_one_percent_of_fp32(quantized, fp32_ppl, text_ids):
    mode, model = quantized.mode, quantized.model
    ppl_ref, ppl_q = fp32_ppl, _perplexity(model, text_ids)
    rel = ppl_q / ppl_ref - 1
    print(f"\n{mode}: perplexity over {len(text_ids)} tokens: fp32 {ppl_ref:.4f}, {mode} {ppl_q:.4f} "
          f"({rel:+.2%})")
    assert abs(rel) < MAX_PPL_REL_DIFF
