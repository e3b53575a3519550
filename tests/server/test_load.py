"""A real server under load and at shutdown: 64 concurrent streams with a fifth of the clients
leaving mid-stream; then SIGTERM with a request in flight."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.server.conftest import serve

pytestmark = pytest.mark.embedded


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


async def _stream(client: httpx.AsyncClient, i: int, leave_after: int | None) -> dict:
    body = {"prompt": f"Story number {i}: once upon a time", "max_tokens": 24, "temperature": 0.8,
            "seed": i, "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    events, text = [], ""
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        status = resp.status_code
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[6:])
            if line[6:] != "[DONE]":
                chunk = json.loads(line[6:])
                text += "".join(c["text"] for c in chunk.get("choices", []))
            if leave_after is not None and len(events) >= leave_after:
                break  # the client goes away mid-stream
    return {"status": status, "events": events, "text": text, "left": leave_after is not None}


def test_64_concurrent_streams_with_disconnects(embedded_server):
    base = embedded_server.base_url

    async def main():
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as client:
            return await asyncio.gather(*(_stream(client, i, 3 if i % 5 == 0 else None) for i in range(64)))

    results = asyncio.run(main())
    assert all(r["status"] == 200 for r in results), [r["status"] for r in results]
    finished = [r for r in results if not r["left"]]
    assert len(finished) == 51
    for r in finished:  # well-formed: chunks, a finish reason, usage, [DONE]
        assert r["events"][-1] == "[DONE]"
        chunks = [json.loads(e) for e in r["events"][:-1]]
        assert all("error" not in c for c in chunks)
        assert chunks[-1]["usage"]["completion_tokens"] == 24
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
        assert r["text"]
    assert httpx.get(base + "/health").status_code == 200
    deadline = time.monotonic() + 30  # aborted requests are freed by the engine loop's next turn
    while True:
        metrics = httpx.get(base + "/metrics").text
        if _metric(metrics, "miaotui_kv_cache_usage_ratio") == 0.0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert _metric(metrics, "miaotui_kv_cache_usage_ratio") == 0.0
    assert _metric(metrics, "miaotui_num_requests_running") == 0
    assert _metric(metrics, "miaotui_num_requests_waiting") == 0
    assert _metric(metrics, "miaotui_num_sequences_admitted") == 0
    assert _metric(metrics, "miaotui_time_to_first_token_seconds_count") >= 64
    assert _metric(metrics, "miaotui_generation_tokens_total") >= 51 * 24
    assert 'miaotui_requests_total{outcome="disconnected"}' in metrics


def test_nonstreaming_client_that_leaves_frees_its_blocks(embedded_server):
    base = embedded_server.base_url
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base + "/v1/completions", json={"prompt": "Tell me everything.", "max_tokens": 2000,
                                                    "ignore_eos": True}, timeout=1.5)
    # Both at once: a scrape can fall between the scheduler dropping the request from the running
    # set and the engine freeing its blocks.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        metrics = httpx.get(base + "/metrics").text
        if (_metric(metrics, "miaotui_num_requests_running") == 0
                and _metric(metrics, "miaotui_kv_cache_usage_ratio") == 0.0):
            break
        time.sleep(0.2)
    assert _metric(metrics, "miaotui_num_requests_running") == 0
    assert _metric(metrics, "miaotui_kv_cache_usage_ratio") == 0.0


def test_sigterm_finishes_in_flight_request_then_exits_0(tmp_path, embedded_gguf):
    with serve(tmp_path, "--kv-cache-memory", "0.25", "--max-model-len", "1024", "--graceful-shutdown", "60") as server:
        lines: list[str] = []
        first_chunk = threading.Event()

        def long_stream():
            # Long enough (~2-3 s here) to be mid-stream when SIGTERM lands.
            body = {"prompt": "Once upon a time", "max_tokens": 300, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=120) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        lines.append(line)
                        first_chunk.set()

        t = threading.Thread(target=long_stream)
        t.start()
        assert first_chunk.wait(60), "no streamed chunk in 60 s"  # the request is streaming
        code = server.terminate(timeout=120)
        t.join(30)
        assert not t.is_alive() and code == 0, server.log_text()
        assert lines[-1] == "data: [DONE]"
        last = json.loads(lines[-2][6:])
        assert last["choices"][0]["finish_reason"] == "length"
        with pytest.raises(httpx.ConnectError):
            httpx.get(server.base_url + "/health", timeout=2)


def test_bad_flag_fails_before_loading(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "miaotui.cli", "serve", "--port", "70000"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "port" in proc.stderr
