"""What an OpenAI client meets first, on the tiny model in process: models.retrieve, HEAD on GET
routes, the chat stream's opening role chunk, chat's logprobs/top_logprobs checks, and the
max_tokens default of each endpoint. The official `openai` client runs over the TestClient."""

from __future__ import annotations

import asyncio
import json
import threading

import openai
import pytest
from fastapi.routing import APIRoute
from starlette.routing import Mount, Route

from tests.server.conftest import tiny_client
from tests.server.test_http_errors import assert_error

CHAT = [{"role": "user", "content": "Say something."}]
MAX_MODEL_LEN = 256  # tiny_client's default


@pytest.fixture(scope="module")
def client(tiny_server_model):
    with tiny_client(tiny_server_model, served_model_name="org/tiny") as c:
        yield c


@pytest.fixture
def gated_engine(client):
    """The engine's steps wait until `gate` is set; `steps_done` counts those that returned."""
    runner = client.app.state.miaotui.engine.engine.runner
    execute = runner.execute
    gate = threading.Event()
    steps_done = []

    def gated_execute(sched):
        gate.wait(60)
        result = execute(sched)
        steps_done.append(1)
        return result

    runner.execute = gated_execute
    try:
        yield gate, steps_done
    finally:
        gate.set()
        runner.execute = execute


def test_models_retrieve_returns_the_listed_model(oai):
    listed = oai.models.list().data
    assert [m.id for m in listed] == ["org/tiny"]  # a slash in the name survives the client's %2F
    got = oai.models.retrieve("org/tiny")
    assert got.model_dump() == listed[0].model_dump()
    assert got.object == "model" and got.max_model_len == MAX_MODEL_LEN


def test_models_retrieve_unknown_is_openai_404_naming_it(oai, client):
    with pytest.raises(openai.NotFoundError) as info:
        oai.models.retrieve("gpt-9")
    assert "gpt-9" in str(info.value)
    err = assert_error(client.get("/v1/models/gpt-9"), 404, param="model", contains="`gpt-9`")
    assert err["code"] == "model_not_found" and "org/tiny" in err["message"]
    assert_error(client.get("/v1/models/org"), 404, param="model")  # a prefix of the name is not it


def _get_requests(app):
    """(path to request, route) for every route that answers GET."""
    for route in app.routes:
        if isinstance(route, Mount):
            yield route.path + "/chat.js", route
        elif isinstance(route, (APIRoute, Route)) and "GET" in (route.methods or ()):
            yield route.path_format.replace("{model_id}", "org/tiny"), route


def test_head_answers_like_get_on_every_get_route(client):
    paths = [p for p, _ in _get_requests(client.app)]
    assert {"/health", "/version", "/v1/models", "/v1/models/org/tiny", "/metrics", "/", "/docs",
            "/openapi.json", "/static/chat.js"} <= set(paths)
    for path in paths:
        get, head = client.get(path), client.head(path)
        assert head.status_code == get.status_code == 200, path
        assert head.headers["content-type"] == get.headers["content-type"], path
        assert head.content == b""
    assert client.head("/v1/completions").status_code == 405  # POST only, as for GET
    assert client.head("/v1/models/gpt-9").status_code == 404


def _raw_asgi(app, method: str, path: str) -> tuple[int, dict[bytes, bytes], bytes]:
    """One request straight into the ASGI app: the body as the app sent it (test clients drop a
    HEAD response's body themselves, so they cannot show that the server does)."""
    messages = []
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": [(b"host", b"testserver")], "client": ("127.0.0.1", 1), "server": ("testserver", 80)}

    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(message):
        messages.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), body


def test_head_response_sends_no_body_but_the_get_length(client):
    for path in ("/health", "/v1/models"):
        status, headers, body = _raw_asgi(client.app, "GET", path)
        head_status, head_headers, head_body = _raw_asgi(client.app, "HEAD", path)
        assert status == head_status == 200 and body and head_body == b""
        assert head_headers[b"content-length"] == headers[b"content-length"] == str(len(body)).encode()


def test_health_head_is_503_while_loading():
    from fastapi.testclient import TestClient

    from miaotui.config import ServerConfig
    from miaotui.server.app import build_app

    gate = threading.Event()

    def slow_factory():
        gate.wait(30)
        raise RuntimeError("never loads")

    with TestClient(build_app(ServerConfig(), slow_factory)) as c:
        try:
            assert c.head("/health").status_code == 503
        finally:
            gate.set()


