"""The FastAPI app: middleware (request counts, body size, API key, HEAD as GET), service routes,
the chat page, OpenAI routes.

    app = build_app(ServerConfig(...), engine_factory)   # engine_factory() -> AsyncLLMEngine

The model loads in the background when the app starts; /health answers 503 until it is ready
(`{"status": "loading"}`) and once loading or the engine has failed (`{"status": "failed"}`).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.routing import Match, Router

from miaotui import __version__
from miaotui.config import ServerConfig
from miaotui.engine.async_engine import AsyncLLMEngine
from miaotui.server.errors import APIError, bad_request, error_body, install_error_handlers
from miaotui.server.limits import check_tokenize
from miaotui.server.metrics import ServerMetrics
from miaotui.server.openai_routes import add_openai_routes
from miaotui.server.protocol import DetokenizeRequest, TokenizeRequest
from miaotui.server.state import ServerState

STATIC_DIR = resources.files("miaotui.server") / "static"
# Reachable without an API key: the liveness probe and the chat page's own files (the page asks
# for the key and sends it with its API calls).
PUBLIC_PATHS = ("/health", "/", "/favicon.ico")
PUBLIC_PREFIXES = ("/static/",)


async def _send_error(send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(error_body(status, message)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """Pure ASGI (so streaming responses stay unbuffered): API key check, then body size limit,
    both by declared Content-Length and by counting a chunked body as it arrives."""

    def __init__(self, app, config: ServerConfig) -> None:
        self.app = app
        self.config = config

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        key = self.config.api_key
        if key and path not in PUBLIC_PATHS and not path.startswith(PUBLIC_PREFIXES):
            auth = headers.get("authorization", "")
            token = auth[7:] if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")
            if not hmac.compare_digest(token.encode(), key.encode()):
                return await _send_error(send, 401, "missing or invalid API key; send "
                                         "'Authorization: Bearer <key>'", {"WWW-Authenticate": "Bearer"})
        limit = self.config.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _send_error(send, 413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
        received = 0
        too_large = started = False

        async def counting_receive():
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # the app sees a client that left; we answer 413 below
                    too_large = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            nonlocal started
            if too_large:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not too_large:
                raise
        if too_large and not started:
            await _send_error(send, 413, f"request body exceeds the limit of {limit} bytes")


class HeadAsGetMiddleware:
    """HEAD is GET without the body (RFC 9110): FastAPI would answer a HEAD to a GET route with
    405. The GET handler runs and its status and headers (Content-Length too) go out."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        async def headers_only(message):
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app(dict(scope, method="GET"), receive, headers_only)


class RequestCountMiddleware:
    """Outermost: counts every HTTP request by route and status once it ends, whoever answered
    it (the guard's 401/413, a route's 4xx, the 500 of an unhandled error)."""

    def __init__(self, app, metrics: ServerMetrics, router: Router) -> None:
        self.app = app
        self.metrics = metrics
        self.router = router

    def _route(self, scope) -> str:
        # The path template, not the path: label values stay few whatever clients send.
        for route in self.router.routes:
            match, _ = route.matches(scope)
            if match is not Match.NONE:  # PARTIAL: the path matched, the method did not (405)
                return getattr(route, "path_format", route.path)
        return "unmatched"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = self._route(scope)  # before routing rewrites the scope (a Mount's root_path)
        status = 500  # what the error middleware answers if the app raises before responding

        async def noting_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, noting_send)
        finally:
            self.metrics.http_requests.labels(route, str(status)).inc()


def build_app(config: ServerConfig, engine_factory: Callable[[], AsyncLLMEngine],
              on_load_error: Callable[[BaseException], None] | None = None) -> FastAPI:
    state = ServerState(config, engine_factory)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start_loading(on_load_error)
        yield
        state.draining = True
        state.shutdown()

    app = FastAPI(title="miaotui", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible API of the miaotui inference engine")
    app.state.miaotui = state
    install_error_handlers(app)
    # The last added runs first: count, then guard, then HEAD as GET.
    app.add_middleware(HeadAsGetMiddleware)
    app.add_middleware(GuardMiddleware, config=config)
    app.add_middleware(RequestCountMiddleware, metrics=state.metrics, router=app.router)
    add_openai_routes(app)

    # Public (no API key), so it says only which state the server is in: a load or engine error
    # names paths and devices, and goes to the log (ServerState, AsyncLLMEngine) alone.
    @app.get("/health")
    async def health() -> JSONResponse:
        if state.load_error is not None or (state.engine is not None and not state.engine.is_running):
            return JSONResponse({"status": "failed"}, status_code=503)
        if state.engine is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/v1/models")
    async def models() -> dict:
        state.engine_or_503()
        return {"object": "list", "data": [state.model_card()]}

    # `:path`: a served name may hold slashes ("org/model"; the openai client sends them as %2F).
    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        state.engine_or_503()
        if not model_id:  # "/v1/models/": a client that built the URL from an empty name
            raise APIError(404, f"no model id in the path: GET /v1/models/{{id}} needs one; this server "
                                f"serves `{state.model_name}`.", param="model", code="model_not_found")
        if model_id != state.model_name:
            raise state.unknown_model(model_id)
        return state.model_card()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        state.engine_or_503()
        state.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        state.require_tokenizer("tokenizing", "prompt" if body.prompt is not None else "messages")
        check_tokenize(body, state.config.limits)
        try:
            if body.messages is not None:
                prompt = await state.chat_prompt([m.as_template_message() for m in body.messages],
                                                 body.add_generation_prompt, None, body.chat_template_kwargs)
                ids = prompt.ids
            else:
                ids = await state.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        except ValueError as exc:
            raise bad_request(exc) from exc
        return {"tokens": ids, "count": len(ids), "max_model_len": state.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        state.engine_or_503()
        state.check_model(body.model)
        vocab = state.llm_engine.hf_config.vocab_size
        if any(t < 0 or t >= vocab for t in body.tokens):
            raise APIError(400, f"tokens: ids must be in [0, {vocab})", param="tokens")
        return {"prompt": state.detokenize(body.tokens)}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(str(STATIC_DIR / "index.html"))

    app.mount("/static", StaticFiles(directory=str(STATIC_DIR)), name="static")
    return app
