"""CPU peers, same GGUF, same prompts, same run: miaotui (its default, which runs this Q4_1 file
quantized, with an fp16 KV cache as llama.cpp's default; the same with --compile-decode; the same
with an fp32 KV cache; the fp32 reference path) vs llama.cpp (llama-cpp-python)
vs transformers, 2 threads each.

    python benchmarks/cpu_peers.py [--threads 2] [--model FILE.gguf]
        [--sides miaotui,miaotui-compiled,miaotui-kv32,miaotui-fp32,llama.cpp,transformers]

Each side runs in its own child process (its own peak RSS), one after the other, on the
embedded SmolLM2-135M-Instruct Q4_1 GGUF, or the GGUF file --model names (e.g. a random-weight
Q4_K_M file of a real shape from benchmarks/make_gguf.py), and the same token-id prompts:
  cold start   process start -> first generated token of a 16-token prompt (imports, load,
               tokenizer, first forward);
  pp512        512-token prompt -> 1 token, tokens/s, best of 3;
  decode       batch 1, 128 tokens after a 16-token prompt, minus that prompt's own time;
  16 x 128     16 requests of 128 tokens in / 128 out at once, output tokens/s (llama.cpp: 16
               parallel slots in one context through llama-cpp-python's low-level API, as its
               batched-bench does; prompts prefilled 512 tokens per llama_decode);
  peak RSS     of the child process.
EOS is banned for every side so all produce exactly the asked number of tokens. llama.cpp runs
from `.bench-venv` (benchmarks/peer_venv.py makes it on first use), never from the package's own venv.

The prompts are ids from the file's own tokenizer (text encoded, or random ids where it has none),
checked to lie inside its vocabulary and outside its special tokens. Before any side is timed,
this process loads that tokenizer and indexes the file, so miaotui's caches of both are as after
any earlier load: a cold start here is a process start, not a first-ever conversion. A side that
cannot run the file (transformers on an architecture or type it does not read) is skipped with
the last line of its error.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_prompts import work_prompts
from peer_venv import llama_cpp_python

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("miaotui", "miaotui-compiled", "miaotui-kv32", "miaotui-fp32", "llama.cpp", "transformers")


def _rss_mib() -> float:
    """This process's peak RSS. Not ru_maxrss: Linux carries the high-water mark of the image
    that called exec into it, and with subprocess's vfork that image is the parent's, so a small
    side would report the parent's peak (its tokenizer and GGUF reads) instead of its own."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _report(work: dict, run_short, run_prefill, run_decode, run_batch, out: dict | None = None) -> None:
    """The measurements every side shares, given its four ways to generate."""
    out = out or {}
    out["pp512_tok_s"] = 512 / _timed(lambda: run_prefill(work["long"]), 3)
    short = _timed(lambda: run_short(work["short"]), 3)
    out["decode_tok_s"] = 127 / (_timed(lambda: run_decode(work["short"]), 2) - short)
    out["batch_out_tok_s"] = 16 * 128 / _timed(lambda: run_batch(work["batch"]))
    out["peak_rss_mib"] = _rss_mib()
    print("RESULT " + json.dumps(out), flush=True)


def side_miaotui(work: dict, threads: int, quantization: str, compile_decode: bool = False,
                 kv_cache_dtype: str = "auto") -> None:
    import torch

    torch.set_num_threads(threads)
    from miaotui import LLM, SamplingParams

    # No prefix cache: repeated timing runs of one prompt must compute it again, as the peers do.
    # max_model_len 2048 as llama.cpp's n_ctx: a file's own context (Qwen3's 40,960) would ask a
    # KV pool one whole sequence of that length fits in, which the work here never uses.
    llm = LLM(work["model"], quantization=quantization, max_num_seqs=16, enable_prefix_caching=False,
              compile_decode=compile_decode, kv_cache_dtype=kv_cache_dtype, max_model_len=2048)
    greedy = dict(temperature=0, ignore_eos=True)
    llm.generate({"prompt_token_ids": work["short"]}, SamplingParams(max_tokens=1, **greedy), use_tqdm=False)
    print("FIRST_TOKEN", flush=True)

    def gen(prompts, n):
        llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(max_tokens=n, **greedy), use_tqdm=False)

    extra = {}
    if compile_decode:  # compile both decode graphs (batch 1, larger batches) before timing
        start = time.perf_counter()
        gen([work["short"]], 3)
        gen(work["batch"][:2], 3)
        extra["compile_s"] = time.perf_counter() - start
    _report(work, lambda p: gen([p], 1), lambda p: gen([p], 1), lambda p: gen([p], 128), lambda b: gen(b, 128),
            extra)


