"""The server's chat template renders, in worker processes, under a time and an output-size limit.

A chat template is a program: Jinja's sandbox stops it from touching the machine, but not from
looping (range() is capped, nesting is not) or from writing gigabytes. Rendered on the event loop,
one such template stopped the whole server; rendered in a thread, it would burn a core for ever,
since a Python thread cannot be stopped. So the server renders in separate processes:

- Pool: at most `workers` long-lived processes (`python -m miaotui.server.template_worker`),
  spawned on demand (or one by `prestart()`, in the background); each renders one job at a time.
  A render waits (on the event loop, not in a thread) for a free worker.
- Time: a render that has not answered `timeout_s` after its job was sent is a RenderLimitError
  and its worker is killed (SIGKILL) and replaced by the next render that needs one. The clock
  starts once the worker has reported ready, so its start-up (importing transformers) never
  counts against a render.
- Size: the worker renders with `Template.generate()` and stops as soon as the output passes
  `max_chars`, so output written piece by piece never accumulates beyond the limit. A single
  giant expression (`'x' * 10**10`) is stopped by the worker's address-space limit
  (MEMORY_HEADROOM above what it used when ready): a MemoryError, reported as the memory limit.
- Same text as offline: the worker compiles with transformers' own chat-template environment
  (its filters, globals, extensions) and passes what `apply_chat_template` passes (the messages,
  tools=None, documents=None, add_generation_prompt, the tokenizer's special tokens), so the
  rendered string is the one `apply_chat_template(..., tokenize=False)` returns. The parent
  tokenizes it.
- No orphans: `shutdown()` kills every worker; a worker whose parent died (even by SIGKILL)
  exits within a second (a watchdog thread polls its parent id; the GIL switches to it even
  during a runaway render), and an idle one also exits when its stdin closes.

Protocol: frames of a 4-byte big-endian length and UTF-8 JSON. The worker's original stdout
carries its frames; its fd 1 is pointed at stderr so that nothing printed can corrupt them.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

WORKER_MODULE = "miaotui.server.template_worker"
# The address space a worker may grow by while rendering, beyond what it had at start-up.
MEMORY_HEADROOM = 1 << 30
_HEADER = struct.Struct(">I")


class RenderLimitError(ValueError):
    """A render passed one of the limits; `limit` is "time", "size" or "memory"."""

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message)
        self.limit = limit


def _frame(payload: dict[str, Any]) -> bytes:
    data = json.dumps(payload, ensure_ascii=False).encode()
    return _HEADER.pack(len(data)) + data


# --- the parent's side --------------------------------------------------------------------------
class _Worker:
    """One worker process and its reply buffer; used by one render at a time."""

    def __init__(self) -> None:
        # The package's own folder first on the path: the child imports this very module even
        # when the server runs from a source tree that is not installed.
        root = str(Path(__file__).resolve().parents[2])
        code = f"import sys; sys.path.insert(0, {root!r}); from {WORKER_MODULE} import main; main()"
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, close_fds=True)
        self.ready = False
        self._buffer = bytearray()

    def wait_ready(self, timeout_s: float) -> None:
        """Block until the worker has imported its renderer; RuntimeError when it cannot."""
        if self.ready:
            return
        reply = self.receive(time.monotonic() + timeout_s)
        if reply is None:
            raise RuntimeError(f"the chat template worker did not start within {timeout_s:g} s")
        if not reply.get("ready"):
            raise RuntimeError(f"the chat template worker could not start: {reply.get('message')}")
        self.ready = True

    def send(self, job: bytes) -> None:
        self.proc.stdin.write(job)
        self.proc.stdin.flush()

    def receive(self, deadline: float) -> dict[str, Any] | None:
        """The next reply; None when the monotonic `deadline` passes first; EOFError when the
        worker has exited. Only the raw fd is read: the pipe's Python buffer stays empty."""
        fd = self.proc.stdout.fileno()
        while True:
            if len(self._buffer) >= _HEADER.size:
                (size,) = _HEADER.unpack_from(self._buffer)
                if len(self._buffer) >= _HEADER.size + size:
                    data = bytes(self._buffer[_HEADER.size:_HEADER.size + size])
                    del self._buffer[:_HEADER.size + size]
                    return json.loads(data)
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise EOFError("the chat template worker exited")
            self._buffer += chunk

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()

    def stop(self) -> int:
        """Kill the process (if still running), reap it and close its pipes; its exit status.
        Only by the worker's user: a render's thread may be reading those pipes."""
        self.kill()
        code = self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass  # a pipe to a killed process may fail to flush; it is gone either way
        return code


