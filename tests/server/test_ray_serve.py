"""`miaotui serve --ray --num-replicas 2` on a local Ray started for the test (loopback, CPU):
the openai client gets the offline engine's completions through Serve, requests spread over both
replicas, Serve's backpressure answers 429, killing one replica's actor leaves no request hanging
and the other replica keeps serving, and SIGTERM drains and exits 0.

No test races the machine's speed. The state a test needs (every replica busy, the proxy's queue
full, a request in flight at SIGTERM) is built from held requests: streams that cannot end during
the test (ignore_eos, max_tokens near a 32k context), seen running (a streamed chunk), closed by
the test. Every wait is a bounded wait on observed state, with a generous deadline."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import make_tiny_checkpoint
from tests.server.conftest import ROOT, reserved_port

pytest.importorskip("ray.serve", reason="Ray Serve is the optional extra miaotui[ray]")

REPLICAS = 2
SEQS = 4  # --max-num-seqs: also Serve's max_ongoing_requests, the requests one replica takes
QUEUED = 8  # --max-queued-requests: requests the proxy holds while every replica is full
MAX_MODEL_LEN = 32768
# A held request: 4 at once in one replica (one thread), 4k tokens each took 11 s here and 32k
# had not finished after 5 minutes, while a test holds its requests for seconds. A machine fast
# enough to finish one anyway fails the tests' still-running checks: it cannot pass for the
# wrong reason.
HELD_TOKENS = MAX_MODEL_LEN - 64
# The SIGTERM test's request: alone in a replica (3k tokens took 2.3 s here), running when the
# drain begins (milliseconds after the signal) and done well within the 120 s grace period on a
# busy machine.
DRAIN_TOKENS = 4000
DRAINING = "shutting down: draining the replicas"


@pytest.fixture(scope="module")
def ray_model(tmp_path_factory, embedded_gguf) -> tuple[str, str]:
    """A tiny random Llama with the embedded tokenizer's vocabulary and a 32k context."""
    folder, _ = make_tiny_checkpoint(tmp_path_factory.mktemp("ray_model"), "llama", vocab_size=49152,
                                     max_position_embeddings=MAX_MODEL_LEN)
    return str(folder), embedded_gguf


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory, ray_model):
    folder, tokenizer = ray_model
    log = tmp_path_factory.mktemp("ray_serve") / "server.log"
    # Serve's proxy binds with SO_REUSEPORT (the default, made explicit): it can bind the port
    # reserved_port holds, and no other process can take it before the proxy starts.
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", RAY_USAGE_STATS_ENABLED="0",
               SERVE_SOCKET_REUSE_PORT_ENABLED="1")
    env.pop("RAY_ADDRESS", None)
    with reserved_port() as port, open(log, "w") as out:
        # Its own session: signals reach the server only, as from a process supervisor.
        # KV cache: 4 sequences of 32k tokens need 64 MiB of the tiny model's 0.1 GiB.
        proc = subprocess.Popen([sys.executable, "-m", "miaotui.cli", "serve", "--ray",
                                 "--num-replicas", str(REPLICAS), "--model", folder, "--tokenizer", tokenizer,
                                 "--port", str(port), "--max-num-seqs", str(SEQS),
                                 "--max-queued-requests", str(QUEUED), "--max-model-len", str(MAX_MODEL_LEN),
                                 "--kv-cache-memory", "0.1", "--graceful-shutdown", "120"],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 240
            while True:
                assert proc.poll() is None, log.read_text()[-3000:]
                try:
                    if httpx.get(base + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.5)
            yield proc, base, folder, tokenizer, log
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(240)  # the 120 s grace period and Ray's own shutdown
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


def _client(base: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base, timeout=300, limits=httpx.Limits(max_connections=64))


class Held:
    """A streamed completion that cannot end during the test, until `close`. Once it has streamed
    a chunk it runs in a replica, holding one of its SEQS places; until then it waits in the
    proxy's queue (or was answered at once, a 429)."""

    def __init__(self, client: httpx.AsyncClient, max_tokens: int = HELD_TOKENS) -> None:
        self.status: int | None = None
        self.headers: httpx.Headers | None = None
        self.chunks = 0
        self.tail: deque[str] = deque(maxlen=2)  # the last data lines
        self.answered = asyncio.Event()  # its status line arrived
        self.streaming = asyncio.Event()  # its first chunk arrived
        self.task = asyncio.create_task(self._run(client, max_tokens))

    async def _run(self, client: httpx.AsyncClient, max_tokens: int) -> None:
        body = {"prompt": "Hello", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            self.status, self.headers = resp.status_code, resp.headers
            self.answered.set()
            async for line in resp.aiter_lines():
                if line.startswith("data: "):
                    self.chunks += 1
                    self.tail.append(line)
                    self.streaming.set()

    @property
    def replica(self) -> str | None:
        return self.headers.get("x-miaotui-replica") if self.headers is not None else None

    @property
    def ended(self) -> bool:
        return self.task.done()

    @property
    def completed(self) -> bool:
        return bool(self.tail) and self.tail[-1] == "data: [DONE]"

    def __repr__(self) -> str:
        error = self.task.exception() if self.task.done() and not self.task.cancelled() else None
        return (f"<{self.status} {self.chunks} chunks{' ended' if self.ended else ''}"
                f"{' ' + type(error).__name__ if error else ''}>")


async def _close(held: list[Held]) -> None:
    """Close held requests (the client leaves: Serve cancels them in their replica)."""
    for h in held:
        h.task.cancel()
    await asyncio.gather(*(h.task for h in held), return_exceptions=True)


async def _until(condition: Callable[[], bool], timeout: float, state: Callable[[], object]) -> None:
    """Poll `condition` until it holds; fail with `state()` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {state()}"
        await asyncio.sleep(0.05)


async def _fill_replicas(client: httpx.AsyncClient) -> list[Held]:
    """REPLICAS * SEQS held requests, each seen streaming. A replica runs at most SEQS (Serve's
    max_ongoing_requests), so this is every place of every replica."""
    held = [Held(client) for _ in range(REPLICAS * SEQS)]

    def all_streaming() -> bool:
        assert not any(h.ended for h in held), f"a held request ended: {held}"
        return all(h.streaming.is_set() for h in held)

    await _until(all_streaming, 180, lambda: held)
    per_replica = Counter(h.replica for h in held)
    assert sorted(per_replica.values()) == [SEQS] * REPLICAS, per_replica
    return held


def test_openai_client_through_serve_spreads_over_replicas(ray_server):
    from miaotui import LLM, SamplingParams

    _, base, folder, tokenizer, _ = ray_server
    client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
    model = client.models.list().data[0].id
    resp = client.completions.create(model=model, prompt="Hello", max_tokens=8, temperature=0,
                                     extra_body={"ignore_eos": True})
    offline = LLM(folder, tokenizer=tokenizer, num_kv_blocks=64, max_model_len=256)
    expected = offline.generate("Hello", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                                use_tqdm=False)[0].outputs[0].text
    assert resp.choices[0].text == expected and resp.usage.completion_tokens == 8
    streamed = client.completions.create(model=model, prompt="Hello", max_tokens=8, temperature=0, stream=True,
                                         extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected

    # More requests running at once than one replica takes: both replicas run SEQS each.
    async def main():
        async with _client(base) as http:
            await _close(await _fill_replicas(http))

    asyncio.run(main())


def test_serve_backpressure_is_429(ray_server):
    """Every replica full (SEQS held requests streaming in each) and then the proxy's queue full
    (QUEUED more, which no replica can take while nothing finishes): one more is 429 with
    Retry-After. Closing the held requests lets the queued ones run, and the server serves again."""
    _, base, *_ = ray_server

    async def main():
        async with _client(base) as client:
            running = await _fill_replicas(client)
            # QUEUED + 1 at once: the proxy queues the first QUEUED it sees and answers the other
            # at once; the queued ones stay unanswered while every replica is full.
            waiting = [Held(client) for _ in range(QUEUED + 1)]
            await _until(lambda: any(h.answered.is_set() or h.ended for h in waiting), 120, lambda: waiting)
            rejected = [h for h in waiting if h.answered.is_set() or h.ended]
            assert len(rejected) == 1 and rejected[0].status == 429, waiting
            assert rejected[0].headers.get("retry-after") == "1"
            # The replicas were full throughout: every running request still streams.
            assert not any(h.ended for h in running), running
            queued = [h for h in waiting if h is not rejected[0]]
            assert not any(h.answered.is_set() for h in queued), queued

            await _close(running)

            def queued_run() -> bool:  # they had been queued, not dropped: they get the places
                assert not any(h.ended for h in queued), queued
                return all(h.streaming.is_set() for h in queued)

            await _until(queued_run, 180, lambda: queued)
            assert all(h.status == 200 for h in queued), queued
            await _close(queued)
            resp = await client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 8,
                                                              "ignore_eos": True})
            assert resp.status_code == 200, resp.text

    asyncio.run(main())


def _replica_pids(server_pid: int) -> list[int]:
    """This server's Serve replica actors: descendants of its process (Ray's raylet, started by
    the server, forks the actor workers), never another Ray's on the same machine."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])

    def descends(pid: int) -> bool:
        while pid in parents and pid != server_pid:
            pid = parents[pid]
        return pid == server_pid

    replicas = []
    for pid in parents:
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"ServeReplica:miaotui" in cmdline and descends(pid):
                replicas.append(pid)
    return sorted(replicas)


def test_killing_a_replica_hangs_nothing_and_the_other_serves(ray_server):
    """Every replica full of held requests; one replica's actor is SIGKILLed. The requests it ran
    end, cut off (Serve does not re-run a request that has started); nothing hangs; the other
    replica's requests go on streaming; the survivor serves new requests and Serve replaces the
    dead replica."""
    proc, base, *_ = ray_server

    async def main():
        async with _client(base) as client:
            held = await _fill_replicas(client)
            replicas = _replica_pids(proc.pid)
            assert len(replicas) == REPLICAS, replicas
            os.kill(replicas[0], signal.SIGKILL)
            await _until(lambda: any(h.ended for h in held), 120, lambda: held)
            dead_id = next(h.replica for h in held if h.ended)
            dead = [h for h in held if h.replica == dead_id]
            alive = [h for h in held if h.replica != dead_id]
            await _until(lambda: all(h.ended for h in dead), 120, lambda: dead)  # nothing hangs
            assert not any(h.completed for h in dead), dead
            await _close(dead)  # collects their errors (the connection was cut)

            before = [h.chunks for h in alive]

            def alive_streams() -> bool:
                assert not any(h.ended for h in alive), alive
                return all(h.chunks > n + 10 for h, n in zip(alive, before))

            await _until(alive_streams, 120, lambda: alive)
            survivor_id = alive[0].replica
            await _close(alive)

            # New requests: the survivor serves them. One sent before Serve has noticed the death
            # may still go to the dead replica (a 5xx or a closed connection): six in a row served.
            deadline, in_a_row, outcomes = time.monotonic() + 120, 0, []
            while in_a_row < 6:
                assert time.monotonic() < deadline, f"not 6 in a row served within 120 s: {outcomes}"
                try:
                    resp = await client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 8,
                                                                      "ignore_eos": True})
                    outcomes.append(resp.status_code)
                except httpx.HTTPError as exc:
                    outcomes.append(type(exc).__name__)
                in_a_row = in_a_row + 1 if outcomes[-1] == 200 else 0
                if in_a_row == 0:
                    await asyncio.sleep(0.5)

            # Serve replaces the dead replica: a third one answers (once it has loaded the model).
            deadline, seen = time.monotonic() + 240, set()
            while not seen - {dead_id, survivor_id}:
                assert time.monotonic() < deadline, f"no replacement replica; serving replicas seen: {seen}"
                with contextlib.suppress(httpx.HTTPError):
                    resp = await client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2})
                    if resp.status_code == 200:
                        seen.add(resp.headers["x-miaotui-replica"])
                await asyncio.sleep(0.2)

    asyncio.run(main())


