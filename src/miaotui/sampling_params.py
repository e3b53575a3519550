"""SamplingParams: how one request picks its tokens. Every field is validated; errors name it."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

# Temperatures below this are treated as greedy: dividing logits by ~0 overflows.
_GREEDY_EPS = 1e-5


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float (JSON allows them)
        return False


class RequestOutputKind(enum.Enum):
    """What each RequestOutput of a request holds, as vLLM names it. CUMULATIVE: everything so far
    (each output copies the whole completion: a caller's choice); DELTA: only what is new since
    the previous output, for streams (each output costs its new tokens, whatever the length);
    FINAL_ONLY: one output, when the request finishes (offline batches)."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass(slots=True)
class SamplingParams:
    """Mirrors vLLM's SamplingParams for the fields it has in common.

    temperature == 0 means greedy. top_k <= 0 (or -1) disables top-k. `stop` strings are not
    part of the returned text. `logprobs=k` returns the sampled token's logprob plus the top k;
    `prompt_logprobs=k` returns, for every prompt token after the first, its logprob (and rank)
    plus the top k at that position (RequestOutput.prompt_logprobs).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]
    prompt_logprobs: int | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    stop_strings: tuple[str, ...] = field(init=False, default=())
    # stop_token_ids as a set, built once: the engine tests every sampled token against it.
    stop_token_id_set: frozenset[int] = field(init=False, default=frozenset())

    def __post_init__(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n: must be an integer >= 1, got {self.n!r}")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature: must be a finite number >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k: must be an integer >= -1 (0 or -1 disable it), got {self.top_k!r}")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p: must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed: must be an integer or None, got {self.seed!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(f"max_tokens: must be an integer >= 1 or None, got {self.max_tokens!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens: must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens: {self.min_tokens} is greater than max_tokens {self.max_tokens}"
            )
        self.stop_strings = self._validated_stop(self.stop)
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, (list, tuple)):
                raise ValueError(
                    f"stop_token_ids: must be a list of non-negative integers, got {self.stop_token_ids!r}"
                )
            ids = list(self.stop_token_ids)
            if not all(_is_int(t) and t >= 0 for t in ids):
                raise ValueError(f"stop_token_ids: must be non-negative integers, got {ids!r}")
            self.stop_token_ids = ids
            self.stop_token_id_set = frozenset(ids)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos: must be a bool, got {self.ignore_eos!r}")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(
                f"repetition_penalty: must be a finite number > 0, got {self.repetition_penalty!r}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                raise ValueError(f"{name}: must be in [-2, 2], got {value!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= 20):
                raise ValueError(f"{name}: must be an integer in [0, 20] or None, got {value!r}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError(f"logit_bias: must map token ids to numbers, got {self.logit_bias!r}")
            for token, bias in self.logit_bias.items():
                if not _is_int(token) or token < 0:
                    raise ValueError(f"logit_bias: keys must be token ids >= 0, got {token!r}")
                if not _is_number(bias) or not -100 <= bias <= 100:
                    raise ValueError(f"logit_bias: biases must be in [-100, 100], got {bias!r} for {token}")
        if not isinstance(self.skip_special_tokens, bool):
            raise ValueError(f"skip_special_tokens: must be a bool, got {self.skip_special_tokens!r}")
        if not isinstance(self.output_kind, RequestOutputKind):
            raise ValueError(f"output_kind: must be a RequestOutputKind, got {self.output_kind!r}")

    @staticmethod
    def _validated_stop(stop: object) -> tuple[str, ...]:
        if stop is None:
            return ()
        items = [stop] if isinstance(stop, str) else stop
        if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) for s in items):
            raise ValueError(f"stop: must be a string or a list of strings, got {stop!r}")
        if any(s == "" for s in items):
            raise ValueError("stop: stop strings must not be empty")
        return tuple(items)

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def uses_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


@dataclass(slots=True)
class BeamSearchParams:
    """Beam search as transformers' generate(num_beams=...) does it (same scoring and stopping).

    early_stopping: True stops when beam_width hypotheses are finished; False (the default)
    stops when no running beam can still beat the worst finished one at the current length;
    "never" runs the canonical bound (with max length when length_penalty > 0).
    """

    beam_width: int = 4
    max_tokens: int = 16
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.beam_width) or self.beam_width < 1:
            raise ValueError(f"beam_width: must be an integer >= 1, got {self.beam_width!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens: must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_number(self.length_penalty):
            raise ValueError(f"length_penalty: must be a finite number, got {self.length_penalty!r}")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping: must be true, false or 'never', got {self.early_stopping!r}")
        if (not _is_int(self.num_return_sequences)
                or not 1 <= self.num_return_sequences <= self.beam_width):
            raise ValueError(
                f"num_return_sequences: must be an integer in [1, beam_width={self.beam_width}], "
                f"got {self.num_return_sequences!r}"
            )
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos: must be a bool, got {self.ignore_eos!r}")
