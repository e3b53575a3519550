"""AsyncLLMEngine: LLMEngine driven by a background thread, with one async stream per request.

The engine is not thread-safe, so it is touched only by its own thread: asyncio callers send
commands (add, abort) through a queue, and the thread hands each request's outputs back to the
caller's event loop. Cancelling the consumer of `generate()` (a client disconnects) aborts the
request, which frees its KV blocks at once.

Whatever ends the thread other than a shutdown (a step, an abort or a delivery that raises, a
runner reporting a failure) fails the engine: every request still streaming or still queued gets
EngineDeadError, later ones get it at once, and `on_dead` runs, once. The error's text never
carries the failure's (a server passes it to clients); the failure is its `__cause__`, is in
`dead_error` and is logged with its traceback.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from miaotui.engine.llm_engine import LLMEngine
from miaotui.outputs import RequestOutput
from miaotui.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger("miaotui.engine")


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
        # Orders queuing a command against the thread's exit: a command is either refused
        # (`_closed` already set) or queued before `_exit` drains the queue, which answers it.
        self._lock = threading.Lock()
        self._closed = False
        self._in_hand: tuple | None = None  # the command `_handle` is working on, for `_exit`
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
        request_id = request_id if request_id is not None else f"async-{next(self._ids)}"
        delta = params is not None and params.output_kind is RequestOutputKind.DELTA
        stream = _Stream(asyncio.get_running_loop(), delta, cache_salt)
        self._submit(("add", request_id, prompt, params, stream))  # EngineDeadError once the engine has ended
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
        if not self._closed:  # after the thread's end there is nothing left to abort
            self._commands.put(("abort", request_id, None, None, None))

    def shutdown(self, timeout: float | None = 10.0) -> None:
        self._stopped = True
        self._commands.put(("stop", None, None, None, None))
        self._thread.join(timeout)
        self.engine.shutdown()

    def _submit(self, command: tuple) -> None:
        """Queue `command` for the engine thread, or raise EngineDeadError once it has ended."""
        with self._lock:
            if self._closed:
                raise self._ended_error()
            self._commands.put(command)

    def _ended_error(self) -> EngineDeadError:
        """What a request gets once the thread has ended (a fresh one each: an exception raised
        in several tasks would share its traceback)."""
        if self.dead_error is None:
            return EngineDeadError("the engine has been shut down")
        error = EngineDeadError("the engine failed; the server log has the details")
        error.__cause__ = self.dead_error
        return error

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

    def _loop(self) -> None:
        """The thread's body: `_exit` runs whatever ends `_run`, a clean stop or not."""
        failure: BaseException | None
        try:
            failure = self._run()
        except BaseException as exc:  # noqa: BLE001 - anything that ends the loop fails the engine
            failure = exc
        self._exit(failure)

    def _run(self) -> BaseException | None:
        """Commands, then a step, until "stop" or shutdown (None) or a runner's "fail" (its error)."""
        while not self._stopped:
            idle = not self.engine.has_unfinished_requests()
            try:
                command = self._commands.get(block=idle)
            except queue.Empty:
                command = None
            while command is not None:
                if command[0] == "stop":
                    return None
                if command[0] == "fail":
                    return RuntimeError(command[1])
                self._in_hand = command
                self._handle(command)
                self._in_hand = None
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            if not self.engine.has_unfinished_requests():
                continue
            for out in self.engine.step():
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    stream.put(out)
                    if out.finished:
                        del self._streams[out.request_id]
        return None

    def _exit(self, failure: BaseException | None) -> None:
        """Runs once, as the thread ends: refuse new commands, answer every request still
        waiting (streaming, in hand, or queued and never added; aborts need no answer) and,
        after a failure, log it and call `on_dead`. One stream whose delivery raises does not
        keep the others waiting, nor `on_dead` from running."""
        with self._lock:  # from here on `_submit` refuses: what is queued now is all there is
            self.dead_error = failure
            self._closed = True
            pending = []
            while True:
                try:
                    pending.append(self._commands.get_nowait())
                except queue.Empty:
                    break
        streams = list(self._streams.values())
        self._streams.clear()
        in_hand = self._in_hand
        if in_hand is not None and in_hand[0] == "add" and not any(s is in_hand[4] for s in streams):
            streams.append(in_hand[4])  # it failed before (or while) being registered
        streams += [command[4] for command in pending if command[0] == "add"]
        if failure is not None:
            logger.error("the engine failed; failing its %d requests", len(streams), exc_info=failure)
        for stream in streams:
            try:
                stream.put(self._ended_error())
            except BaseException:  # noqa: BLE001 - the other streams still get their error
                logger.exception("could not deliver the engine's failure to a request")
        if failure is not None and self._on_dead is not None:
            try:
                self._on_dead(failure)
            except BaseException:  # noqa: BLE001 - the thread ends either way; say why it went wrong
                logger.exception("the engine's on_dead callback failed")
