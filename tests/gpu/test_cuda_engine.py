"""The engine on a CUDA device (skipped without one): fp32 greedy output equals the CPU reference
path on a tiny model, bf16 logits stay within 1e-2 relative of fp32, and the Triton decode
kernel (compiled, not interpreted) equals the torch backend."""

from __future__ import annotations

import pytest
import torch

from miaotui import LLM, SamplingParams
from tests.conftest import make_tiny_checkpoint

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")]

PROMPTS = [{"prompt_token_ids": [5, 9, 13]}, {"prompt_token_ids": list(range(20, 61))}]


def _run(folder, tokenizer, **kwargs):
    llm = LLM(str(folder), tokenizer=tokenizer, block_size=16, num_kv_blocks=64, max_model_len=256, **kwargs)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=5)
    return llm.generate(PROMPTS, params, use_tqdm=False)


def test_cuda_fp32_greedy_equals_cpu(tmp_path, embedded_gguf, monkeypatch):
    folder, _ = make_tiny_checkpoint(tmp_path / "llama", "llama")
    cpu = _run(folder, embedded_gguf)
    for backend in ("torch", "triton"):
        monkeypatch.setenv("MIAOTUI_ATTENTION_BACKEND", backend)
        cuda = _run(folder, embedded_gguf, device="cuda")
        for a, b in zip(cpu, cuda):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids, backend


def test_cuda_bf16_logits_within_1e_2_relative(tmp_path):
    from miaotui.config import CacheConfig, ModelConfig
    from miaotui.engine.kv_cache import KVCacheManager
    from miaotui.step_plan import ScheduledSeq, SchedulerOutput
    from miaotui.loader import load_model, resolve_model
    from miaotui.request import Request
    from miaotui.runner.model_runner import ModelRunner

    folder, _ = make_tiny_checkpoint(tmp_path / "llama", "llama")
    logits = {}
    for dtype in ("float32", "bfloat16"):
        config = ModelConfig(model=str(folder), device="cuda", dtype=dtype)
        model, _ = load_model(resolve_model(str(folder)), config)
        runner = ModelRunner(model, config, CacheConfig(block_size=16, num_blocks=64), 256)
        kv = KVCacheManager(64, 16)
        req = Request("r", list(range(3, 40)), SamplingParams(temperature=0), frozenset(), 256, "r")
        assert kv.allocate_slots(req, req.num_tokens)
        logits[dtype] = runner.forward_logits(SchedulerOutput([ScheduledSeq(req, 0, req.num_tokens)]))[0].float().cpu()
    rel = (logits["bfloat16"] - logits["float32"]).norm() / logits["float32"].norm()
    assert rel.item() < 1e-2
