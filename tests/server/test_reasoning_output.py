"""Reasoning output on the chat route: the thinking in `reasoning_content`, the answer in
`content`, split alike streamed and not; chat_template_kwargs reach the template."""

from __future__ import annotations

import json

import pytest

from miaotui.outputs import CompletionOutput, RequestOutput
from tests.server.conftest import openai_over, tiny_client

USER = [{"role": "user", "content": "Hello there"}]
# A Qwen3-like template: it closes an empty thinking block in the prompt when thinking is off.
QWEN_LIKE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
             "enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
# A template that opens the thinking for the model (DeepSeek-R1 distills, Qwen3 thinking-only
# releases) unless told not to; it also writes a kwarg, to show that kwargs reach it.
OPENING = ("{% for m in messages %}<<{{ m.role }}>> {{ m.content }}\n{% endfor %}<<{{ flavour | default('plain') }}>>"
           "{% if enable_thinking is defined and enable_thinking is false %}<think></think>{% else %}<think>\n"
           "{% endif %}")
# The scripted reply: tags split across deltas.
PIECES = ["<th", "ink>\nLet me", " think.</th", "ink", ">\n\nThe ans", "wer."]


def _scripted(pieces):
    """An engine.generate that streams `pieces` as DELTA outputs, one token each."""
    async def generate(prompt, params, request_id, cache_salt=None):
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            yield RequestOutput(request_id, None, list(prompt), [CompletionOutput(
                0, piece, [100 + i], finish_reason="stop" if last else None)], finished=last)
    return generate


@pytest.fixture(scope="module")
def qwen_like(tiny_server_model):
    with tiny_client(tiny_server_model, chat_template=QWEN_LIKE) as client:
        yield client


@pytest.fixture(scope="module")
def opening(tiny_server_model):
    with tiny_client(tiny_server_model, chat_template=OPENING) as client:
        yield client


