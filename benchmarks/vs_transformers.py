"""miaotui vs Hugging Face transformers `generate()`: same model, same prompts, same run.

Command (from the repository root):

    .venv/bin/python benchmarks/vs_transformers.py [--repeats 3] [--threads N]
        [--prompt-len 512] [--decode-tokens 128] [--decode-prompt-len 16] [--json PATH]

Model: the embedded default, SmolLM2-135M-Instruct Q4_1 GGUF, dequantised to fp32 by both
engines; CPU only; both run under the same torch thread count (--threads, default
torch.get_num_threads()). Both engines see identical prompt token ids: English text tokens
drawn at random (torch.manual_seed(0)) from an encoded paragraph, no BOS or chat template.

What is measured (every timing is the best of --repeats runs, after one untimed warm-up):
  load      miaotui: LLM() construction; transformers: AutoTokenizer + AutoModelForCausalLM
            from_pretrained(gguf_file=...). Measured once each (imports not counted).
  prefill   --prompt-len tokens -> 1 greedy token. miaotui: generate(max_tokens=1,
            ignore_eos=True); transformers: generate(max_new_tokens=1, do_sample=False).
            prefill tok/s = prompt_len / time.
  decode    batch 1, a --decode-prompt-len (16) token prompt, --decode-tokens (128) greedy tokens
            with EOS ignored (ignore_eos / min_new_tokens), minus the 1-token time for the same
            16-token prompt. The first token comes out of the prefill, so the difference covers
            decode_tokens - 1 forward passes: decode tok/s = (decode_tokens - 1) / (t_total - t_prefill16).
Also printed: whether the greedy token ids of the two engines' decode runs are identical.
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


def best_of(fn, repeats: int) -> tuple[float, object]:
    """Run fn once untimed (warm-up), then `repeats` timed runs; (best seconds, last result)."""
    result = fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


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
    ap.add_argument("--json", metavar="PATH", help="also write the numbers to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gguf = embedded_model_path()
    dirname, basename = os.path.dirname(gguf), os.path.basename(gguf)

    # Per engine: load, prefill(long), prefill(short), decode(short) -> 4 steps x 2 engines.
    bar = tqdm(total=8, desc="benchmark", unit="step", file=sys.stderr)

    def step(name: str) -> None:
        bar.set_postfix_str(name)

    results: dict[str, dict[str, float]] = {}
    tokens: dict[str, list[int]] = {}
    prompts = None

    def measure(engine: str, run) -> None:
        r = results[engine]
        step(f"{engine}: prefill {args.prompt_len}")
        r["prefill_s"], _ = best_of(lambda: run(prompts[0], 1), args.repeats)
        bar.update()
        step(f"{engine}: prefill {args.decode_prompt_len}")
        r["prefill_short_s"], _ = best_of(lambda: run(prompts[1], 1), args.repeats)
        bar.update()
        step(f"{engine}: decode {args.decode_tokens}")
        r["decode_total_s"], tokens[engine] = best_of(lambda: run(prompts[1], args.decode_tokens),
                                                      args.repeats)
        bar.update()
        r["prefill_tok_s"] = args.prompt_len / r["prefill_s"]
        r["decode_tok_s"] = (args.decode_tokens - 1) / (r["decode_total_s"] - r["prefill_short_s"])

    # --- miaotui -------------------------------------------------------------------------
    step("miaotui: load")
    t0 = time.perf_counter()
    llm = LLM()
    results["miaotui"] = {"load_s": time.perf_counter() - t0}
    bar.update()
    tok = llm.get_tokenizer()
    prompts = (make_prompt(tok, args.prompt_len), make_prompt(tok, args.decode_prompt_len, seed=1))
    measure("miaotui", miaotui_runner(llm))
    del llm

    # --- transformers --------------------------------------------------------------------
    step("transformers: load")
    t0 = time.perf_counter()
    hf_tok = AutoTokenizer.from_pretrained(dirname, gguf_file=basename)
    model = AutoModelForCausalLM.from_pretrained(dirname, gguf_file=basename, torch_dtype=torch.float32)
    model.eval()
    results["transformers"] = {"load_s": time.perf_counter() - t0}
    bar.update()
    pad = hf_tok.pad_token_id if hf_tok.pad_token_id is not None else hf_tok.eos_token_id
    measure("transformers", hf_runner(model, pad))
    bar.close()

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
          f"{args.threads} threads, best of {args.repeats}\n")
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
                   "tokens": tokens}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
