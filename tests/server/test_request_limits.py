"""Per-request limits (a 400 naming the field, the limit and its flag), admission before any work,
params built once per request, and cache_salt (tiny model, in process)."""

from __future__ import annotations

import threading

import pytest

from miaotui.config import RequestLimits
from tests.server.conftest import tiny_client
from tests.server.test_http_errors import assert_error

LIMITS = RequestLimits(max_prompts=4, max_n=2, max_stop_strings=3, max_stop_string_chars=8, max_stop_token_ids=2,
                       max_logit_bias=3, max_logprobs=2, max_messages=3, max_chat_template_chars=50)
USER = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def client(tiny_server_model):
    with tiny_client(tiny_server_model, limits=LIMITS, trust_request_chat_template=True) as c:
        yield c


OVER = [  # (endpoint, body, param, flag)
    ("completions", {"prompt": ["a"] * 5}, "prompt", "--max-prompts-per-request"),
    ("completions", {"prompt": [[1, 2]] * 5}, "prompt", "--max-prompts-per-request"),
    ("completions", {"prompt": "a", "n": 3}, "n", "--max-n"),
    ("completions", {"prompt": "a", "stop": ["x"] * 4}, "stop", "--max-stop-strings"),
    ("completions", {"prompt": "a", "stop": "x" * 9}, "stop", "--max-stop-string-chars"),
    ("completions", {"prompt": "a", "stop_token_ids": [1, 2, 3]}, "stop_token_ids", "--max-stop-token-ids"),
    ("completions", {"prompt": "a", "logit_bias": {str(i): 1 for i in range(4)}}, "logit_bias", "--max-logit-bias"),
    ("completions", {"prompt": "a", "logprobs": 3}, "logprobs", "--max-logprobs"),
    ("completions", {"prompt": "a", "prompt_logprobs": 3}, "prompt_logprobs", "--max-logprobs"),
    ("chat/completions", {"messages": USER * 4}, "messages", "--max-messages"),
    ("chat/completions", {"messages": USER, "logprobs": True, "top_logprobs": 3}, "top_logprobs", "--max-logprobs"),
    ("chat/completions", {"messages": USER, "chat_template": "{{ 'x' }}" * 6}, "chat_template",
     "--max-chat-template-chars"),
    ("chat/completions", {"messages": USER, "n": 3}, "n", "--max-n"),
]


@pytest.mark.parametrize(("endpoint", "body", "param", "flag"), OVER)
def test_each_limit_is_a_400_naming_the_field_the_limit_and_its_flag(client, endpoint, body, param, flag):
    err = assert_error(client.post(f"/v1/{endpoint}", json={"max_tokens": 1, **body}), 400, param=param)
    limit = getattr(LIMITS, {"--max-prompts-per-request": "max_prompts"}.get(flag, flag[2:].replace("-", "_")))
    assert err["message"].startswith(f"{param}: ") and f"limit of {limit} ({flag})" in err["message"], err


