"""Checks the model-family tests share: transformers' greedy reference, and the CPU decode stack
against the layers' own forward."""

from __future__ import annotations

import torch


def hf_greedy_ids(hf_model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation of `prompt` (its eos disabled by the caller)."""
    with torch.no_grad():
        # An explicit mask: a random prompt may contain the pad id, which generate() would mask.
        ref = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return ref[0, len(prompt):].tolist()


def assert_decode_stack_matches_layers(folder, tokenizer: str, served: bool) -> None:
    """An int8 model's greedy ids are the same with its decode stack as with the layers' own
    forward (the reference), and the stack serves the model exactly when `served`."""
    from miaotui import LLM, SamplingParams

    llm = LLM(str(folder), tokenizer=tokenizer, block_size=4, num_kv_blocks=64, quantization="int8",
              max_model_len=128)
    prompt = {"prompt_token_ids": list(range(20, 31))}
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    stacked = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    model = llm.engine.runner.model
    stack, model.decode_stack = model.decode_stack, None  # the layers' own forward: the reference
    assert llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids == stacked
    assert stack.enabled is served
