"""POST /v1/completions and /v1/chat/completions: JSON in, engine requests, JSON or SSE out.

Each endpoint checks in this order: the body's types (pydantic), its sizes against the server's
limits (limits.py: counting only), admission (429 when full), then the work (tokenizing,
rendering a chat template, building the params once per distinct max_tokens). Every prompt
becomes one engine request (job_runner.py drives them); `index` is prompt_index * n +
sample_index, as OpenAI numbers choices.
"""

from __future__ import annotations

import uuid

from fastapi import FastAPI, Request

from miaotui.outputs import CompletionOutput, RequestOutput
from miaotui.sampling_params import SamplingParams
from miaotui.server.errors import APIError, bad_request
from miaotui.server.job_runner import Job, Sent, run_job
from miaotui.server.limits import check_chat, check_completion
from miaotui.server.logprobs import chat_logprobs, completion_logprobs, join_logprobs, prompt_logprobs_json
from miaotui.server.parsers.reasoning import ReasoningMode, ReasoningParser, choose, split_reasoning
from miaotui.server.protocol import ChatCompletionRequest, CompletionRequest
from miaotui.server.state import NO_TOKENIZER, ServerState, sized_work


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


def _job(state: ServerState, prompts: list[list[int]], requested: int | None, make_params, n: int,
         prefix: str, cache_salt: str | None) -> Job:
    """The job of tokenized prompts. Params are built (and validated) once per distinct
    max_tokens, not once per prompt: a batch of prompts with one logit_bias shares one map."""
    limit = state.max_model_len
    built: dict[int, SamplingParams] = {}
    params = []
    for ids in prompts:
        try:
            room = state.llm_engine.prompt_room(len(ids))
            max_tokens = _max_tokens(requested, len(ids), limit, room)
            if max_tokens not in built:
                built[max_tokens] = make_params(max_tokens)
                # The engine's own limits, checked before the request is queued: n beyond
                # max_num_seqs could never run however long it queued (a 400, not a 429).
                state.check_params(built[max_tokens])
            params.append(built[max_tokens])
        except ValueError as exc:
            raise bad_request(exc) from exc
    return Job(prompts, params, n, f"{prefix}-{uuid.uuid4().hex}", cache_salt)


async def create_completion(body: CompletionRequest, request: Request):
    state: ServerState = request.app.state.miaotui
    state.engine_or_503()
    model = state.check_model(body.model)
    check_completion(body, state.config.limits)
    if state.tokenizer is None:
        _check_without_tokenizer(body)
    try:
        raw_prompts = body.prompts()
    except ValueError as exc:
        raise bad_request(exc) from exc
    admission = state.admit(len(raw_prompts) * body.n)
    try:
        try:
            prompts = await state.tokenize_all(raw_prompts)
        except ValueError as exc:
            raise bad_request(exc) from exc
        job = _job(state, prompts, body.max_tokens, body.sampling_params, body.n, "cmpl", body.cache_salt)
        echo = (await sized_work(sum(map(len, prompts)), lambda: [state.detokenize(p) for p in prompts])
                if body.echo else None)
        return await _completion_job(state, request, body, model, job, prompts, echo, admission)
    except BaseException:
        admission.release()  # idempotent: run_job may have released it already
        raise


