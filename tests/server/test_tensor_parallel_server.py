"""`miaotui serve --tensor-parallel-size 2` (gloo on loopback): serves the openai client, and when
a worker process dies mid-stream the stream ends with an error, /health stops answering 200 and
the server exits with status 1 instead of hanging."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import openai

from tests.server.conftest import serve


def _tp_worker_pid(server_pid: int) -> int:
    """The spawned worker among the server's children (the other child is multiprocessing's
    resource tracker). Every thread's children: the loading thread, which spawns the workers,
    may still be running (it loads the chat-template tokenizer after /health turns 200)."""
    children = [pid for task in Path(f"/proc/{server_pid}/task").iterdir()
                for pid in (task / "children").read_text().split()]
    for pid in children:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        if "spawn_main" in cmdline:
            return int(pid)
    raise AssertionError(f"no tensor-parallel worker among children {children}")


def test_tp2_server_serves_then_exits_when_a_worker_dies(tmp_path, tiny_server_model):
    folder, tokenizer = tiny_server_model
    with serve(tmp_path, "--model", folder, "--tokenizer", tokenizer, "--tensor-parallel-size", "2",
               "--max-model-len", "512", "--kv-cache-memory", "0.05") as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
        model = client.models.list().data[0].id
        ok = client.completions.create(model=model, prompt="Hello", max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
        assert ok.usage.completion_tokens == 6 and ok.choices[0].finish_reason == "length"

        worker = _tp_worker_pid(server.proc.pid)
        events = []
        body = {"model": model, "prompt": "Hello", "max_tokens": 480, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=60) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[6:])
                if len(events) == 1:
                    os.kill(worker, signal.SIGKILL)
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])
        assert "error" in error and error["error"]["type"] == "service_unavailable_error", events[-3:]
        assert "exited with code" not in error["error"]["message"]  # the cause is in the log alone
        assert len(events) < 480  # the stream ended early, with the error

        started = time.monotonic()
        code = server.proc.wait(timeout=60)
        assert code == 1, server.log_text()[-2000:]
        assert time.monotonic() - started < 30
        assert "the engine failed" in server.log_text() and "exited with code -9" in server.log_text()
