"""Test helper shared by the scheduler tests' fake runners: mirror of which token prefix each
KV slot holds, so a test can check that every sequence reads its own history."""

from __future__ import annotations


def apply_block_copies(slots: dict[tuple[int, int], object], copies: list[tuple[int, int]],
                       block_size: int) -> None:
    """Do what the runner does before the forward pass: copy whole blocks src -> dst."""
    for src, dst in copies:
        assert src != dst
        for slot in range(block_size):
            if (src, slot) in slots:
                slots[(dst, slot)] = slots[(src, slot)]
            else:
                slots.pop((dst, slot), None)