async def _completion_job(state: ServerState, request: Request, body: CompletionRequest, model: str, job: Job,
                          prompts: list[list[int]], echo: list[str] | None, admission):
    # echo with max_tokens 0 scores the prompt: the engine samples one token (from logits the
    # prompt's last position computes anyway), which is never returned.
    scoring = body.echo and body.max_tokens == 0
    top = body.logprobs or 0
    as_ids = body.return_tokens_as_token_ids
    return_ids = body.return_token_ids if body.return_token_ids is not None else state.tokenizer is None

    def choice(index: int, o: CompletionOutput, sent: Sent) -> dict:
        """The choice's text and logprobs since `sent`; its first chunk (or the whole choice)
        begins with the echoed prompt, whose tokens come first in the logprobs, the first null."""
        i = index // job.n
        first = sent.tokens == 0 and sent.text == 0
        prefix = echo[i] if echo is not None else ""
        text = "" if scoring else o.text
        tokens = [] if scoring else list(zip(o.token_ids, o.logprobs or []))
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
            out["token_ids"] = [] if scoring else o.token_ids
        return out

    def chunk(index: int, o: CompletionOutput, sent: Sent) -> dict | None:
        # Tokens whose text is held back (a partial character or stop string) still carry their
        # logprobs (and ids) now: the caller counts them as sent whether or not a chunk goes out.
        # Without a tokenizer no token has text: with ids returned, each new token is a chunk.
        new_tokens = (body.logprobs is not None or return_ids) and bool(o.token_ids) and not scoring
        if not o.text and not o.finished and not new_tokens and not (echo and sent.tokens == 0):
            return None
        return {"id": job.request_id, "object": "text_completion", "created": job.created, "model": model,
                "choices": [choice(index, o, sent)]}

    def final(whole: dict[int, RequestOutput] | None, usage: dict, usage_chunk: bool = False) -> dict:
        base = {"id": job.request_id, "object": "text_completion", "created": job.created, "model": model}
        if scoring:
            usage = usage | {"completion_tokens": 0, "total_tokens": usage["prompt_tokens"]}
        if usage_chunk:
            return base | {"choices": [], "usage": usage}
        choices = [choice(i * job.n + o.index, o, Sent()) for i in sorted(whole) for o in whole[i].outputs]
        return base | {"choices": choices, "usage": usage}

    return await run_job(state, request, job, admission, chunk, final, body.stream, body.include_usage)


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
    check_chat(body, state.config.limits)
    admission = state.admit(body.n)
    try:
        messages = [m.as_template_message() for m in body.messages]
        try:
            prompt = await state.chat_prompt(messages, body.add_generation_prompt, body.chat_template,
                                             body.chat_template_kwargs)
        except ValueError as exc:
            raise APIError(400, f"messages: {exc}", param="messages") from exc
        job = _job(state, [prompt.ids], body.requested_max_tokens, body.sampling_params, body.n, "chatcmpl",
                   body.cache_salt)
        reasoning = choose(state.config.reasoning_parser, prompt.template, prompt.text)
        return await _chat_job(state, request, body, model, job, admission, reasoning)
    except BaseException:
        admission.release()  # idempotent: run_job may have released it already
        raise


async def _chat_job(state: ServerState, request: Request, body: ChatCompletionRequest, model: str, job: Job,
                    admission, reasoning: ReasoningMode | None = None):
    """`reasoning`: the request's reasoning parser (parsers/reasoning.py), if any: the thinking
    goes to `reasoning_content` (streamed, `delta.reasoning_content`), the answer to `content`,
    split alike whether streamed or not."""
    want_logprobs = bool(body.logprobs)
    as_ids = body.return_tokens_as_token_ids
    base = {"id": job.request_id, "created": job.created, "model": model}
    # As OpenAI's: each choice's first chunk is the role alone, sent before the first token.
    opening = tuple(base | {"object": "chat.completion.chunk", "choices": [{
        "index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
        "logprobs": None}]} for index in range(job.n))

    parsers: dict[int, ReasoningParser] = {}  # per streamed choice

    def chunk(index: int, o: CompletionOutput, sent: Sent) -> dict | None:
        thought, text = "", o.text
        if reasoning is not None:
            parser = parsers.setdefault(index, reasoning.parser())
            thought, text = parser.feed(text)
            if o.finished:  # no more text: what could still have become a tag is text
                held_thought, held_text = parser.finish()
                thought, text = thought + held_thought, text + held_text
        # Tokens whose text is still held back (a partial UTF-8 character, stop string or tag)
        # carry their logprobs now: the caller counts them as sent whether or not a chunk goes out.
        new_logprobs = want_logprobs and bool(o.token_ids)
        if not text and not thought and not new_logprobs and not o.finished:
            return None
        delta = {"reasoning_content": thought} if thought else {}
        if text or (new_logprobs and not thought):
            delta["content"] = text
        return base | {"object": "chat.completion.chunk", "choices": [{
            "index": index, "delta": delta,
            "finish_reason": o.finish_reason,
            "logprobs": chat_logprobs(o, 0, as_ids) if want_logprobs else None}]}

    def final(whole: dict[int, RequestOutput] | None, usage: dict, usage_chunk: bool = False) -> dict:
        if usage_chunk:
            return base | {"object": "chat.completion.chunk", "choices": [], "usage": usage}
        choices = [{"index": o.index, "message": _message(o.text, reasoning), "finish_reason": o.finish_reason,
                    "logprobs": chat_logprobs(o, 0, as_ids) if want_logprobs else None}
                   for o in whole[0].outputs]
        return base | {"object": "chat.completion", "choices": choices, "usage": usage}

    return await run_job(state, request, job, admission, chunk, final, body.stream, body.include_usage, opening)


def _message(text: str, reasoning: ReasoningMode | None) -> dict:
    """A whole choice's message; `reasoning_content` only where a reasoning parser runs (null
    when the reply did not think, and `content` null when it only thought, as vLLM's)."""
    if reasoning is None:
        return {"role": "assistant", "content": text}
    thought, content = split_reasoning(text, reasoning.in_reasoning)
    return {"role": "assistant", "content": content, "reasoning_content": thought}


def add_openai_routes(app: FastAPI) -> None:
    app.add_api_route("/v1/completions", create_completion, methods=["POST"])
    app.add_api_route("/v1/chat/completions", create_chat_completion, methods=["POST"])
