"""`miaotui serve`: the OpenAI-compatible server under uvicorn, with a graceful SIGTERM.

On SIGTERM or Ctrl-C the server stops accepting connections, lets in-flight requests finish for
at most --graceful-shutdown seconds, stops the engine and exits 0. A model that fails to load
stops the server with exit status 2; an engine that dies while serving (a tensor-parallel worker
killed, say) fails its in-flight requests with 503 and the server exits with status 1, so a
supervisor restarts it instead of it answering 503 forever.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import signal
import socket

from miaotui.config import REASONING_PARSERS, RequestLimits, SchedulerConfig, ServerConfig
from miaotui.engine_args import add_chat_template_arg

logger = logging.getLogger("miaotui.server")

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening address, bound before the model loads: a port in use is an error at once
    that names it (uvicorn would report it only after our start-up lines)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ValueError(f"host: cannot resolve {host!r} ({exc.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ValueError(f"port: {port} on {host} is already in use (is another server running?); "
                             "stop it or pick another --port") from None
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)  # connections queue from now on, while the server starts
    sock.set_inheritable(True)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if sock.family == socket.AF_INET6 else f"http://{host}:{port}"


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port, logged at start)")
    p.add_argument("--api-key", default=os.environ.get("MIAOTUI_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $MIAOTUI_API_KEY, else none)")
    p.add_argument("--served-model-name", default=None, help="model id clients use (default: file name)")
    add_chat_template_arg(p, "for requests that send none (default: the model's)")
    p.add_argument("--trust-request-chat-template", action="store_true",
                   help="render the chat_template a request sends (a template is code the server runs; "
                        "without this flag such a request gets 400)")
    p.add_argument("--chat-template-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="time limit of one chat template render (400 beyond; the render is stopped)")
    p.add_argument("--chat-template-max-chars", type=int, default=None, metavar="N",
                   help="largest text a chat template may render, in characters (400 beyond; "
                        "default: max(1 MiB, 16 x the context length))")
    p.add_argument("--reasoning-parser", default=None, choices=REASONING_PARSERS,
                   help="split a chat reply's <think> ... </think> thinking into reasoning_content, as vLLM's "
                        "parsers of these names do ('none': never; default: qwen3 where the chat template "
                        "contains </think>, else none)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the draws of requests without their own seed: a whole run reproducible "
                        "(default: fresh randomness every start)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences decoded together")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="tokens one engine step may compute (prompt chunks + decodes): larger prefills "
                        "faster, smaller keeps streams smooth while long prompts arrive")
    p.add_argument("--max-queued-requests", type=int, default=256,
                   help="sequences waiting beyond --max-num-seqs before 429")
    p.add_argument("--max-body-bytes", type=int, default=4 * 2**20,
                   help="largest request body accepted, in bytes (413 beyond)")
    p.add_argument("--graceful-shutdown", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM, how long in-flight requests may take to finish")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="server and access log level")
    p.add_argument("--stream-stall-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="a streaming client that reads nothing for this long is disconnected and its "
                        "request aborted")
    _add_limit_args(p)
    from miaotui.ray_serve import add_ray_args

    add_ray_args(p)


# (flag, RequestLimits field, what it bounds): each a 400 naming the field and the limit.
_LIMIT_FLAGS = (
    ("--max-prompts-per-request", "max_prompts", "prompts in one completions request"),
    ("--max-n", "max_n", "samples per prompt (n)"),
    ("--max-stop-strings", "max_stop_strings", "stop strings of one request"),
    ("--max-stop-string-chars", "max_stop_string_chars", "characters of one stop string"),
    ("--max-stop-token-ids", "max_stop_token_ids", "stop_token_ids of one request"),
    ("--max-logit-bias", "max_logit_bias", "logit_bias entries of one request"),
    ("--max-logprobs", "max_logprobs", "logprobs / top_logprobs / prompt_logprobs (at most 20)"),
    ("--max-messages", "max_messages", "messages of one chat request"),
    ("--max-chat-template-chars", "max_chat_template_chars", "characters of a request's own chat_template"),
)


def _add_limit_args(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("request limits", "what one request may ask for (400 beyond, before any work)")
    defaults = RequestLimits()
    for flag, name, what in _LIMIT_FLAGS:
        group.add_argument(flag, dest=f"limit_{name}", type=int, default=getattr(defaults, name), metavar="N",
                           help=what)


def request_limits(args: argparse.Namespace) -> RequestLimits:
    return RequestLimits(**{name: getattr(args, f"limit_{name}") for _, name, _ in _LIMIT_FLAGS})


class _Server:
    """uvicorn.Server whose signals we own: uvicorn >= 0.29 re-raises a caught SIGTERM after
    shutdown, which would end the process with status -15 instead of 0."""

    def __init__(self, config) -> None:
        import uvicorn

        class Server(uvicorn.Server):
            def install_signal_handlers(self) -> None:  # older uvicorn
                pass

            @contextlib.contextmanager
            def capture_signals(self):  # newer uvicorn
                yield

        self.server = Server(config)

    async def run(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        await self.server.serve(sockets=[sock])

    def stop(self) -> None:
        if not self.server.should_exit:
            logger.info("shutting down: finishing in-flight requests (at most %.0f s)",
                        self.server.config.timeout_graceful_shutdown or 0)
        self.server.should_exit = True


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from miaotui.engine_args import load_chat_template, model_and_cache_configs
    from miaotui.engine.async_engine import AsyncLLMEngine
    from miaotui.engine.llm_engine import LLMEngine
    from miaotui.server.app import build_app

    # Every option is validated before anything loads: a bad flag fails at once.
    server_config = ServerConfig(host=args.host, port=args.port, api_key=args.api_key,
                                 served_model_name=args.served_model_name,
                                 max_queued_requests=args.max_queued_requests,
                                 max_body_bytes=args.max_body_bytes,
                                 graceful_shutdown_s=args.graceful_shutdown,
                                 chat_template=load_chat_template(args.chat_template),
                                 trust_request_chat_template=args.trust_request_chat_template,
                                 chat_template_timeout_s=args.chat_template_timeout,
                                 chat_template_max_chars=args.chat_template_max_chars,
                                 limits=request_limits(args),
                                 stream_stall_timeout_s=args.stream_stall_timeout,
                                 reasoning_parser=args.reasoning_parser)
    model_config, cache_config = model_and_cache_configs(args)
    model_config = dataclasses.replace(model_config, seed=args.seed)
    scheduler_config = SchedulerConfig(max_num_seqs=args.max_num_seqs,
                                       max_num_batched_tokens=args.max_num_batched_tokens)
    sock = bind_socket(args.host, args.port)  # before anything slow: a port in use fails now
    if args.ray:
        from miaotui.ray_serve import run_ray_serve

        sock.close()  # Ray Serve's proxy binds the port itself
        return run_ray_serve(args, model_config, cache_config, scheduler_config, server_config)

    failed: list[BaseException] = []
    died: list[BaseException] = []
    server: _Server | None = None

    def on_engine_dead(exc: BaseException) -> None:
        died.append(exc)
        logger.error("the engine failed (%s); shutting down", exc)
        if server is not None:
            server.server.should_exit = True

    def factory() -> AsyncLLMEngine:
        return AsyncLLMEngine(LLMEngine(model_config, cache_config, scheduler_config), on_dead=on_engine_dead)

    def on_load_error(exc: BaseException) -> None:
        failed.append(exc)
        if server is not None:
            server.server.should_exit = True

    app = build_app(server_config, factory, on_load_error)
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=args.graceful_shutdown,
                            access_log=args.log_level == "debug")
    server = _Server(config)
    logger.info("serving on %s (chat page at /, API at /v1)", _url(sock))
    asyncio.run(server.run(sock))
    if failed:
        logger.error("exiting: the model could not be loaded")
        return 2
    if died:
        logger.error("exiting: the engine failed")
        return 1
    return 0
