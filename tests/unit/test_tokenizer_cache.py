"""The tokenizer built from GGUF metadata is cached on disk and behaves exactly like a fresh one."""

from __future__ import annotations

from miaotui.tokenizer import chat_prompt_ids, load_tokenizer

TEXTS = ["Hello world! 🍕 秒推是一个推理引擎。", "  leading spaces\n\nand\ttabs", "<|im_start|>user\nhi<|im_end|>"]


def test_cached_tokenizer_equals_the_converted_one(tmp_path, monkeypatch, embedded_gguf):
    monkeypatch.setenv("MIAOTUI_CACHE_DIR", str(tmp_path))
    fresh = load_tokenizer(embedded_gguf, is_gguf=True)
    (entry,) = (tmp_path / "tokenizers").iterdir()
    assert (entry / "tokenizer.json").is_file()

    def no_conversion(*args, **kwargs):
        if kwargs.get("gguf_file"):
            raise AssertionError("the second load converted the GGUF again")
        return real(*args, **kwargs)

    from transformers import AutoTokenizer

    real = AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", no_conversion)
    cached = load_tokenizer(embedded_gguf, is_gguf=True)
    for text in TEXTS:
        assert cached.encode(text) == fresh.encode(text)
        ids = fresh.encode(text)
        assert cached.decode(ids) == fresh.decode(ids)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert chat_prompt_ids(cached, messages) == chat_prompt_ids(fresh, messages)
    assert (cached.eos_token_id, cached.bos_token_id) == (fresh.eos_token_id, fresh.bos_token_id)
