"""The logprobs JSON of OpenAI's endpoints (and vLLM's extensions) from the engine's Logprob entries.

Completions: {"tokens", "token_logprobs", "top_logprobs", "text_offset"}; chat: {"content": [...]}
with each token's bytes; vLLM's `prompt_logprobs`. A token is named by its text, or `token_id:N`
with vLLM's return_tokens_as_token_ids (the only name a server without a tokenizer has).
"""

from __future__ import annotations

from miaotui.outputs import CompletionOutput, Logprob
from miaotui.server.state import ServerState


def token_label(tid: int, lp: Logprob | None, as_ids: bool) -> str | None:
    """How logprobs name a token: its text, or `token_id:N` (`as_ids`)."""
    if as_ids:
        return f"token_id:{tid}"
    return lp.decoded_token if lp is not None else None


def _ranked(entry: dict[int, Logprob] | None, top: int | None = None) -> list[tuple[int, Logprob]]:
    """An entry's ranked alternatives (rank 1 first), those within `top` when given; the sampled
    token, when outside them, has rank None and is left out."""
    return sorted(((t, lp) for t, lp in (entry or {}).items()
                   if lp.rank is not None and (top is None or lp.rank <= top)), key=lambda item: item[1].rank)


def completion_logprobs(state: ServerState, tokens: list[tuple[int, dict[int, Logprob] | None]],
                        text_offset: int, top: int, as_ids: bool = False) -> dict:
    """OpenAI's logprobs of (token id, its entry) pairs; an entry of None (the first prompt token,
    which nothing scores) gives null logprobs. `text_offset`: where the first token starts in the
    choice's text; each next token starts where the previous one's text ends (as vLLM counts).
    top_logprobs holds the entries ranked within the `top` requested. `as_ids`: tokens are named
    `token_id:N`; the offsets still index the text."""
    pieces, token_lps, tops, offsets = [], [], [], []
    offset = text_offset
    for tid, entry in tokens:
        chosen = entry.get(tid) if entry is not None else None
        text = chosen.decoded_token if chosen is not None else state.decode_token(tid)
        pieces.append(f"token_id:{tid}" if as_ids else text)
        token_lps.append(chosen.logprob if chosen is not None else None)
        tops.append({token_label(t, lp, as_ids): lp.logprob for t, lp in _ranked(entry, top)} or None)
        offsets.append(offset)
        offset += len(text or "")
    return {"tokens": pieces, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def join_logprobs(head: dict, tail: dict) -> dict:
    return {key: head[key] + tail[key] for key in head}


def prompt_logprobs_json(prompt_logprobs: list[dict[int, Logprob] | None] | None) -> list | None:
    """vLLM's `prompt_logprobs` of a choice: null first, then {token id: logprob, rank, text}."""
    if prompt_logprobs is None:
        return None
    return [None if entry is None else
            {str(tid): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token}
             for tid, lp in entry.items()}
            for entry in prompt_logprobs]


def chat_logprobs(out: CompletionOutput, start: int, as_ids: bool = False) -> dict:
    """`bytes` are always the token's text (UTF-8), `token` its text or `token_id:N` (`as_ids`)."""
    content = []
    for tid, entry in zip(out.token_ids[start:], (out.logprobs or [])[start:]):
        chosen = entry[tid]
        content.append({
            "token": token_label(tid, chosen, as_ids), "logprob": chosen.logprob,
            "bytes": list((chosen.decoded_token or "").encode()),
            "top_logprobs": [{"token": token_label(t, lp, as_ids), "logprob": lp.logprob,
                              "bytes": list((lp.decoded_token or "").encode())}
                             for t, lp in _ranked(entry)],
        })
    return {"content": content}
