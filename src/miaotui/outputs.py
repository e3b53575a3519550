"""User-facing results, shaped like vLLM's so its users feel at home."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass(slots=True)
class CompletionOutput:
    """One of the n completions of a request: cumulative, or what is new since the last output
    (SamplingParams.output_kind DELTA; `cumulative_logprob` is always the running total).
    `finish_reason` is None until done."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    """`prompt_logprobs` (when SamplingParams.prompt_logprobs is set): None for the first prompt
    token, then per prompt token a dict holding that token and the top k at its position."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None

    def add_delta(self, delta: RequestOutput) -> None:
        """Append a later DELTA output of the same request to this one, in place: the cost is the
        delta's size. A delta lists only the completions that advanced, so one may be new here."""
        mine = {o.index: o for o in self.outputs}
        for d in delta.outputs:
            o = mine.get(d.index)
            if o is None:
                o = mine[d.index] = CompletionOutput(d.index)
                self.outputs.append(o)
                self.outputs.sort(key=lambda c: c.index)
            o.text += d.text
            o.token_ids.extend(d.token_ids)
            if d.logprobs is not None:
                if o.logprobs is None:
                    o.logprobs = []
                o.logprobs.extend(d.logprobs)
            o.cumulative_logprob = d.cumulative_logprob
            o.finish_reason, o.stop_reason = d.finish_reason, d.stop_reason
        self.finished = delta.finished
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
