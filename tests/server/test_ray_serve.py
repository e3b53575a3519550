"""`miaotui serve --ray --num-replicas 2` on a local Ray started for the test (loopback, CPU):
the openai client gets the offline engine's completions through Serve, requests spread over both
replicas, Serve's backpressure answers 429, killing one replica's actor leaves no request hanging
and the other replica keeps serving, and SIGTERM drains and exits 0."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from tests.server.conftest import ROOT, free_port

pytest.importorskip("ray.serve", reason="Ray Serve is the optional extra miaotui[ray]")


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory, tiny_server_model):
    folder, tokenizer = tiny_server_model
    port = free_port()
    log = tmp_path_factory.mktemp("ray_serve") / "server.log"
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    with open(log, "w") as out:
        # Its own session: signals reach the server only, as from a process supervisor.
        proc = subprocess.Popen([sys.executable, "-m", "miaotui.cli", "serve", "--ray", "--num-replicas", "2",
                                 "--model", folder, "--tokenizer", tokenizer, "--port", str(port),
                                 "--max-num-seqs", "4", "--max-queued-requests", "8", "--kv-cache-memory", "0.05",
                                 "--graceful-shutdown", "20"],
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
                proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _complete(base: str, max_tokens: int, prompt: str = "Hello") -> httpx.Response:
    return httpx.post(base + "/v1/completions", timeout=120,
                      json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})


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

    # 8 overlapping requests; one replica takes at most 4 (max_num_seqs): both must serve. A burst
    # waits in the proxy's queue until the router assigns it, so the queue (8) holds all 8: with a
    # queue of 4 the proxy answered 429 whenever 5 were still unassigned.
    with cf.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: _complete(base, 200), range(8)))
    failed = [(r.status_code, r.text[:300]) for r in responses if r.status_code != 200]
    assert not failed, failed
    assert len({r.headers["x-miaotui-replica"] for r in responses}) == 2


def test_serve_backpressure_is_429(ray_server):
    """2 replicas x 4 ongoing + 8 queued at the proxy: 64 long requests at once overflow it
    (four times its room, so early finishers cannot make room for the whole burst)."""
    _, base, *_ = ray_server
    started = time.monotonic()
    _complete(base, 480)
    print(f"one 480-token request alone: {time.monotonic() - started:.2f} s")
    with cf.ThreadPoolExecutor(64) as pool:
        responses = list(pool.map(lambda _: _complete(base, 480), range(64)))
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) >= 8 and 429 in statuses, statuses
    rejected = next(r for r in responses if r.status_code == 429)
    assert rejected.headers.get("retry-after") == "1"


def _outcome(future: cf.Future) -> int | str:
    return future.result().status_code if future.exception() is None else type(future.exception()).__name__


def test_killing_a_replica_hangs_nothing_and_the_other_serves(ray_server):
    """Requests running inside the killed replica fail (500 from the proxy, or the connection
    closes); Serve does not re-run a request that has started. With half the capacity gone,
    the proxy may shed load with 429. Nothing hangs, and the surviving replica keeps serving."""
    _, base, *_ = ray_server
    replicas = subprocess.run(["pgrep", "-f", "ServeReplica:miaotui"], capture_output=True, text=True).stdout.split()
    assert len(replicas) == 2, replicas
    with cf.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(_complete, base, 200) for _ in range(8)]
        time.sleep(0.5)
        os.kill(int(replicas[0]), signal.SIGKILL)
        done, pending = cf.wait(futures, timeout=150)
    assert not pending  # nothing hangs
    outcomes = [_outcome(f) for f in futures]
    print("outcomes after killing a replica:", outcomes)
    assert outcomes.count(200) >= 2, outcomes  # the surviving replica's share completed
    assert all(o in (200, 429) or isinstance(o, str) or o >= 500 for o in outcomes), outcomes
    # New requests: the survivor serves them (one retry covers a request routed to the dead
    # replica before Serve noticed its death).
    for _ in range(6):
        try:
            resp = _complete(base, 8)
        except httpx.HTTPError:
            resp = None
        if resp is None or resp.status_code >= 500:
            time.sleep(1)
            resp = _complete(base, 8)
        assert resp.status_code == 200, resp.text
    # Serve replaces the dead replica: two again, both answering (the replacement loads the model).
    deadline = time.monotonic() + 180
    seen: set[str] = set()
    while len(seen) < 2:
        assert time.monotonic() < deadline, f"no replacement replica; serving replicas seen: {seen}"
        resp = _complete(base, 2)
        if resp.status_code == 200:
            seen.add(resp.headers["x-miaotui-replica"])
        time.sleep(0.2)


def _stream_lines(base: str, max_tokens: int, first_chunk: threading.Event) -> tuple[int, list[str]]:
    """A streamed completion: (status, its data lines); sets `first_chunk` once one arrived."""
    body = {"prompt": "Hello", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    lines = []
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=120) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: "):
                lines.append(line)
                first_chunk.set()
        return resp.status_code, lines


def test_sigterm_drains_and_exits_0(ray_server):
    proc, base, *_, log = ray_server
    first_chunk = threading.Event()
    with cf.ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(_stream_lines, base, 400, first_chunk)
        # Its first chunk: the request runs in a replica (not still in the proxy's queue).
        assert first_chunk.wait(60), in_flight.exception() if in_flight.done() else "no chunk in 60 s"
        proc.send_signal(signal.SIGTERM)
        status, lines = in_flight.result(timeout=120)  # accepted before SIGTERM: finished, not dropped
    assert status == 200 and lines[-1] == "data: [DONE]", lines[-3:]
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert proc.wait(120) == 0, log.read_text()[-3000:]


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
    with pytest.raises(ValueError, match="unknown args num_replica"):
        app_builder(dict(args, num_replica=3))
    with pytest.raises(ValueError, match="args.model"):
        app_builder({"num_replicas": 1})
