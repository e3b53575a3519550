"""Tensor parallelism across processes: rank 0 is the engine's own runner, ranks 1..N-1 are
worker processes (torch multiprocessing, spawn) that each hold a shard and run the same steps.

The scheduler, sampler and detokenizer live in the driver only. Each step the driver builds
its StepInputs and sends their diff against the previous step (runner/step_diff.py: new tokens
and appended blocks), pickled once, down one pipe per worker; every rank rebuilds the same
inputs and runs the forward pass, the collectives inside the sharded layers (torch.distributed:
gloo on the CPU, NCCL on CUDA) join the pieces, and the driver samples from the gathered logits.
Step messages travel by pipe, not by a collective, so an idle server waits on nothing that can
time out: the collective timeout only bounds work inside a step. A worker whose driver is gone
sees its pipe close and exits.

Exit: a script that never calls `shutdown()` still exits cleanly: live runners are shut down at
interpreter exit, before multiprocessing's own exit hook would terminate the workers (atexit runs
hooks last-registered first). Workers ignore SIGINT: Ctrl-C reaches the driver, which stops them.
Scripts need no `if __name__ == "__main__"` guard: the spawned workers are not told to re-run
the parent's main module, which they do not need (their target lives here).

Failure: a watcher thread waits on the workers' process sentinels; when one exits, the runner is
marked failed, `on_failure` callbacks run (the async engine stops serving at once), and any
step fails fast instead of waiting on a collective that can never complete.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import multiprocessing.util
import os
import pickle
import signal
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import wait
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from miaotui.config import CacheConfig, ModelConfig
from miaotui.step_plan import SchedulerOutput
from miaotui.layers.tensor_parallel import bind_group
from miaotui.kernels.cpu_build import load_for_device
from miaotui.runner.cpu_allocator import return_large_blocks, settle_after_load
from miaotui.runner.model_runner import ModelRunner
from miaotui.runner.step_diff import StepDiffDecoder, StepDiffEncoder
from miaotui.runner.threads import configure_threads

logger = logging.getLogger(__name__)

# A step on a small CPU can take seconds; a collective inside a step waiting this long means a
# rank is gone. MIAOTUI_TP_TIMEOUT_S overrides it. Start-up (spawning, importing, loading the
# model) has its own, longer bound.
def _timeout() -> timedelta:
    return timedelta(seconds=float(os.environ.get("MIAOTUI_TP_TIMEOUT_S", "300")))


_STARTUP_TIMEOUT = timedelta(minutes=30)


class WorkerFailedError(RuntimeError):
    """A tensor-parallel worker process has exited; the engine cannot run steps any more."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend(device: str) -> str:
    return "nccl" if str(device).startswith("cuda") else "gloo"


# Runners whose workers are still up; shut down at exit by the hook below.
_LIVE_RUNNERS: "weakref.WeakSet[TensorParallelRunner]" = weakref.WeakSet()


def _shutdown_live_runners() -> None:
    for runner in list(_LIVE_RUNNERS):
        runner.shutdown()


# multiprocessing.util registered its exit hook (terminate daemonic children) when imported
# above; this one, registered after it, runs before it.
assert hasattr(multiprocessing.util, "_exit_function")
atexit.register(_shutdown_live_runners)


@contextlib.contextmanager
def _main_module_not_rerun():
    """While workers start: spawn would have each child re-run the parent's `__main__` (found by
    its `__spec__` or `__file__`), which starts workers again from a script without a main guard
    ("An attempt has been made to start a new process before ... bootstrapping")."""
    main = sys.modules.get("__main__")
    saved = {name: getattr(main, name) for name in ("__spec__", "__file__") if hasattr(main, name)}
    try:
        if main is not None:
            main.__spec__ = None
            if "__file__" in saved:
                del main.__file__
        yield
    finally:
        for name, value in saved.items():
            setattr(main, name, value)


def _init_group(model_config: ModelConfig, port: int, rank: int, world: int) -> Any:
    """The default group (rendezvous and the start-up barrier); returns the step group the
    sharded layers use, with the step timeout."""
    dist.init_process_group(_backend(model_config.device), init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world, timeout=_STARTUP_TIMEOUT)
    return dist.new_group(list(range(world)), timeout=_timeout())


def _rank_device(model_config: ModelConfig, rank: int) -> ModelConfig:
    """CUDA: rank r runs on the driver's device index + r (one GPU per rank)."""
    device = torch.device(model_config.device)
    if device.type != "cuda":
        return model_config
    index = (device.index or 0) + rank
    torch.cuda.set_device(index)
    return dataclasses.replace(model_config, device=f"cuda:{index}")