def side_transformers(work: dict, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(work["gguf"])
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None

    def gen(prompts, n):
        ids = torch.tensor(prompts)
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)

    gen([work["short"]], 1)
    print("FIRST_TOKEN", flush=True)
    _report(work, lambda p: gen([p], 1), lambda p: gen([p], 1), lambda p: gen([p], 128), lambda b: gen(b, 128))


def _llama_cpp_parallel(llm, threads: int, banned: list[int], slots: int = 16):
    """llama.cpp with parallel slots, as its batched-bench and server run them: one context
    holding `slots` sequences, every decode step one llama_decode over a token of each."""
    import llama_cpp as lc
    import numpy as np
    from llama_cpp import _internals

    params = lc.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = slots * 272, 512, 512, slots
    params.n_threads = params.n_threads_batch = threads
    params.kv_unified = True
    ctx = _internals.LlamaContext(model=llm._model, params=params, verbose=False)
    batch = _internals.LlamaBatch(n_tokens=512, embd=0, n_seq_max=1, verbose=False)
    n_vocab = llm.n_vocab()

    def greedy(row: int) -> int:
        logits = np.ctypeslib.as_array(ctx.get_logits_ith(row), shape=(n_vocab,)).copy()
        logits[banned] = -np.inf
        return int(logits.argmax())

    def decode(entries):  # [(seq, pos, token, wants_logits)] -> {seq: next token} of the flagged rows
        b = batch.batch
        b.n_tokens = len(entries)
        for j, (seq, pos, token, wants) in enumerate(entries):
            b.token[j], b.pos[j], b.n_seq_id[j], b.logits[j] = token, pos, 1, wants
            b.seq_id[j][0] = seq
        ctx.decode(batch)
        return {seq: greedy(j) for j, (seq, _, _, wants) in enumerate(entries) if wants}

    def run(prompts: list[list[int]], n: int) -> list[list[int]]:
        ctx.kv_cache_clear()
        flat = [(s, i, t, i == len(p) - 1) for s, p in enumerate(prompts) for i, t in enumerate(p)]
        nxt = {}
        for start in range(0, len(flat), 512):
            nxt.update(decode(flat[start:start + 512]))
        outputs = [[nxt[s]] for s in range(len(prompts))]
        for step in range(1, n):
            nxt = decode([(s, len(p) + step - 1, nxt[s], True) for s, p in enumerate(prompts)])
            for s in range(len(prompts)):
                outputs[s].append(nxt[s])
        return outputs

    return run


def side_llama_cpp(work: dict, threads: int) -> None:
    from llama_cpp import Llama

    llm = Llama(model_path=work["gguf"], n_threads=threads, n_threads_batch=threads, n_ctx=2048, n_batch=512,
                verbose=False)
    ban = {t: -1e9 for t in work["special_ids"]}

    def gen(prompt, n):
        llm.reset()  # no reuse of the previous prompt's KV: every side computes every prompt
        llm.create_completion(prompt=prompt, max_tokens=n, temperature=0.0, logit_bias=ban)

    gen(work["short"], 1)
    print("FIRST_TOKEN", flush=True)
    parallel = _llama_cpp_parallel(llm, threads, work["special_ids"])
    _report(work, lambda p: gen(p, 1), lambda p: gen(p, 1), lambda p: gen(p, 128), lambda batch: parallel(batch, 128))


