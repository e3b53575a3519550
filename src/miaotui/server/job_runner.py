"""Driving the engine requests behind one HTTP request: merge their outputs, time them, answer
with one JSON body or an SSE stream, and give the admission back however the request ends.

One HTTP request may carry several prompts (completions) and n > 1; every prompt becomes one
engine request (its n samples fork inside the engine). The engine sends DELTA outputs (only what
is new), so every step costs its new tokens whatever a completion's length; the non-streaming
answer appends them (RequestOutput.add_delta). Between the engine and the client every buffer is
bounded: the merge queue blocks its pumps, the engine's stream then merges what waits
(async_engine._Stream), and a streaming client that reads nothing for `stream_stall_timeout_s`
is disconnected, which aborts its requests. A client that goes away cancels the merge, which
aborts every engine request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from miaotui.engine.async_engine import EngineDeadError
from miaotui.outputs import CompletionOutput, RequestOutput
from miaotui.sampling_params import SamplingParams
from miaotui.server.errors import APIError, bad_request, error_body
from miaotui.server.state import Admission, ServerState

logger = logging.getLogger("miaotui.server")


@dataclass(slots=True)
class Job:
    """The engine requests behind one HTTP request (their params are DELTA ones)."""

    prompts: list[list[int]]
    params: list[SamplingParams]
    n: int
    request_id: str
    cache_salt: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    # The newest output of each prompt, for what a choice's chunk needs beyond its own delta
    # (the prompt's logprobs, which arrive once and are kept).
    latest: dict[int, RequestOutput] = field(default_factory=dict)


@dataclass(slots=True)
class Sent:
    """What a choice has sent so far: characters and tokens (chunks carry only what is new)."""

    text: int = 0
    tokens: int = 0
    finished: bool = False


async def _merged(state: ServerState, job: Job) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Yield (prompt index, delta output) from all of the job's engine requests."""
    engine = state.engine_or_503()
    # Bounded: a consumer that stops taking blocks the pumps, so outputs wait in the engine's
    # own (bounded, merging) streams instead of piling up here.
    queue: asyncio.Queue = asyncio.Queue(maxsize=2 * len(job.prompts))

    async def pump(i: int) -> None:
        try:
            async for out in engine.generate(job.prompts[i], job.params[i], f"{job.request_id}-{i}",
                                             cache_salt=job.cache_salt):
                await queue.put((i, out))
        except asyncio.CancelledError:  # the consumer cancelled us: nobody is waiting
            raise
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises
            await queue.put((i, exc))
            raise

    tasks = [asyncio.create_task(pump(i)) for i in range(len(job.prompts))]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if isinstance(item, BaseException):
                if isinstance(item, ValueError):
                    raise bad_request(item)
                if isinstance(item, EngineDeadError):
                    raise APIError(503, str(item))
                raise item
            if item.finished:
                remaining -= 1
            job.latest[i] = item
            yield i, item
    finally:
        for t in tasks:  # a client that left (or an error) aborts every engine request
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Timing:
    """TTFT / inter-token latency of one HTTP request, into the server's histograms."""

    def __init__(self, state: ServerState) -> None:
        self.metrics = state.metrics
        self.start = self.last = time.perf_counter()
        self.first = True

    def tokens(self, count: int) -> None:
        if count <= 0:
            return
        now = time.perf_counter()
        if self.first:
            self.metrics.time_to_first_token.observe(now - self.start)
            self.first = False
        else:
            self.metrics.inter_token_latency.observe((now - self.last) / count)
        self.last = now

    def done(self, outcome: str) -> None:
        self.metrics.request_latency.observe(time.perf_counter() - self.start)
        self.metrics.requests.labels(outcome).inc()


def _new_tokens(out: RequestOutput) -> int:
    return sum(len(o.token_ids) for o in out.outputs)


ChunkFn = Callable[[int, CompletionOutput, Sent], "dict | None"]
FinalFn = Callable[..., dict]


