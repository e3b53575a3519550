"""AsyncLLMEngine: LLMEngine driven by a background thread, with one async stream per request.

The engine is not thread-safe, so it is touched only by its own thread: asyncio callers send
commands (add, abort) through a queue, and the thread hands each request's outputs back to the
caller's event loop. Cancelling the consumer of `generate()` (a client disconnects) aborts the
request, which frees its KV blocks at once.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from miaotui.engine.llm_engine import LLMEngine
from miaotui.outputs import RequestOutput
from miaotui.sampling_params import RequestOutputKind, SamplingParams


class EngineDeadError(RuntimeError):
    """The engine loop failed; no request can be served any more."""


@dataclass(slots=True)
class _Stream:
    """One request's outputs on their way to its consumer, on the consumer's event loop.

    Bounded: past `limit` waiting outputs, a new one is merged into the last (a DELTA output is
    appended to it, any other kind replaces it), so a consumer that stops reading holds at most
    `limit` objects and the request's own output once, never a growing queue of copies. An
    exception is always queued: it ends the stream."""

    loop: asyncio.AbstractEventLoop
    delta: bool = False  # the request's outputs are DELTA ones (merged by appending)
    cache_salt: str | None = None  # travels with the "add" command, for LLMEngine.add_request
    limit: int = 64
    items: collections.deque = field(default_factory=collections.deque)
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def put(self, item: RequestOutput | BaseException) -> None:
        """From any thread. A consumer whose event loop has closed is gone: nothing to deliver."""
        try:
            self.loop.call_soon_threadsafe(self._deliver, item)
        except RuntimeError:  # the loop is closed
            pass

    def _deliver(self, item: RequestOutput | BaseException) -> None:
        items = self.items
        if len(items) >= self.limit and isinstance(item, RequestOutput) and isinstance(items[-1], RequestOutput):
            if self.delta:
                items[-1].add_delta(item)
            else:
                items[-1] = item
        else:
            items.append(item)
        self.ready.set()

    async def get(self) -> RequestOutput | BaseException:
        while not self.items:
            self.ready.clear()
            await self.ready.wait()
        return self.items.popleft()


class AsyncLLMEngine:
    """Owns `engine` from construction on: nothing else may call it while this runs.

    `on_dead(exc)` runs (on the engine thread) once the engine has failed, e.g. so a server can
    exit instead of answering 503 forever; a runner that can fail outside a step (a
    tensor-parallel worker dying) reports it through its `on_failure` hooks."""

    def __init__(self, engine: LLMEngine, on_dead: Callable[[BaseException], None] | None = None) -> None:
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self._stopped = False
        self._on_dead = on_dead
        self.dead_error: BaseException | None = None
        hooks = getattr(engine.runner, "on_failure", None)
        if hooks is not None:
            hooks.append(lambda message: self._commands.put(("fail", message, None, None, None)))
        self._thread = threading.Thread(target=self._loop, name="miaotui-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self.dead_error is None

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None, cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs (cumulative unless params.output_kind says DELTA or
        FINAL_ONLY); errors in the request (bad prompt) raise here. Requests with different
        `cache_salt` never share prefix-cache blocks (LLMEngine.add_request)."""
        if self.dead_error is not None:
            raise EngineDeadError(f"the engine has stopped: {self.dead_error}")
        request_id = request_id if request_id is not None else f"async-{next(self._ids)}"
        delta = params is not None and params.output_kind is RequestOutputKind.DELTA
        stream = _Stream(asyncio.get_running_loop(), delta, cache_salt)
        self._commands.put(("add", request_id, prompt, params, stream))
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id, None, None, None))

    def shutdown(self, timeout: float | None = 10.0) -> None:
        self._stopped = True
        self._commands.put(("stop", None, None, None, None))
        self._thread.join(timeout)
        self.engine.shutdown()

    # --- the engine thread -------------------------------------------------------------------
    def _handle(self, command: tuple) -> None:
        kind, request_id, prompt, params, stream = command
        if kind == "add":
            try:
                self.engine.add_request(request_id, prompt, params, stream.cache_salt)
            except Exception as exc:  # a bad request fails alone; the loop goes on
                stream.put(exc)
                return
            self._streams[request_id] = stream
        elif kind == "abort":
            self.engine.abort_request(request_id)
            self._streams.pop(request_id, None)

    def _die(self, exc: BaseException) -> None:
        self.dead_error = exc
        for stream in self._streams.values():
            stream.put(EngineDeadError(f"the engine failed: {exc}"))
        self._streams.clear()
        if self._on_dead is not None:
            self._on_dead(exc)

    def _loop(self) -> None:
        while not self._stopped:
            idle = not self.engine.has_unfinished_requests()
            try:
                command = self._commands.get(block=idle)
            except queue.Empty:
                command = None
            while command is not None:
                if command[0] == "stop":
                    return
                if command[0] == "fail":
                    self._die(RuntimeError(command[1]))
                    return
                self._handle(command)
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            if not self.engine.has_unfinished_requests():
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # the model failed: fail every request, refuse new ones
                self._die(exc)
                return
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    stream.put(out)
                    if out.finished:
                        del self._streams[out.request_id]
