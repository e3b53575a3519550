"""Beam search bookkeeping, step for step the algorithm of transformers' `generate(num_beams=...)`.

The engine computes one next-token log-distribution per running beam; `BeamSearchState.step`
turns them into the next running beams (parent index + token) and keeps the best finished
hypotheses. Scores are kept as float32 tensors and combined with the same operations as the
reference, so ties and the -1e9 masks resolve the same way and the outputs match exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from miaotui.sampling_params import BeamSearchParams

_MASK = -1.0e9


@dataclass(slots=True)
class Hypothesis:
    token_ids: list[int]  # generated tokens (prompt excluded), EOS included when it ended on one
    score: float  # sum of logprobs / generated_length ** length_penalty


class BeamSearchState:
    def __init__(self, params: BeamSearchParams, prompt_len: int, max_len: int,
                 eos_token_ids: frozenset[int]) -> None:
        self.params = params
        self.prompt_len = prompt_len
        self.max_len = max_len  # prompt + generated tokens never exceed this
        self.eos = frozenset() if params.ignore_eos else eos_token_ids
        nb = params.beam_width
        self.beams_to_keep = max(2, 1 + len(self.eos)) * nb
        self.running_scores = torch.zeros(1)  # one running beam (the prompt) at the start
        self.running_tokens: list[list[int]] = [[]]
        self.finished_scores = torch.full((nb,), _MASK)
        self.finished_flags = torch.zeros(nb, dtype=torch.bool)
        self.finished_tokens: list[list[int] | None] = [None] * nb
        self.unsatisfied = True
        self.cur_len = prompt_len
        self.done = False

    def step(self, logprobs: torch.Tensor) -> list[tuple[int, int]]:
        """logprobs [num_running, vocab] (log_softmax, fp32) -> next beams as (parent, token).

        Returns [] once the search is done; `best()` then has the results."""
        nb = self.params.beam_width
        lp = logprobs.float().cpu()
        scores = self.running_scores
        if lp.shape[0] == 1 and nb > 1:  # the reference starts from nb copies, all but one masked
            lp = lp.expand(nb, -1)
            scores = torch.cat([scores, torch.full((nb - 1,), _MASK)])
        vocab = lp.shape[1]
        acc = (lp + scores[:, None]).reshape(-1)
        top_scores, top_idx = torch.topk(acc, k=min(self.beams_to_keep, acc.numel()))
        parents = (top_idx // vocab).tolist()
        tokens = (top_idx % vocab).tolist()
        seqs = [self.running_tokens[p] + [t] for p, t in zip(parents, tokens)]
        new_len = self.cur_len + 1
        hits = torch.tensor([t in self.eos or new_len >= self.max_len for t in tokens])

        # Next running beams: the best nb candidates that did not just finish.
        running = top_scores + hits.to(torch.float32) * _MASK
        next_idx = torch.topk(running, k=nb).indices
        next_scores = running[next_idx]

        # Finished hypotheses: candidates among the top nb that hit EOS or the length limit.
        top_mask = torch.arange(len(tokens)) < nb
        just_finished = hits & top_mask
        cand = top_scores / ((new_len - self.prompt_len) ** self.params.length_penalty)
        full = bool(self.finished_flags.all()) and self.params.early_stopping is True
        cand = cand + float(full) * _MASK
        cand = cand + float(not self.unsatisfied) * _MASK
        cand = cand + (~just_finished) * _MASK
        merged_scores = torch.cat([self.finished_scores, cand])
        merged_flags = torch.cat([self.finished_flags, just_finished])
        merged_tokens = self.finished_tokens + seqs
        keep = torch.topk(merged_scores, k=nb).indices
        self.finished_scores = merged_scores[keep]
        self.finished_flags = merged_flags[keep]
        self.finished_tokens = [merged_tokens[i] for i in keep.tolist()]

        self.cur_len = new_len
        self._update_heuristic(next_scores)
        self.running_scores = next_scores
        picked = next_idx.tolist()
        self.running_tokens = [seqs[i] for i in picked]
        open_beam = not (bool(self.finished_flags.all()) and self.params.early_stopping is True)
        self.done = not (self.unsatisfied and open_beam and not bool(hits.all()))
        if self.done:
            return []
        return [(parents[i], tokens[i]) for i in picked]

    def _update_heuristic(self, running_scores: torch.Tensor) -> None:
        lp = self.params.length_penalty
        if self.params.early_stopping == "never" and lp > 0.0:
            best_len = self.max_len - self.prompt_len
        else:
            best_len = self.cur_len - self.prompt_len
        best_possible = running_scores[:1] / (best_len ** lp)
        worst = torch.where(self.finished_flags, self.finished_scores.min(), torch.tensor(_MASK))
        self.unsatisfied = self.unsatisfied and bool((best_possible > worst).any())

    def best(self) -> list[Hypothesis]:
        """Finished hypotheses, best first, at most num_return_sequences."""
        out = [Hypothesis(list(t), float(s))
               for t, s, f in zip(self.finished_tokens, self.finished_scores.tolist(),
                                  self.finished_flags.tolist()) if f and t is not None]
        return out[: self.params.num_return_sequences]
