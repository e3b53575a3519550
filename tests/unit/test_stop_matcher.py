"""StopMatcher / StopAutomaton against brute force, and their cost counted (not timed).

The reference is the detokenizer's earlier stop logic (str.find per stop string over a window,
and every prefix of every stop string tried for the hold-back), which is obviously right and
quadratic: the new matcher must agree with it on every step of random runs.
"""

from __future__ import annotations

import random

import pytest

from miaotui.detokenizer import IncrementalDetokenizer
from miaotui.stop_matcher import StopAutomaton, StopMatcher


class PieceTokenizer:
    """Token id i decodes to pieces[i]; a run of ids decodes to their concatenation."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids)


class ReferenceStops:
    """The detokenizer's stop handling before StopMatcher, verbatim, on text fed directly."""

    def __init__(self, stop: tuple[str, ...]) -> None:
        self.stop, self.text, self.emitted, self.stopped_by = stop, "", 0, None

    def find_stop(self) -> bool:
        if not self.stop or self.stopped_by is not None:
            return self.stopped_by is not None
        longest = max(len(s) for s in self.stop)
        start = max(self.emitted - longest + 1, 0)
        best = None
        for s in self.stop:
            idx = self.text.find(s, start)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, s)
        if best is None:
            return False
        self.text = self.text[: best[0]]
        self.stopped_by = best[1]
        return True

    def held_back(self) -> int:
        held = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), held, -1):
                if self.text.endswith(s[:k]):
                    held = k
                    break
        return held

    def delta(self, finished: bool) -> str:
        end = len(self.text) if finished or self.stopped_by else len(self.text) - self.held_back()
        if end <= self.emitted:
            return ""
        out = self.text[self.emitted:end]
        self.emitted = end
        return out


def random_case(rng: random.Random) -> tuple[tuple[str, ...], list[str]]:
    """Stops over a 2-3 letter alphabet (overlapping, nested, repeated) and a text in pieces."""
    alphabet = "ab" if rng.random() < 0.5 else "abc"
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
    stops = []
    for _ in range(rng.randint(1, 6)):
        roll = rng.random()
        if roll < 0.4 and len(text) > 1:  # a piece of the text, so matches happen
            i = rng.randrange(len(text))
            stops.append(text[i:i + rng.randint(1, 6)])
        elif roll < 0.55 and stops:  # a repeat, a prefix or an extension of an earlier stop
            base = rng.choice(stops)
            stops.append(rng.choice([base, base[:max(1, len(base) - 1)], base + rng.choice(alphabet)]))
        else:
            stops.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))))
    pieces, i = [], 0
    while i < len(text):
        n = rng.choice([0, 1, 1, 2, 3, 5])
        pieces.append(text[i:i + n])
        i += n
    return tuple(stops), pieces


@pytest.mark.parametrize("seed", range(4))
def test_detokenizer_matches_reference_on_every_step(seed):
    rng = random.Random(seed)
    for _ in range(1000):
        stops, pieces = random_case(rng)
        new = IncrementalDetokenizer(PieceTokenizer(pieces), [], stops)
        ref = ReferenceStops(stops)
        for token, piece in enumerate(pieces):
            new.add_token(token)
            ref.text += piece
            assert new.text == ref.text, (stops, pieces, token)
            stopped = new.find_stop()
            assert stopped == ref.find_stop(), (stops, pieces, token)
            assert (new.stopped_by, new.text) == (ref.stopped_by, ref.text), (stops, pieces, token)
            if not stopped:
                assert new._held_back() == ref.held_back(), (stops, pieces, token)
            finished = stopped or token == len(pieces) - 1
            assert new.delta(finished) == ref.delta(finished), (stops, pieces, token)
            if stopped:
                break
        assert new.output_text == ref.text[:ref.emitted]


def brute_matches(text: str, stops: tuple[str, ...], ends: range) -> tuple[int, int] | None:
    found = [(e - len(s), k) for k, s in enumerate(stops) for e in ends if text[:e].endswith(s)]
    return min(found, default=None)


def brute_held(text: str, stops: tuple[str, ...]) -> int:
    """Longest suffix of text that is a prefix of some stop (the matcher's state depth)."""
    return max((n for s in stops for n in range(min(len(s), len(text)) + 1) if text.endswith(s[:n])), default=0)


