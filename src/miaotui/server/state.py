"""What the routes share: the engine (once loaded), admission control, the model's names."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from miaotui.config import ServerConfig
from miaotui.engine.async_engine import AsyncLLMEngine
from miaotui.sampling_params import SamplingParams
from miaotui.server.errors import APIError
from miaotui.server.metrics import ServerMetrics
from miaotui.server.template_worker import ChatTemplateRenderer, RenderLimitError
from miaotui.tokenizer import chat_template_inputs
from miaotui.tokenizer_core import CoreTokenizer, transformers_tokenizer

logger = logging.getLogger("miaotui.server")

# The clause of every 400 that a server started with --skip-tokenizer-init (an engine whose
# tokenizer is None: token-id prompts only, outputs without text) gives for what needs text.
NO_TOKENIZER = "this server runs without a tokenizer (--skip-tokenizer-init)"
# Work on up to this many characters or token ids runs on the event loop (well under a
# millisecond); more, in a thread.
_INLINE_WORK_SIZE = 16 * 1024


async def sized_work(size: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs) on the event loop when `size` (characters or ids) is small, else in a
    thread: the event loop (every other stream, /health) never waits for a request's bulk."""
    if size <= _INLINE_WORK_SIZE:
        return fn(*args, **kwargs)
    return await asyncio.to_thread(fn, *args, **kwargs)


# What a render passes besides its variables (transformers' render_jinja_template) and the
# globals of its environment: a request's chat_template_kwargs may not replace them.
_RESERVED_VARIABLES = frozenset({"messages", "tools", "documents", "add_generation_prompt",
                                 "raise_exception", "strftime_now"})


def _extra_variables(kwargs: dict[str, Any], variables: dict[str, Any]) -> dict[str, Any]:
    taken = sorted(k for k in kwargs if k in _RESERVED_VARIABLES or k in variables)
    if taken:
        raise APIError(400, f"chat_template_kwargs: may not set {', '.join(map(repr, taken))}, which the server "
                            "passes to the chat template itself", param="chat_template_kwargs")
    return kwargs


@dataclass(frozen=True, slots=True)
class ChatPrompt:
    """A rendered chat prompt: its ids, its text and the template that rendered it."""

    ids: list[int]
    text: str
    template: str


class Admission:
    """Sequences a request holds in the server's admission count; `release()` gives them back,
    once, however many paths call it."""

    __slots__ = ("_state", "_sequences")

    def __init__(self, state: ServerState, sequences: int) -> None:
        self._state: ServerState | None = state
        self._sequences = sequences

    def release(self) -> None:
        if self._state is not None:
            self._state.in_flight -= self._sequences
            self._state = None


