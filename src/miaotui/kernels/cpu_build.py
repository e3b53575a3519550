"""Build and load the hand-written CPU kernels (cpu_matmul.cpp, cpu_matmul_int16.cpp,
cpu_attention.cpp, cpu_elementwise.cpp, cpu_decode_stack.cpp) as torch ops.

The sources are compiled once per machine with the system C++ compiler against the installed
torch (10-30 s) and cached under ~/.cache/miaotui/kernels (or $MIAOTUI_CACHE_DIR/kernels), keyed by
the sources, the compiler, the flags and the torch build they link against (version, C++ ABI,
install folder) and the Python version; later processes only load the cached library. A failed
build (compiler error, or no result within _BUILD_TIMEOUT_S) leaves a marker file with the same
key and the compiler's error, so later starts (other ranks, other replicas) fall back at once
instead of failing the same build again; deleting the marker retries. Where the kernels cannot
run (not x86 with AVX2/FMA/F16C, no compiler, a failed build, or MIAOTUI_CPU_KERNELS=0)
`cpu_kernels_available()` is False and callers keep torch's own kernels.
The loader loads them for CPU models before building one (`load_for_device`); layers then bind
ops with `cpu_op`.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

logger = logging.getLogger("miaotui")

_HERE = Path(__file__).parent
_SOURCES = (_HERE / "cpu_matmul.cpp", _HERE / "cpu_matmul_int16.cpp", _HERE / "cpu_matmul_vnni.cpp",
            _HERE / "cpu_attention.cpp",
            _HERE / "cpu_elementwise.cpp", _HERE / "cpu_decode_stack.cpp")
_HEADERS = (_HERE / "cpu_simd.h", _HERE / "cpu_ops.h", _HERE / "cpu_q4.h")
_ARCH_FLAGS = ("-mavx2", "-mfma", "-mf16c")
_NEEDED_CPU_FLAGS = ("avx2", "fma", "f16c")
_LIBS = ("-lc10", "-ltorch_cpu", "-ltorch")
# Generous: a build takes 10-30 s; a compiler that has not finished after this is stuck
# (or the machine is swapping), and the build counts as failed.
_BUILD_TIMEOUT_S = 600.0


class KernelBuildError(RuntimeError):
    """The C++ compiler failed or did not finish: the build is marked failed (`_failure_marker`)."""


def _cpu_has_flags() -> bool:
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        return False
    return all(flag in flags for flag in _NEEDED_CPU_FLAGS)


def _cache_dir() -> Path:
    root = os.environ.get("MIAOTUI_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "miaotui")
    return Path(root) / "kernels"


def _commands(compiler: str, objects: list[Path], output: Path) -> tuple[list[list[str]], list[str]]:
    """(one compile command per source, the link command)."""
    from torch.utils import cpp_extension  # only when building: it imports setuptools

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [flag for path in cpp_extension.include_paths() for flag in ("-isystem", path)]
    lib_dirs = [flag for path in cpp_extension.library_paths() for flag in ("-L", path)]
    compile_flags = ["-O3", "-std=c++17", "-fPIC", "-fopenmp", *_ARCH_FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
                     *includes]
    compiles = [[compiler, *compile_flags, "-c", str(source), "-o", str(obj)]
                for source, obj in zip(_SOURCES, objects)]
    link = [compiler, "-shared", "-fopenmp", *map(str, objects), "-o", str(output), *lib_dirs, *_LIBS]
    return compiles, link


def _torch_build() -> str:
    """What a built library depends on in the torch it links against: two installs of one
    version can differ in C++ ABI (the std::string layout of every op signature) or location
    (the libraries found at link time), and a library built for one crashes or fails to load
    in the other."""
    return f"{torch.__version__}|abi={int(torch.compiled_with_cxx11_abi())}|{Path(torch.__file__).parent}"


def _library_path(compiler: str) -> Path:
    key = hashlib.sha256()
    for path in (*_SOURCES, *_HEADERS):
        key.update(path.read_bytes())
    key.update(f"{_torch_build()}|{sys.version}|{compiler}|{_ARCH_FLAGS}".encode())
    return _cache_dir() / f"miaotui_cpu_{key.hexdigest()[:16]}.so"


def _failure_marker(target: Path) -> Path:
    """The marker of a failed build of `target`: same key, so a new torch, compiler or source
    tries again by itself."""
    return target.with_suffix(".failed")


def _record_failure(target: Path, error: str) -> None:
    marker = _failure_marker(target)
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        # Written beside and renamed: a concurrent start never reads half a marker.
        partial = marker.with_name(f"{marker.name}.{os.getpid()}.tmp")
        partial.write_text(error)
        os.replace(partial, marker)
    except OSError as exc:  # a read-only cache only costs the retry on the next start
        logger.info("could not record the failed CPU kernel build in %s: %s", marker, exc)


def _run_all(commands: list[list[str]], deadline: float) -> str | None:
    """Run the commands side by side; the stderr of the first that failed, or None. A command
    still running at `deadline` (time.monotonic) is killed and raises KernelBuildError."""
    running = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
               for cmd in commands]
    try:
        errors = [proc.communicate(timeout=max(0.0, deadline - time.monotonic()))[1] for proc in running]
    except subprocess.TimeoutExpired:
        raise KernelBuildError(
            f"{commands[0][0]} did not finish within {_BUILD_TIMEOUT_S:.0f} s (stuck compiler, or a machine "
            "out of memory?)") from None
    finally:
        for proc in running:  # no compiler outlives the build, however it ended
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return next((err for proc, err in zip(running, errors) if proc.returncode != 0), None)


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("building miaotui's CPU kernels (once per machine and torch version, 10-30 s) ...")
    start = time.perf_counter()
    # Built beside the target and renamed into place: concurrent processes never load a partial file.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        objects = [Path(tmp) / f"{source.stem}.o" for source in _SOURCES]
        partial = Path(tmp) / target.name
        compiles, link = _commands(compiler, objects, partial)
        deadline = time.monotonic() + _BUILD_TIMEOUT_S  # one limit for the whole build
        # The sources compile side by side (each mostly parses torch's headers), then link.
        failed = _run_all(compiles, deadline)
        if failed is None:
            failed = _run_all([link], deadline)
        if failed is not None:
            raise KernelBuildError(f"{compiler} failed:\n{failed[-2000:]}")
        os.replace(partial, target)
    logger.info("built miaotui's CPU kernels in %.1f s: %s", time.perf_counter() - start, target)


def _register_fakes() -> None:
    """Shapes for torch.compile's tracing (the decode step of --compile-decode calls these ops)."""
    register = getattr(torch.library, "register_fake", None)  # torch >= 2.4
    if register is None:
        return

    @register("miaotui_cpu::q4_linear")
    def _(x, blocks, fp16_scales):
        return x.new_empty(x.shape[0], blocks.shape[0])

    @register("miaotui_cpu::q4_dequantize")
    def _(blocks, in_features, fp16_scales):
        return blocks.new_empty(blocks.shape[0], in_features, dtype=torch.float32)

    @register("miaotui_cpu::q8_linear")
    def _(x, qweight, scales):
        return x.new_empty(x.shape[0], qweight.shape[0])

    @register("miaotui_cpu::q8_group_linear")
    def _(x, qweight, group_scales):
        return x.new_empty(x.shape[0], qweight.shape[0])

    @register("miaotui_cpu::paged_decode_attention")
    def _(q, k_cache, v_cache, block_tables, seq_lens, scale, window=0):
        return torch.empty_like(q)

    @register("miaotui_cpu::rms_norm")
    def _(x, weight, eps):
        return torch.empty_like(x)

    @register("miaotui_cpu::rotary")
    def _(x, cos, signed_sin):
        return x.new_empty(x.shape)

    @register("miaotui_cpu::silu_and_mul")
    def _(gate_up):
        return gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)

    @register("miaotui_cpu::decode_stack")
    def _(h, cos, signed_sin, weights, k_caches, v_caches, slot_mapping, block_tables, seq_lens, num_heads,
          num_kv_heads, scale, eps):
        return torch.empty_like(h)


