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
        # The cached plain fast tokenizer loads by its own class: AutoTokenizer (which indexes
        # every model transformers knows first) is not called at all.
        raise AssertionError("the second load went through AutoTokenizer")

    from transformers import AutoTokenizer

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", no_conversion)
    cached = load_tokenizer(embedded_gguf, is_gguf=True)
    for text in TEXTS:
        assert cached.encode(text) == fresh.encode(text)
        ids = fresh.encode(text)
        assert cached.decode(ids) == fresh.decode(ids)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert chat_prompt_ids(cached, messages) == chat_prompt_ids(fresh, messages)
    assert (cached.eos_token_id, cached.bos_token_id) == (fresh.eos_token_id, fresh.bos_token_id)
    assert cached.chat_template == fresh.chat_template
    assert cached.all_special_tokens == fresh.all_special_tokens
