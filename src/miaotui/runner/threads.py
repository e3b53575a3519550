"""How many CPU threads the model's kernels use: `--threads`, by default the physical cores this
process may run on. Hyper-threads share a core's vector units; a memory-bound decode step gains
nothing from them and loses to their synchronisation, so they are not counted."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger("miaotui")


def physical_cores() -> int:
    """Distinct (package, core) pairs among the CPUs in this process's affinity mask (Linux
    topology files); the logical CPU count where the topology cannot be read."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((topology.joinpath("physical_package_id").read_text().strip(),
                       topology.joinpath("core_id").read_text().strip()))
        except OSError:
            return len(cpus)
    return max(1, len(cores))


def configure_threads(threads: int | None, share: int = 1) -> int:
    """Set torch's intra-op thread count to `threads` (None: the physical cores), divided among
    `share` processes that run at once (tensor-parallel ranks on one CPU); returns it."""
    count = max(1, (threads or physical_cores()) // share)
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count
