"""The classic BLOOM snippet, with miaotui: greedy and beam-search continuations of one prompt.

    python examples/bloom_generation.py PATH/TO/bloom-560m ["A cat in French is \\""]
        [--tokenizer PATH] [--max-tokens 30]

PATH is a local BLOOM checkpoint folder or a bloom GGUF file. transformers would do:
model.generate(**tokenizer(prompt, return_tensors="pt"), max_new_tokens=30[, num_beams=4]).
"""

import argparse

from miaotui import LLM, SamplingParams
from miaotui.sampling_params import BeamSearchParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("prompt", nargs="?", default='A cat in French is "')
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder or GGUF, if not the model's own")
    ap.add_argument("--max-tokens", type=int, default=30)
    args = ap.parse_args()
    llm = LLM(args.model, tokenizer=args.tokenizer)
    greedy = llm.generate(args.prompt, SamplingParams(temperature=0, max_tokens=args.max_tokens), use_tqdm=False)
    print("greedy:", args.prompt + greedy[0].outputs[0].text)
    beams = llm.beam_search(args.prompt, BeamSearchParams(beam_width=4, max_tokens=args.max_tokens,
                                                          early_stopping=True), use_tqdm=False)
    print("beam search (4 beams):", args.prompt + beams[0].outputs[0].text)


if __name__ == "__main__":
    main()