def _events(reply) -> list[dict]:
    return [json.loads(line[6:]) for line in reply.text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


def _streamed_split(client, body) -> tuple[str, str, list[dict]]:
    reply = client.post("/v1/chat/completions", json=body | {"stream": True})
    assert reply.status_code == 200, reply.text
    deltas = [e["choices"][0]["delta"] for e in _events(reply) if e.get("choices")]
    return ("".join(d.get("reasoning_content") or "" for d in deltas),
            "".join(d.get("content") or "" for d in deltas), deltas)


@pytest.fixture
def scripted(qwen_like, monkeypatch):
    def use(pieces):
        monkeypatch.setattr(qwen_like.app.state.miaotui.engine, "generate", _scripted(pieces))
        return qwen_like
    return use


def test_the_thinking_is_reasoning_content_streamed_or_not(scripted):
    client = scripted(PIECES)
    body = {"messages": USER, "max_tokens": 8}
    reply = client.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    message = reply.json()["choices"][0]["message"]
    assert message == {"role": "assistant", "reasoning_content": "\nLet me think.", "content": "\n\nThe answer."}
    thought, content, deltas = _streamed_split(client, body)
    assert (thought, content) == ("\nLet me think.", "\n\nThe answer.")
    assert not any("<" in (d.get("reasoning_content") or "") + (d.get("content") or "") for d in deltas)
    assert any("reasoning_content" in d and "content" not in d for d in deltas)


@pytest.mark.parametrize("pieces,thought,content", [
    (["Just ", "an answer."], None, "Just an answer."),
    (["<think>", "cut short"], "cut short", None),
    (["<think>all</think>"], "all", None),
    (["<thi"], None, "<thi"),
])
def test_replies_without_an_answer_or_without_thinking(scripted, pieces, thought, content):
    client = scripted(pieces)
    body = {"messages": USER, "max_tokens": 8}
    message = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == (thought, content)
    streamed = _streamed_split(client, body)[:2]
    assert streamed == (thought or "", content or "")


def test_the_openai_client_reads_reasoning_content(scripted):
    oai = openai_over(scripted(PIECES))
    resp = oai.chat.completions.create(model="", messages=USER, max_tokens=8)
    assert resp.choices[0].message.reasoning_content == "\nLet me think."
    assert resp.choices[0].message.content == "\n\nThe answer."
    thought = content = ""
    for event in oai.chat.completions.create(model="", messages=USER, max_tokens=8, stream=True):
        if event.choices:
            thought += getattr(event.choices[0].delta, "reasoning_content", None) or ""
            content += event.choices[0].delta.content or ""
    assert (thought, content) == ("\nLet me think.", "\n\nThe answer.")


def test_a_template_without_think_tags_gets_no_split(tiny_server_model, monkeypatch):
    with tiny_client(tiny_server_model) as client:
        monkeypatch.setattr(client.app.state.miaotui.engine, "generate", _scripted(PIECES))
        message = client.post("/v1/chat/completions", json={"messages": USER}).json()["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "".join(PIECES)}


def test_reasoning_parser_none_turns_it_off(tiny_server_model, monkeypatch):
    with tiny_client(tiny_server_model, chat_template=QWEN_LIKE, reasoning_parser="none") as client:
        monkeypatch.setattr(client.app.state.miaotui.engine, "generate", _scripted(PIECES))
        message = client.post("/v1/chat/completions", json={"messages": USER}).json()["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "".join(PIECES)}


def test_deepseek_r1_treats_text_before_the_closing_tag_as_reasoning(tiny_server_model, monkeypatch):
    with tiny_client(tiny_server_model, reasoning_parser="deepseek_r1") as client:
        monkeypatch.setattr(client.app.state.miaotui.engine, "generate", _scripted(["hm", "m</thi", "nk>ok"]))
        message = client.post("/v1/chat/completions", json={"messages": USER}).json()["choices"][0]["message"]
        assert (message["reasoning_content"], message["content"]) == ("hmm", "ok")
        assert _streamed_split(client, {"messages": USER})[:2] == ("hmm", "ok")


def test_a_real_reply_in_a_prompt_opened_thinking_is_reasoning_and_kwargs_reach_the_template(opening):
    """The tiny random model never closes the block: its whole reply is thinking, unless
    enable_thinking: false closes it in the prompt; `flavour` is written into the prompt."""
    body = {"messages": USER, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    plain = opening.post("/v1/chat/completions", json=body).json()
    thought = plain["choices"][0]["message"]["reasoning_content"]
    assert thought and plain["choices"][0]["message"]["content"] is None
    assert _streamed_split(opening, body)[:2] == (thought, "")
    off = opening.post("/v1/chat/completions", json=body | {"chat_template_kwargs": {"enable_thinking": False}})
    assert off.status_code == 200, off.text
    message = off.json()["choices"][0]["message"]
    assert message["reasoning_content"] is None and message["content"]
    flavoured = opening.post("/v1/chat/completions", json=body | {
        "chat_template_kwargs": {"flavour": "a much longer flavour than plain"}}).json()
    assert flavoured["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]


@pytest.mark.parametrize("kwargs,fragment", [
    ({"messages": []}, "'messages'"),
    ({"add_generation_prompt": False}, "'add_generation_prompt'"),
    ({"bos_token": "x"}, "'bos_token'"),
    ({"big": "x" * 5000}, "over the limit of 4096"),
    ([1, 2], None),
    ("enable_thinking", None),
])
def test_bad_chat_template_kwargs_are_a_400_naming_them(opening, kwargs, fragment):
    reply = opening.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2,
                                                       "chat_template_kwargs": kwargs})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "chat_template_kwargs", error
    if fragment:
        assert fragment in error["message"], error


def test_the_serve_flag_picks_the_parser_and_refuses_unknown_names(tmp_path, tiny_server_model):
    import subprocess
    import sys

    import httpx

    from tests.server.conftest import serve

    folder, tokenizer = tiny_server_model
    with serve(tmp_path, "--model", folder, "--tokenizer", tokenizer, "--reasoning-parser", "deepseek_r1") as server:
        reply = httpx.post(server.base_url + "/v1/chat/completions", timeout=120, json={
            "messages": USER, "max_tokens": 4, "ignore_eos": True, "temperature": 0}).json()
        message = reply["choices"][0]["message"]  # a random model never closes the thinking
        assert message["reasoning_content"] and message["content"] is None
    bad = subprocess.run([sys.executable, "-m", "miaotui.cli", "serve", "--model", folder, "--reasoning-parser",
                          "deepseek-r1"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--reasoning-parser" in bad.stderr and "deepseek_r1" in bad.stderr
