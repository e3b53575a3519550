"""One beam-search request inside the engine: its live beams are ordinary scheduled requests.

Each step every live beam yields a log-distribution. Once all have, the search picks the next
beams; each new beam forks its parent's KV blocks (full blocks shared, the partial one copied),
so no beam ever recomputes its prefix, and the old beams are released.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from miaotui.engine.scheduler import Scheduler
from miaotui.outputs import CompletionOutput, RequestOutput
from miaotui.request import EncoderState, Request, RequestStatus
from miaotui.sample.beam_search import BeamSearchState
from miaotui.sampling_params import BeamSearchParams, SamplingParams


class BeamGroup:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params: BeamSearchParams, eos_token_ids: frozenset[int], max_model_len: int,
                 decoder_prompt: list[int] | None = None, encoder: EncoderState | None = None,
                 cache_salt: str | None = None) -> None:
        """Encoder-decoder models pass the decoder's prompt and the shared encoder state; the
        beams then extend `decoder_prompt` (the user's prompt went to the encoder)."""
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self._decoder_prompt = decoder_prompt if decoder_prompt is not None else prompt_token_ids
        self._encoder = encoder
        self._cache_salt = cache_salt
        max_len = min(len(self._decoder_prompt) + params.max_tokens, max_model_len)
        self.state = BeamSearchState(params, len(self._decoder_prompt), max_len, eos_token_ids)
        # Beams never stop by themselves: the search decides when they end.
        self._beam_params = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)
        self._eos = eos_token_ids
        self._max_model_len = max_model_len
        self._ids = itertools.count()
        self.beams: list[Request] = [self._new_beam([])]
        self._rows: dict[str, torch.Tensor] = {}

    def _new_beam(self, output_ids: list[int]) -> Request:
        beam = Request(f"{self.request_id}#beam{next(self._ids)}", self._decoder_prompt, self._beam_params,
                       self._eos, self._max_model_len, parent_id=self.request_id, is_beam=True,
                       cache_salt=self._cache_salt, encoder=self._encoder)
        for t in output_ids:
            beam.append_output_token(t)
        return beam

    def add_logprobs(self, beam_id: str, row: torch.Tensor) -> None:
        self._rows[beam_id] = row

    @property
    def ready(self) -> bool:
        return all(b.request_id in self._rows for b in self.beams)

    def advance(self, scheduler: Scheduler) -> bool:
        """Run one search step over the collected rows; True when the search is finished."""
        rows = torch.stack([self._rows[b.request_id] for b in self.beams])
        self._rows.clear()
        picks = self.state.step(rows)
        old = self.beams
        self.beams = []
        for parent_idx, token in picks:
            parent = old[parent_idx]
            beam = self._new_beam(parent.output_token_ids + [token])
            if parent.block_ids:
                scheduler.kv.fork(parent, beam)
            scheduler.add_forked(beam)
            self.beams.append(beam)
        for beam in old:  # after the forks: the parents' blocks must live until shared
            scheduler.finish(beam.request_id, RequestStatus.FINISHED_ABORTED)
        return self.state.done

    def abort(self, scheduler: Scheduler) -> None:
        for beam in self.beams:
            scheduler.finish(beam.request_id, RequestStatus.FINISHED_ABORTED)
        self.beams = []

    def output(self, tokenizer: Any) -> RequestOutput:
        completions = []
        for i, hyp in enumerate(self.state.best()):
            ended_on_eos = bool(hyp.token_ids) and hyp.token_ids[-1] in self.state.eos
            completions.append(CompletionOutput(
                index=i, text=tokenizer.decode(hyp.token_ids, skip_special_tokens=True) if tokenizer is not None else "",
                token_ids=hyp.token_ids, cumulative_logprob=hyp.score,
                finish_reason="stop" if ended_on_eos else "length"))
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, completions, finished=True)
