"""Servers for the server tests: real `miaotui serve` processes, and in-process apps on a tiny model."""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]


# `miaotui serve` binds its socket before anything loads and logs the port it bound (the real
# one when asked for port 0): "serving on http://127.0.0.1:PORT (chat page ...".
_BOUND_PORT = re.compile(r"serving on https?://\S+:(\d+) ")
_log_names = itertools.count()


@contextmanager
def reserved_port(host: str = "127.0.0.1"):
    """A port for a server that binds with SO_REUSEPORT (Ray Serve's proxy does), held from
    before the server starts until after it stops. This socket stays bound but never listens:
    while it is held the kernel gives the port to no ephemeral bind or connect, a bind of it
    fails unless made with SO_REUSEADDR or SO_REUSEPORT, and the server's listening socket alone
    receives the connections."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host, 0))
        yield s.getsockname()[1]


class ServerProcess:
    def __init__(self, proc: subprocess.Popen, log: Path) -> None:
        self.proc, self.log = proc, log
        self.port: int | None = None  # known once the server has bound it
        self.base_url = ""

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def bound_port(self) -> int | None:
        match = _BOUND_PORT.search(self.log_text())
        if match and self.port is None:
            self.port = int(match.group(1))
            self.base_url = f"http://127.0.0.1:{self.port}"
        return self.port

    def terminate(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


@contextmanager
def serve(tmp_path: Path, *args: str, load_timeout: float = 180):
    """Run `miaotui serve ARGS` until /health is 200; SIGTERM it at the end. It binds `--port 0`:
    the kernel gives it a free port in the same bind (no window in which another process could
    take a port chosen beforehand), and the port is read back from the server's log."""
    log = tmp_path / f"server-{next(_log_names)}.log"
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "miaotui.cli", "serve", "--port", "0", *args],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    server = ServerProcess(proc, log)
    try:
        deadline = time.monotonic() + load_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log_text()}")
            try:
                if server.bound_port() and httpx.get(server.base_url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not become healthy in {load_timeout} s:\n{server.log_text()}")
            time.sleep(0.3)
        yield server
    finally:
        try:
            server.terminate()
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def embedded_server(tmp_path_factory, embedded_gguf):
    """`miaotui serve` on the embedded model, shared by the openai-client and load tests."""
    # Dense fp32 weights: the tests compare its text with transformers' on the same file.
    with serve(tmp_path_factory.mktemp("embedded_server"), "--kv-cache-memory", "0.5",
               "--max-num-seqs", "64", "--quantization", "none") as server:
        yield server


@pytest.fixture(scope="session")
def tiny_server_model(tmp_path_factory, embedded_gguf) -> tuple[str, str]:
    """A tiny random Llama with the embedded tokenizer's vocabulary (text prompts work)."""
    folder, _ = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_server"), "llama", vocab_size=49152)
    return str(folder), embedded_gguf


def tiny_app(tiny_server_model, **server_options):
    """An in-process app on the tiny model (use inside `fastapi.testclient.TestClient`)."""
    from miaotui.config import CacheConfig, ModelConfig, SchedulerConfig, ServerConfig
    from miaotui.engine.async_engine import AsyncLLMEngine
    from miaotui.engine.llm_engine import LLMEngine
    from miaotui.server.app import build_app

    folder, tokenizer = tiny_server_model
    max_num_seqs = server_options.pop("max_num_seqs", 8)
    max_model_len = server_options.pop("max_model_len", 256)

    def factory():
        return AsyncLLMEngine(LLMEngine(ModelConfig(model=folder, tokenizer=tokenizer, max_model_len=max_model_len),
                                        CacheConfig(num_blocks=128),
                                        SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=256)))

    return build_app(ServerConfig(**server_options), factory)


def openai_over(client):
    """The official openai client talking to an in-process TestClient app."""
    import openai

    return openai.OpenAI(base_url=str(client.base_url) + "/v1", api_key="x", http_client=client, max_retries=0)


@pytest.fixture(scope="module")
def oai(client):
    """`openai_over` the test module's own `client` fixture."""
    return openai_over(client)


@contextmanager
def tiny_client(tiny_server_model, **server_options):
    """TestClient on a tiny-model app, entered (lifespan run) and waited until healthy."""
    from fastapi.testclient import TestClient

    with TestClient(tiny_app(tiny_server_model, **server_options), raise_server_exceptions=False) as client:
        deadline = time.monotonic() + 120  # a busy machine loads slowly; a bound, not a speed
        while client.get("/health").status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"tiny app did not become healthy in 120 s: {client.get('/health').text}")
            time.sleep(0.05)
        yield client
