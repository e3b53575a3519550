"""The `miaotui` command, run as a user would: a subprocess on the embedded model."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from miaotui import SamplingParams

pytestmark = pytest.mark.embedded


def _miaotui(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "miaotui.cli", *args], input=stdin, text=True,
                          capture_output=True, timeout=300, env=env)


def test_raw_generate_streams_the_greedy_completion(embedded_llm):
    proc = _miaotui("generate", "The capital of France is", "--raw", "--max-tokens", "12", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    expected = embedded_llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=12),
                              use_tqdm=False)[0].outputs[0].text
    assert proc.stdout == expected + "\n"


def test_chat_answers_resets_and_quits_on_eof():
    script = "What is the capital of France?\n/reset\nWhat is the capital of France?\n"
    proc = _miaotui("chat", "--temperature", "0", "--max-tokens", "24", stdin=script)
    assert proc.returncode == 0, proc.stderr
    assert "(conversation cleared)" in proc.stdout
    before, after = proc.stdout.split("(conversation cleared)")
    assert "Paris" in before
    assert before.strip() == after.strip()  # after /reset the same question gets the same answer


def test_bad_model_path_exits_2_with_a_clear_message(tmp_path):
    proc = _miaotui("generate", "hi", "--model", str(tmp_path / "missing"))
    assert proc.returncode == 2
    assert "model path not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_sampling_flag_exits_2_naming_the_field():
    proc = _miaotui("generate", "hi", "--top-p", "1.5")
    assert proc.returncode == 2
    assert "top_p" in proc.stderr
