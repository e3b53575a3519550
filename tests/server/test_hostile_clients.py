"""Hostile clients against a real `miaotui serve`: each attack gets its 4xx (or a bounded, correct
answer) while /health answers within a second and another client's stream keeps progressing.

The witness is a stream that cannot end during a test (ignore_eos on a 32k context); progress is
observed (its token count grows), never assumed from a speed. Engine-thread faults, template
rendering and prefix-cache collisions have their own suites (test_engine_thread_faults.py,
test_request_chat_templates.py, tests/unit/test_prefix_cache_keys.py).
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time

import httpx
import pytest

from tests.conftest import make_tiny_checkpoint
from tests.server.conftest import serve

STALL_S = 3


@pytest.fixture(scope="module")
def server(tmp_path_factory, embedded_gguf):
    folder, _ = make_tiny_checkpoint(tmp_path_factory.mktemp("hostile_model"), "llama", vocab_size=49152,
                                     max_position_embeddings=32768)
    # One kernel thread: the engine never crowds the event loop's core on a 2-core machine.
    with serve(tmp_path_factory.mktemp("hostile"), "--model", str(folder), "--tokenizer", embedded_gguf,
               "--kv-cache-memory", "0.25", "--threads", "1", "--stream-stall-timeout", str(STALL_S)) as s:
        yield s


class Witness:
    """Another user's stream, counting the tokens it receives."""

    def __init__(self, base_url: str) -> None:
        self.tokens = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(base_url,), daemon=True)
        self._thread.start()

    def _read(self, base_url: str) -> None:
        body = {"prompt": "The witness", "max_tokens": 30000, "ignore_eos": True, "stream": True,
                "return_token_ids": True}
        try:
            with httpx.stream("POST", base_url + "/v1/completions", json=body, timeout=120) as resp:
                for line in resp.iter_lines():
                    if self._stop.is_set():
                        return
                    if line.startswith("data: {"):
                        self.tokens += len(json.loads(line[6:])["choices"][0].get("token_ids", []))
        except BaseException as exc:  # noqa: BLE001 - reported by progressed()
            self.error = exc

    def progressed(self, since: int, timeout: float = 60) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.error is None:
            if self.tokens > since:
                return True
            time.sleep(0.05)
        assert self.error is None, f"the witness stream failed: {self.error!r}"
        return False

    def close(self) -> None:
        self._stop.set()
        self._thread.join(60)


@pytest.fixture()
def witness(server):
    w = Witness(server.base_url)
    assert w.progressed(0), "the witness stream never started"
    yield w
    w.close()


def _healthy_within_a_second(base_url: str) -> None:
    start = time.monotonic()
    resp = httpx.get(base_url + "/health", timeout=5)
    assert resp.status_code == 200 and time.monotonic() - start < 1.0, resp.text


def _while_in_flight(base_url: str, witness: Witness, attack) -> object:
    """Run `attack()` in a thread; while it runs, /health answers within a second and the witness
    keeps receiving tokens (checked at least once, however fast the attack is). Returns its result."""
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", attack()), daemon=True)
    thread.start()
    checks = 0
    while thread.is_alive() or checks == 0:
        seen = witness.tokens
        _healthy_within_a_second(base_url)
        assert witness.progressed(seen), "the witness stopped receiving tokens"
        checks += 1
    thread.join(300)
    assert "value" in result, "the attack raised"
    return result["value"]


def _post(base_url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(base_url + path, json=body, timeout=300)


OVER_LIMITS = [
    ("/v1/completions", {"prompt": ["x"] * 257}, "prompt"),  # item 1: a body of many prompts
    ("/v1/completions", {"prompt": "x", "logit_bias": {str(i): 1 for i in range(49_000)}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "stop": ["s" * 10_000] * 300}, "stop"),  # item 3 (within the body limit)
    ("/v1/completions", {"prompt": "x", "n": 64}, "n"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}] * 3000}, "messages"),
    # item 2: a request's own template is code; without --trust-request-chat-template, refused
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "chat_template": "{% for a in range(99999) %}{% for b in range(99999) %}"
                                               "{% for c in range(99999) %}x{% endfor %}{% endfor %}{% endfor %}"},
     "chat_template"),
]


@pytest.mark.parametrize(("path", "body", "param"), OVER_LIMITS, ids=[p for _, _, p in OVER_LIMITS])
def test_an_oversized_request_is_a_400_and_nobody_else_waits(server, witness, path, body, param):
    resp = _while_in_flight(server.base_url, witness, lambda: _post(server.base_url, path, {"max_tokens": 4, **body}))
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param


def test_a_full_batch_at_the_limits_is_served_while_others_stream(server, witness):
    """256 prompts sharing a 1024-entry logit_bias: a bounded, correct answer, one choice each."""
    body = {"prompt": [f"prompt {i}" for i in range(256)], "max_tokens": 2,
            "logit_bias": {str(i): 0.5 for i in range(1024)}}
    resp = _while_in_flight(server.base_url, witness, lambda: _post(server.base_url, "/v1/completions", body))
    assert resp.status_code == 200, resp.text
    assert sorted(c["index"] for c in resp.json()["choices"]) == list(range(256))


def test_long_stop_strings_at_the_limits_cost_others_nothing(server, witness):
    """16 stop strings of 1024 characters sharing a 1000-character prefix that the text (token 81,
    "a", forced by the bias) keeps matching: everything is held back at every step, and the
    request still runs to its length while the witness keeps its pace."""
    stops = ["a" * 1000 + f"{i:024d}" for i in range(16)]
    body = {"prompt": "a", "max_tokens": 300, "ignore_eos": True, "stop": stops, "logit_bias": {"81": 100}}
    resp = _while_in_flight(server.base_url, witness, lambda: _post(server.base_url, "/v1/completions", body))
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    assert choice["finish_reason"] == "length" and choice["text"] == "a" * 300  # no stop completed


def _rss_kib(pid: int) -> int:
    status = open(f"/proc/{pid}/status").read()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))


def _metric(base_url: str, name: str) -> float:
    text = httpx.get(base_url + "/metrics", timeout=10).text
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_a_reader_that_stops_reading_is_disconnected_and_its_request_freed(server, witness):
    """A client that sends a stream request and then reads nothing (its socket full): after
    --stream-stall-timeout the server cuts it off and aborts its request; the server's memory
    stays bounded and the witness streams on throughout."""
    base = server.base_url
    rss_before = _rss_kib(server.proc.pid)
    running_before = _metric(base, "miaotui_num_requests_running")
    body = json.dumps({"prompt": "flood", "max_tokens": 30000, "ignore_eos": True, "stream": True,
                       "logprobs": 20}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    sock.connect(("127.0.0.1", server.port))
    try:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

        def cut_off() -> bool:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                if "read nothing for" in server.log_text():
                    return True
                time.sleep(0.2)
            return False

        assert _while_in_flight(base, witness, cut_off), f"never disconnected:\n{server.log_text()[-3000:]}"
        deadline = time.monotonic() + 60
        while _metric(base, "miaotui_num_requests_running") > running_before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _metric(base, "miaotui_num_requests_running") == running_before  # its request aborted
        # Bounded: the stalled stream held at most its unread deltas, not copies of its output.
        assert _rss_kib(server.proc.pid) - rss_before < 200 * 1024
        sock.settimeout(30)
        received = b""
        while chunk := sock.recv(65536):  # the server closed the connection: recv reaches EOF
            received += chunk
        assert received.startswith(b"HTTP/1.1 200")
    finally:
        sock.close()
    seen = witness.tokens
    assert witness.progressed(seen)
