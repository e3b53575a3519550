"""A real server under load and at shutdown: 64 concurrent streams with a fifth of the clients
leaving mid-stream; then SIGTERM with a request in flight."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.server.conftest import serve

pytestmark = pytest.mark.embedded


DISCONNECTED = 'miaotui_requests_total{outcome="disconnected"}'
IDLE = ("miaotui_num_requests_running", "miaotui_num_requests_waiting", "miaotui_num_sequences_admitted",
        "miaotui_kv_cache_usage_ratio")


def _metric(text: str, name: str, default: float | None = None) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    if match is None and default is not None:  # a labelled counter appears at its first count
        return default
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


def _wait_metrics(base: str, condition, timeout: float, what: str) -> str:
    """Scrape /metrics until `condition(text)` holds; fail after `timeout` s naming `what`."""
    deadline = time.monotonic() + timeout
    while not condition(metrics := httpx.get(base + "/metrics").text):
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {what}\n{metrics}"
        time.sleep(0.1)
    return metrics


def _idle(metrics: str) -> bool:
    """Nothing running, waiting, admitted, and every KV block free: all at once, as a scrape can
    fall between the engine dropping a request from its sets and freeing its blocks."""
    return all(_metric(metrics, name) == 0 for name in IDLE)


async def _stream(client: httpx.AsyncClient, i: int, leave_after: int | None) -> dict:
    # A client that leaves asks for far more tokens than it waits for: it is mid-stream when it
    # goes, however fast the machine decodes.
    body = {"prompt": f"Story number {i}: once upon a time", "max_tokens": 24 if leave_after is None else 1000,
            "temperature": 0.8, "seed": i, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
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
    # Aborted requests are freed by the engine loop's next turn; a busy machine is slow.
    metrics = _wait_metrics(base, _idle, 60, "the server idle after the load")
    assert _metric(metrics, "miaotui_time_to_first_token_seconds_count") >= 64
    assert _metric(metrics, "miaotui_generation_tokens_total") >= 51 * 24
    assert _metric(metrics, DISCONNECTED, 0) >= 13  # every client that left, seen leaving


def test_nonstreaming_client_that_leaves_frees_its_blocks(embedded_server):
    """A non-streaming request seen running (on /metrics), then its client closes the connection:
    the server counts it disconnected and frees everything it held."""
    base, port = embedded_server.base_url, embedded_server.port
    before = _wait_metrics(base, _idle, 60, "the server idle before the request")
    body = json.dumps({"prompt": "Tell me everything.", "max_tokens": 2000, "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:  # a client that can just leave
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        # 2000 tokens take the embedded model many seconds: it is still running when the client goes.
        _wait_metrics(base, lambda m: _metric(m, "miaotui_num_requests_running") == 1, 60, "the request running")
    metrics = _wait_metrics(base, _idle, 60, "its blocks freed after the client left")
    assert _metric(metrics, DISCONNECTED, 0) == _metric(before, DISCONNECTED, 0) + 1


def test_sigterm_finishes_in_flight_request_then_exits_0(tmp_path, embedded_gguf):
    """SIGTERM with a request streaming: the server begins its graceful shutdown (its log says so)
    while the request is still in flight, finishes it in full, then exits 0."""
    # One kernel thread: on a machine whose cores are busy elsewhere, a thread per core made 600
    # tokens take 160 s here (17 s with one thread).
    with serve(tmp_path, "--kv-cache-memory", "0.25", "--max-model-len", "1024", "--graceful-shutdown", "300",
               "--threads", "1") as server:
        lines: list[str] = []
        first_chunk, ended = threading.Event(), threading.Event()

        def long_stream():
            # Running when the shutdown begins (milliseconds after the signal; 400 tokens take
            # seconds), done well within the grace period.
            body = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True}
            try:
                with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=300) as resp:
                    for line in resp.iter_lines():
                        if line.startswith("data: "):
                            lines.append(line)
                            first_chunk.set()
            finally:
                ended.set()

        t = threading.Thread(target=long_stream)
        t.start()
        assert first_chunk.wait(120), "no streamed chunk in 120 s"  # the request is streaming
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        while "shutting down: finishing in-flight requests" not in server.log_text():
            assert time.monotonic() < deadline, server.log_text()[-3000:]
            time.sleep(0.02)
        assert not ended.is_set(), "the request ended before the shutdown began (ask for more tokens)"
        code = server.proc.wait(360)
        t.join(60)
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
