"""Stop-string matching in time linear in the text: an Aho-Corasick automaton over the stops.

StopAutomaton is built once per stop tuple and shared, read-only, by every sequence that uses
it (the n samples of a request); StopMatcher is one sequence's position in it.

Invariant (StopMatcher): after feeding text t, `state` is the trie node of the longest suffix of
t that is a prefix of some stop string. So:
- the stops ending at the last character are the terminal nodes on the state's fail chain,
  longest (earliest-starting) first; `_out` caches the nearest one per node;
- while no stop has matched, that suffix is a *proper* prefix of a stop (a whole one would have
  matched), so the state's depth is exactly the text a detokenizer must hold back.
Each character costs one successful transition plus fail steps that each shorten the state, so
feeding costs at most 2 transitions per character over a sequence's life, whatever the number
and length of the stops (`transitions` counts them).

Memory: the nodes a string adds past the point where it leaves the trie of the strings before
it form a chain of consecutive node ids whose next character is read from the string itself;
only the root and nodes with two or more children keep a dict. The trie costs three machine
integers per character of the stops, and inserting a string compares slices, not characters.

Fail links of depth d are computed only once some sequence's text can reach depth d, one
breadth-first layer at a time, each node once: a request with megabytes of stop strings pays
for the layers its text has reached, not for the whole trie at admission.
"""

from __future__ import annotations

import threading
import weakref
from array import array

_NONE = -1
_ROOT = 0


def _common_prefix(a: str, i: int, b: str, j: int) -> int:
    """Length of the longest common prefix of a[i:] and b[j:]: galloping, then bisection, on
    slice comparisons, so the cost is in C and grows with the answer, not the strings."""
    limit = min(len(a) - i, len(b) - j)
    step = 1
    while step <= limit and a.startswith(b[j:j + step], i):
        step *= 2
    lo, hi = step // 2, min(step, limit + 1) - 1  # a[i:i+lo] matches; a[i:i+hi+1] does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a.startswith(b[j:j + mid], i):
            lo = mid
        else:
            hi = mid - 1
    return lo


