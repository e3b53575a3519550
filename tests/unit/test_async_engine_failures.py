"""AsyncLLMEngine when its thread fails outside a step: in abort handling, in delivering an
output, or while a request is being queued. Every stream still waiting ends with EngineDeadError
(whose text carries none of the cause's), `on_dead` runs once, and no request waits forever.

Each test has its own engine (a dead one serves nobody); bounds are generous limits, never
speeds: the interleavings that matter are forced with events, not sleeps."""

from __future__ import annotations

import asyncio
import threading

import pytest

from miaotui import LLM, SamplingParams
from miaotui.engine.async_engine import AsyncLLMEngine, EngineDeadError, _Stream
from miaotui.outputs import RequestOutput

LONG = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)  # still running when the fault hits
BOUND_S = 60


@pytest.fixture
def make_engine(tiny_llama):
    """make_engine() -> (AsyncLLMEngine on a fresh tiny engine, the list of on_dead's calls)."""
    made = []

    def make():
        llm = LLM(str(tiny_llama[0]), skip_tokenizer_init=True, block_size=4, num_kv_blocks=256,
                  max_num_batched_tokens=32)
        calls: list[BaseException] = []
        engine = AsyncLLMEngine(llm.engine, on_dead=calls.append)
        made.append(engine)
        return engine, calls

    yield make
    for engine in made:
        engine.shutdown()


def _ended(engine: AsyncLLMEngine) -> None:
    """Wait for the engine thread to be gone (so on_dead, if due, has run)."""
    engine._thread.join(BOUND_S)
    assert not engine._thread.is_alive(), "the engine thread did not end"


async def _drain(stream) -> None:
    async with asyncio.timeout(BOUND_S):
        async for _ in stream:
            pass


def test_failing_abort_fails_every_stream_and_later_requests(make_engine):
    engine, calls = make_engine()
    injected = RuntimeError("injected abort failure: /secret/path")

    def abort_request(request_id):
        raise injected

    engine.engine.abort_request = abort_request

    async def main():
        leaving = engine.generate([31] * 8, LONG, request_id="leaving")
        staying = engine.generate([32] * 8, LONG, request_id="staying")
        await anext(leaving)
        await anext(staying)  # both are streaming
        await leaving.aclose()  # a client that leaves: its abort raises in the engine thread
        with pytest.raises(EngineDeadError) as info:
            await _drain(staying)
        return info.value

    error = asyncio.run(main())
    assert "injected" not in str(error) and error.__cause__ is injected
    _ended(engine)
    assert calls == [injected] and engine.dead_error is injected and not engine.is_running

    async def after():
        async with asyncio.timeout(BOUND_S):  # raises at once: nothing is queued
            with pytest.raises(EngineDeadError) as info:
                await anext(engine.generate([33] * 4, LONG))
        return info.value

    later = asyncio.run(after())
    assert "injected" not in str(later) and later.__cause__ is injected
    assert engine._commands.empty()  # refused, not queued for a thread that is gone


class _SpyLock:
    """engine._lock, noting when the engine thread starts waiting for it."""

    def __init__(self, engine_thread: threading.Thread) -> None:
        self._lock = threading.Lock()
        self._engine_thread = engine_thread
        self.engine_thread_waiting = threading.Event()

    def __enter__(self):
        if threading.current_thread() is self._engine_thread:
            self.engine_thread_waiting.set()
        self._lock.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()


def test_request_queued_while_the_thread_dies_is_answered(make_engine, monkeypatch):
    """The race: generate() has found the engine alive and is about to queue its request when
    the thread fails. Forced here: the failure arrives just then, and the request is queued only
    once the dying thread waits to drain the queue. It must get EngineDeadError, not hang."""
    engine, calls = make_engine()
    spy = _SpyLock(engine._thread)
    engine._lock = spy
    real_put = engine._commands.put

    def put(command, *args, **kwargs):
        if command[0] == "add":
            real_put(("fail", "injected runner failure", None, None, None))  # what a runner's hook sends
            assert spy.engine_thread_waiting.wait(BOUND_S), "the failing thread never reached its exit"
        real_put(command, *args, **kwargs)

    monkeypatch.setattr(engine._commands, "put", put)

    async def main():
        with pytest.raises(EngineDeadError) as info:
            await _drain(engine.generate([34] * 4, LONG))
        return info.value

    error = asyncio.run(main())
    assert "injected" not in str(error) and str(error.__cause__) == "injected runner failure"
    _ended(engine)
    assert len(calls) == 1 and not engine.is_running


def test_a_stream_whose_delivery_fails_does_not_keep_the_others_waiting(make_engine, monkeypatch):
    engine, calls = make_engine()
    armed = threading.Event()
    broken: set[int] = set()
    deliver = _Stream.put

    def put(self, item):  # request "bad"'s consumer is unreachable once armed: every put raises
        if id(self) in broken or (armed.is_set() and isinstance(item, RequestOutput) and item.request_id == "bad"):
            broken.add(id(self))
            raise OSError("injected delivery failure")
        deliver(self, item)

    monkeypatch.setattr(_Stream, "put", put)

    async def main():
        bad = engine.generate([35] * 8, LONG, request_id="bad")  # first: its failure is met first
        good = engine.generate([36] * 8, LONG, request_id="good")
        await anext(bad)
        await anext(good)
        armed.set()
        with pytest.raises(EngineDeadError) as info:
            await _drain(good)
        await bad.aclose()
        return info.value

    error = asyncio.run(main())
    assert isinstance(error.__cause__, OSError) and "injected" not in str(error)
    _ended(engine)
    assert len(calls) == 1 and isinstance(calls[0], OSError) and broken


def test_shutdown_ends_waiting_streams_without_on_dead(make_engine):
    engine, calls = make_engine()

    async def main():
        stream = engine.generate([37] * 8, LONG)
        await anext(stream)
        await asyncio.to_thread(engine.shutdown)
        with pytest.raises(EngineDeadError, match="shut down"):
            await _drain(stream)
        with pytest.raises(EngineDeadError, match="shut down"):
            await anext(engine.generate([38] * 4, LONG))

    asyncio.run(main())
    assert calls == [] and engine.dead_error is None and not engine.is_running
