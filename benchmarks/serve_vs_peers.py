"""Online serving, same work, same run: miaotui's server vs llama.cpp's server (and transformers
serve where it runs), on the embedded SmolLM2-135M Q4_1 GGUF, through `miaotui bench serve`.

    python benchmarks/serve_vs_peers.py [--concurrency 16] [--num-requests 64]
        [--input-len 128] [--output-len 128] [--threads 2] [--peers llama.cpp,transformers]

llama.cpp's server comes from `llama-cpp-python[server]` in a separate venv (.bench-venv, made on
first use; building it compiles llama.cpp, which takes minutes). Each server runs alone, one
after the other, on the same prompts (token ids), with greedy decoding and exactly --output-len
tokens per request. The table ends with miaotui's ratio over each peer.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from miaotui.bench.serve import print_table, run_load
from miaotui.bench.throughput import make_prompts
from miaotui.loader.default_model import embedded_model_path
from miaotui.tokenizer import load_tokenizer
from peer_venv import llama_cpp_python

ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        for probe in ("/health", "/v1/models"):  # llama-cpp-python has no /health
            try:
                if httpx.get(url + probe, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
        time.sleep(0.5)
    raise RuntimeError("server did not become ready")


def _hf_folder(gguf: str) -> str:
    """transformers serve cannot load a local GGUF (it wants `repo:file`), so the same weights,
    dequantized by transformers itself, are written once as a safetensors folder."""
    folder = ROOT / ".bench-hf-model"
    if not (folder / "model.safetensors").exists():
        import torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        where, name = os.path.split(gguf)
        model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
        folder.mkdir(exist_ok=True)
        tied = model.config.tie_word_embeddings
        save_file({k: v.contiguous() for k, v in model.state_dict().items()
                   if not (tied and k == "lm_head.weight")}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(folder)
        AutoTokenizer.from_pretrained(where, gguf_file=name).save_pretrained(folder)
    return str(folder)


def server_command(name: str, gguf: str, port: int, args: argparse.Namespace) -> list[str]:
    if name == "miaotui":
        return [sys.executable, "-m", "miaotui.cli", "serve", "--port", str(port), "--max-model-len", "4096",
                "--max-num-seqs", str(max(args.concurrency, 1))]
    if name == "llama.cpp":
        return [llama_cpp_python(), "-m", "llama_cpp.server", "--model", gguf, "--port", str(port),
                "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads), "--n_ctx", "4096",
                # By default a new request cuts off the one streaming; queue them instead.
                "--interrupt_requests", "False"]
    if name == "transformers":
        return [str(Path(sys.executable).parent / "transformers"), "serve", _hf_folder(gguf),
                "--continuous-batching", "--dtype", "float32", "--device", "cpu", "--port", str(port)]
    raise ValueError(f"--peers: unknown server {name!r}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--peers", default="llama.cpp,transformers")
    args = p.parse_args()
    gguf = embedded_model_path()
    tokenizer = load_tokenizer(gguf, True)
    # Text, not token ids: llama-cpp-python's server accepts only strings. Every server gets the
    # same strings (about --input-len tokens each); usage reports what each really produced.
    prompts = [tokenizer.decode(ids) for ids in make_prompts(tokenizer, args.num_requests, args.input_len)]
    # llama-cpp-python ignores `ignore_eos`; a -100 logit bias on the special tokens (EOS among
    # them) makes every server produce exactly --output-len tokens: the same work everywhere.
    banned = sorted(set(tokenizer.all_special_ids))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    reports = []
    for name in ["miaotui"] + [x for x in args.peers.split(",") if x]:
        port = _port()
        url = f"http://127.0.0.1:{port}"
        try:
            cmd = server_command(name, gguf, port, args)
        except subprocess.CalledProcessError as exc:
            print(f"{name}: could not be installed ({exc}); skipped", file=sys.stderr)
            continue
        log = open(ROOT / f".bench-{name}.log", "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            _wait_ready(url, proc)
            model = {"llama.cpp": gguf, "transformers": cmd[2]}.get(name)
            # transformers serve rejects unknown fields, so it gets no ignore_eos; the logit bias
            # bans EOS for it too. Output tokens are what each server reports in usage.
            report = asyncio.run(run_load(url, model, prompts, args.output_len, args.concurrency, None,
                                          ignore_eos=name != "transformers", banned=banned))
            reports.append((name, report))
        except RuntimeError as exc:
            print(f"{name}: {exc}; see .bench-{name}.log; skipped", file=sys.stderr)
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
    print(f"\n{args.num_requests} requests, {args.input_len} in / {args.output_len} out, concurrency "
          f"{args.concurrency}, {args.threads} threads, {os.path.basename(gguf)}")
    print_table(reports)
    ours = reports[0][1]
    for name, r in reports[1:]:
        if r.completed:
            print(f"miaotui output tokens/s = {ours.output_tok_s / r.output_tok_s:.2f}x {name}'s; "
                  f"TTFT p50 {r.ttft_p50_ms / ours.ttft_p50_ms:.2f}x lower")
    return 0


if __name__ == "__main__":
    sys.exit(main())