@pytest.mark.parametrize("seed", range(4))
def test_matcher_keeps_matching_after_a_stop(seed):
    # On its own the matcher goes on after a match (the detokenizer stops there): every chunk
    # reports the earliest-starting occurrence ending in it, and the state always holds.
    rng = random.Random(100 + seed)
    for _ in range(1000):
        stops, pieces = random_case(rng)
        matcher = StopMatcher(StopAutomaton(stops))
        text = ""
        for piece in pieces:
            ends = range(len(text) + 1, len(text) + len(piece) + 1)
            text += piece
            assert matcher.feed(piece) == brute_matches(text, stops, ends), (stops, pieces, text)
            assert matcher.fed == len(text)
            assert matcher.held == brute_held(text, stops), (stops, pieces, text)


def test_overlapping_stops_earliest_start_then_listed_first():
    # "bc" ends first, but "abcd" starts first; of two stops at one start the listed first wins.
    for stops, text, want in [(("abcd", "bc"), "xabcd", ("abcd", "x")),
                              (("bc", "abcd"), "xabcd", ("abcd", "x")),
                              (("abc", "ab"), "abc", ("abc", "")),
                              (("ab", "abc"), "abc", ("ab", "")),
                              (("ab", "ab"), "zab", ("ab", "z"))]:
        detok = IncrementalDetokenizer(PieceTokenizer([text]), [], stops)
        detok.add_token(0)
        assert detok.find_stop()
        assert (detok.stopped_by, detok.text) == want, stops
    # Fed piece by piece, "bc" is complete before "abcd" can be: it wins, as it always did.
    detok = IncrementalDetokenizer(PieceTokenizer(["xab", "c", "d"]), [], ("abcd", "bc"))
    detok.add_token(0)
    assert not detok.find_stop()
    detok.add_token(1)
    assert detok.find_stop() and (detok.stopped_by, detok.text) == ("bc", "xa")


def test_delta_checks_text_find_stop_has_not_seen():
    detok = IncrementalDetokenizer(PieceTokenizer(["hi STOP"]), [], ("STOP",))
    detok.add_token(0)
    assert detok.delta(False) == "hi "
    assert detok.stopped_by == "STOP"


def test_children_with_the_same_stops_share_one_automaton():
    stops = ("END", "STOP")
    a, b = (IncrementalDetokenizer(PieceTokenizer(["x"]), [], stops) for _ in range(2))
    assert a._matcher.automaton is b._matcher.automaton
    assert a._matcher is not b._matcher


def test_automaton_rejects_empty_stops():
    with pytest.raises(ValueError, match="^stop: "):
        StopAutomaton(("a", ""))


# ---------------------------------------------------------------- cost, counted


def _feed_counting(stops: tuple[str, ...], text: str, token_len: int) -> IncrementalDetokenizer:
    """Feed text in tokens through a detokenizer, checking the per-token work bound."""
    pieces = [text[i:i + token_len] for i in range(0, len(text), token_len)]
    detok = IncrementalDetokenizer(PieceTokenizer(pieces), [], stops)
    matcher = detok._matcher
    for token, piece in enumerate(pieces):
        steps, held = matcher.transitions, matcher.held
        detok.add_token(token)
        assert not detok.find_stop()
        steps = matcher.transitions - steps
        # One goto per character plus fail steps, each of which shortens the held-back suffix:
        # a token costs at most 2 * len(piece) + (held before - held after), whatever the stops.
        assert steps <= 2 * len(piece) + held - matcher.held
        assert matcher.transitions <= 2 * matcher.fed
        detok.delta(False)
    return detok


def test_cost_with_400_random_stops_of_10k_characters():
    rng = random.Random(7)
    stops = tuple("".join(rng.choice("ab") for _ in range(10_000)) for _ in range(400))
    text = "".join(rng.choice("ab") for _ in range(300))
    detok = _feed_counting(stops, text, token_len=3)
    automaton = detok._matcher.automaton
    # Fail links are made once per node, only down to the depth the text has reached.
    assert automaton.nodes_built <= len(stops) * len(text)
    assert detok.output_text == text[:len(text) - detok._held_back()]


def test_cost_with_400_stops_sharing_a_long_prefix():
    # The old hold-back tried all 400 * 10k prefixes per token; here the held-back text grows
    # with every token, and a mismatch at the end walks a long fail chain, paid for by the
    # characters that built it.
    stops = tuple("a" * 9_999 + chr(0x4E00 + i) for i in range(400))
    detok = _feed_counting(stops, "a" * 3_000 + "b" + "a" * 50, token_len=4)
    assert detok._held_back() == 50
    assert detok.output_text == "a" * 3_000 + "b"
    assert detok._matcher.automaton.nodes_built <= 3_051  # one chain: one node per depth
