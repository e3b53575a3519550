"""A server without a tokenizer (`miaotui serve --skip-tokenizer-init`): token-id prompts on
/v1/completions work and return the generated ids; whatever needs text (a text prompt, chat,
/tokenize, /detokenize, echo, stop strings, logprobs named by text) is a 400 naming the flag.
A tiny random Llama with no tokenizer files, in process."""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager

import openai
import pytest
from fastapi.testclient import TestClient

from tests.conftest import make_tiny_checkpoint
from tests.server.test_http_errors import assert_error

FLAG = "--skip-tokenizer-init"
PROMPT = [5, 17, 42, 99, 7]


@pytest.fixture(scope="module")
def tokenizer_free_model(tmp_path_factory) -> str:
    folder, _ = make_tiny_checkpoint(tmp_path_factory.mktemp("no_tokenizer"), "llama")
    return str(folder)


@contextmanager
def _client(folder: str):
    from miaotui.config import CacheConfig, ModelConfig, SchedulerConfig, ServerConfig
    from miaotui.engine.async_engine import AsyncLLMEngine
    from miaotui.engine.llm_engine import LLMEngine
    from miaotui.server.app import build_app

    def factory():
        return AsyncLLMEngine(LLMEngine(ModelConfig(model=folder, skip_tokenizer_init=True, max_model_len=128),
                                        CacheConfig(num_blocks=64), SchedulerConfig(max_num_seqs=8)))

    with TestClient(build_app(ServerConfig(), factory), raise_server_exceptions=False) as client:
        deadline = time.monotonic() + 120  # a busy machine loads slowly; a bound, not a speed
        while (health := client.get("/health")).status_code != 200:
            assert time.monotonic() < deadline, f"the app not healthy in 120 s: {health.text}"
            time.sleep(0.05)
        yield client


@pytest.fixture(scope="module")
def client(tokenizer_free_model):
    with _client(tokenizer_free_model) as c:
        yield c


def _model(client) -> str:
    return client.get("/v1/models").json()["data"][0]["id"]


def test_token_prompt_returns_ids_and_usage(oai, client):
    resp = oai.completions.create(model=_model(client), prompt=PROMPT, max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    choice = resp.choices[0]
    assert choice.text == "" and choice.finish_reason == "length"
    extra = choice.model_extra
    assert extra["prompt_token_ids"] == PROMPT
    assert len(extra["token_ids"]) == 6 and all(isinstance(t, int) for t in extra["token_ids"])
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (5, 6, 11)

    # The stream carries the same ids, a chunk per token (no text would ever trigger one), the
    # prompt's ids in the first, and the same usage.
    chunks = list(oai.completions.create(model=_model(client), prompt=PROMPT, max_tokens=6, temperature=0,
                                         stream=True, stream_options={"include_usage": True},
                                         extra_body={"ignore_eos": True}))
    choices = [c.choices[0] for c in chunks if c.choices]
    assert [t for c in choices for t in c.model_extra["token_ids"]] == extra["token_ids"]
    assert choices[0].model_extra["prompt_token_ids"] == PROMPT
    assert all("prompt_token_ids" not in c.model_extra for c in choices[1:])
    assert all(c.text == "" for c in choices) and choices[-1].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-1].usage.prompt_tokens == 5


def test_batch_and_n_count_every_token(client):
    resp = client.post("/v1/completions", json={"prompt": [PROMPT, [3, 4]], "n": 2, "max_tokens": 3,
                                                "ignore_eos": True})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["prompt_token_ids"] for c in body["choices"]] == [PROMPT, PROMPT, [3, 4], [3, 4]]
    assert all(len(c["token_ids"]) == 3 for c in body["choices"])
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 12, "total_tokens": 19}


def test_return_token_ids_false_leaves_them_out(client):
    resp = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "return_token_ids": False})
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    assert "token_ids" not in choice and "prompt_token_ids" not in choice


@pytest.mark.parametrize("prompt", ["Hello", ["Hello", "there"]])
def test_text_prompt_is_a_400_naming_the_flag(oai, client, prompt):
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model=_model(client), prompt=prompt, max_tokens=2)
    assert FLAG in info.value.message and "token ids" in info.value.message
    assert info.value.body["param"] == "prompt"


@pytest.mark.parametrize("stream", [False, True])
def test_chat_is_a_400_naming_the_flag(oai, client, stream):
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model=_model(client), messages=[{"role": "user", "content": "Hi"}],
                                    stream=stream)
    assert FLAG in info.value.message and "/v1/completions" in info.value.message
    assert info.value.body["param"] == "messages"


def test_tokenize_and_detokenize_are_400s(client):
    err = assert_error(client.post("/tokenize", json={"prompt": "Hi"}), 400, param="prompt")
    assert FLAG in err["message"]
    err = assert_error(client.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}), 400,
                       param="messages")
    assert FLAG in err["message"]
    err = assert_error(client.post("/detokenize", json={"tokens": [1, 2]}), 400, param="tokens")
    assert FLAG in err["message"]


@pytest.mark.parametrize("body, param", [({"echo": True}, "echo"), ({"stop": ["\n"]}, "stop"),
                                         ({"logprobs": 2}, "logprobs")])
@pytest.mark.parametrize("stream", [False, True])
def test_what_needs_text_is_a_400_before_any_stream(client, body, param, stream):
    resp = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "stream": stream, **body})
    err = assert_error(resp, 400, param=param)
    assert FLAG in err["message"]