class StopAutomaton:
    """The trie of `stops` with lazily built fail links (see the module docstring)."""

    __slots__ = ("stops", "longest", "nodes_built", "_branch", "_owner", "_off", "_lo", "_hang",
                 "_terminal", "_fail", "_out", "_built", "_pending", "_active", "_lock", "__weakref__")

    _shared: weakref.WeakValueDictionary[tuple[str, ...], StopAutomaton] = weakref.WeakValueDictionary()
    _shared_lock = threading.Lock()

    @classmethod
    def shared(cls, stops: tuple[str, ...]) -> StopAutomaton:
        """The automaton for `stops`, built once while any sequence still uses it: the n
        samples of a request (and requests with the same stops) share one, since an automaton
        is a pure function of its stops."""
        with cls._shared_lock:
            automaton = cls._shared.get(stops)
            if automaton is None:
                automaton = cls._shared[stops] = cls(stops)
            return automaton

    def __init__(self, stops: tuple[str, ...]) -> None:
        if not stops or not all(isinstance(s, str) and s for s in stops):
            raise ValueError(f"stop: needs one or more non-empty strings, got {stops!r}")
        self.stops = stops
        self.longest = max(map(len, stops))
        self.nodes_built = 0  # fail links computed so far (bounded by the stops' total length)
        # Node -> {char: child} for the root and for nodes with two or more children.
        self._branch: dict[int, dict[str, int]] = {_ROOT: {}}
        # Chain k (the nodes stops[k] added) holds depths _lo[k].._len(stops[k]) as node ids
        # _off[k] + depth, hanging from node _hang[k]; _lo[k] == 0 when it added none. The root
        # is owned by the extra index len(stops), whose _off of 0 gives it depth 0.
        self._owner = array("i", [len(stops)])
        self._off = [0] * (len(stops) + 1)
        self._lo = [0] * len(stops)
        self._hang = [_ROOT] * len(stops)
        self._terminal: dict[int, int] = {}  # node -> index of the first stop spelling it
        for k, s in enumerate(stops):
            self._insert(k, s)
        self._fail = array("i", [_ROOT]) * len(self._owner)
        self._out = array("i", [_NONE]) * len(self._owner)  # nearest terminal on the fail chain
        self._built = 0  # fail links and _out are final for every node of depth <= _built
        self._pending: dict[int, list[int]] = {}  # first depth -> chains starting there
        for k in range(len(stops)):
            if self._lo[k]:
                self._pending.setdefault(self._lo[k], []).append(k)
        self._active: list[int] = []  # chains that reach depth _built
        self._lock = threading.Lock()

    def depth(self, node: int) -> int:
        return node - self._off[self._owner[node]]

    def goto(self, node: int, char: str) -> int:
        """The trie child of `node` on `char`, or -1."""
        kids = self._branch.get(node)
        if kids is not None:
            return kids.get(char, _NONE)
        k = self._owner[node]
        s = self.stops[k]
        d = node - self._off[k]
        return node + 1 if d < len(s) and s[d] == char else _NONE

    def _insert(self, k: int, s: str) -> None:
        node, i = _ROOT, 0
        while i < len(s):
            child = self.goto(node, s[i])
            if child == _NONE:
                break
            node, i = child, i + 1
            # Along the child's chain the next nodes are consecutive ids: skip as far as s agrees.
            run = _common_prefix(s, i, self.stops[self._owner[node]], i)
            node, i = node + run, i + run
        if i == len(s):  # a prefix of (or equal to) an earlier stop: no new nodes
            self._terminal.setdefault(node, k)
            return
        first = len(self._owner)
        self._owner.extend(array("i", [k]) * (len(s) - i))
        self._off[k], self._lo[k], self._hang[k] = first - (i + 1), i + 1, node
        self._terminal[len(self._owner) - 1] = k
        kids = self._branch.get(node)
        if kids is None:  # a chain node gains its second child (or a chain's end its first)
            kids = self._branch[node] = {}
            owner = self.stops[self._owner[node]]
            if i < len(owner):
                kids[owner[i]] = node + 1
        kids[s[i]] = first

    def ensure_depth(self, depth: int) -> None:
        """Compute fail links for every node up to `depth` (layers already built are kept)."""
        depth = min(depth, self.longest)
        if depth <= self._built:
            return
        with self._lock:  # sequences of different engine threads may share this automaton
            while self._built < depth:
                self._build_layer(self._built + 1)
                self._built += 1

    def _build_layer(self, d: int) -> None:
        """Fail links of the depth-d nodes, from those of depth < d (all final by now)."""
        self._active = [k for k in self._active if len(self.stops[k]) >= d] + self._pending.pop(d, [])
        fail, out, terminal, goto = self._fail, self._out, self._terminal, self.goto
        for k in self._active:
            node = self._off[k] + d
            f = _ROOT
            if d > 1:
                char = self.stops[k][d - 1]
                f = fail[self._hang[k] if d == self._lo[k] else node - 1]
                while True:
                    child = goto(f, char)
                    if child != _NONE:
                        f = child
                        break
                    if f == _ROOT:
                        break
                    f = fail[f]
            fail[node] = f
            out[node] = node if node in terminal else out[f]
        self.nodes_built += len(self._active)


class StopMatcher:
    """One sequence's position in a StopAutomaton (see the module invariant)."""

    __slots__ = ("automaton", "state", "fed", "transitions")

    def __init__(self, automaton: StopAutomaton) -> None:
        self.automaton = automaton
        self.state = _ROOT
        self.fed = 0  # characters fed so far; match positions count from the first one
        self.transitions = 0  # goto calls so far: at most 2 * fed

    def feed(self, text: str) -> tuple[int, int] | None:
        """Advance over `text`. Returns (start, stop index) of the earliest-starting stop
        occurrence that ends inside `text` (equal starts: the stop listed first), or None."""
        a = self.automaton
        a.ensure_depth(self.fed + len(text))
        goto, fail, out, terminal = a.goto, a._fail, a._out, a._terminal
        node, pos, steps = self.state, self.fed, 0
        best: tuple[int, int] | None = None
        for char in text:
            pos += 1
            while True:
                steps += 1
                child = goto(node, char)
                if child != _NONE:
                    node = child
                    break
                if node == _ROOT:
                    break
                node = fail[node]
            hit = out[node]
            if hit != _NONE:
                found = (pos - a.depth(hit), terminal[hit])
                if best is None or found < best:
                    best = found
        self.state, self.fed = node, pos
        self.transitions += steps
        return best

    @property
    def held(self) -> int:
        """Length of the longest suffix of the text fed that is a prefix of a stop string (a
        proper prefix while feed has returned None)."""
        return self.automaton.depth(self.state)
