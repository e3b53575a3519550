"""What the tensor-parallel driver sends its workers each step: a diff, not the whole batch.

Block tables live on both sides: each worker keeps the table of every sequence it saw in the
previous step and receives only the blocks appended since (the whole table again only when it
changed otherwise: a new, preempted or forked sequence). Both sides forget the tables of the
sequences a step does not schedule, by the same rule, so no "forget" list travels either. Per
sequence a step then carries its key, where its new tokens start, the new token ids, whether it
samples, how many of its first rows score prompt tokens, and the table change; slots and
positions are derived on the worker.

A model with sliding-window KV groups sends each group's table the same way, plus how many of its
entries are now placeholders (released blocks only ever turn a table's prefix into placeholders).

Invariant: `StepDiffDecoder.decode(StepDiffEncoder.encode(sched_inputs))` equals the driver's
own StepInputs, step after step (tests/unit/test_step_diff.py).
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

from miaotui.runner.model_runner import StepInputs, WindowInputs
from miaotui.step_plan import PLACEHOLDER


@dataclass(slots=True)
class TableDiff:
    """A window group's table of one sequence: entries before `released` are placeholders; the
    rest is `table` whole (new or changed), or the last table sent plus `appended`."""

    released: int
    table: list[int] | None
    appended: list[int]


@dataclass(slots=True)
class SeqDiff:
    key: str
    start: int
    token_ids: list[int]
    samples: bool
    table: list[int] | None  # the whole table (new or changed sequence), or None: append `appended`
    appended: list[int]
    prompt_rows: int = 0  # rows from the sequence's first new token on that score prompt tokens
    windows: list[TableDiff] = field(default_factory=list)  # one per window KV group


@dataclass(slots=True)
class StepDiff:
    seqs: list[SeqDiff] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    new_blocks: list[int] = field(default_factory=list)
    # Per window KV group: (blocks used for the first time, fork copies (src, dst)).
    windows: list[tuple[list[int], list[tuple[int, int]]]] = field(default_factory=list)


def _table_diff(old: list[int] | None, table: list[int]) -> TableDiff:
    released = bisect_left(table, True, key=lambda b: b != PLACEHOLDER)  # placeholders are a prefix
    if old is not None and released <= len(old) <= len(table) and table[released:len(old)] == old[released:]:
        return TableDiff(released, None, table[len(old):])
    return TableDiff(released, list(table), [])


class StepDiffEncoder:
    """Driver side: remembers the tables it has sent."""

    def __init__(self) -> None:
        self._sent: dict[str, list[int]] = {}
        self._sent_windows: list[dict[str, list[int]]] = []

    def encode(self, keys: list[str], inputs: StepInputs) -> StepDiff:
        diff = StepDiff(block_copies=inputs.block_copies, new_blocks=inputs.new_blocks,
                        windows=[(w.new_blocks, w.block_copies) for w in inputs.windows])
        sent: dict[str, list[int]] = {}
        sent_windows: list[dict[str, list[int]]] = [{} for _ in inputs.windows]
        old_windows = self._sent_windows or sent_windows
        sample_rows = set(inputs.sample_rows)
        prompt_rows = inputs.prompt_rows  # ascending: one run from each sequence's first row
        for i, key in enumerate(keys):
            table = inputs.block_tables[i]
            old = self._sent.get(key)
            q0, q1 = inputs.query_start[i], inputs.query_start[i + 1]
            grown = old is not None and len(old) <= len(table) and table[: len(old)] == old
            diff.seqs.append(SeqDiff(key, inputs.positions[q0], inputs.input_ids[q0:q1], q1 - 1 in sample_rows,
                                     None if grown else list(table), table[len(old):] if grown else [],
                                     bisect_left(prompt_rows, q1) - bisect_left(prompt_rows, q0)))
            sent[key] = list(table)
            for win, old, new in zip(inputs.windows, old_windows, sent_windows):
                diff.seqs[-1].windows.append(_table_diff(old.get(key), win.block_tables[i]))
                new[key] = list(win.block_tables[i])
        self._sent = sent  # unscheduled sequences are forgotten (the decoder does the same)
        self._sent_windows = sent_windows
        return diff


class StepDiffDecoder:
    """Worker side: rebuilds the full StepInputs from a diff and the tables it keeps."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._tables: dict[str, list[int]] = {}
        self._window_tables: list[dict[str, list[int]]] = []

    def decode(self, diff: StepDiff) -> StepInputs:
        bs = self.block_size
        inputs = StepInputs(block_copies=diff.block_copies, new_blocks=diff.new_blocks,
                            windows=[WindowInputs(new_blocks=n, block_copies=c) for n, c in diff.windows])
        tables: dict[str, list[int]] = {}
        window_tables: list[dict[str, list[int]]] = [{} for _ in diff.windows]
        old_windows = self._window_tables or window_tables
        for change in diff.seqs:
            table = change.table if change.table is not None else self._tables[change.key] + change.appended
            tables[change.key] = table
            n = len(change.token_ids)
            end = change.start + n
            inputs.input_ids.extend(change.token_ids)
            inputs.positions.extend(range(change.start, end))
            inputs.slots.extend(table[p // bs] * bs + p % bs for p in range(change.start, end))
            inputs.block_tables.append(table)
            inputs.seq_lens.append(end)
            inputs.query_start.append(inputs.query_start[-1] + n)
            if change.samples:
                inputs.sample_rows.append(inputs.query_start[-1] - 1)
            first = inputs.query_start[-2]
            inputs.prompt_rows.extend(range(first, first + change.prompt_rows))
            for win, old, new, t in zip(inputs.windows, old_windows, window_tables, change.windows):
                wt = list(t.table) if t.table is not None else old[change.key] + t.appended
                wt[:t.released] = [PLACEHOLDER] * t.released
                new[change.key] = wt
                win.slots.extend(wt[p // bs] * bs + p % bs for p in range(change.start, end))
                win.block_tables.append(list(wt))
        self._tables = tables
        self._window_tables = window_tables
        return inputs