async def run_job(state: ServerState, request: Request, job: Job, admission: Admission, chunk: ChunkFn,
                  final: FinalFn, stream: bool, include_usage: bool, opening: tuple[dict, ...] = ()):
    """Drive a job: SSE of `chunk(...)` dicts when streaming, else `final(...)` once at the end.

    chunk(index, delta, sent) -> dict | None builds the chunk of choice `index` from its new
    output `delta`, `sent` being what the choice sent before it;
    final(outputs, usage) -> dict builds the whole response from each prompt's whole output
    (final(outputs, usage, usage_chunk=True): the streamed usage chunk);
    `opening` chunks are streamed first, before any token. This function owns `admission`
    from its call on and releases it however the request ends.
    """
    timing = _Timing(state)
    prompt_tokens = sum(len(p) for p in job.prompts)

    def usage(completion: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    if not stream:
        async def collect() -> dict[int, RequestOutput]:
            whole: dict[int, RequestOutput] = {}
            async for i, out in _merged(state, job):
                timing.tokens(_new_tokens(out))
                if i in whole:
                    whole[i].add_delta(out)
                else:
                    whole[i] = out  # the first delta, ours alone, becomes the whole output
            return whole

        task = asyncio.create_task(collect())
        try:
            while not task.done():  # watch for the client leaving while we generate
                await asyncio.wait({task}, timeout=0.25)
                if not task.done() and await request.is_disconnected():
                    task.cancel()
                    timing.done("disconnected")
                    return JSONResponse(error_body(499, "client disconnected"), status_code=499)
            whole = task.result()
        except Exception:  # an APIError becomes its JSON error; anything else a logged 500
            timing.done("error")
            raise
        finally:
            if not task.done():
                task.cancel()
            admission.release()
        timing.done("ok")
        return JSONResponse(final(whole, usage(sum(_new_tokens(o) for o in whole.values()))))

    async def events() -> AsyncIterator[str]:
        sent: dict[int, Sent] = {}
        outcome = "disconnected"
        try:
            for payload in opening:
                yield f"data: {json.dumps(payload)}\n\n"
            async for i, out in _merged(state, job):
                new = 0
                for o in out.outputs:
                    index = i * job.n + o.index
                    s = sent.setdefault(index, Sent())
                    if s.finished:
                        continue
                    new += len(o.token_ids)
                    payload = chunk(index, o, s)
                    s.text += len(o.text)
                    s.tokens += len(o.token_ids)
                    s.finished = o.finished
                    if payload is not None:
                        yield f"data: {json.dumps(payload)}\n\n"
                timing.tokens(new)
            if include_usage:
                completion = sum(s.tokens for s in sent.values())
                yield f"data: {json.dumps(final(None, usage(completion), usage_chunk=True))}\n\n"
            outcome = "ok"
        except APIError as exc:  # headers are gone: report in-band, as OpenAI-compatible servers do
            outcome = "error"
            yield f"data: {json.dumps(error_body(exc.status, exc.message, exc.param, exc.code))}\n\n"
        except Exception:  # a bug: the trace goes to the log, the client gets an in-band 500
            # (a client that left raises CancelledError or GeneratorExit, no Exception: "disconnected")
            outcome = "error"
            logger.exception("unhandled error in the stream of %s", job.request_id)
            yield f"data: {json.dumps(error_body(500, 'internal server error; the server log has the details'))}\n\n"
        finally:
            admission.release()
            timing.done(outcome)
        yield "data: [DONE]\n\n"

    response = StallGuardedStream(events(), state.config.stream_stall_timeout_s, job.request_id,
                                  media_type="text/event-stream",
                                  headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    # A client that leaves before the body starts leaves `events` unstarted, so its `finally`
    # never runs: the admission is then returned when the response object is dropped.
    weakref.finalize(response, admission.release)
    return response


class _ReaderStalled(Exception):
    pass


class StallGuardedStream(StreamingResponse):
    """A streaming response whose every send must complete within `timeout` seconds. A send
    blocks while the client's socket is full: a client that stops reading (but stays connected)
    is cut off after `timeout`, its body generator closed (which aborts its engine requests),
    instead of holding its request, KV blocks and buffers for as long as it likes."""

    def __init__(self, content, timeout: float, request_id: str, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.timeout = timeout
        self.request_id = request_id

    async def __call__(self, scope, receive, send) -> None:
        async def bounded_send(message) -> None:
            try:
                await asyncio.wait_for(send(message), self.timeout)
            except TimeoutError:
                raise _ReaderStalled from None

        try:
            await super().__call__(scope, receive, bounded_send)
        except _ReaderStalled:
            logger.warning("request %s: the client read nothing for %.0f s; disconnected it and aborted "
                           "the request", self.request_id, self.timeout)
            await self.body_iterator.aclose()  # its `finally` aborts the engine requests now
