"""Incremental detokenization: text deltas that never split a UTF-8 character or leak a stop string.

A byte-level BPE token can end in the middle of a multi-byte character; decoding it alone
gives U+FFFD. We decode a short window of recent tokens and emit only when the window's text
grows without a trailing U+FFFD. Text that could be the start of a stop string is held back
until it either completes the stop string (then it is cut off) or cannot anymore. Stop strings
are matched by a StopMatcher fed each new character once, so a request's stops cost every step
time in its new text only, however many and however long they are.
An engine without a tokenizer (skip_tokenizer_init) passes None: no text, and no stop strings.
"""

from __future__ import annotations

from typing import Any

from miaotui.stop_matcher import StopAutomaton, StopMatcher

# Tokens of context decoded before the new ones, so tokenizers that drop a leading space on
# the first token of a decode still produce the right text.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], stop: tuple[str, ...] = (),
                 skip_special_tokens: bool = True) -> None:
        if tokenizer is None and stop:
            raise ValueError("stop: stop strings are matched in the text, and this engine runs without a tokenizer "
                             "(skip_tokenizer_init / --skip-tokenizer-init); use stop_token_ids")
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.skip_special_tokens = skip_special_tokens
        self.token_ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)
        self.text = ""  # all decoded output text, possibly past a stop string
        self.emitted = 0  # characters of `text` handed to the user so far
        self.stopped_by: str | None = None
        # Fed with `text` up to `_matcher.fed`; the rest is new since the last find_stop.
        self._matcher = StopMatcher(StopAutomaton.shared(self.stop)) if self.stop else None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_token(self, token_id: int) -> None:
        """Decode one more token into `text` (possibly nothing yet, if it ends mid-character)."""
        if self.tokenizer is None:
            return
        self.token_ids.append(token_id)
        prefix = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.token_ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.token_ids)

    def find_stop(self) -> bool:
        """Cut `text` at the earliest-starting stop string (equal starts: the one listed first);
        True when one was found. Only the text new since the last call is scanned: any stop in
        older text would have been found then."""
        if self._matcher is None or self.stopped_by is not None:
            return self.stopped_by is not None
        found = self._matcher.feed(self.text[self._matcher.fed:])
        if found is None:
            return False
        start, index = found
        self.text = self.text[:start]
        self.stopped_by = self.stop[index]
        return True

    def _held_back(self) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string
        (valid once find_stop has seen all of `text` and found nothing)."""
        return 0 if self._matcher is None else self._matcher.held

    def delta(self, finished: bool) -> str:
        """New text the user may see now. When finished, everything left is released. Text that
        find_stop has not seen yet is checked first, so a stop string is never shown."""
        if self._matcher is not None and self._matcher.fed < len(self.text):
            self.find_stop()
        end = len(self.text) if finished or self.stopped_by else len(self.text) - self._held_back()
        if end <= self.emitted:
            return ""
        out = self.text[self.emitted:end]
        self.emitted = end
        return out

    @property
    def output_text(self) -> str:
        return self.text[: self.emitted]
