"""Ray Serve replicas on one machine: the same load against `miaotui serve` (one process, all
cores), `serve --ray --num-replicas 1` and `--num-replicas 2`, one after the other.

    python benchmarks/ray_replicas.py [--model M] [--num-requests 32] [--concurrency 16]
        [--input-len 128] [--output-len 64]

Each Ray replica reserves --cpus-per-replica CPUs (and its kernels use that many threads), so
on a 2-core machine two replicas split the cores that one plain server uses alone. Every setup
has the same total capacity: with R replicas each takes concurrency / R sequences at once
(`--max-num-seqs`, which is also Serve's max_ongoing_requests), so Serve's router must spread
the load instead of filling one replica. The table ends with each setup's output tokens/s
relative to the plain server.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

from miaotui.bench.serve import print_table, run_load
from miaotui.bench.throughput import make_prompts
from miaotui.loader import resolve_model
from miaotui.tokenizer import load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_vs_peers import _port, _wait_ready  # noqa: E402  (same helpers as the peers benchmark)

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct GGUF")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--cpus-per-replica", type=float, default=1.0)
    args = p.parse_args()
    source = resolve_model(args.model)
    tokenizer = load_tokenizer(str(source.path), source.is_gguf)
    prompts = make_prompts(tokenizer, args.num_requests, args.input_len)
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    setups = [("plain server", 1, []), ("Ray, 1 replica", 1, ["--ray", "--num-replicas", "1"]),
              ("Ray, 2 replicas", 2, ["--ray", "--num-replicas", "2"])]
    reports = []
    for name, replicas, extra in setups:
        port = _port()
        cmd = [sys.executable, "-m", "miaotui.cli", "serve", "--port", str(port), "--max-num-seqs",
               str(max(args.concurrency // replicas, 1)), "--ray-cpus-per-replica", str(args.cpus_per_replica),
               *extra]
        if args.model:
            cmd += ["--model", args.model]
        with open(ROOT / f".bench-{name.replace(' ', '-').replace(',', '')}.log", "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                    start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(url, proc)
            reports.append((name, asyncio.run(run_load(url, None, prompts, args.output_len, args.concurrency, None))))
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    print_table(reports)
    base = reports[0][1].output_tok_s
    for name, report in reports[1:]:
        print(f"{name}: output tokens/s = {report.output_tok_s / base:.2f}x the plain server's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
