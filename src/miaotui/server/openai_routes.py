"""POST /v1/completions and /v1/chat/completions: JSON in, engine requests, JSON or SSE out.

One HTTP request may carry several prompts (completions) and n > 1; every prompt becomes one
engine request (its n samples fork inside the engine). Their cumulative outputs are merged into
one stream of OpenAI chunks; `index` is prompt_index * n + sample_index, as OpenAI numbers them.
A client that goes away (streaming or not) cancels the merge, which aborts every engine request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from miaotui.engine.async_engine import EngineDeadError
from miaotui.outputs import CompletionOutput, RequestOutput
from miaotui.sampling_params import SamplingParams
from miaotui.server.errors import APIError, bad_request, error_body
from miaotui.server.logprobs import chat_logprobs, completion_logprobs, join_logprobs, prompt_logprobs_json
from miaotui.server.protocol import ChatCompletionRequest, CompletionRequest
from miaotui.server.state import NO_TOKENIZER, ServerState

logger = logging.getLogger("miaotui.server")


@dataclass(slots=True)
class _Job:
    """The engine requests behind one HTTP request."""

    prompts: list[list[int]]
    params: list[SamplingParams]
    n: int
    request_id: str
    created: int = field(default_factory=lambda: int(time.time()))
    # The newest output of each prompt, for what a choice's chunk needs beyond its own
    # CompletionOutput (the prompt's logprobs).
    latest: dict[int, RequestOutput] = field(default_factory=dict)


@dataclass(slots=True)
class _Sent:
    """What a choice has sent so far (outputs are cumulative; chunks carry deltas)."""

    text: int = 0
    tokens: int = 0
    finished: bool = False


def _max_tokens(requested: int | None, prompt_len: int, max_model_len: int, room: int) -> int:
    """`room`: what the prompt leaves for output (for encoder-decoder models, the decoder's window)."""
    if requested is None:
        if room < 1:
            raise APIError(400, f"This model's maximum context length is {max_model_len} tokens, and "
                                f"the prompt has {prompt_len} tokens: no room for any output.",
                           param="prompt", code="context_length_exceeded")
        return room
    if requested > room and room != max_model_len - prompt_len:  # an encoder-decoder model
        raise APIError(400, f"This model's decoder generates at most {room} tokens; you requested "
                            f"{requested} for the completion. Reduce max_tokens.",
                       param="max_tokens", code="context_length_exceeded")
    if requested > room:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, "
                            f"you requested {prompt_len + requested} tokens ({prompt_len} in the prompt, "
                            f"{requested} for the completion). Reduce the prompt or max_tokens.",
                       param="max_tokens", code="context_length_exceeded")
    return requested


async def _merged(state: ServerState, job: _Job) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Yield (prompt index, cumulative output) from all of the job's engine requests."""
    engine = state.engine_or_503()
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            async for out in engine.generate(job.prompts[i], job.params[i], f"{job.request_id}-{i}"):
                await queue.put((i, out))
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


