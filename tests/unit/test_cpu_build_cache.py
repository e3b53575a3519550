"""The CPU kernel build's cache: keyed by the torch build it links against, a failed or stuck
build recorded once so later starts fall back at once. Nothing here compiles anything."""

from __future__ import annotations

import functools
import logging
import sys
import time

import pytest
import torch

from miaotui.kernels import cpu_build


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """cpu_kernels_available with an empty per-test cache and memo; the process's own stays."""
    monkeypatch.setenv("MIAOTUI_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "c++-under-test")
    monkeypatch.delenv("MIAOTUI_CPU_KERNELS", raising=False)
    monkeypatch.setattr(cpu_build, "_cpu_has_flags", lambda: True)
    available = functools.lru_cache(maxsize=1)(cpu_build.cpu_kernels_available.__wrapped__)
    monkeypatch.setattr(cpu_build, "cpu_kernels_available", available)
    return available


def test_the_key_changes_with_the_cxx_abi_and_the_torch_install(monkeypatch):
    base = cpu_build._library_path("c++")
    abi = torch.compiled_with_cxx11_abi()
    monkeypatch.setattr(torch, "compiled_with_cxx11_abi", lambda: not abi)
    other_abi = cpu_build._library_path("c++")
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__file__", "/elsewhere/site-packages/torch/__init__.py")
    other_place = cpu_build._library_path("c++")
    assert len({base, other_abi, other_place}) == 3
    assert cpu_build._library_path("g++") != base


def test_a_failed_build_is_recorded_and_later_starts_fall_back_at_once(fresh, monkeypatch, caplog):
    calls = []

    def failing_build(compiler, target):
        calls.append(target)
        raise cpu_build.KernelBuildError(f"{compiler} failed:\nfatal error: Python.h: No such file")

    monkeypatch.setattr(cpu_build, "_build", failing_build)
    caplog.set_level(logging.INFO, logger="miaotui")
    assert fresh() is False
    marker = cpu_build._failure_marker(calls[0])
    assert "Python.h: No such file" in marker.read_text()
    fresh.cache_clear()  # a later start: another process, rank or replica
    caplog.clear()
    assert fresh() is False
    assert len(calls) == 1  # not built again
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "earlier build" in warning.getMessage() and str(marker) in warning.getMessage()
    assert "delete that file to retry" in warning.getMessage()
    marker.unlink()  # the retry the message offers
    fresh.cache_clear()
    assert fresh() is False and len(calls) == 2


def test_a_stuck_compiler_is_killed_and_the_build_counts_as_failed(fresh, monkeypatch, tmp_path):
    hang = [sys.executable, "-c", "import time; time.sleep(60)"]
    monkeypatch.setattr(cpu_build, "_commands", lambda compiler, objects, output: ([hang, hang], hang))
    monkeypatch.setattr(cpu_build, "_BUILD_TIMEOUT_S", 0.5)
    start = time.monotonic()
    with pytest.raises(cpu_build.KernelBuildError, match="did not finish within"):
        cpu_build._build("c++", tmp_path / "kernels" / "lib.so")
    assert time.monotonic() - start < 30
    assert fresh() is False
    (marker,) = (tmp_path / "kernels").glob("*.failed")
    assert "did not finish within" in marker.read_text()
    assert not list((tmp_path / "kernels").glob("*.so"))


def test_a_compiler_error_is_reported_with_its_output(monkeypatch, tmp_path):
    fail = [sys.executable, "-c", "import sys; sys.exit('error: no such header')"]
    monkeypatch.setattr(cpu_build, "_commands", lambda compiler, objects, output: ([fail], fail))
    with pytest.raises(cpu_build.KernelBuildError, match="c[+][+] failed:\nerror: no such header"):
        cpu_build._build("c++", tmp_path / "lib.so")
