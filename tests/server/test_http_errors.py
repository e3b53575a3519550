"""Every error the server promises, with its status code and OpenAI-shaped body (tiny model, in process)."""

from __future__ import annotations

import threading
import time

import pytest
from fastapi.routing import APIRoute
from starlette.routing import Mount, Route

from tests.server.conftest import tiny_client

KEY = "sk-test-123"


def assert_error(resp, status: int, param: str | None = None, contains: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in err["message"]
    if param is not None:
        assert err["param"] == param, err
    if contains is not None:
        assert contains in err["message"], err
    return err


@pytest.fixture(scope="module")
def client(tiny_server_model):
    with tiny_client(tiny_server_model, max_body_bytes=64 * 1024) as c:
        yield c


def test_malformed_json_is_400(client):
    resp = client.post("/v1/completions", content=b'{"prompt": "hi",', headers={"content-type": "application/json"})
    assert_error(resp, 400, contains="malformed JSON")


@pytest.mark.parametrize("field,value", [
    ("temperature", -1), ("top_p", 0), ("top_p", 1.5), ("n", 0), ("max_tokens", 0),
    ("presence_penalty", 3), ("logprobs", 50), ("top_k", -5), ("min_p", 2), ("repetition_penalty", 0),
    ("logit_bias", {"7": 500}), ("logit_bias", {"999999": 1}), ("stop", [""]), ("seed", "abc"),
    ("n", "two"), ("max_tokens", 1.5), ("n", 1000),
])
def test_invalid_field_is_400_naming_it(client, field, value):
    resp = client.post("/v1/completions", json={"prompt": "Hello", field: value})
    err = assert_error(resp, 400, param=field)
    assert field in err["message"]


def test_invalid_chat_fields_are_400(client):
    assert_error(client.post("/v1/chat/completions", json={"messages": []}), 400, param="messages")
    assert_error(client.post("/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]}),
                 400, param="messages")
    assert_error(client.post("/v1/chat/completions",
                             json={"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}),
                 400, param="top_logprobs")
    assert_error(client.post("/v1/completions", json={"prompt": [999999]}), 400, param="prompt")
    assert_error(client.post("/v1/completions", json={"max_tokens": 3}), 400, param="prompt")


def test_prompt_plus_max_tokens_beyond_context_states_both_numbers(client):
    ids = client.post("/tokenize", json={"prompt": "Hello there"}).json()["tokens"]
    resp = client.post("/v1/completions", json={"prompt": "Hello there", "max_tokens": 300})
    err = assert_error(resp, 400, param="max_tokens")
    assert "256" in err["message"] and str(len(ids) + 300) in err["message"] and err["code"] == "context_length_exceeded"
    long_prompt = list(range(10, 300))
    assert_error(client.post("/v1/completions", json={"prompt": long_prompt}), 400, contains="256")


def test_unknown_model_is_404_and_unknown_route_404(client):
    assert_error(client.post("/v1/completions", json={"prompt": "x", "model": "gpt-9"}), 404, param="model")
    assert_error(client.get("/v1/nothing-here"), 404)


def test_body_over_limit_is_413(client):
    big = {"prompt": "x" * (80 * 1024)}
    assert_error(client.post("/v1/completions", json=big), 413)

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(20):
            yield b"x" * 8192

    assert_error(client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"}), 413)


def test_queue_full_is_429_with_retry_after(tiny_server_model):
    """One running place, no queue: a request holding the place (its engine step held until the
    test lets it go) makes the next one 429 with Retry-After; once it is let go, both work."""
    with tiny_client(tiny_server_model, max_num_seqs=1, max_queued_requests=0) as c:
        runner = c.app.state.miaotui.engine.engine.runner
        execute = runner.execute
        stepping, release = threading.Event(), threading.Event()

        def held_execute(sched):  # the engine thread waits here, inside the first request's step
            stepping.set()
            assert release.wait(120), "the test never let the step go"
            return execute(sched)

        runner.execute = held_execute
        state = c.app.state.miaotui
        results = {}

        def long_request():
            results["first"] = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 200,
                                                               "ignore_eos": True})

        t = threading.Thread(target=long_request)
        t.start()
        try:
            assert stepping.wait(60), "the first request never reached the engine"
            assert state.in_flight == 1  # it holds the only place, and cannot finish yet
            resp = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        finally:
            release.set()
            t.join(120)
        err = assert_error(resp, 429)
        assert "capacity" in err["message"] and resp.headers["retry-after"] == "1"
        assert not t.is_alive() and results["first"].status_code == 200
        assert c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_engine_failure_is_503_and_server_survives(tiny_server_model, caplog):
    """The failure's text (a device message) is in the log only: clients and /health get none."""
    with tiny_client(tiny_server_model) as c:
        engine = c.app.state.miaotui.engine
        assert c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200

        def boom(*_):
            raise RuntimeError("simulated device failure")

        engine.engine.runner.execute = boom
        err = assert_error(c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}), 503)
        assert err["message"] == "the engine failed; the server log has the details"
        err = assert_error(c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}), 503)
        assert err["message"] == "the engine has stopped; the server log has the details"
        health = c.get("/health")
        assert health.status_code == 503 and health.json() == {"status": "failed"}
        assert c.get("/version").status_code == 200  # the process still answers
    failures = [r for r in caplog.records if r.name == "miaotui.engine" and r.exc_info]
    assert failures and "simulated device failure" in caplog.text


