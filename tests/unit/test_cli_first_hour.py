"""What a new user meets first on the command line, run as they would run it (subprocesses):
the chat template in `generate`, fresh randomness without a seed, Ctrl-C, `--help` and
`--version`, chat commands, and a port already in use."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from miaotui import SamplingParams
from miaotui.cli import build_parser

pytestmark = pytest.mark.embedded

ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
CLI = [sys.executable, "-m", "miaotui.cli"]


def _miaotui(*args: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], input=stdin, text=True, capture_output=True, timeout=timeout, env=ENV)


def _sigint_as_at_a_terminal() -> None:
    """In the child before exec: a test run started in the background (`cmd &` in a script, as a
    CI runner may) inherits SIGINT ignored, and so would the CLI under test. A user's terminal
    delivers it: restore the default, so Python installs its KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for(stream, marker: str, proc: subprocess.Popen, deadline_s: float = 180) -> str:
    """Read `stream` (a child's pipe) until `marker` appears; fail if the child exits first."""
    seen = ""
    deadline = time.monotonic() + deadline_s
    while marker not in seen:
        assert time.monotonic() < deadline, f"no {marker!r} within {deadline_s} s; got {seen[-2000:]!r}"
        char = stream.read(1)
        if not char:
            pytest.fail(f"the process exited (rc {proc.wait()}) before {marker!r}; got {seen[-2000:]!r}")
        seen += char
    return seen


# --- item 4: generate answers through the chat template --------------------------------------
def test_generate_applies_the_chat_template_and_answers(embedded_llm):
    question = "What is the capital of France?"
    proc = _miaotui("generate", question, "--temperature", "0", "--max-tokens", "24")
    assert proc.returncode == 0, proc.stderr
    expected = embedded_llm.chat([{"role": "user", "content": question}],
                                 SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0].outputs[0].text
    assert proc.stdout == expected + "\n"
    assert "Paris" in proc.stdout


def test_generate_reads_the_prompt_from_stdin(embedded_llm):
    question = "What is the capital of France?"
    piped = _miaotui("generate", "-", "--temperature", "0", "--max-tokens", "16", stdin=question + "\n")
    given = _miaotui("generate", question, "--temperature", "0", "--max-tokens", "16")
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == given.stdout and "Paris" in piped.stdout
    empty = _miaotui("generate", "-", stdin="")
    assert empty.returncode == 2 and "standard input" in empty.stderr


# --- item 3: fresh randomness without a seed, exact with one ---------------------------------
def test_unseeded_generate_runs_differ_and_seeded_runs_match():
    args = ("generate", "Once upon a time", "--max-tokens", "32", "--temperature", "1.0")
    unseeded = [_miaotui(*args) for _ in range(3)]
    assert all(p.returncode == 0 for p in unseeded), [p.stderr for p in unseeded]
    texts = [p.stdout for p in unseeded]
    assert len(set(texts)) == 3, f"unseeded runs repeated themselves: {texts}"
    seeded = [_miaotui(*args, "--seed", "7") for _ in range(2)]
    assert seeded[0].returncode == 0, seeded[0].stderr
    assert seeded[0].stdout == seeded[1].stdout


# --- item 5: Ctrl-C ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def endless_model(tmp_path_factory):
    """A tiny random Llama with a 64k context and the embedded model's vocabulary size: with
    --ignore-eos it writes far longer than any test waits, so a SIGINT always lands mid-stream."""
    from conftest import make_tiny_checkpoint

    folder, _ = make_tiny_checkpoint(tmp_path_factory.mktemp("endless"), "llama",
                                     max_position_embeddings=65536, vocab_size=49152)
    return str(folder)


