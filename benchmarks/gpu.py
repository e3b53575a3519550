"""GPU speed, miaotui vs transformers in the same job, on random weights of real configs.

    python benchmarks/gpu.py [--configs smollm2-135m,llama-3.2-1b,llama-3.1-8b] [--dtype bfloat16]
        [--prompt-len 128] [--new-tokens 256] [--concurrency 64] [--device cuda]

Per config: batch-1 decode tokens/s and its share of the bandwidth limit (measured copy bandwidth
/ weight bytes: every decode step reads every weight once), time to first token, and output
tokens/s with --concurrency requests at once (prompt-len in, new-tokens out); transformers
`generate()` runs the same prompts (batch 1 with its dynamic cache, then one batch of
--concurrency). Both sides use --load-format dummy weights (N(0, 0.02)) and token-id prompts
(miaotui loads no tokenizer: skip_tokenizer_init); EOS is ignored so both produce exactly
--new-tokens. `--device cpu --dtype float32` runs the same code on the CPU with small sizes (a
smoke test; CPU numbers say nothing about GPUs).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, gib: float = 1.0) -> float:
    """Bytes moved per second by a device-to-device copy (read + write), best of 5."""
    n = int(gib * 2**30) // 4
    src = torch.empty(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n * 4 / best


def _prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(100, min(vocab, 30000), (n, length), generator=g).tolist()


def run_miaotui(config: str, args: argparse.Namespace) -> dict[str, float]:
    from miaotui import LLM, SamplingParams

    llm = LLM(config, load_format="dummy", skip_tokenizer_init=True, device=args.device, dtype=args.dtype,
              max_model_len=args.prompt_len + args.new_tokens + 16, max_num_seqs=args.concurrency,
              max_num_batched_tokens=max(2048, args.prompt_len))
    device = torch.device(args.device)
    vocab = llm.engine.hf_config.vocab_size
    weight_bytes = sum(p.numel() * p.element_size() for p in llm.engine.model.parameters())
    one = {"prompt_token_ids": _prompts(1, args.prompt_len, vocab)[0]}
    llm.generate(one, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    _sync(device)
    start = time.perf_counter()
    llm.generate(one, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True), use_tqdm=False)
    _sync(device)
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    llm.generate(one, SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True), use_tqdm=False)
    _sync(device)
    decode = (args.new_tokens - 1) / (time.perf_counter() - start - ttft)
    many = [{"prompt_token_ids": p} for p in _prompts(args.concurrency, args.prompt_len, vocab)]
    start = time.perf_counter()
    outs = llm.generate(many, SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True),
                        use_tqdm=False)
    _sync(device)
    batch = sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start)
    llm.shutdown()
    return {"decode": decode, "ttft_ms": ttft * 1000, "batch": batch, "weight_bytes": weight_bytes}


def run_transformers(config: str, args: argparse.Namespace) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    from miaotui.config import parse_dtype
    from miaotui.loader.dummy import dummy_hf_config

    device = torch.device(args.device)
    hf_config = dummy_hf_config(config)
    with device:
        model = AutoModelForCausalLM.from_config(hf_config, dtype=parse_dtype(args.dtype)).eval()
    model.generation_config.eos_token_id = None

    def generate(prompts: list[list[int]], new: int) -> float:
        ids = torch.tensor(prompts, device=device)
        _sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0)
        _sync(device)
        return time.perf_counter() - start

    one = _prompts(1, args.prompt_len, hf_config.vocab_size)
    generate(one, 4)  # warm-up
    ttft = generate(one, 1)
    decode = (args.new_tokens - 1) / (generate(one, args.new_tokens) - ttft)
    many = _prompts(args.concurrency, args.prompt_len, hf_config.vocab_size)
    batch = args.concurrency * args.new_tokens / generate(many, args.new_tokens)
    return {"decode": decode, "ttft_ms": ttft * 1000, "batch": batch}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="smollm2-135m,llama-3.2-1b,llama-3.1-8b",
                   help="built-in names or config.json paths, comma-separated")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--skip-hf", action="store_true")
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: this benchmark measures GPUs (use --device cpu for a smoke run)", file=sys.stderr)
        return 2
    bandwidth = copy_bandwidth(torch.device(args.device), 1.0 if args.device.startswith("cuda") else 0.25)
    print(f"copy bandwidth: {bandwidth / 1e9:,.0f} GB/s ({args.device})", file=sys.stderr)
    rows = []
    for config in [c for c in args.configs.split(",") if c]:
        print(f"{config}: miaotui ...", file=sys.stderr)
        ours = run_miaotui(config, args)
        theirs = None if args.skip_hf else run_transformers(config, args)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        rows.append((config, ours, theirs, bandwidth / ours["weight_bytes"]))
    print("\n| config | batch-1 decode tok/s (miaotui / transformers / ratio) | % of bandwidth limit "
          f"(limit tok/s) | TTFT ms (miaotui / transformers) | {args.concurrency} concurrent output tok/s "
          "(miaotui / transformers / ratio) |")
    print("|---|---|---|---|---|")
    for config, ours, theirs, limit in rows:
        t = theirs or {"decode": float("nan"), "ttft_ms": float("nan"), "batch": float("nan")}
        print(f"| {config} | {ours['decode']:,.1f} / {t['decode']:,.1f} / {ours['decode'] / t['decode']:.2f}x "
              f"| {100 * ours['decode'] / limit:.1f}% ({limit:,.0f}) | {ours['ttft_ms']:,.1f} / {t['ttft_ms']:,.1f} "
              f"| {ours['batch']:,.1f} / {t['batch']:,.1f} / {ours['batch'] / t['batch']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
