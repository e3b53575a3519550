"""The classic T5 summarization snippet, with miaotui: beam search over an encoder-decoder.

    python examples/t5_summarization.py PATH/TO/t5-small ["summarize: <article>"]
        [--tokenizer PATH] [--max-tokens 60] [--num-beams 5] [--length-penalty 2.0]

PATH is a local T5 / flan-T5 checkpoint folder. transformers would do:
model.generate(**tokenizer("summarize: " + article, return_tensors="pt"), num_beams=5,
early_stopping=True, max_new_tokens=60). The article is cut to the model's context the same way
(tokenizer truncation); the prompt goes to the encoder, the summary comes from the decoder.
"""

import argparse

from miaotui import LLM, SamplingParams
from miaotui.sampling_params import BeamSearchParams

ARTICLE = (
    "summarize: The tower is 324 metres (1,063 ft) tall, about the same height as an 81-storey "
    "building, and the tallest structure in Paris. Its base is square, measuring 125 metres (410 ft) "
    "on each side. During its construction, the Eiffel Tower surpassed the Washington Monument to "
    "become the tallest man-made structure in the world, a title it held for 41 years until the "
    "Chrysler Building in New York City was finished in 1930."
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("text", nargs="?", default=ARTICLE)
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder, if not the model's own")
    ap.add_argument("--max-tokens", type=int, default=60)
    ap.add_argument("--num-beams", type=int, default=5)
    ap.add_argument("--length-penalty", type=float, default=1.0)
    args = ap.parse_args()
    llm = LLM(args.model, tokenizer=args.tokenizer, max_num_seqs=max(8, args.num_beams))
    ids = llm.get_tokenizer()(args.text, truncation=True, max_length=llm.engine.max_model_len)["input_ids"]
    params = BeamSearchParams(beam_width=args.num_beams, max_tokens=args.max_tokens, early_stopping=True,
                              length_penalty=args.length_penalty)
    summary = llm.beam_search({"prompt_token_ids": ids}, params, use_tqdm=False)[0].outputs[0]
    print(f"summary ({args.num_beams} beams): {summary.text.strip()}")
    greedy = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=args.max_tokens),
                          use_tqdm=False)[0].outputs[0]
    print(f"summary (greedy): {greedy.text.strip()}")


if __name__ == "__main__":
    main()
