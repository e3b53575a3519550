"""--threads: the default counts physical cores in the affinity mask; a given count is applied."""

from __future__ import annotations

import os

import pytest
import torch

from miaotui.config import ModelConfig
from miaotui.runner.threads import configure_threads, physical_cores


def test_physical_cores_is_within_the_affinity_mask():
    assert 1 <= physical_cores() <= len(os.sched_getaffinity(0))


def test_configure_threads_applies_and_divides_among_ranks():
    before = torch.get_num_threads()
    try:
        assert configure_threads(1) == 1 and torch.get_num_threads() == 1
        assert configure_threads(4, share=2) == 2 and torch.get_num_threads() == 2
        assert configure_threads(1, share=4) == 1  # never below one thread
        assert configure_threads(None) == physical_cores()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("bad", [0, -2, 1.5, "2"])
def test_threads_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="^threads: must be an integer >= 1"):
        ModelConfig(threads=bad)
