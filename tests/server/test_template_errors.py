"""A chat template that refuses the messages (its raise_exception) is the client's 400 with the
template's message, on chat completions and /tokenize, never a 500; offline it is a ValueError."""

from __future__ import annotations

import pytest

from tests.server.conftest import tiny_client

STRICT = ("{% if messages[0]['role'] != 'system' %}{{ raise_exception('the first message must be the "
          "system prompt') }}{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")
MALFORMED = "{% for m in messages %}{{ m['content'] }}"  # no endfor


@pytest.fixture(scope="module")
def client(tiny_server_model):
    # The server's own template (as --chat-template sets it) refuses conversations without a system prompt;
    # requests may send their own (as with --trust-request-chat-template).
    with tiny_client(tiny_server_model, chat_template=STRICT, trust_request_chat_template=True) as c:
        yield c


USER_ONLY = [{"role": "user", "content": "hi"}]


def test_a_refusing_template_is_a_400_on_chat_and_tokenize(client):
    chat = client.post("/v1/chat/completions", json={"messages": USER_ONLY, "max_tokens": 2})
    assert chat.status_code == 400, chat.text
    error = chat.json()["error"]
    assert "the first message must be the system prompt" in error["message"] and error["param"] == "messages"
    tokenize = client.post("/tokenize", json={"messages": USER_ONLY})
    assert tokenize.status_code == 400, tokenize.text
    assert "the first message must be the system prompt" in tokenize.json()["error"]["message"]
    with_system = [{"role": "system", "content": "s"}, *USER_ONLY]
    assert client.post("/v1/chat/completions", json={"messages": with_system, "max_tokens": 2}).status_code == 200
    assert client.post("/tokenize", json={"messages": with_system}).status_code == 200


def test_a_malformed_request_template_is_a_400(client):
    chat = client.post("/v1/chat/completions", json={"messages": USER_ONLY, "chat_template": MALFORMED,
                                                     "max_tokens": 2})
    assert chat.status_code == 400, chat.text
    assert "chat template rejected" in chat.json()["error"]["message"]


def test_template_error_offline_is_a_value_error(embedded_tokenizer):
    from miaotui.tokenizer import chat_prompt_ids

    with pytest.raises(ValueError, match="rejected the messages: the first message must be the system prompt"):
        chat_prompt_ids(embedded_tokenizer, [{"role": "user", "content": "hi"}], chat_template=STRICT)
