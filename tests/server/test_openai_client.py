"""The official `openai` client (sync and async, streaming and not) against a real `miaotui serve`
on the embedded model. Greedy outputs are checked against the offline engine on the same model."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

pytestmark = pytest.mark.embedded

PROMPT = "The three primary colors are"
CHAT = [{"role": "user", "content": "Name a fruit that is yellow."}]


@pytest.fixture(scope="module")
def client(embedded_server):
    return openai.OpenAI(base_url=embedded_server.base_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def _num_tokens(server, text: str) -> int:
    return httpx.post(server.base_url + "/tokenize", json={"prompt": text}).json()["count"]


def test_completion_matches_offline_engine_and_usage(client, model, embedded_server, embedded_llm):
    from miaotui import SamplingParams

    resp = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
    offline = embedded_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    choice = resp.choices[0]
    assert choice.text == offline.outputs[0].text
    assert resp.usage.prompt_tokens == _num_tokens(embedded_server, PROMPT) == len(offline.prompt_token_ids)
    assert resp.usage.completion_tokens == len(offline.outputs[0].token_ids)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert choice.finish_reason in ("stop", "length")


def test_streamed_completion_equals_unstreamed_and_counts_usage(client, model):
    whole = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0,
                                      extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_chat_streaming_and_not_agree(client, model, embedded_llm):
    from miaotui import SamplingParams

    whole = client.chat.completions.create(model=model, messages=CHAT, max_tokens=20, temperature=0)
    offline = embedded_llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0]
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == offline.outputs[0].text
    assert whole.usage.prompt_tokens == len(offline.prompt_token_ids)
    stream = client.chat.completions.create(model=model, messages=CHAT, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_n2_returns_two_distinct_indexed_choices(client, model):
    resp = client.chat.completions.create(model=model, messages=CHAT, max_tokens=12, n=2, temperature=1.0,
                                          seed=3, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in resp.choices) == [0, 1]
    assert resp.usage.completion_tokens == 24
    assert resp.choices[0].message.content != resp.choices[1].message.content
    resp = client.completions.create(model=model, prompt=[PROMPT, "Once upon a time"], max_tokens=5, n=2,
                                     temperature=0)
    assert sorted(c.index for c in resp.choices) == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in resp.choices}
    assert by_index[0] == by_index[1] and by_index[2] == by_index[3]  # greedy: samples agree per prompt
    assert by_index[0] != by_index[2]


def test_completion_logprobs(client, model):
    resp = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == resp.usage.completion_tokens
    assert "".join(lp.tokens) == resp.choices[0].text
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and len(top) == 3
        assert max(top.values()) == pytest.approx(value, abs=1e-5)  # greedy picks the top token
        assert token in top


def test_chat_logprobs(client, model):
    resp = client.chat.completions.create(model=model, messages=CHAT, max_tokens=6, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 2 and item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
        assert item.top_logprobs[0].token == item.token
        assert bytes(item.bytes).decode(errors="replace") == item.token


def test_stop_string_ends_the_reply(client, model):
    free = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    word = free.split()[1]
    resp = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0, stop=[word])
    assert resp.choices[0].finish_reason == "stop"
    assert word not in resp.choices[0].text and free.startswith(resp.choices[0].text)


def test_seed_reproducible(client, model):
    def draw(seed):
        return client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=1.0,
                                         seed=seed, extra_body={"ignore_eos": True}).choices[0].text

    assert draw(11) == draw(11)
    assert len({draw(11), draw(12), draw(13)}) > 1


def test_logit_bias_forces_a_token(client, model, embedded_server):
    token = httpx.post(embedded_server.base_url + "/tokenize",
                       json={"prompt": " banana", "add_special_tokens": False}).json()["tokens"][0]
    resp = client.completions.create(model=model, prompt=PROMPT, max_tokens=3, temperature=0,
                                     logit_bias={str(token): 100})
    assert resp.choices[0].text == " banana" * 3


def test_errors_arrive_as_openai_exceptions(client, model):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model, prompt=PROMPT, max_tokens=100000)
    assert "8192" in str(info.value)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt=PROMPT)


def test_async_client_streams_concurrently(embedded_server, model):
    async def main():
        aclient = openai.AsyncOpenAI(base_url=embedded_server.base_url + "/v1", api_key="unused", max_retries=0)

        async def one(i):
            stream = await aclient.chat.completions.create(
                model=model, messages=[{"role": "user", "content": f"Count to {i + 3}."}], max_tokens=10,
                temperature=0, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        async def plain(i):
            r = await aclient.chat.completions.create(
                model=model, messages=[{"role": "user", "content": f"Count to {i + 3}."}], max_tokens=10,
                temperature=0)
            return r.choices[0].message.content

        streamed = await asyncio.gather(*(one(i) for i in range(4)))
        whole = await asyncio.gather(*(plain(i) for i in range(4)))
        await aclient.close()
        return streamed, whole

    streamed, whole = asyncio.run(main())
    assert streamed == whole and all(streamed)
