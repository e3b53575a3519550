"""`miaotui serve --chat-template`, `--seed` and `--log-level`, on real server processes over a
tiny random model (each starts in a few seconds)."""

from __future__ import annotations

import subprocess
import sys

import httpx

from tests.server.conftest import serve

TEMPLATE = "{% for m in messages %}<<{{ m.role }}>> {{ m.content }}\n{% endfor %}<<reply>>"


def _sampled(server, prompt: str = "Once upon a time") -> str:
    body = {"prompt": prompt, "max_tokens": 24, "temperature": 1.0, "ignore_eos": True}
    reply = httpx.post(server.base_url + "/v1/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["text"]


def test_chat_template_flag_renders_requests_without_their_own(tmp_path, tiny_server_model, embedded_tokenizer):
    folder, tokenizer = tiny_server_model
    template_file = tmp_path / "template.jinja"
    template_file.write_text(TEMPLATE)
    messages = [{"role": "user", "content": "Hello there"}]
    expected = embedded_tokenizer.encode("<<user>> Hello there\n<<reply>>", add_special_tokens=False)
    with serve(tmp_path, "--model", folder, "--tokenizer", tokenizer, "--chat-template", str(template_file)) as server:
        ids = httpx.post(server.base_url + "/tokenize", json={"messages": messages}, timeout=60).json()["tokens"]
        assert ids == expected
        usage = httpx.post(server.base_url + "/v1/chat/completions", timeout=120,
                           json={"messages": messages, "max_tokens": 2}).json()["usage"]
        assert usage["prompt_tokens"] == len(expected)
    # Inline template text works too; a path that does not exist fails before anything loads.
    with serve(tmp_path, "--model", folder, "--tokenizer", tokenizer, "--chat-template", TEMPLATE) as server:
        assert httpx.post(server.base_url + "/tokenize", json={"messages": messages}).json()["tokens"] == expected
    missing = subprocess.run([sys.executable, "-m", "miaotui.cli", "serve", "--model", folder, "--chat-template",
                              str(tmp_path / "no-such.jinja")], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "chat_template" in missing.stderr and "no-such.jinja" in missing.stderr
    assert "serving on" not in missing.stderr


def test_seed_flag_makes_unseeded_requests_reproducible(tmp_path, tiny_server_model):
    folder, tokenizer = tiny_server_model
    texts = {}
    for name, extra in (("seed-a", ["--seed", "3"]), ("seed-b", ["--seed", "3"]), ("none-a", []), ("none-b", [])):
        with serve(tmp_path, "--model", folder, "--tokenizer", tokenizer, *extra) as server:
            texts[name] = [_sampled(server), _sampled(server)]
    assert texts["seed-a"] == texts["seed-b"], "two servers with --seed 3 drew differently"
    # 24 near-uniform draws over 49k ids repeat with negligible probability: equal means shared state.
    assert texts["none-a"] != texts["none-b"], "two servers without --seed drew the same tokens"
    assert texts["seed-a"][0] != texts["seed-a"][1], "one server's two unseeded requests drew the same"


def test_log_level_debug_logs_each_request(tmp_path, tiny_server_model):
    folder, tokenizer = tiny_server_model
    with serve(tmp_path, "--model", folder, "--tokenizer", tokenizer, "--log-level", "debug") as server:
        assert httpx.get(server.base_url + "/v1/models", timeout=60).status_code == 200
        server.terminate()  # the log is complete once the process has exited
        assert '"GET /v1/models HTTP/1.1" 200' in server.log_text()
