"""GGUF chat models stop at their end-of-turn token, found by its text as llama.cpp does, when
the file's metadata names only the EOS (Gemma's <end_of_turn>, Phi-3's <|end|>, ChatML's <|im_end|>)."""

from __future__ import annotations

from types import SimpleNamespace

from miaotui.loader import END_OF_TURN_TOKENS, end_of_turn_ids, eos_token_ids, resolve_model


class _Vocab:
    """A tokenizer that knows only its vocabulary (transformers' get_vocab)."""

    eos_token_id = 1

    def __init__(self, vocab: dict[str, int]) -> None:
        self.vocab = vocab

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)


def test_gemma_end_of_turn_joins_the_stop_ids(embedded_gguf):
    gemma = _Vocab({"<eos>": 1, "<start_of_turn>": 105, "<end_of_turn>": 106, "hello": 7})
    source = resolve_model(embedded_gguf)  # any GGUF file: the ids come from the tokenizer given
    assert eos_token_ids(source, SimpleNamespace(eos_token_id=1), gemma) == {1, 106}
    assert end_of_turn_ids(_Vocab({"<|end|>": 32007, "<|endoftext|>": 32000})) == {32007, 32000}
    assert "<start_of_turn>" not in END_OF_TURN_TOKENS


def test_embedded_model_stops_at_im_end_and_endoftext(embedded_gguf, embedded_tokenizer):
    ids = eos_token_ids(resolve_model(embedded_gguf), SimpleNamespace(eos_token_id=2), embedded_tokenizer)
    assert ids == {embedded_tokenizer.token_id("<|im_end|>"), embedded_tokenizer.token_id("<|endoftext|>")} == {0, 2}


def test_hugging_face_folders_keep_their_own_ids(tiny_llama):
    folder, _ = tiny_llama
    gemma = _Vocab({"<end_of_turn>": 106})
    assert 106 not in eos_token_ids(resolve_model(str(folder)), SimpleNamespace(eos_token_id=2), gemma)
