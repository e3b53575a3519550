"""benchmarks/gpu.py runs end to end (on the CPU, a tiny config): both sides, the table, ratios."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_benchmark_smoke_on_cpu(tmp_path):
    folder, _ = make_tiny_checkpoint(tmp_path / "tiny", "llama")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cpu", "--dtype", "float32",
                           "--configs", str(folder / "config.json"), "--prompt-len", "16", "--new-tokens", "6",
                           "--concurrency", "3"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = next(line for line in proc.stdout.splitlines() if line.startswith(f"| {folder}"))
    assert row.count("x") >= 2 and "nan" not in row  # both ratios computed from real numbers


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where there is no CUDA device")
def test_gpu_benchmark_refuses_without_cuda():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py")], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
