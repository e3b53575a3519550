"""IncrementalDetokenizer with the real byte-level BPE tokenizer of the embedded SmolLM2 model.

Token ids are fed one at a time, the way the engine does it (add_token, find_stop, delta).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from miaotui.detokenizer import IncrementalDetokenizer

pytestmark = pytest.mark.embedded

REPLACEMENT = "\ufffd"

TEXTS = {
    "emoji": "I love 🍕 and 🎉!",
    "cjk": "秒推是一个推理引擎。日本語もテスト",
    "accents": "Café naïve résumé — Ångström façade Zürich",
    "mixed": "Привет, мир! Ελληνικά 5€ — ça va? 👍🏽 añejo",
    "ascii": "Hello world, how are you?",
}


@pytest.fixture(scope="module")
def tok(embedded_tokenizer):
    return embedded_tokenizer


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


@dataclass
class Run:
    detok: IncrementalDetokenizer
    deltas: list[str] = field(default_factory=list)
    fed: int = 0  # tokens fed before the run ended (a stop ends it early)

    @property
    def text(self) -> str:
        return "".join(self.deltas)

    def cumulative(self) -> list[str]:
        out, acc = [], ""
        for d in self.deltas:
            acc += d
            out.append(acc)
        return out


def feed(tok, ids: list[int], prompt_ids: list[int] = (), stop: tuple[str, ...] = (),
         finish: bool = True, skip_special_tokens: bool = True) -> Run:
    """Feed `ids` one by one like the engine; stop early when a stop string is found.

    With finish=True the last token's delta is taken with finished=True."""
    detok = IncrementalDetokenizer(tok, list(prompt_ids), stop, skip_special_tokens)
    run = Run(detok)
    for i, token_id in enumerate(ids):
        detok.add_token(token_id)
        stopped = detok.find_stop()
        run.deltas.append(detok.delta(stopped or (finish and i == len(ids) - 1)))
        run.fed = i + 1
        if stopped:
            break
    return run


# ---------------------------------------------------------------- round trip


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_deltas_concatenate_to_full_decode(tok, name):
    ids = encode(tok, TEXTS[name])
    run = feed(tok, ids)
    assert run.text == tok.decode(ids, skip_special_tokens=True) == TEXTS[name]
    assert run.detok.output_text == run.text
    assert run.fed == len(ids)
    for d in run.deltas:
        assert REPLACEMENT not in d


@pytest.mark.parametrize("name", ["emoji", "cjk", "mixed"])
def test_partial_characters_are_held_not_garbled(tok, name):
    # These texts have tokens that are only part of a UTF-8 character: decoded alone they give
    # U+FFFD. The detokenizer must wait (empty delta) and never emit the replacement char.
    ids = encode(tok, TEXTS[name])
    assert any(REPLACEMENT in tok.decode([i]) for i in ids)
    run = feed(tok, ids, finish=False)
    assert "" in run.deltas
    assert all(REPLACEMENT not in d for d in run.deltas)
    assert run.text == TEXTS[name]  # nothing held back without stop strings, even unfinished


def test_emoji_is_emitted_whole_when_its_last_byte_arrives(tok):
    ids = encode(tok, "I love 🍕 and")
    pieces = [tok.decode([i]) for i in ids]
    assert pieces[2:5] == [" \ufffd", REPLACEMENT, REPLACEMENT]  # 🍕 spans three tokens
    run = feed(tok, ids)
    assert run.deltas == ["I", " love", "", "", " 🍕", " and"]


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tok, skip):
    ids = encode(tok, "x<|im_end|>y")
    assert tok.convert_ids_to_tokens(ids[1]) == "<|im_end|>"
    run = feed(tok, ids, skip_special_tokens=skip)
    assert run.text == tok.decode(ids, skip_special_tokens=skip)
    assert run.text == ("xy" if skip else "x<|im_end|>y")


# ---------------------------------------------------------------- stop strings