def test_logprobs_name_tokens_by_id_as_vllm(client):
    """vLLM's return_tokens_as_token_ids: tokens and top_logprobs keys read `token_id:N`."""
    resp = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "logprobs": 2,
                                                "return_tokens_as_token_ids": True, "ignore_eos": True})
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    lps = choice["logprobs"]
    assert lps["tokens"] == [f"token_id:{t}" for t in choice["token_ids"]]
    assert all(isinstance(v, float) for v in lps["token_logprobs"])
    assert all(2 <= len(top) <= 3 and all(k.startswith("token_id:") for k in top) for top in lps["top_logprobs"])
    assert lps["text_offset"] == [0, 0, 0, 0]  # no text: every token starts at 0


def test_prompt_logprobs_have_null_text(client):
    resp = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1, "prompt_logprobs": 1})
    assert resp.status_code == 200, resp.text
    scored = resp.json()["choices"][0]["prompt_logprobs"]
    assert scored[0] is None and len(scored) == len(PROMPT)
    assert all(entry[str(tid)]["decoded_token"] is None for tid, entry in zip(PROMPT[1:], scored[1:]))


def test_page_models_and_health_still_work(client):
    assert client.get("/").status_code == 200
    assert client.get("/v1/models").json()["data"][0]["object"] == "model"
    assert client.get("/health").json() == {"status": "ok"}


def test_loading_without_a_tokenizer_logs_no_warning(tokenizer_free_model, caplog):
    """No tokenizer is no failure: loading logs no warning about the chat template's tokenizer."""
    with caplog.at_level(logging.WARNING, logger="miaotui.server"), _client(tokenizer_free_model) as c:
        assert c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1}).status_code == 200
    assert not [r for r in caplog.records if r.name == "miaotui.server" and r.levelno >= logging.WARNING]


def test_streamed_ids_arrive_as_sse(client):
    """The raw stream: every data line is JSON or [DONE]; no error event."""
    with client.stream("POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "stream": True,
                                                        "ignore_eos": True}) as resp:
        assert resp.status_code == 200
        lines = [line.removeprefix("data: ") for line in resp.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    events = [json.loads(line) for line in lines[:-1]]
    assert not any("error" in e for e in events)
    assert sum(len(e["choices"][0]["token_ids"]) for e in events) == 3


def test_ray_app_builder_forwards_skip_tokenizer_init(monkeypatch, tokenizer_free_model):
    """Serve config files reach replicas through app_builder's args: the flag is a known arg and
    lands in the ModelConfig that every replica is constructed with."""
    from miaotui import ray_serve

    built = {}
    monkeypatch.setattr(ray_serve, "build_application", lambda model_config, *a, **kw: built.update(m=model_config))
    ray_serve.app_builder({"model": tokenizer_free_model, "skip_tokenizer_init": True})
    assert built["m"].skip_tokenizer_init is True
    ray_serve.app_builder({"model": tokenizer_free_model})
    assert built["m"].skip_tokenizer_init is False
    with pytest.raises(ValueError, match="skip_tokenizer_init"):
        ray_serve.app_builder({"model": tokenizer_free_model, "skip_tokenizer_init": "yes"})


def test_with_a_tokenizer_the_ids_are_opt_in(tiny_server_model):
    """A server with a tokenizer returns ids only when asked (vLLM's return_token_ids), and names
    logprobs' tokens `token_id:N` only with return_tokens_as_token_ids, on both endpoints."""
    from tests.server.conftest import tiny_client

    with tiny_client(tiny_server_model) as c:
        plain = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "logprobs": 1}).json()["choices"][0]
        assert "token_ids" not in plain and "prompt_token_ids" not in plain
        assert not any(t.startswith("token_id:") for t in plain["logprobs"]["tokens"])

        body = {"prompt": "Hi", "max_tokens": 3, "temperature": 0, "logprobs": 1, "ignore_eos": True,
                "return_token_ids": True, "return_tokens_as_token_ids": True}
        choice = c.post("/v1/completions", json=body).json()["choices"][0]
        prompt_ids = c.post("/tokenize", json={"prompt": "Hi"}).json()["tokens"]
        assert choice["prompt_token_ids"] == prompt_ids and len(choice["token_ids"]) == 3
        assert choice["logprobs"]["tokens"] == [f"token_id:{t}" for t in choice["token_ids"]]
        text = c.post("/detokenize", json={"tokens": choice["token_ids"]}).json()["prompt"]
        assert choice["text"] == text  # the text is still there
        assert choice["logprobs"]["text_offset"][0] == 0 and choice["logprobs"]["text_offset"][-1] <= len(text)

        chat = c.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0, "logprobs": True,
            "top_logprobs": 2, "ignore_eos": True, "return_tokens_as_token_ids": True}).json()["choices"][0]
        content = chat["logprobs"]["content"]
        assert len(content) == 3 and all(e["token"].startswith("token_id:") for e in content)
        assert all(len(e["top_logprobs"]) == 2 and e["top_logprobs"][0]["token"].startswith("token_id:")
                   for e in content)
        for e in content:  # bytes stay the token's text
            tid = int(e["token"].removeprefix("token_id:"))
            assert e["bytes"] == list(c.post("/detokenize", json={"tokens": [tid]}).json()["prompt"].encode())
