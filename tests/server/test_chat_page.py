"""The chat page in real headless Chromium (Debian's, driven by Playwright) against a real server.

Screenshots go to test-artifacts/ at the project root.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.embedded

CHROMIUM = os.environ.get("MIAOTUI_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@pytest.fixture(scope="module")
def browser():
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        pytest.fail(f"Chromium not found at {CHROMIUM}; `make test` installs Debian's chromium package")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox"])
        yield b
        b.close()


def _send(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def _wait_idle(base_url: str, timeout: float = 60) -> None:
    """Until the server's /metrics shows nothing running or admitted; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = httpx.get(base_url + "/metrics").text
        busy = re.findall(r"^miaotui_num_(?:requests_running|sequences_admitted) ([0-9.e+-]+)$", metrics, re.M)
        if len(busy) == 2 and all(float(v) == 0 for v in busy):
            return
        assert time.monotonic() < deadline, f"the server still busy after {timeout:.0f} s: {busy}"
        time.sleep(0.1)


def test_streamed_reply_then_stop_on_a_narrow_screen(browser, embedded_server):
    page = browser.new_page(viewport={"width": 375, "height": 740})
    page.goto(embedded_server.base_url + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('context')", timeout=60_000)
    page.click("#settings-toggle")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "24")
    page.click("#settings-toggle")

    _send(page, "Say hello.")
    page.wait_for_selector(".msg.assistant[data-done='complete']", timeout=60_000)
    reply = page.inner_text(".msg.assistant .content")
    assert reply.strip(), "the reply is empty"
    assert "tokens/s" in page.inner_text(".msg.assistant .meta")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), "horizontal scroll"
    page.screenshot(path=str(ARTIFACTS / "chat-page-narrow.png"), full_page=True)

    # A long reply, stopped while it streams: the text stops growing and the bubble says so.
    page.click("#settings-toggle")
    page.fill("#max-tokens", "2000")  # greedy: the embedded model's story runs to the limit, so it
    page.fill("#temperature", "0")  # is still streaming when Stop is clicked (a sampled one may end early)
    page.click("#settings-toggle")
    _send(page, "Write a very long story about a cat who sails around the world.")
    second = ".msg.assistant >> nth=1"
    page.wait_for_function(
        "(document.querySelectorAll('.msg.assistant .content')[1] || {textContent: ''}).textContent.length > 20",
        timeout=60_000)
    assert page.is_visible("#stop")
    page.click("#stop")
    page.wait_for_selector(".msg.assistant[data-done='stopped']", timeout=60_000)
    stopped_text = page.inner_text(second + " >> .content")
    # The server saw the page leave and dropped the request: no token can arrive any more, and
    # the text is still the text at Stop.
    _wait_idle(embedded_server.base_url)
    assert page.inner_text(second + " >> .content") == stopped_text
    assert "stopped" in page.inner_text(second + " >> .meta")
    assert page.is_visible("#send") and not page.is_visible("#stop")
    page.set_viewport_size({"width": 1200, "height": 800})
    page.screenshot(path=str(ARTIFACTS / "chat-page-wide.png"), full_page=True)
    page.close()


def test_page_asks_for_the_api_key_and_uses_it(browser, tmp_path, embedded_gguf):
    from tests.server.conftest import serve

    with serve(tmp_path, "--kv-cache-memory", "0.25", "--max-model-len", "1024", "--api-key", "k-123") as server:
        page = browser.new_page()
        page.goto(server.base_url + "/")
        page.wait_for_function("document.getElementById('model').textContent.includes('API key')", timeout=60_000)
        assert page.is_visible("#api-key")
        page.fill("#api-key", "k-123")
        page.dispatch_event("#api-key", "change")
        page.wait_for_function("document.getElementById('model').textContent.includes('context')", timeout=60_000)
        page.fill("#max-tokens", "8")
        _send(page, "Hi")
        page.wait_for_selector(".msg.assistant[data-done='complete']", timeout=60_000)
        assert page.inner_text(".msg.assistant .content").strip()
        page.close()


def test_the_thinking_streams_into_a_fold_above_the_answer(browser, embedded_server):
    """A reply with delta.reasoning_content (the server's own split is tested in
    test_reasoning_output.py; here the stream is canned): the thinking goes into a closed
    <details> above the answer, and only the answer joins the conversation."""
    import json

    def sse(*deltas) -> str:
        events = [{"choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
        events.append({"choices": [], "usage": {"completion_tokens": 4}})
        return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"

    sent: list[dict] = []

    def fake_chat(route) -> None:
        sent.append(json.loads(route.request.post_data))
        route.fulfill(status=200, content_type="text/event-stream", body=sse(
            {"role": "assistant", "content": ""}, {"reasoning_content": "Let me "},
            {"reasoning_content": "think."}, {"content": "The answer."}))

    page = browser.new_page()
    page.route("**/v1/chat/completions", fake_chat)
    page.goto(embedded_server.base_url + "/")
    _send(page, "Why?")
    page.wait_for_selector(".msg.assistant[data-done='complete']", timeout=60_000)
    fold = page.locator(".msg.assistant details.thinking")
    assert fold.count() == 1 and fold.get_attribute("open") is None
    assert page.inner_text(".msg.assistant details.thinking summary") == "Thought"
    assert page.text_content(".msg.assistant details.thinking .reasoning") == "Let me think."
    assert page.inner_text(".msg.assistant .content") == "The answer."
    # The fold comes first in the bubble, then the answer.
    assert page.evaluate("document.querySelector('.msg.assistant').firstElementChild.tagName") == "DETAILS"
    page.click(".msg.assistant details.thinking summary")
    assert page.is_visible(".msg.assistant details.thinking .reasoning")
    page.screenshot(path=str(ARTIFACTS / "chat-page-thinking.png"), full_page=True)
    _send(page, "And?")
    page.wait_for_function("document.querySelectorAll(\".msg.assistant[data-done='complete']\").length == 2",
                           timeout=60_000)
    assert sent[1]["messages"][1] == {"role": "assistant", "content": "The answer."}
    page.close()
