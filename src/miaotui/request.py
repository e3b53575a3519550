"""Request: the one source of per-sequence state. Only the scheduler advances `num_computed_tokens`."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from miaotui.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self.value in ("stop", "length", "abort")


@dataclass(slots=True, eq=False)
class EncoderState:
    """Encoder-decoder models: one user request's encoder input and, once the runner has run the
    encoder, the cross-attention K/V of every decoder layer ([tokens, heads, head_dim] each).

    Shared by reference between all sequences of the request (n > 1 samples, beams): the encoder
    runs once per request, and the K/V lives exactly as long as a sequence still needs it."""

    token_ids: list[int]
    cross_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(slots=True, eq=False)
class Request:
    """One sequence being generated. A user request with n > 1 is n of these (see ParentRequest).

    Invariant: `token_ids == prompt_token_ids + output_token_ids`; the first
    `num_computed_tokens` of them have K/V in the blocks listed in `block_ids`.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int]
    max_model_len: int
    parent_id: str
    index: int = 0
    generator: torch.Generator | None = None
    cache_salt: str | None = None
    # Beam search: the runner returns this sequence's log-distribution instead of sampling, and
    # the engine's beam group (not the scheduler) appends tokens by forking new beams.
    is_beam: bool = False
    # Encoder-decoder models: the encoder side; `prompt_token_ids` is then the decoder's prompt
    # (its start token), and every token list below belongs to the decoder.
    encoder: EncoderState | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    token_ids: list[int] = field(init=False)
    output_token_ids: list[int] = field(init=False, default_factory=list)
    # One (sampled_logprob, [(token_id, logprob), ...top k]) per output token when logprobs is set.
    output_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(init=False, default_factory=list)
    # prompt_logprobs: entry i scores prompt token i + 1 (from the logits at position i) as
    # (logprob, rank, [(token_id, logprob), ...top k]); complete at num_prompt_tokens - 1 entries.
    prompt_logprobs: list[tuple[float, int, list[tuple[int, float]]]] = field(init=False, default_factory=list)
    num_computed_tokens: int = field(init=False, default=0)
    block_ids: list[int] = field(init=False, default_factory=list)
    # Models with sliding-window layers beside full ones: one block table per window group
    # (engine/window_kv.py), as long as block_ids, placeholders where blocks were released.
    window_block_ids: list[list[int]] = field(init=False, default_factory=list)
    # Chained hashes of the full blocks of token_ids computed so far (prefix cache keys), and
    # how many of this request's blocks are registered in the prefix cache.
    block_hashes: list[bytes] = field(init=False, default_factory=list)  # kv_cache.hash_block keys
    num_cached_blocks: int = field(init=False, default=0)
    # n > 1: the other sequences of the same user request, waiting to fork this one's prompt.
    fork_siblings: list[Request] = field(init=False, default_factory=list)
    status: RequestStatus = field(init=False, default=RequestStatus.WAITING)
    stop_reason: int | str | None = field(init=False, default=None)
    # logit_bias as (token ids, biases) on the sampler's device, built on first use and reused
    # every step (the sampler's cache; it dies with the request).
    logit_bias_tensors: tuple[torch.Tensor, torch.Tensor] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Whether prompt positions of this sequence still need their logits scored. n > 1: the
        leader (index 0) scores the prompt for all its samples, which share it."""
        return (self.sampling_params.prompt_logprobs is not None and self.index == 0 and not self.is_beam
                and len(self.prompt_logprobs) < self.num_prompt_tokens - 1)

    def record_prompt_logprobs(self, first: int, entries: list[tuple[float, int, list[tuple[int, float]]]]) -> None:
        """Store the scores of prompt tokens first + 1, first + 2, ... Chunks arrive in order; a
        prefix recomputed after preemption overwrites its own earlier (equal) entries."""
        if first > len(self.prompt_logprobs):
            raise RuntimeError(f"prompt logprobs from position {first}, but only "
                               f"{len(self.prompt_logprobs)} are recorded")
        self.prompt_logprobs[first:first + len(entries)] = entries

    @property
    def max_output_tokens(self) -> int:
        """The output budget: max_tokens, capped so prompt + output fits the context window."""
        room = self.max_model_len - self.num_prompt_tokens
        wanted = self.sampling_params.max_tokens
        return room if wanted is None else min(wanted, room)

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None

    def append_output_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        self.output_token_ids.append(token_id)

    def check_token_stop(self) -> None:
        """Finish on EOS, a stop token id, or the length budget (stop strings live in the detokenizer)."""
        params = self.sampling_params
        last = self.output_token_ids[-1]
        num_out = len(self.output_token_ids)
        if num_out >= params.min_tokens:
            if not params.ignore_eos and last in self.eos_token_ids:
                self.status = RequestStatus.FINISHED_STOPPED
                return
            if last in params.stop_token_id_set:
                self.status = RequestStatus.FINISHED_STOPPED
                self.stop_reason = last
                return
        if num_out >= self.max_output_tokens:
            self.status = RequestStatus.FINISHED_LENGTH
