"""Tokenizer metadata for the random-weight GGUF files of benchmarks/make_gguf.py.

llama.cpp refuses a model file without a vocabulary, and a benchmark on random weights needs
only one it accepts, of the model's vocabulary size (the embedding and output rows are what
cost time). Two kinds, each the kind the real model's file carries:

  gpt2  byte-level BPE (Qwen3's kind): the embedded SmolLM2 GGUF's 49,152 tokens and merges,
        padded with plain tokens that no merge reaches, so text encodes to ids < 49,152;
  llama SentencePiece (Gemma's kind): made here: Gemma's special ids (pad 0, eos 1, bos 2,
        unk 3), the 256 byte-fallback tokens, the printable ASCII characters with and without
        the word-start mark, and numbered pieces up to the vocabulary size.

The padding tokens are NORMAL, not CONTROL: transformers turns control tokens into added tokens,
and 100,000 of those make its tokenizer (and so the engine's start) slow for no benchmark's sake.
"""

from __future__ import annotations

from typing import Any

# gguf.TokenType values, spelled out so this module needs no gguf import to be read.
NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6


def add_borrowed_gpt2(writer: Any, vocab_size: int) -> None:
    """SmolLM2's BPE tokenizer fields, the token list padded to `vocab_size`."""
    import gguf

    from miaotui.loader.default_model import embedded_model_path

    reader = gguf.GGUFReader(embedded_model_path())

    def field(key: str) -> Any:
        return reader.fields[key].contents()

    tokens, types = list(field("tokenizer.ggml.tokens")), list(field("tokenizer.ggml.token_type"))
    if vocab_size < len(tokens):
        raise ValueError(f"vocab_size {vocab_size} is below the borrowed tokenizer's {len(tokens)} tokens")
    tokens += [f"<pad_{i}>" for i in range(len(tokens), vocab_size)]
    types += [NORMAL] * (vocab_size - len(types))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(field("tokenizer.ggml.pre"))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(list(field("tokenizer.ggml.merges")))
    writer.add_bos_token_id(field("tokenizer.ggml.bos_token_id"))
    writer.add_eos_token_id(field("tokenizer.ggml.eos_token_id"))
    writer.add_unk_token_id(field("tokenizer.ggml.unknown_token_id"))
    writer.add_pad_token_id(field("tokenizer.ggml.padding_token_id"))
    writer.add_add_bos_token(False)


def add_made_spm(writer: Any, vocab_size: int) -> None:
    """A SentencePiece ("llama") vocabulary of `vocab_size` pieces with Gemma's special ids."""
    mark = "\u2581"  # SentencePiece's word-start mark
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"]
    types = [CONTROL, CONTROL, CONTROL, UNKNOWN]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [BYTE] * 256
    chars = [chr(c) for c in range(33, 127)]
    pieces = [mark] + chars + [mark + c for c in chars]
    tokens += pieces
    types += [NORMAL] * len(pieces)
    if vocab_size < len(tokens):
        raise ValueError(f"vocab_size {vocab_size} is below the {len(tokens)} pieces every vocabulary here has")
    tokens += [f"{mark}p{i}" for i in range(len(tokens), vocab_size)]
    types += [NORMAL] * (vocab_size - len(types))
    # Scores rank the pieces for SentencePiece's merges: later pieces are rarer.
    scores = [0.0] * 260 + [-float(i) for i in range(vocab_size - 260)]
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_pad_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_bos_token_id(2)
    writer.add_unk_token_id(3)
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(False)  # as llama.cpp's converter writes for Gemma 3