class ServerState:
    """Loads the engine in a background thread so /health can answer 503 while it loads.

    Admission: at most max_num_seqs running plus `max_queued_requests` waiting sequences are
    accepted; one more gets 429. Counted here, on the event loop, so no lock is needed.
    """

    def __init__(self, config: ServerConfig, engine_factory: Callable[[], AsyncLLMEngine]) -> None:
        self.config = config
        self._factory = engine_factory
        self.engine: AsyncLLMEngine | None = None
        self.load_error: BaseException | None = None
        self.in_flight = 0
        self.metrics = ServerMetrics(self._stats)
        self.draining = False
        self.renderer = ChatTemplateRenderer()  # chat templates render in its worker processes

    # --- lifecycle ---------------------------------------------------------------------------
    def start_loading(self, on_error: Callable[[BaseException], None] | None = None) -> threading.Thread:
        def load() -> None:
            try:
                self.engine = self._factory()
                logger.info("model loaded: %s (context %d tokens)", self.model_name, self.max_model_len)
            except BaseException as exc:  # noqa: BLE001 - the log has it; /health says only "failed"
                self.load_error = exc
                logger.error("loading the model failed: %s", exc)
                if on_error is not None:
                    on_error(exc)
                return
            if self.tokenizer is None:  # --skip-tokenizer-init: no chat template to prepare
                return
            # Chat templates need the transformers tokenizer: load it now, in the background,
            # rather than in the first chat request (which meanwhile waits for it, if it comes).
            try:
                full = transformers_tokenizer(self.tokenizer)
            except Exception as exc:  # noqa: BLE001 - plain prompts still work; a chat request reports it
                logger.warning("loading the chat template's tokenizer failed: %s", exc)
                return
            # Likewise a render worker (it imports transformers in its own process), where chat can happen.
            if getattr(full, "chat_template", None) or self.config.chat_template \
                    or self.config.trust_request_chat_template:
                self.renderer.prestart()

        thread = threading.Thread(target=load, name="miaotui-load", daemon=True)
        thread.start()
        return thread

    def shutdown(self) -> None:
        self.renderer.shutdown()
        if self.engine is not None:
            self.engine.shutdown()

    # --- engine access -----------------------------------------------------------------------
    @property
    def llm_engine(self):
        return self.engine.engine

    @property
    def tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    async def chat_prompt_ids(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                              chat_template: str | None = None) -> list[int]:
        """The ids of `chat_prompt`."""
        return (await self.chat_prompt(messages, add_generation_prompt, chat_template)).ids

    async def chat_prompt(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                          chat_template: str | None = None,
                          template_kwargs: dict[str, Any] | None = None) -> ChatPrompt:
        """`messages` rendered with the request's chat template (only with
        --trust-request-chat-template), else --chat-template, else the model's, and tokenized as
        `tokenizer.chat_prompt_ids` does. The render runs in a worker process under the server's
        time and size limits (template_worker.py): a template never stalls the event loop.
        While the transformers tokenizer is still loading (tokenizer_core.py), the template is
        looked up in a thread. Past a limit: 400 naming it; no tokenizer or worker: 503.
        `template_kwargs` (a request's chat_template_kwargs) are extra variables of the template;
        one naming a variable the server sets (messages, the special tokens, ...) is a 400."""
        if chat_template and not self.config.trust_request_chat_template:
            raise APIError(400, "chat_template: this server does not render chat templates sent by clients "
                                "(a template is code the server runs); its operator can allow them with "
                                "--trust-request-chat-template", param="chat_template")
        param = "chat_template" if chat_template else "messages"
        tokenizer = self.tokenizer
        args = (tokenizer, messages, chat_template or self.config.chat_template)
        try:
            if isinstance(tokenizer, CoreTokenizer) and tokenizer.full_pending:
                template, variables = await asyncio.to_thread(chat_template_inputs, *args)
            else:
                template, variables = chat_template_inputs(*args)
            if template_kwargs:
                variables = variables | _extra_variables(template_kwargs, variables)
            text = await self.renderer.render(template, messages, variables, add_generation_prompt,
                                              self.config.chat_template_timeout_s, self.chat_template_max_chars)
        except RenderLimitError as exc:
            logger.warning("a chat template render was stopped: %s", exc)
            raise APIError(400, f"{param}: {exc}", param=param) from exc
        except RuntimeError as exc:
            raise APIError(503, f"chat templates are unavailable: {exc}") from exc
        # The template already wrote any BOS it wants; do not let the tokenizer add a second one.
        return ChatPrompt(await self.encode(text, add_special_tokens=False), text, template)

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The tokenizer's ids of `text`, off the event loop when long (`sized_work`)."""
        return await sized_work(len(text), self.tokenizer.encode, text, add_special_tokens=add_special_tokens)

    async def tokenize_all(self, prompts: list[str | list[int]]) -> list[list[int]]:
        """`tokenize` of each prompt, off the event loop when they are long (`sized_work`)."""
        return await sized_work(sum(len(p) for p in prompts), lambda: [self.tokenize(p) for p in prompts])

    @property
    def chat_template_max_chars(self) -> int:
        """The output limit of a render: --chat-template-max-chars, else room for a prompt that
        fills the context at 16 characters a token (a megabyte at least)."""
        return self.config.chat_template_max_chars or max(2**20, 16 * self.max_model_len)

    @property
    def max_model_len(self) -> int:
        return self.llm_engine.max_model_len

    @property
    def model_name(self) -> str:
        if self.config.served_model_name:
            return self.config.served_model_name
        return self.llm_engine.model_path.rstrip("/").rsplit("/", 1)[-1] if self.engine else "loading"

    def engine_or_503(self) -> AsyncLLMEngine:
        """The engine, or a 503 saying why not. Never with a load or engine error's text (paths,
        device messages): a client may be anyone, and the log has it."""
        if self.load_error is not None:
            raise APIError(503, "the model failed to load; the server log has the details")
        if self.engine is None:
            raise APIError(503, "the model is still loading; retry shortly", headers={"Retry-After": "5"})
        if not self.engine.is_running:
            raise APIError(503, "the engine has stopped; the server log has the details")
        if self.draining:
            raise APIError(503, "the server is shutting down")
        return self.engine

    def check_model(self, requested: str | None) -> str:
        """The served name; a request naming another model is a 404 (no name means this one)."""
        name = self.model_name
        if requested not in (None, "", name):
            raise self.unknown_model(requested)
        return name

    def unknown_model(self, requested: str) -> APIError:
        return APIError(404, f"The model `{requested}` does not exist; this server serves "
                             f"`{self.model_name}`.", param="model", code="model_not_found")

    def model_card(self) -> dict[str, Any]:
        """The model object of GET /v1/models and /v1/models/{id}."""
        return {"id": self.model_name, "object": "model", "created": 0, "owned_by": "miaotui",
                "max_model_len": self.max_model_len}

    def require_tokenizer(self, what: str, param: str | None) -> Any:
        """The tokenizer; without one a 400 that says `what` needs it and names the flag."""
        if self.tokenizer is None:
            raise APIError(400, f"{param + ': ' if param else ''}{what} needs a tokenizer, and {NO_TOKENIZER}",
                           param=param)
        return self.tokenizer

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt: must not be empty")
            tokenizer = self.tokenizer
            if tokenizer is None:
                raise APIError(400, f"prompt: a text prompt needs a tokenizer, and {NO_TOKENIZER}: send "
                                    "prompts as token ids", param="prompt")
            return tokenizer.encode(prompt)
        self.llm_engine.check_prompt_ids(prompt)
        return list(prompt)

    def detokenize(self, ids: list[int]) -> str:
        return self.require_tokenizer("turning token ids into text", "tokens").decode(ids)

    def decode_token(self, token_id: int) -> str:
        """One token's text; "" without a tokenizer (as the engine's outputs have no text then)."""
        return "" if self.tokenizer is None else self.tokenizer.decode([token_id])

    def check_params(self, params: SamplingParams) -> None:
        """The engine's limits, and what a server without a tokenizer cannot do, before admission
        (the engine would refuse it only once the request is queued, in a stream's body)."""
        self.llm_engine.check_params(params)
        if self.tokenizer is None and params.stop_strings:
            raise ValueError(f"stop: stop strings are matched in the text, and {NO_TOKENIZER}; "
                             "use stop_token_ids")

    # --- admission -----------------------------------------------------------------------------
    def admit(self, sequences: int) -> Admission:
        """Count `sequences` in, or a 429: before any work is done for the request."""
        limit = self.llm_engine.scheduler.config.max_num_seqs + self.config.max_queued_requests
        if self.in_flight + sequences > limit:
            raise APIError(429, f"the server is at capacity ({self.in_flight} sequences in flight, limit "
                                f"{limit}); retry later", headers={"Retry-After": "1"})
        self.in_flight += sequences
        return Admission(self, sequences)

    def _stats(self) -> dict[str, int] | None:
        if self.engine is None:
            return None
        return self.llm_engine.stats() | {"admitted": self.in_flight}
