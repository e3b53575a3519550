"""The server's per-request limits (config.RequestLimits), checked on the parsed body before the
request is admitted or any prompt is tokenized: each check counts, none builds anything, so a
hostile body costs the event loop no more than its parsing did."""

from __future__ import annotations

import json

from miaotui.config import RequestLimits
from miaotui.server.errors import APIError
from miaotui.server.protocol import ChatCompletionRequest, CompletionRequest, TokenizeRequest, _SamplingFields

_FLAGS = {
    "max_prompts": "--max-prompts-per-request", "max_n": "--max-n", "max_stop_strings": "--max-stop-strings",
    "max_stop_string_chars": "--max-stop-string-chars", "max_stop_token_ids": "--max-stop-token-ids",
    "max_logit_bias": "--max-logit-bias", "max_logprobs": "--max-logprobs", "max_messages": "--max-messages",
    "max_chat_template_chars": "--max-chat-template-chars",
}
# A chat request's chat_template_kwargs, as JSON: a few switches, not a second prompt.
MAX_TEMPLATE_KWARGS_BYTES = 4096


def _over(limits: RequestLimits, name: str, value: int, param: str, noun: str) -> None:
    limit = getattr(limits, name)
    if value > limit:
        raise APIError(400, f"{param}: {value} {noun} is over this server's limit of {limit} "
                            f"({_FLAGS[name]})", param=param)


def _check_sampling(body: _SamplingFields, limits: RequestLimits) -> None:
    _over(limits, "max_n", body.n, "n", "samples per prompt")
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    _over(limits, "max_stop_strings", len(stop), "stop", "stop strings")
    longest = max((len(s) for s in stop), default=0)
    _over(limits, "max_stop_string_chars", longest, "stop", "characters in one stop string")
    _over(limits, "max_stop_token_ids", len(body.stop_token_ids or ()), "stop_token_ids", "stop token ids")
    _over(limits, "max_logit_bias", len(body.logit_bias or ()), "logit_bias", "entries")


def check_completion(body: CompletionRequest, limits: RequestLimits) -> None:
    _check_sampling(body, limits)
    p = body.prompt
    batch = 1 if isinstance(p, str) or not p or isinstance(p[0], int) else len(p)
    _over(limits, "max_prompts", batch, "prompt", "prompts")
    for param in ("logprobs", "prompt_logprobs"):
        value = getattr(body, param)
        if value is not None:
            _over(limits, "max_logprobs", value, param, "logprobs per token")


def check_chat(body: ChatCompletionRequest, limits: RequestLimits) -> None:
    _check_sampling(body, limits)
    check_messages(body.messages, limits)
    if body.top_logprobs is not None:
        _over(limits, "max_logprobs", body.top_logprobs, "top_logprobs", "logprobs per token")
    if body.chat_template is not None:
        _over(limits, "max_chat_template_chars", len(body.chat_template), "chat_template", "characters")
    _check_template_kwargs(body.chat_template_kwargs)


def _check_template_kwargs(kwargs: dict | None) -> None:
    if kwargs:
        # The body is already bounded (--max-body-bytes), so encoding it costs what parsing did.
        size = len(json.dumps(kwargs, ensure_ascii=False).encode())
        if size > MAX_TEMPLATE_KWARGS_BYTES:
            raise APIError(400, f"chat_template_kwargs: {size} bytes of JSON is over the limit of "
                                f"{MAX_TEMPLATE_KWARGS_BYTES}", param="chat_template_kwargs")


def check_messages(messages: list | None, limits: RequestLimits) -> None:
    _over(limits, "max_messages", len(messages or ()), "messages", "messages")


def check_tokenize(body: TokenizeRequest, limits: RequestLimits) -> None:
    check_messages(body.messages, limits)
    _check_template_kwargs(body.chat_template_kwargs)