def test_at_the_limits_requests_are_served(client):
    body = {"prompt": ["a", "b", "c", "d"], "n": 2, "max_tokens": 2, "stop": ["12345678", "x", "y"],
            "stop_token_ids": [1, 2], "logit_bias": {"5": 1, "6": -1, "7": 0}, "logprobs": 2}
    resp = client.post("/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["choices"]) == 8
    resp = client.post("/v1/chat/completions", json={"messages": USER * 3, "max_tokens": 2, "logprobs": True,
                                                     "top_logprobs": 2})
    assert resp.status_code == 200, resp.text


def test_params_are_built_once_per_request_not_per_prompt(client, monkeypatch):
    from miaotui.server import protocol

    built = []
    original = protocol._SamplingFields._sampling_params

    def counting(self, *args, **kwargs):
        built.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(protocol._SamplingFields, "_sampling_params", counting)
    body = {"prompt": ["one", "two", "three", "four"], "max_tokens": 2, "logit_bias": {"5": 1, "6": 2, "7": 3}}
    assert client.post("/v1/completions", json=body).status_code == 200
    assert len(built) == 1


def test_a_full_server_answers_429_before_tokenizing_anything(tiny_server_model):
    """One place, held by a request whose engine step the test holds: the next request is 429,
    and its prompts were never tokenized (admission comes before the work)."""
    with tiny_client(tiny_server_model, max_num_seqs=1, max_queued_requests=0) as c:
        state = c.app.state.miaotui
        runner = state.engine.engine.runner
        execute = runner.execute
        stepping, release = threading.Event(), threading.Event()

        def held_execute(sched):
            stepping.set()
            assert release.wait(120), "the test never let the step go"
            return execute(sched)

        runner.execute = held_execute
        first = {}
        t = threading.Thread(target=lambda: first.setdefault("r", c.post(
            "/v1/completions", json={"prompt": "Hi", "max_tokens": 20, "ignore_eos": True})))
        t.start()
        tokenized = []
        try:
            assert stepping.wait(60), "the first request never reached the engine"
            encode = state.tokenizer.encode
            state.tokenizer.encode = lambda *a, **k: tokenized.append(a) or encode(*a, **k)
            try:
                resp = c.post("/v1/completions", json={"prompt": ["x" * 100_000] * 4, "max_tokens": 2})
                chat = c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2})
            finally:
                del state.tokenizer.encode
        finally:
            release.set()
            t.join(120)
        assert_error(resp, 429)
        assert_error(chat, 429)
        assert tokenized == []
        assert first["r"].status_code == 200 and state.in_flight == 0


def test_cache_salt_separates_prefix_cache_entries(client):
    """The same long prompt again hits the prefix cache under the same salt (or none), never
    under another salt."""
    state = client.app.state.miaotui
    prompt = list(range(100, 164))  # 64 tokens: full blocks to share

    def hits(**extra) -> int:
        before = state.llm_engine.kv.prefix_hit_tokens
        resp = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1, **extra})
        assert resp.status_code == 200, resp.text
        return state.llm_engine.kv.prefix_hit_tokens - before

    hits(cache_salt="tenant-a")
    assert hits(cache_salt="tenant-a") > 0
    assert hits(cache_salt="tenant-b") == 0
    assert hits() == 0  # no salt: a cache of its own too
    assert hits() > 0
    chat = {"messages": [{"role": "user", "content": "w " * 60}], "max_tokens": 1}
    assert client.post("/v1/chat/completions", json={**chat, "cache_salt": "c"}).status_code == 200
    before = state.llm_engine.kv.prefix_hit_tokens
    assert client.post("/v1/chat/completions", json={**chat, "cache_salt": "d"}).status_code == 200
    assert state.llm_engine.kv.prefix_hit_tokens == before


@pytest.mark.parametrize("salt", ["", "s" * 1025, 5])
def test_a_bad_cache_salt_is_a_400(client, salt):
    resp = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1, "cache_salt": salt})
    assert resp.status_code == 400, resp.text
    assert "cache_salt" in resp.text


def test_tokenize_takes_the_limits_and_chat_template_kwargs(tiny_server_model):
    template = "{{ greeting | default('') }}{% for m in messages %}{{ m.content }}{% endfor %}"
    with tiny_client(tiny_server_model, limits=LIMITS, chat_template=template) as c:
        plain = c.post("/tokenize", json={"messages": USER}).json()
        greeted = c.post("/tokenize", json={"messages": USER, "chat_template_kwargs": {"greeting": "Hello there"}})
        assert greeted.status_code == 200, greeted.text
        assert greeted.json()["tokens"] == c.post("/tokenize", json={"prompt": "Hello thereHi",
                                                                     "add_special_tokens": False}).json()["tokens"]
        assert greeted.json()["count"] > plain["count"]
        assert_error(c.post("/tokenize", json={"messages": USER * 4}), 400, param="messages")
        assert_error(c.post("/tokenize", json={"messages": USER, "chat_template_kwargs": {"k": "v" * 5000}}),
                     400, param="chat_template_kwargs")
        long_text = "word " * 20_000  # tokenized off the event loop: the same ids
        resp = c.post("/tokenize", json={"prompt": long_text})
        assert resp.json()["tokens"] == c.app.state.miaotui.tokenizer.encode(long_text)
