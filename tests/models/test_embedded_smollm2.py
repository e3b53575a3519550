"""The embedded SmolLM2-135M-Instruct GGUF: greedy ids equal transformers loading the same file."""

from __future__ import annotations

import pytest
import torch

from miaotui import SamplingParams

pytestmark = pytest.mark.embedded

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
]


@pytest.fixture(scope="module")
def llm(embedded_llm):
    return embedded_llm


@pytest.fixture(scope="module")
def hf(embedded_hf):
    return embedded_hf


def test_default_model_is_the_embedded_gguf(llm, embedded_gguf):
    assert llm.engine.model_path == embedded_gguf


def test_greedy_ids_match_transformers_on_the_same_file(llm, hf):
    tok, model = hf
    model.generation_config.eos_token_id = None  # run all 32 steps, as ignore_eos does
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        ids = tok(prompt, return_tensors="pt")
        assert out.prompt_token_ids == ids["input_ids"][0].tolist()
        with torch.no_grad():
            ref = model.generate(**ids, max_new_tokens=32, do_sample=False)
        assert out.outputs[0].token_ids == ref[0, ids["input_ids"].shape[1]:].tolist(), prompt


def test_chat_answers_paris(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0].outputs[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # ended on <|im_end|>, which is not in the text
    assert "<|im_end|>" not in out.text
