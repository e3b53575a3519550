"""Offline throughput: N requests through `LLM.generate` vs transformers `generate()` batched.

    miaotui bench throughput [--model M] [--tokenizer T] [--num-requests 32] [--input-len 128] [--output-len 128]
        [--hf-batch-size 32] [--threads N] [--skip-hf] [--json PATH]
    (or: python benchmarks/throughput.py ...)

Both sides get the same token-id prompts (drawn with a fixed seed from the model's vocabulary
range of ordinary text) and generate exactly --output-len greedy tokens each (EOS ignored), in
fp32 on the CPU. transformers runs the requests in batches of --hf-batch-size with left padding
(right padding of the encoder input for encoder-decoder models such as T5, whose prompt is the
encoder's input and whose decoder starts from its start token).
Each side runs in its own child process so its peak RSS is its own; load time is not counted.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from dataclasses import asdict, dataclass


@dataclass(slots=True)
class SideResult:
    name: str
    seconds: float
    prompt_tokens: int
    output_tokens: int
    peak_rss_mib: float

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def total_tok_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.seconds


def make_prompts(tokenizer, n: int, length: int, seed: int = 0) -> list[list[int]]:
    import torch

    text = ("The history of the city begins with a small settlement by the river, where traders "
            "met to exchange grain, salt and cloth. Over centuries it grew into a busy port. ") * 8
    pool = torch.tensor(tokenizer.encode(text, add_special_tokens=False))
    g = torch.Generator().manual_seed(seed)
    return [pool[torch.randint(len(pool), (length,), generator=g)].tolist() for _ in range(n)]


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _run_miaotui(args: argparse.Namespace, queue: mp.Queue) -> None:
    import torch

    from miaotui import LLM, SamplingParams

    torch.set_num_threads(args.threads)
    llm = LLM(args.model, tokenizer=args.tokenizer, max_num_seqs=max(args.num_requests, 1))
    prompts = make_prompts(llm.get_tokenizer(), args.num_requests, args.input_len)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate({"prompt_token_ids": prompts[0][:8]}, SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=True)
    seconds = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    queue.put(SideResult("miaotui", seconds, sum(map(len, prompts)), produced, _peak_rss_mib()))


def _run_transformers(args: argparse.Namespace, queue: mp.Queue) -> None:
    import os

    import torch
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from miaotui.loader import resolve_model

    torch.set_num_threads(args.threads)
    source = resolve_model(args.model)
    tok_source = resolve_model(args.tokenizer) if args.tokenizer else source
    if tok_source.is_gguf:
        folder, name = os.path.split(tok_source.path)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    else:
        tok = AutoTokenizer.from_pretrained(tok_source.path)
    if source.is_gguf:
        folder, name = os.path.split(source.path)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    else:
        seq2seq = getattr(AutoConfig.from_pretrained(source.path), "is_encoder_decoder", False)
        model_cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
        model = model_cls.from_pretrained(source.path, dtype=torch.float32)
    model.eval()
    seq2seq = model.config.is_encoder_decoder
    model.generation_config.eos_token_id = None  # exactly output_len tokens, like ignore_eos
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    prompts = make_prompts(tok, args.num_requests, args.input_len)
    produced = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for i in tqdm(range(0, len(prompts), args.hf_batch_size), desc="transformers", unit="batch"):
            batch = prompts[i:i + args.hf_batch_size]
            width = max(map(len, batch))
            if seq2seq:  # the encoder's input, right-padded; the output starts with the decoder start
                ids = torch.tensor([p + [pad] * (width - len(p)) for p in batch])
                mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in batch])
            else:  # left padding, so every row's new tokens start at the same column
                ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.output_len,
                                 do_sample=False, pad_token_id=pad)
            produced += (out.shape[1] - (1 if seq2seq else width)) * len(batch)
    seconds = time.perf_counter() - start
    queue.put(SideResult("transformers", seconds, sum(map(len, prompts)), produced, _peak_rss_mib()))


def _in_child(target, args: argparse.Namespace) -> SideResult:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    import os

    parser = parser or argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct GGUF")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer (folder or GGUF) when the model folder has none, e.g. a random test model")
    parser.add_argument("--num-requests", type=int, default=32, help="requests, all submitted at once")
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    parser.add_argument("--output-len", type=int, default=128, help="generated tokens per request")
    parser.add_argument("--hf-batch-size", type=int, default=32,
                        help="transformers side: requests per generate() batch (left-padded)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="CPU threads, the same for both sides")
    parser.add_argument("--skip-hf", action="store_true", help="run miaotui only")
    parser.add_argument("--json", default=None, help="also write the results here")
    return parser


def run(args: argparse.Namespace) -> int:
    print(f"throughput: {args.num_requests} requests, {args.input_len} in / {args.output_len} out, "
          f"{args.threads} threads", file=sys.stderr)
    results = [_in_child(_run_miaotui, args)]
    if not args.skip_hf:
        results.append(_in_child(_run_transformers, args))
    ours = results[0]
    print("\n| | " + " | ".join(r.name for r in results) + (" | ratio |" if len(results) > 1 else " |"))
    print("|---" * (len(results) + 1 + (len(results) > 1)) + "|")
    rows = [("output tokens/s", "output_tok_s", True), ("total tokens/s", "total_tok_s", True),
            ("wall time (s)", "seconds", False), ("peak RSS (MiB)", "peak_rss_mib", False)]
    for label, attr, higher_better in rows:
        values = [getattr(r, attr) for r in results]
        line = f"| {label} | " + " | ".join(f"{v:,.1f}" for v in values)
        if len(results) > 1:
            ratio = values[0] / values[1] if higher_better else values[1] / values[0]
            line += f" | {ratio:.2f}x"
        print(line + " |")
    if len(results) > 1:
        print(f"\nmiaotui output tokens/s = {ours.output_tok_s / results[1].output_tok_s:.2f}x transformers'")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) | {"output_tok_s": r.output_tok_s} for r in results], f, indent=2)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