def _worker_main(rank: int, world: int, port: int, model_config: ModelConfig, cache_config: CacheConfig,
                 max_model_len: int, group_blocks: tuple[int, ...], steps) -> None:
    from miaotui.loader import load_for_config

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle (it stops us)
    configure_threads(model_config.threads, world)  # the cores are shared by all ranks
    return_large_blocks()
    load_for_device(model_config.device)  # CPU kernels (built by the driver already)
    model_config = _rank_device(model_config, rank)
    step_group = _init_group(model_config, port, rank, world)
    model, _ = load_for_config(model_config, rank=rank, progress=False)
    bind_group(model, step_group)
    runner = ModelRunner(model, model_config, cache_config, max_model_len, group_blocks=group_blocks)
    settle_after_load()
    decoder = StepDiffDecoder(cache_config.block_size)
    dist.barrier()  # loaded: the driver's constructor returns once every rank is here
    try:
        while True:
            try:
                message = pickle.loads(steps.recv_bytes())
            except EOFError:
                break  # the driver is gone
            if message is None:
                break
            runner.forward_inputs(decoder.decode(message))
    finally:
        dist.destroy_process_group()


class TensorParallelRunner(ModelRunner):
    """Rank 0: a ModelRunner over the driver's shard that also drives the worker ranks."""

    def __init__(self, model: nn.Module, model_config: ModelConfig, cache_config: CacheConfig,
                 max_model_len: int, max_num_batched_tokens: int | None = None,
                 max_num_seqs: int | None = None) -> None:
        world = model_config.tensor_parallel_size
        if not str(model_config.device).startswith("cuda"):
            configure_threads(model_config.threads, world)  # the cores are shared by all ranks
        _rank_device(model_config, 0)
        super().__init__(model, model_config, cache_config, max_model_len, max_num_batched_tokens,
                         max_num_seqs=max_num_seqs)
        self.world = world
        self.failure: str | None = None
        self.on_failure: list[Callable[[str], None]] = []
        self._closed = False
        self._in_step = False
        self._diffs = StepDiffEncoder()
        port = _free_port()
        # Every rank must hold the same number of blocks in each KV group: block ids are global.
        worker_cache = dataclasses.replace(cache_config, num_blocks=self.num_blocks)
        group_blocks = tuple(g.num_blocks for g in self.kv_layout.groups)
        ctx = mp.get_context("spawn")
        self.workers, self._pipes = [], []
        for rank in range(1, world):
            receive, send = ctx.Pipe(duplex=False)
            self.workers.append(ctx.Process(target=_worker_main, name=f"miaotui-tp-rank{rank}", daemon=True,
                                            args=(rank, world, port, model_config, worker_cache, max_model_len,
                                                  group_blocks, receive)))
            self._pipes.append(send)
        with _main_module_not_rerun():
            for proc in self.workers:
                proc.start()
        self._finalizer = weakref.finalize(self, TensorParallelRunner._stop_workers, self.workers)
        try:
            bind_group(model, self._join_group(model_config, port))
            self._wait_loaded()
        except BaseException:
            self._finalizer()
            raise
        _LIVE_RUNNERS.add(self)
        logger.info("tensor parallel: %d ranks (%s), %d threads each", world, _backend(model_config.device),
                    configure_threads(model_config.threads, world))
        threading.Thread(target=self._watch, name="miaotui-tp-watch", daemon=True).start()

    def _join_group(self, model_config: ModelConfig, port: int) -> Any:
        """The rendezvous, in a thread that is polled, so a worker that dies before joining
        (an import error, say) fails the start at once instead of after the start-up timeout."""
        joined: dict[str, Any] = {}

        def join() -> None:
            try:
                joined["group"] = _init_group(model_config, port, 0, self.world)
            except BaseException as exc:  # noqa: BLE001 - re-raised by the caller below
                joined["error"] = exc

        thread = threading.Thread(target=join, name="miaotui-tp-rendezvous", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(timeout=0.05)
            dead = self._dead_worker(wait_s=0) if thread.is_alive() else None
            if dead is not None:
                raise WorkerFailedError(f"{dead} while starting")
        if "error" in joined:
            raise joined["error"]
        return joined["group"]

    def _wait_loaded(self) -> None:
        """The start-up barrier, polled, so a worker that dies while loading fails the start."""
        work = dist.barrier(async_op=True)
        while not work.is_completed():
            dead = self._dead_worker(wait_s=0)
            if dead is not None:
                raise WorkerFailedError(f"{dead} while loading the model")
            time.sleep(0.05)
        work.wait()

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
        message = pickle.dumps(self._diffs.encode([s.request.request_id for s in sched.seqs], inputs))
        self._in_step = True
        try:
            for pipe in self._pipes:
                pipe.send_bytes(message)
            return self.forward_inputs(inputs, sched)
        except (RuntimeError, OSError) as exc:  # a pipe or a collective broke: name the rank that died
            self.failure = self._dead_worker() or f"a tensor-parallel step failed: {exc}"
            raise WorkerFailedError(self.failure) from exc
        finally:
            self._in_step = False

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
        """Stop the workers: a None message ends their loop; workers that cannot get it (a step
        is still running, or the ranks are out of step after a failure) are terminated."""
        if self._closed:
            return
        self._closed = True
        _LIVE_RUNNERS.discard(self)
        if self.failure is None and not self._in_step:
            for pipe in self._pipes:
                try:
                    pipe.send_bytes(pickle.dumps(None))
                except OSError:
                    pass  # that worker is already gone
            for proc in self.workers:
                proc.join(timeout=10)
        self._finalizer()
        if dist.is_initialized() and not self._in_step:
            dist.destroy_process_group()

    @staticmethod
    def _stop_workers(workers: list) -> None:
        for proc in workers:
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
