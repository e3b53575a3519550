"""The server on a classic architecture: a tiny GPT-2 through the official openai client, and a
clear 400 from the chat endpoint when the tokenizer has no chat template."""

from __future__ import annotations

import time

import openai
import pytest
from fastapi.testclient import TestClient

from tests.conftest import make_tiny_checkpoint


@pytest.fixture(scope="module")
def gpt2_client(tmp_path_factory, embedded_tokenizer):
    from miaotui.config import CacheConfig, ModelConfig, SchedulerConfig, ServerConfig
    from miaotui.engine.async_engine import AsyncLLMEngine
    from miaotui.engine.llm_engine import LLMEngine
    from miaotui.server.app import build_app

    folder, hf_model = make_tiny_checkpoint(tmp_path_factory.mktemp("gpt2_server"), "gpt2", vocab_size=49152)
    tok_dir = tmp_path_factory.mktemp("gpt2_tokenizer")
    embedded_tokenizer.save_pretrained(tok_dir)
    for name in ("chat_template.jinja", "chat_template.json"):  # a plain tokenizer, like GPT-2's own
        (tok_dir / name).unlink(missing_ok=True)
    config = tok_dir / "tokenizer_config.json"
    config.write_text(config.read_text().replace('"chat_template"', '"unused_template"'))

    def factory():
        return AsyncLLMEngine(LLMEngine(ModelConfig(model=str(folder), tokenizer=str(tok_dir), max_model_len=128),
                                        CacheConfig(num_blocks=64), SchedulerConfig(max_num_seqs=4)))

    with TestClient(build_app(ServerConfig(), factory)) as client:
        deadline = time.monotonic() + 60
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        yield client, hf_model


def test_openai_client_completions_on_tiny_gpt2(gpt2_client):
    import torch

    client, hf_model = gpt2_client
    oai = openai.OpenAI(base_url=str(client.base_url) + "/v1", api_key="x", http_client=client, max_retries=0)
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
