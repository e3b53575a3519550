"""Write a random-weight checkpoint folder of a classic architecture, for benchmarks with no
download: `python benchmarks/random_checkpoint.py gpt2 /tmp/gpt2-random [--layers 12 --hidden 768]`.

The vocabulary is the embedded model's (49,152 tokens), so `--tokenizer` can be the embedded
GGUF; sizes default to the real small models (gpt2: 12 x 768, 12 heads; bloom: bloom-560m's
24 x 1024, 16 heads; t5: t5-small's 6 + 6 layers x 512, 8 heads, d_ff 2048, ReLU).
"""

import argparse

import torch

DEFAULTS = {"gpt2": (12, 768, 12), "bloom": (24, 1024, 16), "llama": (30, 576, 9), "t5": (6, 512, 8)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("arch", choices=sorted(DEFAULTS))
    ap.add_argument("out")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from transformers import (BloomConfig, BloomForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM, T5Config, T5ForConditionalGeneration)

    layers, hidden, heads = DEFAULTS[args.arch]
    layers, hidden, heads = args.layers or layers, args.hidden or hidden, args.heads or heads
    torch.manual_seed(args.seed)
    if args.arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=49152, n_embd=hidden, n_layer=layers, n_head=heads,
                                           bos_token_id=1, eos_token_id=2))
    elif args.arch == "bloom":
        model = BloomForCausalLM(BloomConfig(vocab_size=49152, hidden_size=hidden, n_layer=layers, n_head=heads,
                                             bos_token_id=1, eos_token_id=2))
    elif args.arch == "t5":
        model = T5ForConditionalGeneration(T5Config(vocab_size=49152, d_model=hidden, d_kv=hidden // heads,
                                                    d_ff=4 * hidden, num_layers=layers, num_heads=heads,
                                                    feed_forward_proj="relu", decoder_start_token_id=0))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=hidden, num_hidden_layers=layers,
                                             num_attention_heads=heads, num_key_value_heads=3,
                                             intermediate_size=4 * hidden, bos_token_id=1, eos_token_id=2))
    model.save_pretrained(args.out)
    print(f"wrote {args.arch} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters) to {args.out}")


if __name__ == "__main__":
    main()
