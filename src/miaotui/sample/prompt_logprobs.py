"""Prompt logprobs: how the model scores each prompt token given the tokens before it.

Computed from the raw model logits (log_softmax in fp32, before any sampling processing), as
vLLM returns them. The logits at position p score prompt token p + 1. Rows are scored in slices,
so a long prefill chunk adds at most one slice's worth of fp32 log-distributions at a time.
"""

from __future__ import annotations

import torch

# Rows per log_softmax slice: bounds the extra memory to ROWS x vocab fp32 values.
_ROWS = 256

# (logprob of the token, its rank (1 = most likely), [(token_id, logprob), ...top k]).
PromptLogprob = tuple[float, int, list[tuple[int, float]]]


def score_tokens(logits: torch.Tensor, targets: list[int], k: int) -> list[PromptLogprob]:
    """logits [rows, vocab]; `targets[i]` the token that follows row i. One device-to-host copy
    per slice. A token's rank counts the tokens strictly more likely, plus one."""
    if logits.shape[0] != len(targets):
        raise ValueError(f"targets: {len(targets)} tokens for {logits.shape[0]} rows of logits")
    out: list[PromptLogprob] = []
    for lo in range(0, len(targets), _ROWS):
        rows = torch.log_softmax(logits[lo:lo + _ROWS].float(), dim=-1)
        ids = torch.tensor(targets[lo:lo + _ROWS], dtype=torch.long, device=rows.device)
        chosen = rows.gather(1, ids[:, None])
        ranks = (rows > chosen).sum(-1) + 1
        values, indices = torch.topk(rows, k, dim=-1) if k else (rows[:, :0], rows[:, :0])
        # Ranks and token ids travel as fp32, exact below 2**24 (any vocabulary).
        host = torch.cat([chosen, ranks[:, None].to(rows.dtype), values, indices.to(rows.dtype)], dim=1).tolist()
        for row in host:
            top = [(int(t), v) for t, v in zip(row[2 + k:], row[2:2 + k])]
            out.append((row[0], int(row[1]), top))
    return out
