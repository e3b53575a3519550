"""The server on the classic architectures: a tiny GPT-2 and a tiny T5 (encoder-decoder) through
the official openai client, and a clear 400 from the chat endpoint when the tokenizer has no
chat template."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from tests.conftest import make_tiny_checkpoint
from tests.server.conftest import openai_over


def _serve_tiny(arch: str, tmp_path_factory, embedded_tokenizer):
    """A TestClient on a tiny random `arch` model with the embedded tokenizer stripped of its
    chat template (GPT-2 and T5 tokenizers have none); yields (client, transformers model)."""
    from miaotui.config import CacheConfig, ModelConfig, SchedulerConfig, ServerConfig
    from miaotui.engine.async_engine import AsyncLLMEngine
    from miaotui.engine.llm_engine import LLMEngine
    from miaotui.server.app import build_app

    folder, hf_model = make_tiny_checkpoint(tmp_path_factory.mktemp(f"{arch}_server"), arch, vocab_size=49152)
    tok_dir = tmp_path_factory.mktemp(f"{arch}_tokenizer")
    embedded_tokenizer.save_pretrained(tok_dir)
    for name in ("chat_template.jinja", "chat_template.json"):  # a plain tokenizer, like GPT-2's own
        (tok_dir / name).unlink(missing_ok=True)
    config = tok_dir / "tokenizer_config.json"
    config.write_text(config.read_text().replace('"chat_template"', '"unused_template"'))

    def factory():
        return AsyncLLMEngine(LLMEngine(ModelConfig(model=str(folder), tokenizer=str(tok_dir), max_model_len=128),
                                        CacheConfig(num_blocks=64), SchedulerConfig(max_num_seqs=4)))

    with TestClient(build_app(ServerConfig(), factory)) as client:
        deadline = time.monotonic() + 120  # a busy machine loads slowly; a bound, not a speed
        while (health := client.get("/health")).status_code != 200:
            assert time.monotonic() < deadline, f"the {arch} app not healthy in 120 s: {health.text}"
            time.sleep(0.05)
        yield client, hf_model


@pytest.fixture(scope="module")
def gpt2_client(tmp_path_factory, embedded_tokenizer):
    yield from _serve_tiny("gpt2", tmp_path_factory, embedded_tokenizer)


@pytest.fixture(scope="module")
def t5_client(tmp_path_factory, embedded_tokenizer):
    yield from _serve_tiny("t5", tmp_path_factory, embedded_tokenizer)


def test_openai_client_completions_on_tiny_gpt2(gpt2_client):
    import torch

    client, hf_model = gpt2_client
    oai = openai_over(client)
    model = oai.models.list().data[0].id
    prompt = [5, 17, 300, 41, 9]
    resp = oai.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, logprobs=1,
                                  extra_body={"ignore_eos": True, "skip_special_tokens": False})
    ids = client.post("/tokenize", json={"prompt": resp.choices[0].text, "add_special_tokens": False}).json()
    hf_model.generation_config.eos_token_id = None
    ref = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 5, dtype=torch.long),
                            max_new_tokens=8, do_sample=False, pad_token_id=0)[0, 5:].tolist()
    expected = client.post("/detokenize", json={"tokens": ref}).json()["prompt"]
    assert resp.choices[0].text == expected and ids["count"] > 0
    assert resp.usage.completion_tokens == 8
    chunks = list(oai.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, stream=True,
                                         extra_body={"ignore_eos": True, "skip_special_tokens": False}))
    assert "".join(c.choices[0].text for c in chunks) == expected


def test_chat_without_template_is_a_clear_400(gpt2_client):
    client, _ = gpt2_client
    resp = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert err["param"] == "messages" and "chat template" in err["message"]


def test_openai_client_completions_on_tiny_t5(t5_client):
    """The prompt goes to the encoder: the completion is transformers' generate() output, usage
    counts the encoder input as the prompt, n=2 samples and streaming work as for decoders."""
    import torch

    client, hf_model = t5_client
    oai = openai_over(client)
    model = oai.models.list().data[0].id
    prompt = "summarize: The quick brown fox jumps over the lazy dog."
    ids = client.post("/tokenize", json={"prompt": prompt}).json()["tokens"]
    extra = {"ignore_eos": True, "skip_special_tokens": False}
    resp = oai.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, extra_body=extra)
    hf_model.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, 1:].tolist()
    expected = client.post("/detokenize", json={"tokens": ref}).json()["prompt"]
    assert resp.choices[0].text == expected
    assert resp.usage.prompt_tokens == len(ids) and resp.usage.completion_tokens == 8
    chunks = list(oai.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, stream=True,
                                         extra_body=extra))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    sampled = oai.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=1.0, n=2, seed=3,
                                     extra_body=extra)
    assert sorted(c.index for c in sampled.choices) == [0, 1]
    assert all(c.finish_reason == "length" for c in sampled.choices)


def test_t5_limits_and_chat_are_clear_400s(t5_client):
    client, _ = t5_client
    chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"
    # max_model_len is 128: the decoder (start token + output) must fit it, whatever the prompt.
    too_many = client.post("/v1/completions", json={"prompt": "translate: hello", "max_tokens": 128})
    assert too_many.status_code == 400
    err = too_many.json()["error"]
    assert err["param"] == "max_tokens" and "127" in err["message"]
    ok = client.post("/v1/completions", json={"prompt": [5] * 100, "max_tokens": 100})
    assert ok.status_code == 200  # 100 + 100 > 128 is fine: the prompt is the encoder's
    too_long = client.post("/v1/completions", json={"prompt": [5] * 200, "max_tokens": 4})
    assert too_long.status_code == 400 and "200 tokens" in too_long.json()["error"]["message"]