def test_ctrl_c_during_generate_exits_130_without_a_traceback(endless_model, embedded_gguf):
    proc = subprocess.Popen([*CLI, "generate", "Hi", "--model", endless_model, "--tokenizer", embedded_gguf,
                             "--raw", "--ignore-eos", "--max-tokens", "60000", "--kv-cache-memory", "0.25"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            preexec_fn=_sigint_as_at_a_terminal)
    try:
        proc.stdout.read(1)  # the stream has started: a SIGINT now lands mid-generation
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.rstrip().endswith("miaotui: interrupted")


# The first chat turn loads the transformers tokenizer for the chat template. The child holds
# that load open (as a slow disk would) and says so, so the SIGINT lands inside it.
SLOW_TEMPLATE_LOAD = """
import sys, time, traceback
import miaotui.tokenizer as tokenizer

real = tokenizer._full_gguf_tokenizer

def slow(*args, **kwargs):
    if any(frame.name == "chat_prompt_ids" for frame in traceback.extract_stack()):
        print("TEMPLATE-LOADING", file=sys.stderr, flush=True)
        time.sleep(600)
    return real(*args, **kwargs)

tokenizer._full_gguf_tokenizer = slow
from miaotui.cli import main
sys.exit(main(["chat", "--temperature", "0", "--max-tokens", "8"]))
"""


def test_ctrl_c_during_the_first_chat_turn_exits_130_without_a_traceback(tmp_path, embedded_tokenizer):
    # embedded_tokenizer has built the tokenizer cache with its core, so the engine starts on
    # the core and the first turn is what loads transformers' tokenizer.
    script = tmp_path / "slow_chat.py"
    script.write_text(textwrap.dedent(SLOW_TEMPLATE_LOAD))
    proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, preexec_fn=_sigint_as_at_a_terminal)
    try:
        proc.stdin.write("Hello\n")
        proc.stdin.flush()
        seen = _wait_for(proc.stderr, "TEMPLATE-LOADING", proc)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    err = seen + err
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.rstrip().endswith("miaotui: interrupted")


# --- item 8: flags, help, version, chat commands, ports ----------------------------------------
def test_version_and_help():
    from miaotui import __version__

    proc = _miaotui("--version", timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"miaotui {__version__}"
    helped = _miaotui("serve", "--help", timeout=60)
    assert helped.returncode == 0
    text = " ".join(helped.stdout.split())  # argparse wraps lines anywhere
    for shown in ("--max-num-batched-tokens", "(default: 2048)", "--chat-template", "--seed", "--log-level",
                  "--max-body-bytes", "(default: 4194304)"):
        assert shown in text
    generate_help = " ".join(_miaotui("generate", "--help", timeout=60).stdout.split())
    assert "(default: 0.8)" in generate_help and "--raw" in generate_help and "chat template" in generate_help


def test_every_flag_has_help():
    def walk(parser: argparse.ArgumentParser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from walk(sub)
            elif action.dest != "help":
                yield f"{parser.prog} {'/'.join(action.option_strings) or action.dest}", action

    missing = [name for name, action in walk(build_parser()) if not action.help]
    assert not missing, f"flags without help: {missing}"


def test_chat_commands_never_reach_the_model():
    proc = _miaotui("chat", "--temperature", "0", "--max-tokens", "8", stdin="/help\n/frobnicate\n/exit\nnever sent\n")
    assert proc.returncode == 0, proc.stderr
    assert "/reset" in proc.stdout and "/exit" in proc.stdout  # the command list
    assert "unknown command /frobnicate" in proc.stdout
    # /exit quit before the last line: nothing was generated, so only the two notes were printed.
    assert proc.stdout.count("\n") == len(proc.stdout.splitlines()) and "never sent" not in proc.stdout
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines[-1] == "unknown command /frobnicate; /help lists them"


def test_serve_on_a_port_in_use_fails_at_once_naming_it():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _miaotui("serve", "--port", str(port), timeout=120)
    assert proc.returncode == 2
    assert f"port: {port} on 127.0.0.1 is already in use" in proc.stderr
    assert "serving on" not in proc.stderr and "Loading" not in proc.stderr and "Traceback" not in proc.stderr
