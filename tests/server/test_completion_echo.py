"""/v1/completions with `echo`, `logprobs`, `max_tokens: 0` and vLLM's `prompt_logprobs`, through
the official `openai` client on a tiny random Llama (fp32) with the embedded tokenizer.

With echo the prompt's tokens come first in the logprobs (the first one null), their values are
transformers' log_softmax at each prompt position, and every text_offset points into the
returned text (prompt + completion), streamed or not. echo with max_tokens 0 scores the prompt.
"""

from __future__ import annotations

import openai
import pytest
import torch

from tests.server.conftest import tiny_client

PROMPT = "The capital of France is Paris, and the capital of Italy is"
ATOL = 1e-4


@pytest.fixture(scope="module")
def client(tiny_server_model):
    with tiny_client(tiny_server_model) as c:
        yield c


@pytest.fixture(scope="module")
def model(oai):
    return oai.models.list().data[0].id


@pytest.fixture(scope="module")
def prompt_ids(embedded_tokenizer) -> list[int]:
    ids = embedded_tokenizer.encode(PROMPT)
    assert embedded_tokenizer.decode(ids) == PROMPT
    return ids


@pytest.fixture(scope="module")
def reference(tiny_server_model, prompt_ids) -> torch.Tensor:
    """transformers' log_softmax of its logits at every prompt position."""
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(tiny_server_model[0], dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(hf_model(torch.tensor([prompt_ids])).logits[0].float(), dim=-1)


def _check_offsets(text: str, lp) -> None:
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    for offset, token in zip(lp.text_offset, lp.tokens):
        assert text[offset:].startswith(token), (offset, token, text)
    assert lp.text_offset == sorted(lp.text_offset)


def _check_prompt_part(lp, prompt_ids, reference, embedded_tokenizer, top: int) -> None:
    n = len(prompt_ids)
    assert lp.tokens[:n] == [embedded_tokenizer.decode([t]) for t in prompt_ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset[0] == 0
    for p in range(n - 1):
        assert abs(lp.token_logprobs[p + 1] - reference[p, prompt_ids[p + 1]].item()) < ATOL
        alternatives = lp.top_logprobs[p + 1]
        assert len(alternatives) == top
        best = torch.topk(reference[p], top).values.tolist()
        assert sorted(alternatives.values(), reverse=True) == pytest.approx(best, abs=ATOL)


def test_echo_logprobs_put_the_prompt_tokens_first(oai, model, prompt_ids, reference, embedded_tokenizer):
    extra = {"ignore_eos": True}
    resp = oai.completions.create(model=model, prompt=PROMPT, echo=True, logprobs=2, max_tokens=6,
                                  temperature=0, extra_body=extra)
    choice, n = resp.choices[0], len(prompt_ids)
    lp = choice.logprobs
    assert resp.usage.prompt_tokens == n and resp.usage.completion_tokens == 6
    assert len(lp.tokens) == n + 6
    assert choice.text.startswith(PROMPT)
    _check_offsets(choice.text, lp)
    _check_prompt_part(lp, prompt_ids, reference, embedded_tokenizer, top=2)
    assert lp.text_offset[n] == len(PROMPT)  # the completion starts where the echoed prompt ends
    # The completion's part is what the same request without echo returns, shifted by the prompt.
    plain = oai.completions.create(model=model, prompt=PROMPT, logprobs=2, max_tokens=6, temperature=0,
                                   extra_body=extra).choices[0]
    assert choice.text == PROMPT + plain.text
    assert lp.tokens[n:] == plain.logprobs.tokens
    assert lp.token_logprobs[n:] == pytest.approx(plain.logprobs.token_logprobs, abs=ATOL)
    assert lp.text_offset[n:] == [len(PROMPT) + o for o in plain.logprobs.text_offset]


def test_streamed_echo_sends_the_prompt_and_its_logprobs_first(oai, model, prompt_ids, reference,
                                                               embedded_tokenizer):
    kwargs = dict(model=model, prompt=PROMPT, echo=True, logprobs=1, max_tokens=5, temperature=0,
                  extra_body={"ignore_eos": True})
    whole = oai.completions.create(**kwargs).choices[0]
    chunks = [c for c in oai.completions.create(stream=True, **kwargs) if c.choices]
    first = chunks[0].choices[0]
    n = len(prompt_ids)
    assert first.text.startswith(PROMPT)
    assert len(first.logprobs.tokens) > n  # the prompt, then the first generated token(s)
    _check_prompt_part(first.logprobs, prompt_ids, reference, embedded_tokenizer, top=1)
    text = "".join(c.choices[0].text for c in chunks)
    tokens = [t for c in chunks for t in c.choices[0].logprobs.tokens]
    offsets = [o for c in chunks for o in c.choices[0].logprobs.text_offset]
    values = [v for c in chunks for v in c.choices[0].logprobs.token_logprobs]
    assert text == whole.text and tokens == whole.logprobs.tokens and offsets == whole.logprobs.text_offset
    assert values[0] is None and values[1:] == pytest.approx(whole.logprobs.token_logprobs[1:], abs=ATOL)
    assert chunks[-1].choices[0].finish_reason == "length"
    # Without logprobs the first chunk still carries the echoed prompt.
    plain = [c for c in oai.completions.create(model=model, prompt=PROMPT, echo=True, max_tokens=3,
                                               temperature=0, stream=True) if c.choices]
    assert plain[0].choices[0].text.startswith(PROMPT) and plain[0].choices[0].logprobs is None


def test_echo_with_max_tokens_zero_scores_the_prompt(oai, model, prompt_ids, reference, embedded_tokenizer):
    resp = oai.completions.create(model=model, prompt=PROMPT, echo=True, logprobs=3, max_tokens=0)
    choice, n = resp.choices[0], len(prompt_ids)
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert len(choice.logprobs.tokens) == n
    _check_offsets(choice.text, choice.logprobs)
    _check_prompt_part(choice.logprobs, prompt_ids, reference, embedded_tokenizer, top=3)
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (n, 0, n)
    # Streamed: one chunk with the prompt and its logprobs, and a usage of no completion tokens.
    chunks = list(oai.completions.create(model=model, prompt=PROMPT, echo=True, logprobs=3, max_tokens=0,
                                         stream=True, stream_options={"include_usage": True}))
    content = [c for c in chunks if c.choices]
    assert len(content) == 1 and content[0].choices[0].text == PROMPT
    assert content[0].choices[0].logprobs.tokens == choice.logprobs.tokens
    assert content[0].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 0
    # A batch of prompts with n = 2: every choice echoes its own prompt, and only it.
    batch = oai.completions.create(model=model, prompt=[PROMPT, "Hello there"], echo=True, max_tokens=0, n=2,
                                   temperature=1.0, logprobs=0)
    assert [c.text for c in sorted(batch.choices, key=lambda c: c.index)] == [PROMPT, PROMPT, "Hello there",
                                                                               "Hello there"]
    assert batch.usage.completion_tokens == 0


def test_max_tokens_zero_without_echo_is_a_400_naming_the_field(client, oai, model):
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model=model, prompt=PROMPT, max_tokens=0)
    resp = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 0})
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["param"] == "max_tokens" and "echo" in error["message"]