class ChatTemplateRenderer:
    """The pool of render workers of one server (see the module's docstring)."""

    def __init__(self, workers: int = 2, start_timeout_s: float = 60.0) -> None:
        if workers < 1:
            raise ValueError(f"workers: must be >= 1, got {workers}")
        self._size = workers
        self._start_timeout_s = start_timeout_s
        self._lock = threading.Lock()  # guards the lists: renders run in threads, shutdown anywhere
        self._idle: list[_Worker] = []
        self._live: set[_Worker] = set()
        self._closed = False
        self._slots: asyncio.Semaphore | None = None  # made on the serving loop, at first use
        self._slots_loop: asyncio.AbstractEventLoop | None = None

    def prestart(self) -> None:
        """Spawn one worker now (it imports in its own process): the first render need not wait."""
        with self._lock:
            if not self._closed and not self._live:
                try:
                    self._idle.append(self._spawn())
                except RuntimeError:
                    pass  # the first render tries again, and reports it

    async def render(self, template: str, messages: list[dict[str, Any]], variables: dict[str, Any],
                     add_generation_prompt: bool, timeout_s: float, max_chars: int) -> str:
        """The template's text for `messages`. RenderLimitError past a limit; ValueError when the
        template refuses the messages or fails; RuntimeError when no worker can run it."""
        if self._closed:
            raise RuntimeError("the server is shutting down")
        job = _frame({"template": template, "messages": messages, "variables": variables,
                      "add_generation_prompt": add_generation_prompt, "max_chars": max_chars})
        loop = asyncio.get_running_loop()
        if self._slots is None or self._slots_loop is not loop:
            self._slots, self._slots_loop = asyncio.Semaphore(self._size), loop
        slots = self._slots
        await slots.acquire()
        try:
            task = asyncio.ensure_future(asyncio.to_thread(self._render, job, timeout_s, max_chars))
        except BaseException:
            slots.release()
            raise

        def done(t: asyncio.Future) -> None:
            # The slot is the worker's: free only once the thread has let go of it, even when the
            # request was cancelled meanwhile (its client left).
            slots.release()
            if not t.cancelled():
                t.exception()  # retrieved, so a cancelled request's error is not logged as lost

        task.add_done_callback(done)
        return await asyncio.shield(task)

    def shutdown(self) -> None:
        """Kill every worker, idle or rendering; later renders raise RuntimeError."""
        with self._lock:
            self._closed = True
            idle, busy = list(self._idle), self._live.difference(self._idle)
            self._live.clear()
            self._idle.clear()
        for worker in busy:
            worker.kill()  # its render's thread sees the pipe close, and stops (reaps) it
        for worker in idle:
            worker.stop()

    # --- in a thread -------------------------------------------------------------------------
    def _take(self) -> _Worker:
        with self._lock:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            if self._idle:
                return self._idle.pop()
            return self._spawn()

    def _spawn(self) -> _Worker:
        """A new live worker (the lock held)."""
        try:
            worker = _Worker()
        except OSError as exc:  # no processes or file descriptors left
            raise RuntimeError(f"cannot start a chat template worker: {exc}") from exc
        self._live.add(worker)
        return worker

    def _give_back(self, worker: _Worker) -> None:
        with self._lock:
            if worker in self._live:
                self._idle.append(worker)
                return
        worker.stop()  # shutdown took it meanwhile

    def _retire(self, worker: _Worker) -> int:
        with self._lock:
            self._live.discard(worker)
        return worker.stop()

    def _started(self, job: bytes) -> _Worker:
        """A ready worker holding `job`. A worker that died while idle is replaced once."""
        for attempt in range(2):
            worker = self._take()
            was_ready = worker.ready
            try:
                worker.wait_ready(self._start_timeout_s)
                worker.send(job)
                return worker
            except (OSError, EOFError, RuntimeError) as exc:
                code = self._retire(worker)
                if attempt or not was_ready or self._closed:  # a fresh one failing would fail again
                    raise RuntimeError(f"the chat template worker failed (exit status {code}): {exc}; "
                                       "the server log has its error") from exc
        raise AssertionError("unreachable")

    def _render(self, job: bytes, timeout_s: float, max_chars: int) -> str:
        worker = self._started(job)
        try:
            reply = worker.receive(time.monotonic() + timeout_s)
        except (OSError, EOFError) as exc:
            code = self._retire(worker)
            if self._closed:
                raise RuntimeError("the server is shutting down") from exc
            # The job was the last thing it ran: the template's render ended the process.
            raise RenderLimitError("memory", f"the chat template's render ended its worker process (exit "
                                             f"status {code}), likely past its memory limit") from exc
        if reply is None:
            self._retire(worker)  # still rendering: only a kill stops it
            raise RenderLimitError("time", f"the chat template did not finish rendering within the time "
                                           f"limit of {timeout_s:g} s (--chat-template-timeout)")
        error = reply.get("error")
        if error == "memory":
            self._retire(worker)  # a process that ran out of memory may be left in a poor state
            raise RenderLimitError("memory", f"the chat template's render passed the memory limit of "
                                             f"{MEMORY_HEADROOM >> 20} MiB")
        self._give_back(worker)
        if error == "size":
            raise RenderLimitError("size", f"the chat template's output passed the size limit of {max_chars} "
                                           "characters (--chat-template-max-chars)")
        if error == "template":
            raise ValueError(f"the chat template rejected the messages: {reply['message']}")
        return reply["text"]


