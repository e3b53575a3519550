"""LLM: the offline Python API vLLM users already know (generate, chat)."""

from __future__ import annotations

import dataclasses
from typing import Any

from tqdm.auto import tqdm

from miaotui.config import CacheConfig, ModelConfig, SchedulerConfig
from miaotui.engine.llm_engine import LLMEngine
from miaotui.outputs import RequestOutput
from miaotui.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams
from miaotui.tokenizer import chat_prompt_ids
from miaotui.tokenizer_core import transformers_tokenizer

Prompt = str | list[int] | dict[str, Any]


def _as_prompt_list(prompts: Prompt | list[Prompt]) -> list[Prompt]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    if isinstance(prompts, (list, tuple)):
        return list(prompts)
    raise ValueError(f"prompts: expected a string, token ids, or a list of them, got {type(prompts).__name__}")


def _prompt_input(prompt: Prompt) -> str | list[int]:
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return list(prompt["prompt_token_ids"])
        if "prompt" in prompt:
            return prompt["prompt"]
        raise ValueError("prompts: a dict prompt needs 'prompt' or 'prompt_token_ids'")
    if isinstance(prompt, (str, list)):
        return prompt
    raise ValueError(f"prompts: unsupported prompt type {type(prompt).__name__}")


class LLM:
    """Load a model once, then generate for many prompts in continuous batches.

    `model=None` uses the embedded default (SmolLM2-135M-Instruct, Q4_1 GGUF). `seed` seeds the
    draws of requests without their own `SamplingParams.seed`; None (the default) draws fresh
    randomness in every process.
    """

    def __init__(self, model: str | None = None, *, tokenizer: str | None = None,
                 dtype: str = "float32", device: str = "cpu", max_model_len: int | None = None,
                 seed: int | None = None, block_size: int = 16, num_kv_blocks: int | None = None,
                 kv_cache_memory_gib: float | None = None, kv_cache_dtype: str = "auto",
                 enable_prefix_caching: bool = True,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 quantization: str = "auto", tensor_parallel_size: int = 1, load_format: str = "auto",
                 threads: int | None = None, compile_decode: bool = False, skip_tokenizer_init: bool = False) -> None:
        self.engine = LLMEngine(
            ModelConfig(model=model, tokenizer=tokenizer, dtype=dtype, device=device,
                        max_model_len=max_model_len, seed=seed, quantization=quantization,
                        tensor_parallel_size=tensor_parallel_size, load_format=load_format, threads=threads,
                        compile_decode=compile_decode, skip_tokenizer_init=skip_tokenizer_init),
            CacheConfig(block_size=block_size, num_blocks=num_kv_blocks,
                        kv_cache_memory_gib=kv_cache_memory_gib, kv_cache_dtype=kv_cache_dtype,
                        enable_prefix_caching=enable_prefix_caching),
            SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens),
        )

    def shutdown(self) -> None:
        """Stop tensor-parallel worker processes now (they also stop when this process exits)."""
        self.engine.shutdown()

    def get_tokenizer(self) -> Any:
        """The transformers tokenizer (the engine may hold only its Rust core: tokenizer_core.py)."""
        return transformers_tokenizer(self.engine.tokenizer)

    def generate(self, prompts: Prompt | list[Prompt],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Complete each prompt; outputs come back in the order of `prompts`."""
        items = [_prompt_input(p) for p in _as_prompt_list(prompts)]
        return self._run(items, sampling_params, use_tqdm)

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template: str | None = None) -> list[RequestOutput]:
        """Answer one conversation (a list of messages) or several (a list of such lists)."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        items = [chat_prompt_ids(self.engine.tokenizer, conv, add_generation_prompt, chat_template)
                 for conv in conversations]
        return self._run(items, sampling_params, use_tqdm)

    def beam_search(self, prompts: Prompt | list[Prompt], params: BeamSearchParams | None = None,
                    use_tqdm: bool = True) -> list[RequestOutput]:
        """Beam search per prompt (transformers' generate(num_beams=...) semantics); each output
        holds num_return_sequences completions, best first."""
        items = [_prompt_input(p) for p in _as_prompt_list(prompts)]
        params = params or BeamSearchParams()
        return self._run(items, [params] * len(items), use_tqdm, self.engine.add_beam_search_request)

    def _run(self, items: list[str | list[int]],
             sampling_params: SamplingParams | list[SamplingParams] | list[BeamSearchParams] | None,
             use_tqdm: bool, add: Any = None) -> list[RequestOutput]:
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(items):
                raise ValueError(
                    f"sampling_params: got {len(sampling_params)} for {len(items)} prompts")
            params = sampling_params
        else:
            params = [sampling_params or SamplingParams()] * len(items)
        params = _final_only(params)
        engine = self.engine
        add = add or engine.add_request
        ids: list[str] = []
        try:
            for item, p in zip(items, params):
                ids.append(add(None, item, p))
        except Exception:
            for rid in ids:
                engine.abort_request(rid)
            raise
        results: dict[str, RequestOutput] = {}
        own = set(ids)  # the engine may hold other callers' requests: count only these
        try:
            with tqdm(total=len(ids), desc="Generating", unit="req", disable=not use_tqdm,
                      delay=1.0, leave=False) as bar:
                while len(results) < len(ids):
                    for out in engine.step():
                        if out.finished and out.request_id in own:
                            results[out.request_id] = out
                            bar.update(1)
        except BaseException:
            # An error or Ctrl-C inside a step: none of this call's requests may stay queued or
            # running with their KV blocks, or the next call would see their outputs.
            for rid in ids:
                if rid not in results:
                    engine.abort_request(rid)
            raise
        return [results[rid] for rid in ids]


def _final_only(params: list) -> list:
    """A batch returns whole, finished outputs: ask the engine for nothing else (no per-step copies
    of growing outputs), whatever output_kind the caller set, as vLLM's LLM does. Each distinct
    params object is replaced once, not once per prompt."""
    replaced: dict[int, Any] = {}
    out = []
    for p in params:
        if isinstance(p, SamplingParams) and p.output_kind is not RequestOutputKind.FINAL_ONLY:
            if id(p) not in replaced:
                replaced[id(p)] = dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY)
            p = replaced[id(p)]
        out.append(p)
    return out
