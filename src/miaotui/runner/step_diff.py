"""What the tensor-parallel driver sends its workers each step: a diff, not the whole batch.

Block tables live on both sides: each worker keeps the table of every sequence it saw in the
previous step and receives only the blocks appended since (the whole table again only when it
changed otherwise: a new, preempted or forked sequence). Both sides forget the tables of the
sequences a step does not schedule, by the same rule, so no "forget" list travels either. Per
sequence a step then carries its key, where its new tokens start, the new token ids, whether it
samples, how many of its first rows score prompt tokens, and the table change; slots and
positions are derived on the worker.

Invariant: `StepDiffDecoder.decode(StepDiffEncoder.encode(sched_inputs))` equals the driver's
own StepInputs, step after step (tests/unit/test_step_diff.py).
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

from miaotui.runner.model_runner import StepInputs


@dataclass(slots=True)
class SeqDiff:
    key: str
    start: int
    token_ids: list[int]
    samples: bool
    table: list[int] | None  # the whole table (new or changed sequence), or None: append `appended`
    appended: list[int]
    prompt_rows: int = 0  # rows from the sequence's first new token on that score prompt tokens


@dataclass(slots=True)
class StepDiff:
    seqs: list[SeqDiff] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    new_blocks: list[int] = field(default_factory=list)


class StepDiffEncoder:
    """Driver side: remembers the tables it has sent."""

    def __init__(self) -> None:
        self._sent: dict[str, list[int]] = {}

    def encode(self, keys: list[str], inputs: StepInputs) -> StepDiff:
        diff = StepDiff(block_copies=inputs.block_copies, new_blocks=inputs.new_blocks)
        sent: dict[str, list[int]] = {}
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
        self._sent = sent  # unscheduled sequences are forgotten (the decoder does the same)
        return diff


class StepDiffDecoder:
    """Worker side: rebuilds the full StepInputs from a diff and the tables it keeps."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._tables: dict[str, list[int]] = {}

    def decode(self, diff: StepDiff) -> StepInputs:
        bs = self.block_size
        inputs = StepInputs(block_copies=diff.block_copies, new_blocks=diff.new_blocks)
        tables: dict[str, list[int]] = {}
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
        self._tables = tables
        return inputs
