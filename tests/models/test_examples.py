"""The examples/ scripts run end to end on tiny random checkpoints (with the embedded tokenizer)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("script,arch,expected_lines", [
    ("gpt2_continuation.py", "gpt2", ["0: Hello, I'm a language model,", "4: Hello, I'm a language model,"]),
    ("bloom_generation.py", "bloom", ['greedy: A cat in French is "', 'beam search (4 beams): A cat in French is "']),
    ("t5_summarization.py", "t5", ["summary (5 beams): ", "summary (greedy): "]),
])
def test_example_runs(script, arch, expected_lines, tmp_path, embedded_gguf):
    folder, _ = make_tiny_checkpoint(tmp_path / arch, arch, vocab_size=49152)
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), str(folder), "--tokenizer",
                           embedded_gguf, "--max-tokens", "8"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    for prefix in expected_lines:
        assert any(line.startswith(prefix) and len(line) > len(prefix) for line in lines), proc.stdout
