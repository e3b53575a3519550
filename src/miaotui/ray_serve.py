"""Replicas of the miaotui server behind Ray Serve (optional extra: `pip install miaotui[ray]`).

Each replica is a Ray actor holding one AsyncLLMEngine and the very FastAPI app of `miaotui
serve` (same routes, errors, metrics, chat page), mounted as the deployment's ASGI ingress. Ray
Serve's proxy spreads requests over the replicas and provides:
- backpressure: at most `max_ongoing_requests` requests in a replica, at most
  `max_queued_requests` waiting in each proxy; beyond that the proxy answers 429 with
  Retry-After (our own admission control inside a replica still answers 429 as well);
- health checks: Serve calls `check_health`, which fails once the engine has failed to load or
  died, and Serve then replaces the replica;
- graceful draining: on shutdown or scale-down a replica gets no new requests and has
  `graceful_shutdown_timeout_s` to finish the ones it has.
Every response carries `x-miaotui-replica` (the Serve replica id) so spreading is observable.

Use it from Python (`serve.run(build_application(...))`) or as `miaotui serve --ray
--num-replicas R` (see docs/deployment.md for clusters and Kubernetes).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import threading
from typing import Any

from miaotui.config import CacheConfig, ModelConfig, SchedulerConfig, ServerConfig
from miaotui.engine_args import load_chat_template

logger = logging.getLogger("miaotui.server")


def _require_ray() -> Any:
    try:
        from ray import serve
    except ImportError:
        raise SystemExit("miaotui serve --ray needs Ray Serve: pip install 'miaotui[ray]'") from None
    return serve


class MiaotuiReplica:
    """One Serve replica: loads the engine in its constructor (so Serve counts the replica as
    ready only once the model is loaded), then serves the FastAPI app."""

    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, scheduler_config: SchedulerConfig,
                 server_config: ServerConfig) -> None:
        from miaotui.engine.async_engine import AsyncLLMEngine
        from miaotui.engine.llm_engine import LLMEngine
        from miaotui.server.app import build_app

        engine = AsyncLLMEngine(LLMEngine(model_config, cache_config, scheduler_config))
        self._app = build_app(server_config, lambda: engine)
        try:
            from ray import serve

            self._replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside Serve (unit use) there is no replica context
            self._replica_id = f"pid-{os.getpid()}"

    def __serve_build_asgi_app__(self):
        app, replica = self._app, self._replica_id.encode()

        async def tagged(scope, receive, send):
            async def send_tagged(message):
                if message["type"] == "http.response.start":
                    message["headers"] = [*message.get("headers", []), (b"x-miaotui-replica", replica)]
                await send(message)

            await app(scope, receive, send_tagged if scope["type"] == "http" else send)

        return tagged

    def check_health(self) -> None:
        state = self._app.state.miaotui
        if state.load_error is not None:
            raise RuntimeError(f"the model failed to load: {state.load_error}")
        if state.engine is not None and not state.engine.is_running:
            raise RuntimeError(f"the engine has stopped: {state.engine.dead_error}")


def build_application(model_config: ModelConfig, cache_config: CacheConfig, scheduler_config: SchedulerConfig,
                      server_config: ServerConfig, num_replicas: int = 1, cpus_per_replica: float = 1.0,
                      max_ongoing_requests: int | None = None, max_queued_requests: int = 64,
                      graceful_shutdown_s: float = 30.0, gpus_per_replica: float | None = None) -> Any:
    """The Serve application (pass it to `serve.run`). `max_ongoing_requests` defaults to the
    engine's max_num_seqs: a replica takes as many requests as it decodes at once. A CPU replica's
    kernels use `cpus_per_replica` threads unless `model_config.threads` says otherwise.
    `gpus_per_replica` defaults to the tensor-parallel size on CUDA (Ray shows an actor only the
    GPUs it reserved), else 0."""
    on_cuda = str(model_config.device).startswith("cuda")
    if gpus_per_replica is None:
        gpus_per_replica = float(model_config.tensor_parallel_size) if on_cuda else 0.0
    if model_config.threads is None and not on_cuda:
        # A replica's kernels use the CPUs it reserved, not every core of the node: R replicas
        # each taking all cores ran R times the node's threads, and a busy node's latency
        # then degraded many-fold (two replicas on 2 cores: 8 requests 4.9 s -> 50 s with one
        # core taken by another process; 1.5 s with a thread each).
        model_config = dataclasses.replace(model_config, threads=max(1, int(cpus_per_replica)))
    serve = _require_ray()
    from ray.serve.config import BackpressureConfig

    deployment = serve.deployment(serve.ingress()(MiaotuiReplica), name="miaotui").options(
        num_replicas=num_replicas,
        ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
        max_ongoing_requests=max_ongoing_requests or scheduler_config.max_num_seqs,
        max_queued_requests=max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=1),
        health_check_period_s=5.0,
        health_check_timeout_s=30.0,
        graceful_shutdown_timeout_s=graceful_shutdown_s,
    )
    return deployment.bind(model_config, cache_config, scheduler_config, server_config)


def add_ray_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray", action="store_true",
                   help="serve replicas behind Ray Serve (joins $RAY_ADDRESS, else starts a local Ray)")
    p.add_argument("--num-replicas", type=int, default=1, help="with --ray: engine replicas")
    p.add_argument("--ray-cpus-per-replica", type=float, default=1.0,
                   help="with --ray: CPUs reserved per replica (on the CPU also its kernels' threads, "
                        "unless --threads is given)")


def run_ray_serve(args: argparse.Namespace, model_config: ModelConfig, cache_config: CacheConfig,
                  scheduler_config: SchedulerConfig, server_config: ServerConfig) -> int:
    """`miaotui serve --ray`: deploy, then block until SIGTERM / Ctrl-C, then drain and stop."""
    if args.num_replicas < 1:
        raise ValueError(f"num_replicas: must be >= 1, got {args.num_replicas}")
    serve = _require_ray()
    import ray

    external = bool(os.environ.get("RAY_ADDRESS"))
    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, logging_level=logging.WARNING)
    serve.start(http_options={"host": args.host, "port": args.port})
    app = build_application(model_config, cache_config, scheduler_config, server_config,
                            num_replicas=args.num_replicas, cpus_per_replica=args.ray_cpus_per_replica,
                            max_queued_requests=args.max_queued_requests,
                            graceful_shutdown_s=args.graceful_shutdown)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    serve.run(app, name="miaotui", route_prefix="/", blocking=False)
    logger.info("serving %d replica(s) on http://%s:%d through Ray Serve", args.num_replicas, args.host, args.port)
    print(f"miaotui: Ray Serve ready on http://{args.host}:{args.port} ({args.num_replicas} replicas)", flush=True)
    stop.wait()
    logger.info("shutting down: draining the replicas")
    # Delete the application first, with the proxies still up: its replicas stop taking requests,
    # finish the ones they have, and those responses still reach their clients. Only then are
    # the proxies and the controller stopped (serve.shutdown alone can stop a proxy while a
    # drained replica's last response is still on its way through it).
    serve.delete("miaotui", _blocking=True)
    if not external:  # a cluster we joined keeps its Serve instance (other apps may run there)
        serve.shutdown()
    ray.shutdown()
    return 0


def app_builder(args: dict[str, Any]) -> Any:
    """Application builder for Serve config files (`import_path: miaotui.ray_serve:app_builder`,
    e.g. in a KubeRay RayService). `args`: model (required), tokenizer, skip_tokenizer_init, dtype,
    max_model_len, quantization, kv_cache_memory_gib, max_num_seqs, max_num_batched_tokens,
    api_key, served_model_name, chat_template (a file or the template), trust_request_chat_template,
    chat_template_timeout, chat_template_max_chars, seed, num_replicas,
    cpus_per_replica, max_queued_requests. Unknown keys
    are an error, so a typo never silently falls back to a default. The configs travel to each
    replica whole (the deployment's init args), so what a config holds every replica gets."""
    known = {"model", "tokenizer", "skip_tokenizer_init", "dtype", "max_model_len", "quantization",
             "kv_cache_memory_gib", "max_num_seqs", "max_num_batched_tokens", "api_key", "served_model_name",
             "chat_template", "seed", "num_replicas", "cpus_per_replica", "max_queued_requests",
             "trust_request_chat_template", "chat_template_timeout", "chat_template_max_chars"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"miaotui app_builder: unknown args {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if not args.get("model"):
        raise ValueError("miaotui app_builder: args.model (a model folder or .gguf path on every node) is required")
    model_config = ModelConfig(model=args["model"], tokenizer=args.get("tokenizer"),
                               dtype=args.get("dtype", "float32"), max_model_len=args.get("max_model_len"),
                               quantization=args.get("quantization", "auto"),
                               skip_tokenizer_init=args.get("skip_tokenizer_init", False),
                               seed=args.get("seed"))
    cache_config = CacheConfig(kv_cache_memory_gib=args.get("kv_cache_memory_gib"))
    scheduler_config = SchedulerConfig(max_num_seqs=int(args.get("max_num_seqs", 64)),
                                       max_num_batched_tokens=int(args.get("max_num_batched_tokens", 2048)))
    server_config = ServerConfig(api_key=args.get("api_key"), served_model_name=args.get("served_model_name"),
                                 chat_template=load_chat_template(args.get("chat_template")),
                                 trust_request_chat_template=args.get("trust_request_chat_template", False),
                                 chat_template_timeout_s=float(args.get("chat_template_timeout", 5.0)),
                                 chat_template_max_chars=args.get("chat_template_max_chars"))
    return build_application(model_config, cache_config, scheduler_config, server_config,
                             num_replicas=int(args.get("num_replicas", 1)),
                             cpus_per_replica=float(args.get("cpus_per_replica", 1.0)),
                             max_queued_requests=int(args.get("max_queued_requests", 64)))
