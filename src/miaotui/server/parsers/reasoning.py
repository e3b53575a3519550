"""Reasoning output: the thinking of `<think> ... </think>` models apart from the answer.

Chat completions return the thinking in `reasoning_content` and the answer in `content`, as
vLLM's reasoning parsers do (same names: `qwen3`, `deepseek_r1`; `none` turns it off).

Which parser a request gets (`choose`):
- `--reasoning-parser NAME` names it for every chat request;
- unset, a request whose chat template's text contains `</think>` gets `qwen3`, others none.
  `</think>` rather than `<think>`: every thinking template closes the block, either to write
  it (Qwen3, whose templates also strip it from past turns) or only to strip it from past
  assistant turns (the DeepSeek-R1 distills' `content.split('</think>')[-1]`), while `<think>`
  alone also appears in templates that merely mention it.

Where the reply starts (`in_reasoning`):
- `deepseek_r1`, as vLLM's: in the thinking. Its templates may open `<think>` in the prompt,
  so everything before the first `</think>` is reasoning, with or without an opening tag; a
  reply that never closes it is all reasoning (thinking cut short by max_tokens).
- `qwen3`: in the thinking when the rendered prompt leaves a `<think>` open (its last `<think>`
  after its last `</think>`: templates that open the block for the model, Qwen3's thinking-only
  releases, the newer R1 distills), else only when the reply itself begins with `<think>`
  (leading whitespace allowed). With `enable_thinking: false` Qwen3's template writes an empty,
  closed block into the prompt: the reply is all content.

After the first `</think>` everything is content, tags included (the answer may talk about
tags); a `<think>` that opens a reply already in the thinking is dropped (models repeat it).

Streaming: `ReasoningParser` is fed text deltas and holds back text that could still become a
tag (a prefix of `<think>` at the reply's start, a suffix that is a prefix of `</think>`), so its
pieces joined are exactly `split_reasoning` of the whole text, however the text was chunked.
"""

from __future__ import annotations

from dataclasses import dataclass

START, END = "<think>", "</think>"

_OPENING, _THINKING, _CONTENT = range(3)


@dataclass(frozen=True, slots=True)
class ReasoningMode:
    """A request's parser: its name and whether the reply starts inside the thinking."""

    name: str
    in_reasoning: bool

    def parser(self) -> ReasoningParser:
        return ReasoningParser(self.in_reasoning)


def prompt_opens_thinking(prompt: str) -> bool:
    """Whether the rendered prompt leaves a `<think>` block open for the reply."""
    return prompt.rfind(START) > prompt.rfind(END)


def choose(configured: str | None, template: str, prompt: str) -> ReasoningMode | None:
    """The parser of one chat request (see the module's docstring); None: no reasoning split.
    `configured`: ServerConfig.reasoning_parser (validated there)."""
    name = configured if configured is not None else ("qwen3" if END in template else "none")
    if name == "none":
        return None
    return ReasoningMode(name, name == "deepseek_r1" or prompt_opens_thinking(prompt))


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


class ReasoningParser:
    """Incremental split of one choice's text: `feed(delta)` and, once the text is complete,
    `finish()`, each returning (reasoning delta, content delta). Invariant: `_held` is text not
    yet given out, and only ever what could still turn out to be (part of) a tag."""

    __slots__ = ("_state", "_in_reasoning", "_held")

    def __init__(self, in_reasoning: bool) -> None:
        self._in_reasoning = in_reasoning
        self._state = _OPENING
        self._held = ""

    def feed(self, text: str) -> tuple[str, str]:
        reasoning, content = "", ""
        text = self._held + text
        self._held = ""
        if self._state == _OPENING:
            head = text.lstrip()
            if head.startswith(START):
                self._state, text = _THINKING, head[len(START):]
            elif START.startswith(head):  # whitespace, or a tag still arriving
                self._held = text
                return "", ""
            else:
                self._state = _THINKING if self._in_reasoning else _CONTENT
        if self._state == _THINKING:
            before, closed, after = text.partition(END)
            if closed:
                reasoning, self._state, text = before, _CONTENT, after
            else:
                keep = _partial_suffix(text, END)
                self._held = text[len(text) - keep:] if keep else ""
                return text[:len(text) - keep], ""
        content = text
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """What is held back, now that no more text comes."""
        held, self._held = self._held, ""
        if self._state == _THINKING or (self._state == _OPENING and self._in_reasoning):
            return held, ""
        return "", held


def split_reasoning(text: str, in_reasoning: bool) -> tuple[str | None, str | None]:
    """(reasoning_content, content) of a whole reply. Reasoning is None when there is none;
    content is None only when there is reasoning and nothing after it (as vLLM answers)."""
    parser = ReasoningParser(in_reasoning)
    r1, c1 = parser.feed(text)
    r2, c2 = parser.finish()
    return message_fields(r1 + r2, c1 + c2)


def message_fields(reasoning: str, content: str) -> tuple[str | None, str | None]:
    """The message's (reasoning_content, content) of a whole reply's two parts."""
    if not reasoning:
        return None, content
    return reasoning, content or None