def test_sigterm_drains_and_exits_0(ray_server):
    """SIGTERM with a request streaming in a replica: the drain begins (the server's log says so)
    with the request still in flight; it then finishes in full and the server exits 0."""
    proc, base, *_, log = ray_server

    async def main() -> Held:
        async with _client(base) as client:
            h = Held(client, DRAIN_TOKENS)
            await _until(lambda: h.streaming.is_set() or h.ended, 180, lambda: h)
            assert not h.ended, h
            proc.send_signal(signal.SIGTERM)
            await _until(lambda: DRAINING in log.read_text(errors="replace"), 60, lambda: log.read_text()[-3000:])
            assert not h.ended, f"the request ended before the drain began (raise DRAIN_TOKENS): {h}"
            await asyncio.wait_for(h.task, 180)  # accepted before SIGTERM: finished, not dropped
            return h

    h = asyncio.run(main())
    assert h.status == 200 and h.completed, list(h.tail)
    assert json.loads(h.tail[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert proc.wait(240) == 0, log.read_text()[-3000:]


def test_cpu_replica_threads_follow_its_reserved_cpus(tiny_server_model):
    """A CPU replica's kernels use the CPUs Ray reserved for it (R replicas must not each take
    every core of the node); an explicit thread count is kept."""
    from miaotui.config import CacheConfig, ModelConfig, SchedulerConfig, ServerConfig
    from miaotui.ray_serve import build_application

    def replica_threads(model_config: ModelConfig, cpus: float) -> int | None:
        app = build_application(model_config, CacheConfig(), SchedulerConfig(), ServerConfig(), cpus_per_replica=cpus)
        return app._bound_deployment.init_args[0].threads  # the ModelConfig each replica is built with

    folder = tiny_server_model[0]
    assert replica_threads(ModelConfig(model=folder), 1.0) == 1
    assert replica_threads(ModelConfig(model=folder), 4.0) == 4
    assert replica_threads(ModelConfig(model=folder), 0.5) == 1
    assert replica_threads(ModelConfig(model=folder, threads=3), 1.0) == 3


def test_kuberay_manifest_builds_the_serve_application(tiny_server_model):
    """deploy/rayservice.yaml's Serve config names a builder that exists and accepts its args
    (the model path swapped for a local one); a typo in args is an error, not a default."""
    import yaml

    from miaotui.ray_serve import app_builder

    manifest = yaml.safe_load((ROOT / "deploy" / "rayservice.yaml").read_text())
    (application,) = yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"]
    assert application["import_path"] == "miaotui.ray_serve:app_builder"
    args = dict(application["args"], model=tiny_server_model[0])
    built = app_builder(args)
    assert type(built).__name__ == "Application"
    assert type(app_builder(dict(args, seed=3, chat_template="{{ messages[0].content }}"))).__name__ == "Application"
    with pytest.raises(ValueError, match="chat_template"):
        app_builder(dict(args, chat_template="/no/such/template.jinja"))
    with pytest.raises(ValueError, match="unknown args num_replica"):
        app_builder(dict(args, num_replica=3))
    with pytest.raises(ValueError, match="args.model"):
        app_builder({"num_replicas": 1})