def _run_side(name: str, work_file: str, threads: int) -> dict:
    python = llama_cpp_python() if name == "llama.cpp" else sys.executable
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    # The child's stderr goes to a file, not a pipe nobody reads (a full pipe would stall it),
    # so a failed side can say why.
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen([python, __file__, "--side", name, "--work", work_file, "--threads", str(threads)],
                                stdout=subprocess.PIPE, stderr=errors, text=True, env=env, cwd=ROOT)
        result: dict = {}
        for line in proc.stdout:
            if line.startswith("FIRST_TOKEN"):
                result["cold_start_s"] = time.perf_counter() - start
                print(f"{name}: first token after {result['cold_start_s']:.2f} s; measuring ...", file=sys.stderr)
            elif line.startswith("RESULT "):
                result.update(json.loads(line[7:]))
        if proc.wait() != 0 or "pp512_tok_s" not in result:
            errors.seek(0)
            lines = [ln.strip() for ln in errors.read().splitlines() if ln.strip()]
            raise RuntimeError(f"{name} failed (exit {proc.returncode}): {lines[-1] if lines else 'no error output'}")
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sides", default=",".join(SIDES))
    p.add_argument("--model", help="a GGUF file to run instead of the embedded SmolLM2 Q4_1 one")
    p.add_argument("--side", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        work = json.loads(Path(args.work).read_text())
        {"miaotui": lambda: side_miaotui(work, args.threads, "auto"),
         "miaotui-compiled": lambda: side_miaotui(work, args.threads, "auto", compile_decode=True),
         "miaotui-kv32": lambda: side_miaotui(work, args.threads, "auto", kv_cache_dtype="float32"),
         "miaotui-fp32": lambda: side_miaotui(work, args.threads, "none"),
         "llama.cpp": lambda: side_llama_cpp(work, args.threads),
         "transformers": lambda: side_transformers(work, args.threads)}[args.side]()
        return 0
    if args.model and not Path(args.model).is_file():
        p.error(f"--model {args.model}: no such file (a GGUF file; benchmarks/make_gguf.py writes some)")

    from miaotui.loader.default_model import embedded_model_path

    work = {"model": args.model, **work_prompts(args.model or embedded_model_path())}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(work, f)
    results, skipped = {}, []
    for name in [s for s in args.sides.split(",") if s]:
        try:
            results[name] = _run_side(name, f.name, args.threads)
        except RuntimeError as exc:
            skipped.append(f"{name}: skipped ({exc})")
            print(skipped[-1], file=sys.stderr)
    os.unlink(f.name)
    names = list(results)
    print(f"\n{work['about']}; {args.threads} threads")
    rows = [("cold start to first token (s)", "cold_start_s", False), ("pp512 (tok/s)", "pp512_tok_s", True),
            ("batch-1 decode, 128 tokens (tok/s)", "decode_tok_s", True),
            ("16 x 128 in / 128 out (output tok/s)", "batch_out_tok_s", True), ("peak RSS (MiB)", "peak_rss_mib", False),
            ("decode-step compile, once per process (s)", "compile_s", False)]
    print("\n| | " + " | ".join(names) + " |" + "".join(f" {n} / llama.cpp |" for n in names if n.startswith("miaotui")))
    print("|---" * (1 + len(names) + sum(n.startswith("miaotui") for n in names)) + "|")
    for label, key, higher in rows:
        if not any(key in r for r in results.values()):
            continue
        cells = [("-" if key not in results[n] else f"{results[n][key]:,.2f}" if key == "cold_start_s"
                  else f"{results[n][key]:,.1f}") for n in names]
        ratios = []
        if "llama.cpp" in results and key in results["llama.cpp"]:
            ref = results["llama.cpp"][key]
            for n in names:
                if n.startswith("miaotui"):
                    value = results[n][key]
                    ratios.append(f"{(value / ref if higher else ref / value):.2f}x")
        print(f"| {label} | " + " | ".join(cells) + " |" + "".join(f" {r} |" for r in ratios))
    print("\n(ratios: higher is better for miaotui; for cold start and RSS they are llama.cpp / miaotui)")
    for line in skipped:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
