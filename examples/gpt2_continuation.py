"""The classic GPT-2 tutorial snippet, with miaotui: five sampled continuations of one prompt.

    python examples/gpt2_continuation.py PATH/TO/gpt2 ["Hello, I'm a language model,"]
        [--tokenizer PATH] [--max-tokens 30] [--seed 42]

PATH is a local GPT-2 checkpoint folder (config.json + weights) or a gpt2 GGUF file. transformers
would do: pipeline("text-generation", model="gpt2")(prompt, max_length=30, num_return_sequences=5).
"""

import argparse

from miaotui import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("prompt", nargs="?", default="Hello, I'm a language model,")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder or GGUF, if not the model's own")
    ap.add_argument("--max-tokens", type=int, default=30)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()
    llm = LLM(args.model, tokenizer=args.tokenizer)
    params = SamplingParams(n=5, temperature=1.0, top_k=50, max_tokens=args.max_tokens, seed=args.seed)
    for completion in llm.generate(args.prompt, params, use_tqdm=False)[0].outputs:
        print(f"{completion.index}: {args.prompt}{completion.text}")


if __name__ == "__main__":
    main()