def assert_never_leaked(run: Run, final: str) -> None:
    """Every intermediate output is a prefix of the final one: nothing later cut was shown."""
    for acc in run.cumulative():
        assert final.startswith(acc), (acc, final)


def test_stop_string_split_over_two_tokens(tok):
    ids = encode(tok, "hello STOP world")
    assert [tok.decode([i]) for i in ids] == ["hello", " ST", "OP", " world"]
    run = feed(tok, ids, stop=("STOP",))
    assert run.detok.find_stop() is True
    assert run.detok.stopped_by == "STOP"
    assert run.fed == 3  # stopped at "OP", " world" never fed
    assert run.text == "hello " == run.detok.output_text
    assert "STOP" not in run.text
    # " ST" might start "STOP": only "hello " is shown until it is resolved.
    assert run.deltas == ["hello", " ", ""]
    assert_never_leaked(run, "hello ")


def test_stop_string_over_several_tokens(tok):
    text = "We want the END_OF_TEXT marker"
    ids = encode(tok, text)
    assert [tok.decode([i]) for i in ids][3:8] == [" END", "_", "OF", "_", "TEXT"]
    run = feed(tok, ids, stop=("END_OF_TEXT",))
    assert run.detok.find_stop() and run.detok.stopped_by == "END_OF_TEXT"
    assert run.fed == 8
    assert run.text == "We want the "
    assert run.cumulative()[3:] == ["We want the "] * 5  # held from " END" until the stop
    assert_never_leaked(run, "We want the ")


def test_stop_string_including_spaces_and_newline(tok):
    text = "Answer: 42\n### End of answer"
    ids = encode(tok, text)
    run = feed(tok, ids, stop=("\n### End",))
    assert run.detok.stopped_by == "\n### End"
    assert run.text == "Answer: 42"
    assert run.fed == ids.index(encode(tok, " End")[0]) + 1
    assert_never_leaked(run, "Answer: 42")


def test_stop_string_that_is_a_multibyte_character(tok):
    ids = encode(tok, "I love 🍕 and more")
    run = feed(tok, ids, stop=("🍕",))
    assert run.detok.stopped_by == "🍕"
    assert run.text == "I love "
    assert run.fed == 5
    assert all(REPLACEMENT not in d for d in run.deltas)


def test_stop_string_inside_one_token(tok):
    ids = encode(tok, "hello STOP world")
    run = feed(tok, ids, stop=("ll",))
    assert run.fed == 1 and run.text == "he" and run.detok.stopped_by == "ll"


def test_earliest_stop_string_wins(tok):
    ids = encode(tok, "hello STOP world")
    run = feed(tok, ids, stop=("world", "STOP"))
    assert run.detok.stopped_by == "STOP" and run.text == "hello "
    # The second stop string only shows up later; without the first it stops there.
    run2 = feed(tok, ids, stop=("world", "xyz"))
    assert run2.detok.stopped_by == "world" and run2.text == "hello STOP "
    assert_never_leaked(run2, "hello STOP ")


def test_stop_found_in_a_single_multi_token_chunk(tok):
    # Text that arrives all at once (the emoji completes it) containing the stop string.
    ids = encode(tok, "a🍕b done")
    run = feed(tok, ids, stop=("🍕b",))
    assert run.text == "a" and run.detok.stopped_by == "🍕b"


def test_held_back_text_released_when_not_a_stop(tok):
    ids = encode(tok, "abc STOCK")
    assert [tok.decode([i]) for i in ids] == ["abc", " ST", "OCK"]
    run = feed(tok, ids, stop=("STOP",), finish=False)
    assert run.detok.find_stop() is False and run.detok.stopped_by is None
    # "abc ST" is shown as "abc " until "OCK" proves it is not "STOP".
    assert run.cumulative() == ["abc", "abc ", "abc STOCK"]
    assert run.deltas[-1] == "STOCK"