async def _run(state: ServerState, request: Request, job: _Job, chunk, final, stream: bool,
               include_usage: bool, opening: tuple[dict, ...] = ()):
    """Drive a job: SSE of `chunk(...)` dicts when streaming, else `final(...)` once at the end.

    chunk(index, out, sent) -> dict | None builds the delta chunk of choice `index`;
    final(outputs) -> dict builds the whole response from the last output of each prompt;
    `opening` chunks are streamed first, as soon as the job is admitted, before any token.
    """
    timing = _Timing(state)
    sequences = len(job.prompts) * job.n
    state.admit(sequences)
    released = False

    def release_once() -> None:
        nonlocal released
        if not released:
            released = True
            state.release(sequences)

    def usage(last: dict[int, RequestOutput]) -> dict:
        prompt = sum(len(p) for p in job.prompts)
        completion = sum(len(o.token_ids) for out in last.values() for o in out.outputs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    if not stream:
        async def collect() -> dict[int, RequestOutput]:
            last: dict[int, RequestOutput] = {}
            counts: dict[int, int] = {}
            async for i, out in _merged(state, job):
                new = sum(len(o.token_ids) for o in out.outputs)
                timing.tokens(new - counts.get(i, 0))
                counts[i] = new
                last[i] = out
            return last

        task = asyncio.create_task(collect())
        try:
            while not task.done():  # watch for the client leaving while we generate
                await asyncio.wait({task}, timeout=0.25)
                if not task.done() and await request.is_disconnected():
                    task.cancel()
                    timing.done("disconnected")
                    return JSONResponse(error_body(499, "client disconnected"), status_code=499)
            last = task.result()
        except Exception:  # an APIError becomes its JSON error; anything else a logged 500
            timing.done("error")
            raise
        finally:
            if not task.done():
                task.cancel()
            release_once()
        timing.done("ok")
        return JSONResponse(final(last, usage(last)))

    async def events() -> AsyncIterator[str]:
        sent: dict[int, _Sent] = {}
        last: dict[int, RequestOutput] = {}
        outcome = "disconnected"
        try:
            for payload in opening:
                yield f"data: {json.dumps(payload)}\n\n"
            async for i, out in _merged(state, job):
                last[i] = out
                new = 0
                for o in out.outputs:
                    index = i * job.n + o.index
                    s = sent.setdefault(index, _Sent())
                    if s.finished:
                        continue
                    new += len(o.token_ids) - s.tokens
                    payload = chunk(index, o, s)
                    s.text, s.tokens, s.finished = len(o.text), len(o.token_ids), o.finished
                    if payload is not None:
                        yield f"data: {json.dumps(payload)}\n\n"
                timing.tokens(new)
            if include_usage:
                yield f"data: {json.dumps(final(last, usage(last), usage_chunk=True))}\n\n"
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
            release_once()
            timing.done(outcome)
        yield "data: [DONE]\n\n"

    response = StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    # A client that leaves before the body starts leaves `events` unstarted, so its `finally`
    # never runs: the admission is then returned when the response object is dropped.
    weakref.finalize(response, release_once)
    return response


def _job(state: ServerState, prompts: list[list[int]], requested: int | None, make_params, n: int,
         prefix: str) -> _Job:
    limit = state.max_model_len
    params = []
    for ids in prompts:
        try:
            room = state.llm_engine.prompt_room(len(ids))
            params.append(make_params(_max_tokens(requested, len(ids), limit, room)))
            # The engine's own limits, checked before admission: n beyond max_num_seqs could
            # never run however long it queued (a 400, not a 429).
            state.check_params(params[-1])
        except ValueError as exc:
            raise bad_request(exc) from exc
    return _Job(prompts, params, n, f"{prefix}-{uuid.uuid4().hex}")


async def create_completion(body: CompletionRequest, request: Request):
    state: ServerState = request.app.state.miaotui
    state.engine_or_503()
    model = state.check_model(body.model)
    try:
        prompts = [state.tokenize(p) for p in body.prompts()]
    except ValueError as exc:
        raise bad_request(exc) from exc
    if state.tokenizer is None:
        _check_without_tokenizer(body)
    job = _job(state, prompts, body.max_tokens, body.sampling_params, body.n, "cmpl")
    echo = [state.detokenize(p) for p in prompts] if body.echo else None
    # echo with max_tokens 0 scores the prompt: the engine samples one token (from logits the
    # prompt's last position computes anyway), which is never returned.
    scoring = body.echo and body.max_tokens == 0
    top = body.logprobs or 0
    as_ids = body.return_tokens_as_token_ids
    return_ids = body.return_token_ids if body.return_token_ids is not None else state.tokenizer is None

    def choice(index: int, o: CompletionOutput, sent: _Sent) -> dict:
        """The choice's text and logprobs since `sent`; its first chunk (or the whole choice)
        begins with the echoed prompt, whose tokens come first in the logprobs, the first null."""
        i = index // job.n
        first = sent.tokens == 0 and sent.text == 0
        prefix = echo[i] if echo is not None else ""
        text = "" if scoring else o.text[sent.text:]
        tokens = [] if scoring else list(zip(o.token_ids[sent.tokens:], (o.logprobs or [])[sent.tokens:]))
        out = {"index": index, "text": prefix + text if first else text,
               "finish_reason": "length" if scoring and o.finished else o.finish_reason, "logprobs": None}
        if body.logprobs is not None:
            lps = completion_logprobs(state, tokens, len(prefix) + sent.text, top, as_ids)
            if echo is not None and first:
                scored = job.latest[i].prompt_logprobs or [None] * len(prompts[i])
                lps = join_logprobs(completion_logprobs(state, list(zip(prompts[i], scored)), 0, top, as_ids), lps)
            out["logprobs"] = lps
        if body.prompt_logprobs is not None and first:
            out["prompt_logprobs"] = prompt_logprobs_json(job.latest[i].prompt_logprobs)
        if return_ids:  # vLLM's: the prompt's ids in a choice's first chunk, then each chunk's new ids
            if first:
                out["prompt_token_ids"] = prompts[i]
            out["token_ids"] = [] if scoring else o.token_ids[sent.tokens:]
        return out

    def chunk(index: int, o: CompletionOutput, sent: _Sent) -> dict | None:
        # Tokens whose text is held back (a partial character or stop string) still carry their
        # logprobs (and ids) now: the caller counts them as sent whether or not a chunk goes out.
        # Without a tokenizer no token has text: with ids returned, each new token is a chunk.
        new_tokens = ((body.logprobs is not None or return_ids) and len(o.token_ids) > sent.tokens
                      and not scoring)
        if o.text[sent.text:] == "" and not o.finished and not new_tokens and not (echo and sent.tokens == 0):
            return None
        return {"id": job.request_id, "object": "text_completion", "created": job.created, "model": model,
                "choices": [choice(index, o, sent)]}

    def final(last: dict[int, RequestOutput], usage: dict, usage_chunk: bool = False) -> dict:
        base = {"id": job.request_id, "object": "text_completion", "created": job.created, "model": model}
        if scoring:
            usage = usage | {"completion_tokens": 0, "total_tokens": usage["prompt_tokens"]}
        if usage_chunk:
            return base | {"choices": [], "usage": usage}
        choices = [choice(i * job.n + o.index, o, _Sent()) for i in sorted(last) for o in last[i].outputs]
        return base | {"choices": choices, "usage": usage}

    return await _run(state, request, job, chunk, final, body.stream, body.include_usage)


def _check_without_tokenizer(body: CompletionRequest) -> None:
    """What a completion cannot have on a server without a tokenizer (400s before admission)."""
    if body.echo:
        raise APIError(400, f"echo: returns the prompt's text, and {NO_TOKENIZER}; the prompt's ids "
                            "are in each choice's prompt_token_ids", param="echo")
    if body.logprobs is not None and not body.return_tokens_as_token_ids:
        raise APIError(400, f"logprobs: tokens are named by their text, and {NO_TOKENIZER}; send "
                            "return_tokens_as_token_ids: true to name them 'token_id:N'", param="logprobs")


async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    state: ServerState = request.app.state.miaotui
    state.engine_or_503()
    model = state.check_model(body.model)
    if state.tokenizer is None:
        raise APIError(400, f"messages: chat completions render the messages with the model's chat template "
                            f"and tokenizer, and {NO_TOKENIZER}; use /v1/completions with "
                            "token-id prompts", param="messages")
    messages = [m.as_template_message() for m in body.messages]
    try:
        ids = await state.chat_prompt_ids(messages, body.add_generation_prompt, body.chat_template)
    except ValueError as exc:
        raise APIError(400, f"messages: {exc}", param="messages") from exc
    job = _job(state, [ids], body.requested_max_tokens, body.sampling_params, body.n, "chatcmpl")
    want_logprobs = bool(body.logprobs)
    as_ids = body.return_tokens_as_token_ids
    base = {"id": job.request_id, "created": job.created, "model": model}
    # As OpenAI's: each choice's first chunk is the role alone, sent before the first token.
    opening = tuple(base | {"object": "chat.completion.chunk", "choices": [{
        "index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
        "logprobs": None}]} for index in range(job.n))

    def chunk(index: int, o: CompletionOutput, sent: _Sent) -> dict | None:
        text = o.text[sent.text:]
        # Tokens whose text is still held back (a partial UTF-8 character or stop string) carry
        # their logprobs now: the caller counts them as sent whether or not a chunk goes out.
        new_logprobs = want_logprobs and len(o.token_ids) > sent.tokens
        if not text and not new_logprobs and not o.finished:
            return None
        return base | {"object": "chat.completion.chunk", "choices": [{
            "index": index, "delta": {"content": text} if text or new_logprobs else {},
            "finish_reason": o.finish_reason,
            "logprobs": chat_logprobs(o, sent.tokens, as_ids) if want_logprobs else None}]}

    def final(last: dict[int, RequestOutput], usage: dict, usage_chunk: bool = False) -> dict:
        if usage_chunk:
            return base | {"object": "chat.completion.chunk", "choices": [], "usage": usage}
        choices = [{"index": o.index, "message": {"role": "assistant", "content": o.text},
                    "finish_reason": o.finish_reason,
                    "logprobs": chat_logprobs(o, 0, as_ids) if want_logprobs else None}
                   for o in last[0].outputs]
        return base | {"object": "chat.completion", "choices": choices, "usage": usage}

    return await _run(state, request, job, chunk, final, body.stream, body.include_usage, opening)


def add_openai_routes(app: FastAPI) -> None:
    app.add_api_route("/v1/completions", create_completion, methods=["POST"])
    app.add_api_route("/v1/chat/completions", create_chat_completion, methods=["POST"])
