"""An explicit JSON null on a field OpenAI allows to be null means the field's default, as if it
were left out (SDKs send null for what a caller leaves unset); a wrong non-null type is still a
400. Tiny model, in process."""

from __future__ import annotations

import pytest

from tests.server.conftest import tiny_client
from tests.server.test_http_errors import assert_error

COMMON = ["n", "stream", "stream_options", "presence_penalty", "frequency_penalty", "temperature", "top_p",
          "stop", "seed", "user", "logit_bias", "model"]
COMPLETION = COMMON + ["logprobs", "max_tokens", "echo", "suffix", "best_of", "prompt_logprobs"]
CHAT = COMMON + ["logprobs", "top_logprobs", "max_tokens", "max_completion_tokens", "response_format", "tools"]


@pytest.fixture(scope="module")
def client(tiny_server_model):
    with tiny_client(tiny_server_model) as c:
        yield c


def test_every_null_completion_field_is_its_default(client):
    base = {"prompt": "Hi", "temperature": 0, "max_tokens": 3, "ignore_eos": True}
    expected = client.post("/v1/completions", json=base).json()
    resp = client.post("/v1/completions", json={**dict.fromkeys(COMPLETION), **base})
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"] == expected["choices"]


def test_every_null_chat_field_is_its_default(client):
    base = {"messages": [{"role": "user", "content": "Hi", "name": None}], "temperature": 0, "max_tokens": 3,
            "ignore_eos": True}
    expected = client.post("/v1/chat/completions", json=base).json()
    resp = client.post("/v1/chat/completions", json={**dict.fromkeys(CHAT), **base})
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"] == expected["choices"]


@pytest.mark.parametrize("field", COMPLETION)
def test_each_null_alone_on_completions(client, field):
    body = {"prompt": "Hi", "max_tokens": 2, field: None}
    resp = client.post("/v1/completions", json=body)
    assert resp.status_code == 200, (field, resp.text)
    assert resp.headers["content-type"].startswith("application/json")  # stream: null is no stream
    assert len(resp.json()["choices"]) == 1  # n: null is 1


@pytest.mark.parametrize("field", CHAT)
def test_each_null_alone_on_chat(client, field):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, field: None}
    resp = client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, (field, resp.text)
    assert len(resp.json()["choices"]) == 1 and resp.json()["choices"][0]["logprobs"] is None


def test_null_max_tokens_on_completions_is_16(oai, client):
    """The official client sends None as null; on the legacy endpoint that is OpenAI's default 16."""
    model = client.get("/v1/models").json()["data"][0]["id"]
    resp = oai.completions.create(model=model, prompt="Hi", max_tokens=None, n=None, temperature=None,
                                  stream=None, logprobs=None, echo=None, stop=None, seed=None, user=None,
                                  presence_penalty=None, frequency_penalty=None, top_p=None, logit_bias=None,
                                  suffix=None, stream_options=None, extra_body={"ignore_eos": True})
    assert resp.usage.completion_tokens == 16 and resp.choices[0].finish_reason == "length"


def test_null_max_tokens_on_chat_is_the_rest_of_the_context(oai, client):
    model = client.get("/v1/models").json()["data"][0]["id"]
    resp = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=None,
                                       max_completion_tokens=None, n=None, stream=None, logprobs=None,
                                       top_logprobs=None, extra_body={"ignore_eos": True})
    assert resp.usage.total_tokens == 256 and resp.choices[0].finish_reason == "length"  # max_model_len


def test_null_inside_stream_options(client):
    resp = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "stream": True,
                                                "stream_options": {"include_usage": None}})
    assert resp.status_code == 200 and '"usage"' not in resp.text.replace('"usage": null', "")


@pytest.mark.parametrize("field, value", [("n", "2"), ("n", 1.5), ("stream", 1), ("stream", "true"),
                                          ("echo", "yes"), ("logprobs", True), ("max_tokens", "16"),
                                          ("max_tokens", 2.0)])
def test_wrong_types_are_still_400s_on_completions(client, field, value):
    assert_error(client.post("/v1/completions", json={"prompt": "Hi", field: value}), 400, param=field)


@pytest.mark.parametrize("field, value", [("logprobs", 1), ("top_logprobs", "2"), ("max_completion_tokens", "8"),
                                          ("stream_options", {"include_usage": "yes"})])
def test_wrong_types_are_still_400s_on_chat(client, field, value):
    body = {"messages": [{"role": "user", "content": "Hi"}], field: value}
    assert_error(client.post("/v1/chat/completions", json=body), 400, param=field)


@pytest.mark.parametrize("body, param", [({"prompt": None}, "prompt"), ({"messages": None}, "messages")])
def test_a_required_field_stays_required(client, body, param):
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    assert_error(client.post(path, json=body), 400, param=param)