def test_finished_releases_everything_held(tok):
    ids = encode(tok, "hello ST")
    detok = IncrementalDetokenizer(tok, [], ("STOP",))
    out = ""
    for t in ids:
        detok.add_token(t)
        assert not detok.find_stop()
        out += detok.delta(False)
    assert out == "hello "
    assert detok.delta(False) == ""  # still held
    assert detok.delta(True) == "ST"
    assert detok.output_text == "hello ST"
    assert detok.delta(True) == ""  # nothing twice


def test_finished_on_last_token_releases_partial_stop(tok):
    ids = encode(tok, "abc ST")
    run = feed(tok, ids, stop=("STOP",), finish=True)
    assert run.text == "abc ST"
    assert run.detok.stopped_by is None


def test_hold_back_uses_longest_matching_prefix_of_any_stop(tok):
    detok = IncrementalDetokenizer(tok, [], ("xyz", "STOP"))
    for t in encode(tok, "hello ST"):
        detok.add_token(t)
    detok.find_stop()
    assert detok.delta(False) == "hello "
    # Adding "O" makes "STO" still a prefix: keep holding.
    for t in encode(tok, "O"):
        detok.add_token(t)
    assert not detok.find_stop()
    assert detok.delta(False) == ""
    for t in encode(tok, "P"):
        detok.add_token(t)
    assert detok.find_stop() and detok.delta(True) == ""
    assert detok.output_text == "hello "


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_stops_that_never_occur_do_not_change_output(tok, name):
    ids = encode(tok, TEXTS[name])
    run = feed(tok, ids, stop=("ZZZ", "</s>", "🙃"))
    assert run.text == TEXTS[name]
    assert run.detok.stopped_by is None


# ---------------------------------------------------------------- prompt context


def test_first_delta_keeps_leading_space_after_prompt(tok):
    prompt_ids = encode(tok, "Hello")
    full_ids = encode(tok, "Hello world, how are you?")
    assert full_ids[: len(prompt_ids)] == prompt_ids
    out_ids = full_ids[len(prompt_ids):]
    assert tok.convert_ids_to_tokens(out_ids[0]).startswith("Ġ")  # byte-level space marker
    run = feed(tok, out_ids, prompt_ids=prompt_ids)
    assert run.deltas[0] == " world"
    assert run.text == " world, how are you?"
    assert "Hello" not in run.text  # prompt text is context only, never emitted


def test_long_prompt_context(tok):
    prompt_ids = encode(tok, "This is a fairly long prompt with many tokens in it, about pizza")
    assert len(prompt_ids) > 5
    out_ids = encode(tok, " and 🎉 and 秒推 too")
    run = feed(tok, out_ids, prompt_ids=prompt_ids)
    assert run.text == " and 🎉 and 秒推 too"
    assert run.deltas[0] == " and"
    assert all(REPLACEMENT not in d for d in run.deltas)


def test_prompt_context_with_stop(tok):
    prompt_ids = encode(tok, "Say: ")
    out_ids = encode(tok, "hello STOP world")
    run = feed(tok, out_ids, prompt_ids=prompt_ids, stop=("STOP",))
    assert run.text == "hello "
    assert run.detok.stopped_by == "STOP"


class _LeadingSpaceDroppingTokenizer:
    """Decodes like SentencePiece (Llama 2, Mistral): the first token's leading space is dropped."""

    def __init__(self, inner):
        self.inner = inner

    def decode(self, ids, skip_special_tokens=True):
        text = self.inner.decode(ids, skip_special_tokens=skip_special_tokens)
        return text[1:] if text.startswith(" ") else text


def test_prompt_context_restores_space_a_tokenizer_would_drop(tok):
    sp_like = _LeadingSpaceDroppingTokenizer(tok)
    prompt_ids = encode(tok, "Hello")
    out_ids = encode(tok, "Hello world, how are you?")[len(prompt_ids):]
    assert sp_like.decode(out_ids[:1]) == "world"  # decoded alone, the space is lost ...
    run = feed(sp_like, out_ids, prompt_ids=prompt_ids)
    assert run.deltas[0] == " world"  # ... but the prompt context keeps it
    assert run.text == " world, how are you?"
