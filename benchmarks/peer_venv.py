"""The llama.cpp peer's own virtual environment (.bench-venv), shared by the benchmark scripts.

llama-cpp-python is never a dependency of the package: it lives in a venv of its own, made on
first use (pip compiles llama.cpp from source there, which takes minutes on 2 cores).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_VENV = ROOT / ".bench-venv"


def llama_cpp_python() -> str:
    """Path of the bench venv's python, with llama-cpp-python[server] importable in it."""
    python = BENCH_VENV / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import llama_cpp"], capture_output=True).returncode == 0:
        return str(python)
    print("installing llama-cpp-python[server] into .bench-venv (compiles llama.cpp; minutes)...", file=sys.stderr)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "llama-cpp-python[server]"], check=True)
    return str(python)