def test_chat_stream_opens_with_the_role_alone_before_any_token(oai, gated_engine):
    gate, steps_done = gated_engine
    stream = oai.chat.completions.create(model="org/tiny", messages=CHAT, max_tokens=4, stream=True,
                                         extra_body={"ignore_eos": True})
    chunks = iter(stream)
    first = next(chunks)  # the engine cannot have run a step: every step waits for the gate
    assert steps_done == [] and not gate.is_set()
    assert first.choices[0].delta.model_dump(exclude_none=True) == {"role": "assistant", "content": ""}
    assert first.choices[0].finish_reason is None
    gate.set()
    rest = list(chunks)
    assert rest and all(c.choices[0].delta.role is None for c in rest)
    assert all(set(c.choices[0].delta.model_dump(exclude_none=True)) <= {"content"} for c in rest)
    assert rest[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in rest)


def test_chat_stream_with_n2_opens_each_choice(client):
    resp = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 3, "n": 2, "stream": True,
                                                      "ignore_eos": True})
    events = [json.loads(line[6:]) for line in resp.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert [e["choices"][0] for e in events[:2]] == [
        {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}
        for i in (0, 1)]
    assert all("role" not in e["choices"][0]["delta"] for e in events[2:])


def test_streamed_chat_logprobs_cover_every_token(client):
    resp = client.post("/v1/chat/completions", json={
        "messages": CHAT, "max_tokens": 24, "stream": True, "logprobs": True, "top_logprobs": 2,
        "ignore_eos": True, "stream_options": {"include_usage": True}})
    events = [json.loads(line[6:]) for line in resp.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    entries = [item for e in events if e["choices"] and e["choices"][0]["logprobs"]
               for item in e["choices"][0]["logprobs"]["content"]]
    assert len(entries) == events[-1]["usage"]["completion_tokens"] == 24
    assert all(len(item["top_logprobs"]) == 2 for item in entries)


@pytest.mark.parametrize("top_logprobs", [30, 21, -1])
def test_top_logprobs_out_of_range_names_top_logprobs_and_the_range(client, top_logprobs):
    resp = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2, "logprobs": True,
                                                      "top_logprobs": top_logprobs})
    err = assert_error(resp, 400, param="top_logprobs")
    # Above the range: the server's limit (its flag named); below: the range itself.
    bound = "limit of 20 (--max-logprobs)" if top_logprobs > 20 else "[0, 20]"
    assert err["message"].startswith("top_logprobs: ") and bound in err["message"]
    assert str(top_logprobs) in err["message"]


@pytest.mark.parametrize("logprobs", [None, False])
def test_top_logprobs_without_logprobs_true_is_400(client, logprobs):
    body = {"messages": CHAT, "max_tokens": 2, "top_logprobs": 2}
    if logprobs is not None:
        body["logprobs"] = logprobs
    err = assert_error(client.post("/v1/chat/completions", json=body), 400, param="top_logprobs")
    assert "logprobs=true" in err["message"]


def test_chat_logprobs_edges_accepted(oai, client):
    most = oai.chat.completions.create(model="org/tiny", messages=CHAT, max_tokens=2, logprobs=True,
                                       top_logprobs=20)
    assert [len(item.top_logprobs) for item in most.choices[0].logprobs.content] == [20, 20]
    alone = oai.chat.completions.create(model="org/tiny", messages=CHAT, max_tokens=2, logprobs=True)
    assert [item.top_logprobs for item in alone.choices[0].logprobs.content] == [[], []]
    assert oai.chat.completions.create(model="org/tiny", messages=CHAT, max_tokens=2,
                                       extra_body={"logprobs": None}).choices[0].logprobs is None
    err = assert_error(client.post("/v1/chat/completions", json={"messages": CHAT, "logprobs": 5}),
                       400, param="logprobs")
    assert "bool" in err["message"]


def test_completions_max_tokens_defaults_to_16(oai):
    resp = oai.completions.create(model="org/tiny", prompt="Once upon a time", extra_body={"ignore_eos": True})
    assert resp.usage.completion_tokens == 16 and resp.choices[0].finish_reason == "length"


def test_chat_max_tokens_defaults_to_the_rest_of_the_context(oai):
    resp = oai.chat.completions.create(model="org/tiny", messages=CHAT, extra_body={"ignore_eos": True})
    assert resp.usage.prompt_tokens + resp.usage.completion_tokens == MAX_MODEL_LEN
    assert resp.choices[0].finish_reason == "length"
