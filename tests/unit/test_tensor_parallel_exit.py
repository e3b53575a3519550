"""A tensor-parallel script that never calls shutdown() exits 0, with nothing alarming printed.

Each case runs a child Python process as a user's script would, on a tiny random Llama."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = """
from miaotui import LLM, SamplingParams
llm = LLM({folder!r}, tokenizer={tokenizer!r}, tensor_parallel_size=2, quantization="none",
          num_kv_blocks=64)
out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
print("ids", out[0].outputs[0].token_ids, flush=True)
"""
ALARMS = ("exited with code", "terminate called", "Traceback", "leaked", "Aborted", "bootstrapping phase")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from conftest import make_tiny_checkpoint

    folder, _ = make_tiny_checkpoint(tmp_path_factory.mktemp("tp_exit"), "llama")
    return str(folder)


@pytest.mark.parametrize("main_guard", [False, True], ids=["no-main-guard", "main-guard"])
def test_script_without_shutdown_exits_0_quietly(tmp_path, tiny_folder, embedded_gguf, main_guard):
    body = SCRIPT.format(folder=tiny_folder, tokenizer=embedded_gguf)
    if main_guard:
        body = 'if __name__ == "__main__":\n' + textwrap.indent(body, "    ")
    script = tmp_path / "user_script.py"
    script.write_text(body)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "ids [" in proc.stdout, output  # it really generated, on both ranks
    found = [a for a in ALARMS if a in output]
    assert not found, f"printed {found}:\n{output}"
