"""Chat templates on the server: a request's own template only with --trust-request-chat-template;
every render (the model's template too) in a worker process under a time and an output-size limit,
so a runaway template is a 400 that names the limit and the server keeps serving."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import serve, tiny_client

USER = [{"role": "user", "content": "Hello there"}]
CUSTOM = "{% for m in messages %}<<{{ m.role }}>> {{ m.content }}\n{% endfor %}{{ bos_token }}<<reply>>"
# Jinja caps range() at 100000 items but not nesting: 10**15 empty iterations, no output.
NESTED = ("{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}"
          "{% endfor %}{% endfor %}{% endfor %}")
# 10**11 characters written a megabyte at a time.
HUGE = "{% for i in range(100000) %}{{ 'x' * 1000000 }}{% endfor %}"
# One expression asking for 10 GB at once.
GIANT = "{{ 'x' * 10000000000 }}"


def _chat(base_url: str, template: str | None = None, messages=USER, timeout: float = 120) -> httpx.Response:
    body = {"messages": messages, "max_tokens": 2}
    if template is not None:
        body["chat_template"] = template
    return httpx.post(base_url + "/v1/chat/completions", json=body, timeout=timeout)


# --- in-process apps --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def untrusting(tiny_server_model):
    with tiny_client(tiny_server_model) as c:
        yield c


@pytest.fixture(scope="module")
def trusting(tiny_server_model):
    with tiny_client(tiny_server_model, trust_request_chat_template=True) as c:
        yield c


def test_a_request_template_without_the_flag_is_a_400_naming_it(untrusting):
    reply = untrusting.post("/v1/chat/completions", json={"messages": USER, "chat_template": CUSTOM,
                                                          "max_tokens": 2})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "chat_template" and "--trust-request-chat-template" in error["message"]
    assert untrusting.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2}).status_code == 200


def test_with_the_flag_a_request_template_renders(trusting, embedded_tokenizer):
    expected = embedded_tokenizer.encode("<<user>> Hello there\n<|im_start|><<reply>>", add_special_tokens=False)
    reply = trusting.post("/v1/chat/completions", json={"messages": USER, "chat_template": CUSTOM, "max_tokens": 2})
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["prompt_tokens"] == len(expected)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_the_models_template_renders_as_transformers_does(untrusting, embedded_tokenizer, add_generation_prompt):
    from miaotui.tokenizer_core import transformers_tokenizer

    hf = transformers_tokenizer(embedded_tokenizer)
    conversation = [{"role": "system", "content": "Be brief."}, *USER,
                    {"role": "assistant", "content": "Hi! ünïcødé 你好"}, {"role": "user", "content": "?"}]
    for messages in (USER, conversation):
        expected = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                          return_dict=False)
        reply = untrusting.post("/tokenize", json={"messages": messages,
                                                   "add_generation_prompt": add_generation_prompt})
        assert reply.status_code == 200, reply.text
        assert reply.json()["tokens"] == expected
    chat = untrusting.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2})
    assert chat.json()["usage"]["prompt_tokens"] == len(hf.apply_chat_template(
        USER, add_generation_prompt=True, tokenize=True, return_dict=False))


def test_the_limits_are_validated():
    from miaotui.config import ServerConfig

    for field, value in (("chat_template_timeout_s", 0), ("chat_template_max_chars", 0),
                         ("trust_request_chat_template", "yes")):
        with pytest.raises(ValueError, match=field):
            ServerConfig(**{field: value})


def test_shutdown_stops_a_busy_worker_and_a_cancelled_render_keeps_its_slot():
    import asyncio

    from miaotui.server.template_worker import ChatTemplateRenderer

    async def scenario() -> set[int]:
        renderer = ChatTemplateRenderer(workers=1)
        assert await renderer.render("{{ messages[0].content }}", USER, {}, True, 60, 1000) == "Hello there"
        runaway = asyncio.ensure_future(renderer.render(NESTED, USER, {}, True, 600, 1000))
        pids = {w.proc.pid for w in renderer._live}
        while not renderer._slots.locked():  # the runaway render holds the only worker
            await asyncio.sleep(0.01)
        runaway.cancel()  # its client left: the worker stays busy, and its slot taken
        await asyncio.sleep(0)
        assert renderer._slots.locked()
        renderer.shutdown()  # kills the busy worker; the render's thread then ends
        with pytest.raises(asyncio.CancelledError):
            await runaway
        with pytest.raises(RuntimeError, match="shutting down"):
            await renderer.render("{{ 1 }}", USER, {}, True, 60, 1000)
        return pids

    pids = asyncio.run(scenario())
    assert pids and not _wait_gone(pids)


# --- a real server --------------------------------------------------------------------------------
def _workers(server_pid: int) -> set[int]:
    """The server's render worker processes (children running template_worker)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == server_pid and b"template_worker" in (stat.parent / "cmdline").read_bytes():
                found.add(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue  # a process that ended while we looked
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _wait_gone(pids: set[int], timeout: float = 60) -> set[int]:
    deadline = time.monotonic() + timeout
    while (left := {p for p in pids if _running(p)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def _rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_server_model):
    folder, tokenizer = tiny_server_model
    seen: set[int] = set()
    with serve(tmp_path_factory.mktemp("request_templates"), "--model", folder, "--tokenizer", tokenizer,
               "--trust-request-chat-template", "--chat-template-timeout", "2") as s:
        s.seen_workers = seen
        yield s
        seen |= _workers(s.proc.pid)
        assert s.terminate() == 0
    assert not _wait_gone(seen), "render workers outlived the server"


def test_a_runaway_template_is_stopped_at_the_time_limit_while_the_server_serves(server):
    url = server.base_url
    assert _chat(url).status_code == 200  # a worker is up
    slow: dict = {}

    def run_slow() -> None:
        start = time.monotonic()
        slow["reply"] = _chat(url, NESTED)
        slow["elapsed"] = time.monotonic() - start

    thread = threading.Thread(target=run_slow)
    thread.start()
    health_during = []
    other = None
    while thread.is_alive():
        start = time.monotonic()
        health = httpx.get(url + "/health", timeout=30)
        latency = time.monotonic() - start
        if thread.is_alive():  # answered while the runaway request was still pending
            health_during.append((health.status_code, latency))
            server.seen_workers |= _workers(server.proc.pid)
        if other is None:
            other = _chat(url)  # another chat request, beside the runaway one
        time.sleep(0.05)
    thread.join()
    assert health_during, "the runaway request ended before /health could be asked"
    assert all(code == 200 and latency < 1.0 for code, latency in health_during), health_during
    assert other.status_code == 200, other.text
    reply = slow["reply"]
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "chat_template"
    assert "time limit of 2 s" in error["message"] and "--chat-template-timeout" in error["message"]
    assert slow["elapsed"] < 60
    assert _chat(url).status_code == 200  # still serving, the model's template too
    assert len(_workers(server.proc.pid)) <= 2


@pytest.mark.parametrize("template, limit", [(HUGE, "size limit"), (GIANT, "memory limit")])
def test_a_template_writing_too_much_is_a_400_and_the_server_stays_small(server, template, limit):
    rss_before = _rss_kib(server.proc.pid)
    reply = _chat(server.base_url, template)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "chat_template" and limit in error["message"], error
    if limit == "size limit":
        assert "--chat-template-max-chars" in error["message"]
    # The rendered text never reached the server: its memory grew by far less than a gigabyte.
    assert _rss_kib(server.proc.pid) - rss_before < 512 * 1024
    assert _chat(server.base_url).status_code == 200


def test_workers_exit_when_the_server_is_killed(tmp_path, tiny_server_model):
    folder, tokenizer = tiny_server_model
    with serve(tmp_path, "--model", folder, "--tokenizer", tokenizer) as s:
        assert _chat(s.base_url).status_code == 200  # the model's template rendered in a worker
        workers = _workers(s.proc.pid)
        assert workers
        s.proc.send_signal(signal.SIGKILL)
        s.proc.wait(30)
        assert not _wait_gone(workers), "render workers outlived a killed server"
