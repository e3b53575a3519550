"""The reasoning parser: the whole-text split, and the same split however the text is streamed."""

from __future__ import annotations

import pytest

from miaotui.config import ServerConfig
from miaotui.server.parsers.reasoning import ReasoningParser, choose, prompt_opens_thinking, split_reasoning

# (text, in_reasoning, reasoning_content, content)
CASES = [
    ("<think>hmm</think>answer", False, "hmm", "answer"),
    ("<think>\nhmm\n</think>\n\nanswer", False, "\nhmm\n", "\n\nanswer"),
    ("\n <think>hmm</think>answer", False, "hmm", "answer"),
    ("plain answer", False, None, "plain answer"),
    ("plain answer", True, "plain answer", None),  # deepseek_r1: thinking cut short
    ("hmm</think>answer", True, "hmm", "answer"),  # the prompt opened <think>
    ("hmm</think>answer", False, None, "hmm</think>answer"),  # qwen3 without an open block
    ("<think>hmm</think>answer", True, "hmm", "answer"),  # a repeated opening tag is dropped
    ("<think>only thinking", False, "only thinking", None),  # unfinished thinking at the end
    ("<think>only thinking</th", False, "only thinking</th", None),  # a partial tag at the end
    ("<think>all thought</think>", False, "all thought", None),
    ("<think></think>answer", False, None, "answer"),
    ("<thi", False, None, "<thi"),
    ("<thi", True, "<thi", None),
    ("   ", False, None, "   "),
    ("", False, None, ""),
    ("a <think>b</think>c", False, None, "a <think>b</think>c"),  # tags mid-answer are text
    ("<think>a</think>b</think>c<think>d", False, "a", "b</think>c<think>d"),
    ("<think>x <</think>y", False, "x <", "y"),
    ("<think>x </thinking></think>y", False, "x </thinking>", "y"),
    ("<thinker>y", False, None, "<thinker>y"),
    ("<think>思考</think>答え", False, "思考", "答え"),
]


def _streamed(text: str, in_reasoning: bool, cuts: list[int]) -> tuple[str | None, str | None]:
    parser = ReasoningParser(in_reasoning)
    reasoning, content = "", ""
    for start, end in zip([0, *cuts], [*cuts, len(text)]):
        r, c = parser.feed(text[start:end])
        reasoning, content = reasoning + r, content + c
    r, c = parser.finish()
    reasoning, content = reasoning + r, content + c
    if not reasoning:
        return None, content
    return reasoning, content or None


@pytest.mark.parametrize("text,in_reasoning,reasoning,content", CASES)
def test_the_whole_text_split(text, in_reasoning, reasoning, content):
    assert split_reasoning(text, in_reasoning) == (reasoning, content)


@pytest.mark.parametrize("text,in_reasoning,reasoning,content", CASES)
def test_a_split_at_every_position_and_character_by_character_gives_the_same(text, in_reasoning, reasoning,
                                                                                content):
    for cut in range(len(text) + 1):
        assert _streamed(text, in_reasoning, [cut]) == (reasoning, content), cut
    for cut in range(len(text) + 1):
        for second in range(cut, len(text) + 1):
            assert _streamed(text, in_reasoning, [cut, second]) == (reasoning, content), (cut, second)
    assert _streamed(text, in_reasoning, list(range(1, len(text)))) == (reasoning, content)


def test_partial_tags_are_held_back_and_nothing_else():
    parser = ReasoningParser(False)
    assert parser.feed("<th") == ("", "")
    assert parser.feed("ink>abc</thi") == ("abc", "")
    assert parser.feed("nk>\nans") == ("", "\nans")
    assert parser.feed("wer </think") == ("", "wer </think")  # content passes through at once
    assert parser.finish() == ("", "")


def test_the_parser_of_a_request():
    qwen_template = "{% if enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    assert choose(None, "{{ messages }}", "<|user|>hi") is None
    assert choose("none", qwen_template, "hi") is None
    mode = choose(None, qwen_template, "<|im_start|>assistant\n")
    assert (mode.name, mode.in_reasoning) == ("qwen3", False)
    assert choose(None, qwen_template, "<|im_start|>assistant\n<think>\n").in_reasoning
    assert not choose(None, qwen_template, "assistant\n<think>\n\n</think>\n\n").in_reasoning
    mode = choose("deepseek_r1", "{{ messages }}", "<｜Assistant｜>")
    assert (mode.name, mode.in_reasoning) == ("deepseek_r1", True)
    assert choose("qwen3", "{{ messages }}", "x").name == "qwen3"
    assert prompt_opens_thinking("<think>a</think> b <think>") and not prompt_opens_thinking("no tags")


def test_an_unknown_parser_name_is_refused_naming_the_choices():
    for name in (None, "qwen3", "deepseek_r1", "none"):
        assert ServerConfig(reasoning_parser=name).reasoning_parser == name
    with pytest.raises(ValueError, match="reasoning_parser: must be one of qwen3, deepseek_r1, none"):
        ServerConfig(reasoning_parser="deepseek-r1")
