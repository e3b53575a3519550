"""Logits -> next tokens, on the logits' device, in fp32.

Order (as in transformers' processors): penalties, temperature, top-k, top-p, min-p, then an
exponential race (argmax of p / Exp(1) noise), which draws exactly from p and needs no host
sync. Seeded requests use their own torch.Generator, so their draws do not depend on the batch.
Logprobs are those of the model's raw distribution, before any processing (as vLLM returns).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from miaotui.request import Request


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    # Per row: None, or (sampled token logprob, [(token_id, logprob), ... top k]).
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]


def apply_penalties(logits: torch.Tensor, token_ids: list[int], output_token_ids: list[int],
                    repetition: float, presence: float, frequency: float) -> torch.Tensor:
    """One row [V]. Repetition as transformers (over prompt and output); presence/frequency as
    OpenAI (over output tokens only)."""
    if repetition != 1.0 and token_ids:
        ids = torch.tensor(sorted(set(token_ids)), device=logits.device)
        score = logits[ids]
        logits[ids] = torch.where(score < 0, score * repetition, score / repetition)
    if (presence or frequency) and output_token_ids:
        counts = torch.bincount(torch.tensor(output_token_ids, device=logits.device),
                                minlength=logits.shape[-1]).to(logits.dtype)
        logits -= frequency * counts + presence * (counts > 0).to(logits.dtype)
    return logits


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """One row [V] of temperature-scaled logits; filtered entries become -inf."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum <= 1 - top_p
        remove[-1] = False
        logits = logits.masked_fill(remove.scatter(0, sorted_idx, remove), float("-inf"))
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    return logits


def build_logit_bias(logit_bias: dict[int, float], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids, biases) for index_add into a logits row `like` (its device and dtype)."""
    ids = torch.tensor(list(logit_bias), dtype=torch.long, device=like.device)
    return ids, torch.tensor(list(logit_bias.values()), dtype=like.dtype, device=like.device)


def logit_bias_tensors(request: Request, row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The request's logit_bias tensors, built once per request instead of once per step."""
    cached = request.logit_bias_tensors
    if cached is None or cached[1].device != row.device or cached[1].dtype != row.dtype:
        cached = request.logit_bias_tensors = build_logit_bias(request.sampling_params.logit_bias, row)
    return cached


class Sampler:
    def __init__(self, seed: int | None, device: torch.device) -> None:
        # Draws for unseeded requests; seeded ones carry their own generator. seed=None (the
        # default) seeds from the OS, so every process draws fresh randomness, as vLLM,
        # llama.cpp and Ollama do; an engine seed makes a whole run reproducible.
        self.generator = torch.Generator(device=device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        logits = logits.float()
        raw_logprobs = None
        if any(r.sampling_params.logprobs is not None for r in requests):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        chosen = torch.empty(len(requests), dtype=torch.long, device=logits.device)
        # Plain greedy rows (no bias, no penalties) take one batched argmax instead of one each.
        plain = [i for i, r in enumerate(requests) if r.sampling_params.greedy and not r.sampling_params.logit_bias
                 and not r.sampling_params.uses_penalties]
        if len(plain) == len(requests):
            chosen = logits.argmax(-1)
        elif plain:
            rows = torch.tensor(plain, dtype=torch.long, device=logits.device)
            chosen[rows] = logits.index_select(0, rows).argmax(-1)
        done = set(plain)
        for i, request in enumerate(requests):
            if i in done:
                continue
            params = request.sampling_params
            row = logits[i]
            if params.logit_bias:
                # OpenAI semantics: added to the logits before any other processing; the
                # returned logprobs stay those of the raw model.
                row = row.index_add(0, *logit_bias_tensors(request, row))
            if params.uses_penalties:
                row = apply_penalties(row.clone(), request.token_ids, request.output_token_ids,
                                      params.repetition_penalty, params.presence_penalty,
                                      params.frequency_penalty)
            if params.greedy:
                chosen[i] = row.argmax()
                continue
            row = filter_logits(row / params.temperature, params.top_k, params.top_p, params.min_p)
            probs = row.softmax(-1)
            noise = torch.empty_like(probs).exponential_(generator=request.generator or self.generator)
            chosen[i] = (probs / noise).argmax()
        token_ids = chosen.tolist()
        logprobs: list[tuple[float, list[tuple[int, float]]] | None] = [None] * len(requests)
        if raw_logprobs is not None:
            for i, request in enumerate(requests):
                k = request.sampling_params.logprobs
                if k is None:
                    continue
                row = raw_logprobs[i]
                top = torch.topk(row, k) if k else None
                top_list = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
                logprobs[i] = (row[token_ids[i]].item(), top_list)
        return SamplerOutput(token_ids, logprobs)
