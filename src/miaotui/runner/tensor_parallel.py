"""Tensor parallelism across processes: rank 0 is the engine's own runner, ranks 1..N-1 are
worker processes (torch multiprocessing, spawn) that each hold a shard and run the same steps.

The scheduler, sampler and detokenizer live in the driver only. Each step the driver builds
its StepInputs and broadcasts their diff against the previous step once (runner/step_diff.py:
new tokens and appended blocks; one pickled message over torch.distributed); every rank
rebuilds the same inputs, runs the forward pass, the collectives inside the sharded layers
join the pieces, and the driver samples from the gathered logits. Backend: gloo on the CPU,
NCCL on CUDA.

Failure: a watcher thread waits on the workers' process sentinels; when one exits, the runner is
marked failed, `on_failure` callbacks run (the async engine stops serving at once), and any
step fails fast instead of waiting on a collective that can never complete.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import wait

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from miaotui.config import CacheConfig, ModelConfig
from miaotui.engine.scheduler import SchedulerOutput
from miaotui.runner.model_runner import ModelRunner
from miaotui.runner.step_diff import StepDiffDecoder, StepDiffEncoder

logger = logging.getLogger(__name__)

# A step on a small CPU can take seconds; a collective waiting this long means a rank is gone.
_TIMEOUT = timedelta(seconds=300)


class WorkerFailedError(RuntimeError):
    """A tensor-parallel worker process has exited; the engine cannot run steps any more."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend(device: str) -> str:
    return "nccl" if str(device).startswith("cuda") else "gloo"


def _threads_per_rank(world: int) -> int:
    return max(1, len(os.sched_getaffinity(0)) // world)


def _init_group(model_config: ModelConfig, port: int, rank: int, world: int) -> None:
    dist.init_process_group(_backend(model_config.device), init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world, timeout=_TIMEOUT)


def _worker_main(rank: int, world: int, port: int, model_config: ModelConfig, cache_config: CacheConfig,
                 max_model_len: int) -> None:
    from miaotui.loader import load_for_config

    torch.set_num_threads(_threads_per_rank(world))
    if str(model_config.device).startswith("cuda"):
        torch.cuda.set_device(rank)
        model_config = dataclasses.replace(model_config, device=f"cuda:{rank}")
    _init_group(model_config, port, rank, world)
    model, _ = load_for_config(model_config, rank=rank, progress=False)
    runner = ModelRunner(model, model_config, cache_config, max_model_len)
    decoder = StepDiffDecoder(cache_config.block_size)
    dist.barrier()  # loaded: the driver's constructor returns once every rank is here
    try:
        while True:
            message = [None]
            dist.broadcast_object_list(message, src=0)
            if message[0] is None:
                break
            runner.forward_inputs(decoder.decode(message[0]))
    finally:
        dist.destroy_process_group()


class TensorParallelRunner(ModelRunner):
    """Rank 0: a ModelRunner over the driver's shard that also drives the worker ranks."""

    def __init__(self, model: nn.Module, model_config: ModelConfig, cache_config: CacheConfig,
                 max_model_len: int) -> None:
        world = model_config.tensor_parallel_size
        if not str(model_config.device).startswith("cuda"):
            torch.set_num_threads(_threads_per_rank(world))  # the cores are shared by all ranks
        super().__init__(model, model_config, cache_config, max_model_len)
        self.world = world
        self.failure: str | None = None
        self.on_failure: list[Callable[[str], None]] = []
        self._closed = False
        self._diffs = StepDiffEncoder()
        port = _free_port()
        # Every rank must hold the same number of blocks: block ids are global.
        worker_cache = dataclasses.replace(cache_config, num_blocks=self.num_blocks)
        ctx = mp.get_context("spawn")
        self.workers = [ctx.Process(target=_worker_main, name=f"miaotui-tp-rank{rank}", daemon=True,
                                    args=(rank, world, port, model_config, worker_cache, max_model_len))
                        for rank in range(1, world)]
        for proc in self.workers:
            proc.start()
        _init_group(model_config, port, 0, world)
        dist.barrier()
        logger.info("tensor parallel: %d ranks (%s), %d threads each", world, _backend(model_config.device),
                    _threads_per_rank(world))
        threading.Thread(target=self._watch, name="miaotui-tp-watch", daemon=True).start()
        self._finalizer = weakref.finalize(self, TensorParallelRunner._stop_workers, self.workers)

    def _watch(self) -> None:
        ready = wait([p.sentinel for p in self.workers])
        if self._closed:
            return
        dead = next(p for p in self.workers if p.sentinel in ready)
        dead.join(timeout=1)  # reap it, so its exit code is known
        self.failure = f"tensor-parallel worker {dead.name} exited with code {dead.exitcode}"
        logger.error("%s; the engine stops", self.failure)
        for callback in list(self.on_failure):
            callback(self.failure)

    def forward_logits(self, sched: SchedulerOutput) -> torch.Tensor | None:
        if self.failure is not None:
            raise WorkerFailedError(self.failure)
        inputs = self.step_inputs(sched)
        diff = self._diffs.encode([s.request.request_id for s in sched.seqs], inputs)
        try:
            dist.broadcast_object_list([diff], src=0)
            return self.forward_inputs(inputs, sched)
        except RuntimeError as exc:  # a collective broke: name the rank that died, if one did
            raise WorkerFailedError(self._dead_worker() or f"a tensor-parallel collective failed: {exc}") from exc

    def _dead_worker(self, wait_s: float = 2.0) -> str | None:
        deadline = time.monotonic() + wait_s
        while True:
            for proc in self.workers:
                if not proc.is_alive():
                    return f"tensor-parallel worker {proc.name} exited with code {proc.exitcode}"
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)

    def shutdown(self) -> None:
        """Stop the workers (they leave their loop on a None message) and the process group."""
        if self._closed:
            return
        self._closed = True
        if self.failure is None:
            try:
                dist.broadcast_object_list([None], src=0)
            except RuntimeError:
                pass  # a rank is already gone
        for proc in self.workers:
            proc.join(timeout=10)
        self._finalizer()
        if dist.is_initialized():
            dist.destroy_process_group()

    @staticmethod
    def _stop_workers(workers: list) -> None:
        for proc in workers:
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
