"""An unexpected exception (a bug, not an APIError) during generation: counted as outcome "error"
in miaotui_requests_total, reported to the client as a 500 (in-band in a stream, which then
ends properly), its stack trace in the server log and never in the response. Also: GET
/v1/models/ with an empty id. Tiny model, in process."""

from __future__ import annotations

import json
import logging

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import openai_over, tiny_client
from tests.server.test_http_errors import assert_error

SECRET = "simulated bug 7f3a"


@pytest.fixture(scope="module")
def client(tiny_server_model):
    with tiny_client(tiny_server_model) as c:
        yield c


@pytest.fixture()
def failing_engine(client):
    """The engine's generate yields its first output, then raises a RuntimeError."""
    engine = client.app.state.miaotui.engine
    generate = engine.generate

    async def failing_generate(*args, **kwargs):
        async for out in generate(*args, **kwargs):
            yield out
            raise RuntimeError(SECRET)

    engine.generate = failing_generate
    yield
    engine.generate = generate


def _outcomes(client) -> dict[str, float]:
    return {s.labels["outcome"]: s.value for family in text_string_to_metric_families(client.get("/metrics").text)
            for s in family.samples if s.name == "miaotui_requests_total"}


def _delta(before: dict, after: dict) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in ("ok", "error", "disconnected")}


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 8, "ignore_eos": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "ignore_eos": True}),
])
def test_stream_error_is_in_band_and_counted_as_error(client, failing_engine, caplog, path, body):
    before = _outcomes(client)
    with caplog.at_level(logging.ERROR, logger="miaotui.server"):
        with client.stream("POST", path, json={**body, "stream": True}) as resp:
            assert resp.status_code == 200
            text = "".join(resp.iter_text())
    data = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    error = json.loads(data[-2])["error"]
    assert error["type"] == "server_error" and "server log" in error["message"]
    assert SECRET not in text and "Traceback" not in text
    assert _delta(before, _outcomes(client)) == {"ok": 0, "error": 1, "disconnected": 0}
    assert any(SECRET in (r.exc_text or "") or (r.exc_info and SECRET in str(r.exc_info[1])) for r in caplog.records)


def test_the_openai_client_sees_the_stream_error(client, failing_engine):
    oai = openai_over(client)
    stream = oai.completions.create(model=client.get("/v1/models").json()["data"][0]["id"], prompt="Hi",
                                    max_tokens=8, stream=True, extra_body={"ignore_eos": True})
    with pytest.raises(openai.APIError) as info:
        list(stream)
    assert "internal server error" in info.value.message and SECRET not in info.value.message


def test_non_streamed_error_is_a_500_counted_as_error(client, failing_engine):
    before = _outcomes(client)
    resp = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 8, "ignore_eos": True})
    err = assert_error(resp, 500)
    assert SECRET not in resp.text and "server log" in err["message"]
    assert _delta(before, _outcomes(client)) == {"ok": 0, "error": 1, "disconnected": 0}
    assert client.app.state.miaotui.in_flight == 0


def test_after_the_errors_the_server_still_serves(client):
    assert client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200
    assert client.app.state.miaotui.in_flight == 0


def test_empty_model_id_is_a_sensible_404(client):
    name = client.get("/v1/models").json()["data"][0]["id"]
    err = assert_error(client.get("/v1/models/"), 404, param="model")
    assert "no model id" in err["message"] and name in err["message"] and "``" not in err["message"]
    assert err["code"] == "model_not_found"
    err = assert_error(client.get("/v1/models/other"), 404, param="model")  # a wrong id still names it
    assert "`other`" in err["message"]
