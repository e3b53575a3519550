"""miaotui vs Hugging Face transformers `generate()`: same model, same prompts, same run.

Command (from the repository root):

    .venv/bin/python benchmarks/vs_transformers.py [--repeats 3] [--threads N]
        [--prompt-len 512] [--decode-tokens 128] [--decode-prompt-len 16] [--quantization int4]
        [--json PATH]

Model: the embedded default, SmolLM2-135M-Instruct Q4_1 GGUF, dequantised to fp32 by both
engines; CPU only; both run under the same torch thread count (--threads, default
torch.get_num_threads()). Prompts are token ids drawn at random from an encoded English
paragraph (torch.Generator with a fixed seed per run; no BOS, no chat template). Both engines get
identical ids, and every timed run uses a fresh prompt, so miaotui's prefix cache never hits.

What is measured (every timing is the best of --repeats runs, after one untimed warm-up; the two
engines alternate run by run so that outside CPU load hits both alike):
  load      miaotui: LLM() construction; transformers: AutoTokenizer + AutoModelForCausalLM
            from_pretrained(gguf_file=...). Measured once each (imports not counted).
  prefill   --prompt-len tokens -> 1 greedy token. miaotui: generate(max_tokens=1,
            ignore_eos=True); transformers: generate(max_new_tokens=1, do_sample=False).
            prefill tok/s = prompt_len / time.
  decode    batch 1, a --decode-prompt-len (16) token prompt, --decode-tokens (128) greedy tokens
            with EOS ignored (ignore_eos / min_new_tokens), minus the 1-token time for a
            16-token prompt. The first token comes out of the prefill, so the difference covers
            decode_tokens - 1 forward passes: decode tok/s = (decode_tokens - 1) / (t_total - t_prefill16).
Also printed: whether the greedy token ids of the two engines' last decode run are identical.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from miaotui import LLM, SamplingParams
from miaotui.config import QUANTIZATIONS
from miaotui.loader.default_model import embedded_model_path

PARAGRAPH = (
    "The old lighthouse keeper climbed the narrow stairs every evening, carrying a lamp and a "
    "notebook in which he wrote down the weather, the ships that passed, and the birds that rested "
    "on the railing. Over the years the notebook grew into a small library of quiet observations, "
    "and visitors who came to the island often asked to read a page or two before the boat left. "
)


def make_prompt(tokenizer, length: int, seed: int = 0) -> list[int]:
    """`length` token ids sampled (with a fixed seed) from the tokens of an English paragraph."""
    pool = torch.tensor(tokenizer.encode(PARAGRAPH * 4, add_special_tokens=False))
    gen = torch.Generator().manual_seed(seed)
    return pool[torch.randint(len(pool), (length,), generator=gen)].tolist()


def miaotui_runner(llm: LLM):
    def run(ids: list[int], new_tokens: int) -> list[int]:
        sp = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
        out = llm.generate({"prompt_token_ids": ids}, sp, use_tqdm=False)
        return list(out[0].outputs[0].token_ids)
    return run


def hf_runner(model, pad_id: int):
    def run(ids: list[int], new_tokens: int) -> list[int]:
        x = torch.tensor([ids], dtype=torch.long)
        with torch.inference_mode():
            out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 pad_token_id=pad_id)
        return out[0, len(ids):].tolist()
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--decode-prompt-len", type=int, default=16)
    ap.add_argument("--quantization", choices=QUANTIZATIONS, default="none",
                    help="miaotui's weight-only quantization (transformers stays fp32)")
    ap.add_argument("--json", metavar="PATH", help="also write the numbers to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gguf = embedded_model_path()
    dirname, basename = os.path.dirname(gguf), os.path.basename(gguf)

    # Steps: 2 loads, then per measurement one warm-up + `repeats` timed runs of each engine.
    tasks = ["prefill_s", "prefill_short_s", "decode_total_s"]
    bar = tqdm(total=2 + len(tasks) * (args.repeats + 1) * 2, desc="benchmark", unit="step",
               file=sys.stderr)
    load_avg_start = os.getloadavg()[0]

    bar.set_postfix_str("miaotui: load")
    t0 = time.perf_counter()
    llm = LLM(quantization=args.quantization)
    results = {"miaotui": {"load_s": time.perf_counter() - t0}}
    bar.update()
    bar.set_postfix_str("transformers: load")
    t0 = time.perf_counter()
    hf_tok = AutoTokenizer.from_pretrained(dirname, gguf_file=basename)
    model = AutoModelForCausalLM.from_pretrained(dirname, gguf_file=basename, torch_dtype=torch.float32)
    model.eval()
    results["transformers"] = {"load_s": time.perf_counter() - t0}
    bar.update()

    pad = hf_tok.pad_token_id if hf_tok.pad_token_id is not None else hf_tok.eos_token_id
    runners = {"miaotui": miaotui_runner(llm), "transformers": hf_runner(model, pad)}
    work = {"prefill_s": (args.prompt_len, 1), "prefill_short_s": (args.decode_prompt_len, 1),
            "decode_total_s": (args.decode_prompt_len, args.decode_tokens)}
    tokens: dict[str, list[int]] = {}
    # The engines alternate run by run, so a burst of outside CPU load hits both alike;
    # the best of the timed runs is kept. Run 0 of each measurement is an untimed warm-up.
    # Every run gets a prompt neither engine has seen (miaotui's prefix cache would otherwise
    # turn a repeated prefill into a lookup); both engines get the same ids in the same run.
    for t, task in enumerate(tasks):
        length, n = work[task]
        for rep in range(args.repeats + 1):
            ids = make_prompt(hf_tok, length, seed=100 * t + rep)
            for engine, run in runners.items():
                bar.set_postfix_str(f"{engine}: {task} ({len(ids)} -> {n} tok), run {rep}")
                t0 = time.perf_counter()
                out = run(ids, n)
                dt = time.perf_counter() - t0
                if rep > 0:
                    r = results[engine]
                    r[task] = min(r.get(task, float("inf")), dt)
                if task == "decode_total_s":
                    tokens[engine] = out
                bar.update()
    bar.close()
    for r in results.values():
        r["prefill_tok_s"] = args.prompt_len / r["prefill_s"]
        r["decode_tok_s"] = (args.decode_tokens - 1) / (r["decode_total_s"] - r["prefill_short_s"])

    # --- report --------------------------------------------------------------------------
    m, h = results["miaotui"], results["transformers"]
    same = tokens["miaotui"] == tokens["transformers"]
    first_diff = next((i for i, (a, b) in enumerate(zip(tokens["miaotui"], tokens["transformers"]))
                       if a != b), None)
    rows = [
        ("load time (s)", m["load_s"], h["load_s"], h["load_s"] / m["load_s"]),
        (f"prefill {args.prompt_len} tok (tok/s)", m["prefill_tok_s"], h["prefill_tok_s"],
         m["prefill_tok_s"] / h["prefill_tok_s"]),
        (f"decode bs=1, {args.decode_tokens} tok after {args.decode_prompt_len}-tok prompt (tok/s)",
         m["decode_tok_s"], h["decode_tok_s"], m["decode_tok_s"] / h["decode_tok_s"]),
    ]
    print(f"\nSmolLM2-135M-Instruct Q4_1 GGUF -> fp32, CPU, torch {torch.__version__}, "
          f"{args.threads} threads, best of {args.repeats}; load average at start "
          f"{load_avg_start:.2f}, at end {os.getloadavg()[0]:.2f} (other CPU load skews timings)\n")
    print("| metric | miaotui | transformers | ratio (>1: miaotui better) |")
    print("|---|---:|---:|---:|")
    for name, a, b, ratio in rows:
        print(f"| {name} | {a:.2f} | {b:.2f} | {ratio:.2f}x |")
    print("\n(load-time ratio = transformers/miaotui; throughput ratios = miaotui/transformers)")
    print(f"greedy decode token ids identical: {same}"
          + ("" if same else f" (first difference at generated token {first_diff})"))
    if args.json:
        payload = {"config": vars(args) | {"model": gguf, "torch": torch.__version__},
                   "results": results, "greedy_ids_identical": same, "first_diff": first_diff,
                   "tokens": tokens, "load_avg": [load_avg_start, os.getloadavg()[0]]}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
