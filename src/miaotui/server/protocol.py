"""Request bodies of the OpenAI-compatible API (pydantic), and their translation to SamplingParams.

Types are checked here; value ranges are checked once, by SamplingParams, whose errors start with
the field name (the server reports that name as the error's `param`). Unknown fields are ignored,
as OpenAI's and vLLM's servers do, so clients that send newer fields keep working. An explicit
JSON null on an optional field means its default, as OpenAI's API documents ("integer or null,
defaults to 16"): clients and SDKs send null for a field they leave unset.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

from miaotui.sampling_params import RequestOutputKind, SamplingParams


class _Body(BaseModel):
    """A JSON object of a request: unknown fields ignored, null on an optional field = omitted."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # Before validation, so strict fields keep rejecting wrong types ("n": "2", "stream":
        # 1) while a null takes the field's default. A required field's null stays an error.
        if not isinstance(data, dict):
            return data
        optional = {name for name, f in cls.model_fields.items() if not f.is_required()}
        return {k: v for k, v in data.items() if v is not None or k not in optional}


class StreamOptions(_Body):
    include_usage: StrictBool = False


class _SamplingFields(_Body):
    """Fields both endpoints share. top_k, min_p, repetition_penalty, ignore_eos, min_tokens,
    stop_token_ids and skip_special_tokens are extensions, as in vLLM; so is
    return_tokens_as_token_ids (logprobs name each token `token_id:N` rather than its text)."""

    model: str | None = None
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    top_k: StrictInt = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: StrictBool = False
    min_tokens: StrictInt = 0
    stop_token_ids: list[StrictInt] | None = None
    skip_special_tokens: StrictBool = True
    return_tokens_as_token_ids: StrictBool = False
    # vLLM's: requests with different salts never share prefix-cache blocks (one random salt per
    # tenant keeps one tenant from timing, or reusing, another's cached prompts).
    cache_salt: str | None = Field(default=None, min_length=1, max_length=1024)

    def _logit_bias(self) -> dict[int, float] | None:
        if not self.logit_bias:
            return None
        try:
            return {int(k): v for k, v in self.logit_bias.items()}
        except ValueError as exc:
            raise ValueError(f"logit_bias: keys must be token ids, got {list(self.logit_bias)!r}") from exc

    def _sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        return SamplingParams(
            n=self.n, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k, min_p=self.min_p,
            seed=self.seed, max_tokens=max_tokens, min_tokens=self.min_tokens, stop=self.stop,
            stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
            repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens, logit_bias=self._logit_bias(),
            output_kind=RequestOutputKind.DELTA,  # the server sends (or appends) what is new
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: StrictInt = 16  # null too, as OpenAI's legacy completions default
    logprobs: StrictInt | None = None
    echo: StrictBool = False
    suffix: str | None = None
    best_of: StrictInt | None = None
    prompt_logprobs: StrictInt | None = None  # vLLM's extension: each choice's `prompt_logprobs`
    # vLLM's extension: each choice's `prompt_token_ids` and `token_ids`. Unset: returned only
    # when the server runs without a tokenizer (then the ids are the whole output).
    return_token_ids: StrictBool | None = None

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts: one string, one token list, or a batch of either."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ValueError("prompt: must not be empty")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        if self.suffix:
            raise ValueError("suffix: is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of: only best_of == n is supported, got best_of={self.best_of}, n={self.n}")
        if max_tokens == 0:
            # OpenAI clients score a prompt with echo and max_tokens 0: the route samples one
            # token and returns none of it, as vLLM does.
            if not self.echo:
                raise ValueError("max_tokens: 0 is allowed only with echo=true (to score the prompt); "
                                 "ask for at least 1 token")
            if self.min_tokens:
                raise ValueError(f"min_tokens: must be 0 with max_tokens 0, got {self.min_tokens}")
            max_tokens = 1
        params = self._sampling_params(max_tokens, self.logprobs)
        prompt_logprobs = self.prompt_logprobs
        if prompt_logprobs is None and self.echo:
            prompt_logprobs = self.logprobs  # the echoed prompt's tokens get logprobs too, as in vLLM
        if prompt_logprobs is None:
            return params
        return dataclasses.replace(params, prompt_logprobs=prompt_logprobs)


class ContentPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def as_template_message(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        # Chat templates know "system", not OpenAI's newer alias "developer".
        return {"role": "system" if self.role == "developer" else self.role, "content": content or ""}


class ResponseFormat(_Body):
    type: str


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = None  # null, as OpenAI allows: no logprobs
    top_logprobs: StrictInt | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    add_generation_prompt: StrictBool = True
    chat_template: str | None = None
    # vLLM's: extra variables of the chat template ({"enable_thinking": false} for Qwen3).
    # Bounded in size by limits.py; names the server sets itself are refused by state.py.
    chat_template_kwargs: dict[str, Any] | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        if self.response_format is not None and self.response_format.type != "text":
            raise ValueError(f"response_format: only type 'text' is supported, got {self.response_format.type!r}")
        if self.tools:
            raise ValueError("tools: tool calling is not supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError(f"top_logprobs: is only allowed with logprobs=true "
                             f"(got top_logprobs={self.top_logprobs} without it)")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        try:
            return self._sampling_params(max_tokens, logprobs)
        except ValueError as exc:
            # Chat's top_logprobs is what SamplingParams calls logprobs (the alternatives per
            # token); its range is checked there, once, and reported under the chat field's name.
            message = str(exc)
            if message.startswith("logprobs: "):
                raise ValueError("top_logprobs: " + message.removeprefix("logprobs: ")) from exc
            raise


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True
    chat_template_kwargs: dict[str, Any] | None = None  # with messages, as on chat completions


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[StrictInt]
