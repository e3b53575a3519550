"""A real `miaotui serve` whose engine fails outside a step (an abort that raises, injected): the
other client's stream ends with an in-band 503 that carries none of the failure's text, the
failure is in the log, and the server exits with status 1 instead of answering 503 forever.
/health of a real server says "loading", and no load error's text, while the model loads.

The faults are injected by starting the server through `python -c`, which patches the engine
and then runs the CLI's own entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import make_tiny_checkpoint
from tests.server.conftest import ROOT, ServerProcess

BOUND_S = 60  # a limit for a busy machine, never an expected speed
INJECTED = "injected abort failure at /secret/path"

_FAILING_ABORT = f"""
from miaotui.engine.llm_engine import LLMEngine

def abort_request(self, request_id):
    raise RuntimeError({INJECTED!r})

LLMEngine.abort_request = abort_request
"""


def _gated_load_failure(gate: Path) -> str:
    """Loading waits until `gate` exists, then fails with a message naming a path."""
    return f"""
import pathlib, time
from miaotui.engine.llm_engine import LLMEngine

def init(self, *args, **kwargs):
    while not pathlib.Path({str(gate)!r}).exists():
        time.sleep(0.02)
    raise RuntimeError("injected load failure: /secret/weights.bin")

LLMEngine.__init__ = init
"""


@contextmanager
def _patched_server(tmp_path: Path, prelude: str, *args: str):
    """`miaotui serve --port 0 ARGS` run by miaotui.cli.main after `prelude`; killed at the end
    if it is still running."""
    code = f"{prelude}\nimport sys\nfrom miaotui.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    log = tmp_path / "server.log"
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", code, "serve", "--port", "0", *args],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    server = ServerProcess(proc, log)
    try:
        deadline = time.monotonic() + 180
        while not server.bound_port():
            assert proc.poll() is None, f"the server exited with {proc.returncode}:\n{server.log_text()}"
            assert time.monotonic() < deadline, f"the server bound no port:\n{server.log_text()}"
            time.sleep(0.1)
        yield server
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _wait_healthy(server: ServerProcess) -> None:
    deadline = time.monotonic() + 180
    while True:
        assert server.proc.poll() is None, f"the server exited:\n{server.log_text()}"
        try:
            if httpx.get(server.base_url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"the server did not become healthy:\n{server.log_text()}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def long_context_model(tmp_path_factory, embedded_gguf) -> tuple[str, str]:
    """A tiny Llama with room for a stream that outlasts the test's steps by far."""
    folder, _ = make_tiny_checkpoint(tmp_path_factory.mktemp("long_context"), "llama", vocab_size=49152,
                                     max_position_embeddings=4096)
    return str(folder), embedded_gguf


def test_failing_abort_ends_other_streams_and_the_server_exits_1(tmp_path, long_context_model):
    folder, tokenizer = long_context_model
    with _patched_server(tmp_path, _FAILING_ABORT, "--model", folder, "--tokenizer", tokenizer,
                         "--max-model-len", "4096", "--kv-cache-memory", "0.05") as server:
        _wait_healthy(server)
        body = {"prompt": "Hello", "max_tokens": 4000, "stream": True, "ignore_eos": True}
        streaming = {"leaving": threading.Event(), "staying": threading.Event()}
        leave = threading.Event()
        staying_events: list[str] = []
        errors: list[BaseException] = []

        def client(name: str) -> None:
            try:
                with httpx.stream("POST", server.base_url + "/v1/completions", json=body,
                                  timeout=BOUND_S) as resp:
                    assert resp.status_code == 200, resp.read()
                    for line in resp.iter_lines():
                        if not line.startswith("data: "):
                            continue
                        streaming[name].set()
                        if name == "leaving":
                            leave.wait(BOUND_S)
                            return  # closes the connection mid-stream: the server aborts the request
                        staying_events.append(line[6:])
            except BaseException as exc:  # noqa: BLE001 - reported by the test below
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(name,), daemon=True) for name in streaming]
        for t in threads:
            t.start()
        for name, event in streaming.items():
            assert event.wait(BOUND_S), f"{name} never streamed:\n{server.log_text()[-3000:]}"
        leave.set()
        for t in threads:
            t.join(BOUND_S)
            assert not t.is_alive(), f"a stream did not end:\n{server.log_text()[-3000:]}"
        assert not errors, errors

        assert staying_events[-1] == "[DONE]", staying_events[-3:]
        error = json.loads(staying_events[-2])["error"]
        assert error["type"] == "service_unavailable_error", error
        assert "injected" not in error["message"] and "/secret" not in error["message"]
        assert len(staying_events) < 4000  # ended early, by the failure

        code = server.proc.wait(timeout=BOUND_S)
        log = server.log_text()
        assert code == 1, log[-3000:]
        assert INJECTED in log and "Traceback" in log  # the details, with where they came from


def test_health_of_a_loading_then_failing_server_names_no_error(tmp_path, tiny_server_model):
    folder, tokenizer = tiny_server_model
    gate = tmp_path / "gate"
    with _patched_server(tmp_path, _gated_load_failure(gate), "--model", folder,
                         "--tokenizer", tokenizer) as server:
        deadline = time.monotonic() + 180
        while True:  # the socket is bound before the app serves: wait for its first answer
            try:
                health = httpx.get(server.base_url + "/health", timeout=5)
                break
            except httpx.HTTPError:
                assert server.proc.poll() is None, server.log_text()
                assert time.monotonic() < deadline, server.log_text()
                time.sleep(0.1)
        assert health.status_code == 503 and health.json() == {"status": "loading"}
        gate.touch()  # the load fails now: the server exits, answering no error text meanwhile
        seen = set()
        while server.proc.poll() is None:
            try:
                health = httpx.get(server.base_url + "/health", timeout=5)
            except httpx.HTTPError:
                continue  # shutting down
            assert health.status_code == 503
            seen.add(health.text)
            assert time.monotonic() < deadline + BOUND_S, server.log_text()
        assert seen <= {'{"status":"loading"}', '{"status":"failed"}'}, seen
        assert server.proc.returncode == 2
        assert "injected load failure: /secret/weights.bin" in server.log_text()