def test_prompt_logprobs_field_as_vllm_returns_it(client, oai, model, prompt_ids, reference):
    resp = oai.completions.create(model=model, prompt=PROMPT, max_tokens=2, temperature=0,
                                  extra_body={"prompt_logprobs": 3})
    choice = resp.choices[0]
    assert choice.logprobs is None and not choice.text.startswith(PROMPT)
    scored = choice.prompt_logprobs
    assert len(scored) == len(prompt_ids) and scored[0] is None
    for p, entry in enumerate(scored[1:]):
        token = prompt_ids[p + 1]
        assert str(token) in entry and len(entry) in (3, 4)
        assert abs(entry[str(token)]["logprob"] - reference[p, token].item()) < ATOL
        assert sorted(e["rank"] for e in entry.values())[:3] == [1, 2, 3]
        for tid, e in entry.items():
            assert abs(e["logprob"] - reference[p, int(tid)].item()) < ATOL
    # Streamed: the first chunk carries them.
    chunks = [c for c in oai.completions.create(model=model, prompt=PROMPT, max_tokens=2, temperature=0,
                                                stream=True, extra_body={"prompt_logprobs": 3}) if c.choices]
    assert chunks[0].choices[0].prompt_logprobs == scored
    resp = client.post("/v1/completions", json={"prompt": PROMPT, "prompt_logprobs": 50})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "prompt_logprobs"