@functools.lru_cache(maxsize=1)
def cpu_kernels_available() -> bool:
    """True once the kernels are loaded into this process (ops under torch.ops.miaotui_cpu).
    Cached per process: a loaded library stays loaded."""
    if os.environ.get("MIAOTUI_CPU_KERNELS", "1") == "0":
        return False
    if not _cpu_has_flags():
        logger.info("CPU kernels off: this CPU lacks one of %s; torch's int4 kernel is used", _NEEDED_CPU_FLAGS)
        return False
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        logger.warning("CPU kernels off: no C++ compiler found (set CXX); torch's slower int4 kernel is used")
        return False
    target = _library_path(compiler)
    marker = _failure_marker(target)
    if not target.exists() and marker.exists():
        logger.warning("CPU kernels off: an earlier build with this compiler and torch failed (its error is in "
                       "%s; delete that file to retry the build); torch's slower int4 kernel is used", marker)
        return False
    try:
        if not target.exists():
            try:
                _build(compiler, target)
            except KernelBuildError as exc:  # not OSError: a full disk or a missing compiler is retried
                _record_failure(target, str(exc))
                raise
        torch.ops.load_library(str(target))
    except (OSError, RuntimeError) as exc:
        logger.warning("CPU kernels off: %s; torch's slower int4 kernel is used", exc)
        return False
    _register_fakes()
    return True


def load_for_device(device: str | torch.device) -> bool:
    """Build (once per machine) and load the kernels when models will run on the CPU; call
    before building a model, whose layers bind the ops at construction (`cpu_op`)."""
    return torch.device(device).type == "cpu" and cpu_kernels_available()


def cpu_op(name: str):
    """torch.ops.miaotui_cpu.<name>.default once this process has loaded the kernels, else None.
    Never builds: the loader calls `load_for_device` for models that run on the CPU, so a GPU
    process never compiles CPU code; layers bind their ops with this at construction."""
    if cpu_kernels_available.cache_info().currsize == 0 or not cpu_kernels_available():
        return None
    return getattr(torch.ops.miaotui_cpu, name).default