# --- the worker's side --------------------------------------------------------------------------
def _exit_with_parent(parent: int) -> None:
    while True:
        time.sleep(0.25)
        if os.getppid() != parent:  # re-parented: the server is gone
            os._exit(0)


def _cap_memory() -> None:
    try:
        import resource

        with open("/proc/self/status") as status:
            size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = size + MEMORY_HEADROOM
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, OSError, StopIteration, ValueError):
        pass  # not Linux: the time limit still stops a render, only later


def _read_job(jobs) -> dict[str, Any] | None:
    header = jobs.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None  # the parent closed the pipe
    (size,) = _HEADER.unpack(header)
    return json.loads(jobs.read(size))


def _render_job(job: dict[str, Any], hf: Any) -> dict[str, Any]:
    from jinja2 import TemplateError

    plain = getattr(hf, "_plain_template_data", lambda value: value)
    alias = getattr(hf, "_alias_reasoning_fields", lambda chat: chat)
    max_chars = job["max_chars"]
    try:
        template = hf._compile_jinja_template(job["template"])  # cached per template text
        # As transformers' render_jinja_template calls render(): the same names, the same values.
        pieces = template.generate(messages=alias(plain(job["messages"])), tools=None, documents=None,
                                   add_generation_prompt=job["add_generation_prompt"], **plain(job["variables"]))
        out: list[str] = []
        size = 0
        for piece in pieces:
            size += len(piece)
            if size > max_chars:
                pieces.close()
                return {"error": "size"}
            out.append(piece)
        return {"text": "".join(out)}
    except MemoryError:
        return {"error": "memory"}
    except TemplateError as exc:
        return {"error": "template", "message": str(exc)}
    except Exception as exc:  # noqa: BLE001 - anything the template's own code raised (TypeError, ...)
        return {"error": "template", "message": f"{type(exc).__name__}: {exc}"}


def main() -> None:
    """The worker process: jobs on stdin, replies on the original stdout, until stdin closes."""
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a library's print goes to the server's log, never into the replies
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), name="miaotui-parent-watch",
                     daemon=True).start()

    def reply(payload: dict[str, Any]) -> None:
        replies.write(_frame(payload))
        replies.flush()

    try:
        import transformers.utils.chat_template_utils as hf

        hf._compile_jinja_template  # noqa: B018 - fail now, at start-up, if this transformers lacks it
    except (ImportError, AttributeError) as exc:
        reply({"ready": False, "message": f"cannot load transformers' chat template renderer: {exc}"})
        return
    _cap_memory()
    reply({"ready": True})
    jobs = sys.stdin.buffer
    while (job := _read_job(jobs)) is not None:
        reply(_render_job(job, hf))


if __name__ == "__main__":
    main()
