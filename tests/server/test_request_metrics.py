"""/metrics counts every request's outcome: miaotui_http_requests_total{route, status} for each HTTP
request (the guard's 401/413, 4xx from routes, 429, 500), beside the generation counter
miaotui_requests_total{outcome} (tiny model, in process)."""

from __future__ import annotations

import threading
import time

from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import tiny_client
from tests.server.test_http_errors import assert_error

KEY = "sk-metrics"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _samples(text: str, name: str) -> dict[tuple, float]:
    return {tuple(sorted(s.labels.items())): s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == name}


def test_every_outcome_is_counted_by_route_and_status(tiny_server_model):
    with tiny_client(tiny_server_model, api_key=KEY, max_body_bytes=4096, max_num_seqs=1,
                     max_queued_requests=0) as c:
        state = c.app.state.miaotui

        def post(body: dict, headers: dict = AUTH):
            return c.post("/v1/completions", json=body, headers=headers)

        assert post({"prompt": "Hi", "max_tokens": 2}).status_code == 200
        assert_error(post({"prompt": "Hi", "temperature": -1}), 400, param="temperature")
        assert_error(post({"prompt": "Hi"}, headers={}), 401)
        assert_error(post({"prompt": "Hi", "model": "gpt-9"}), 404, param="model")
        assert_error(post({"prompt": "x" * 8192}), 413)
        assert_error(c.get("/v1/completions", headers=AUTH), 405)
        assert_error(c.get("/v1/nothing-here", headers=AUTH), 404)

        def boom(_ids):
            raise RuntimeError("simulated bug")

        state.detokenize = boom
        assert_error(c.post("/detokenize", json={"tokens": [1]}, headers=AUTH), 500)

        # 429: a first request holds the only slot while the engine waits on a gate.
        runner = state.engine.engine.runner
        execute, gate = runner.execute, threading.Event()

        def gated_execute(sched):
            gate.wait(60)
            return execute(sched)

        runner.execute = gated_execute
        first = {}
        holder = threading.Thread(target=lambda: first.update(r=post({"prompt": "Hi", "max_tokens": 2})))
        holder.start()
        try:
            deadline = time.monotonic() + 60
            while state.in_flight == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert_error(post({"prompt": "Hi", "max_tokens": 2}), 429)
        finally:
            gate.set()
            holder.join(60)
        runner.execute = execute
        assert first["r"].status_code == 200

        text = c.get("/metrics", headers=AUTH).text
        counts = _samples(text, "miaotui_http_requests_total")

        def count(route: str, status: int) -> float:
            return counts.get((("route", route), ("status", str(status))), 0)

        assert {status: count("/v1/completions", status) for status in (200, 400, 401, 404, 405, 413, 429)} == {
            200: 2, 400: 1, 401: 1, 404: 1, 405: 1, 413: 1, 429: 1}
        assert count("unmatched", 404) == 1
        assert count("/detokenize", 500) == 1
        assert count("/health", 200) >= 1  # the client waited on it until healthy
        # The generation counter keeps its name and meaning: admitted requests by how they ended.
        assert _samples(text, "miaotui_requests_total") == {(("outcome", "ok"),): 2}

        # The scrape above is counted too; a HEAD is counted under the GET route it asked.
        assert c.head("/v1/models/nope", headers=AUTH).status_code == 404
        again = _samples(c.get("/metrics", headers=AUTH).text, "miaotui_http_requests_total")
        assert again[(("route", "/metrics"), ("status", "200"))] == 1
        assert again[(("route", "/v1/models/{model_id}"), ("status", "404"))] == 1


def test_streamed_and_static_requests_are_counted(tiny_server_model):
    with tiny_client(tiny_server_model) as c:
        resp = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                     "max_tokens": 2, "stream": True})
        assert resp.status_code == 200 and resp.text.endswith("data: [DONE]\n\n")
        assert c.get("/static/chat.js").status_code == 200
        assert c.get("/static/missing.js").status_code == 404
        counts = _samples(c.get("/metrics").text, "miaotui_http_requests_total")
        assert counts[(("route", "/v1/chat/completions"), ("status", "200"))] == 1
        assert counts[(("route", "/static/{path}"), ("status", "200"))] == 1
        assert counts[(("route", "/static/{path}"), ("status", "404"))] == 1