def test_streaming_error_after_headers_is_in_band(tiny_server_model):
    with tiny_client(tiny_server_model) as c:
        engine = c.app.state.miaotui.engine

        def boom(*_):
            raise RuntimeError("simulated device failure")

        engine.engine.runner.execute = boom
        resp = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "stream": True})
        assert resp.status_code == 200
        events = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and '"error"' in events[-2] and "simulated" not in events[-2]
        assert "the server log has the details" in events[-2]


PUBLIC = {"/health", "/", "/static"}


def _protected_requests(app):
    """Every (method, path) of the route table except the public ones; an unknown kind of
    route fails the test rather than being skipped."""
    for route in app.routes:
        if route.path in PUBLIC:
            continue
        if isinstance(route, Mount):
            yield "GET", route.path + "/x"
        elif isinstance(route, (APIRoute, Route)):
            for method in sorted(route.methods - {"HEAD"}):
                yield method, route.path
        else:
            raise AssertionError(f"route of unknown kind {type(route).__name__}: walk it too")


def test_api_key_required_on_every_protected_route(tiny_server_model):
    with tiny_client(tiny_server_model, api_key=KEY) as c:
        protected = list(_protected_requests(c.app))
        paths = {p for _, p in protected}
        assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/metrics", "/tokenize",
                "/detokenize", "/version", "/openapi.json", "/docs"} <= paths
        for method, path in protected:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
                resp = c.request(method, path, headers=headers)
                assert_error(resp, 401)
            ok = c.request(method, path, headers={"Authorization": f"Bearer {KEY}"})
            assert ok.status_code != 401, (method, path)
        assert c.get("/health").status_code == 200
        assert c.get("/").status_code == 200
        assert c.get("/static/chat.js").status_code == 200
        models = c.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
        assert models["data"][0]["id"]


def test_health_is_503_while_loading(tiny_server_model, caplog):
    """/health says loading, then failed, and nothing more: the load error is in the log only."""
    from fastapi.testclient import TestClient

    from miaotui.config import ServerConfig
    from miaotui.server.app import build_app

    gate = threading.Event()

    def slow_factory():  # loading lasts until the test lets it fail
        gate.wait()
        raise RuntimeError("weights are corrupt")

    try:
        with TestClient(build_app(ServerConfig(), slow_factory)) as c:
            assert c.get("/health").json() == {"status": "loading"}
            assert c.get("/health").status_code == 503
            assert_error(c.post("/v1/completions", json={"prompt": "x"}), 503, contains="loading")
            gate.set()
            deadline = time.monotonic() + 60
            while (health := c.get("/health").json()) == {"status": "loading"}:
                assert time.monotonic() < deadline, f"the load error never showed: {health}"
                time.sleep(0.02)
            assert health == {"status": "failed"} and c.get("/health").status_code == 503
            err = assert_error(c.post("/v1/completions", json={"prompt": "x"}), 503)
            assert err["message"] == "the model failed to load; the server log has the details"
        assert "weights are corrupt" in caplog.text
    finally:
        gate.set()
