"""A GGUF whose model sizes are 0 is refused by name, not with a ZeroDivisionError."""

from __future__ import annotations

import pytest

from miaotui import LLM
from miaotui.errors import ModelLoadError
from miaotui.loader.gguf import gguf_hf_config, open_gguf

SIZES = {"block_count": 1, "embedding_length": 8, "head_count": 2, "head_count_kv": 1}


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIAOTUI_CACHE_DIR", str(tmp_path / "cache"))


def _gguf(path, **sizes):
    import gguf
    import numpy as np

    from tests.gguf_writer import finish

    sizes = {**SIZES, **sizes}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(sizes["block_count"])
    writer.add_context_length(128)
    writer.add_embedding_length(sizes["embedding_length"])
    writer.add_feed_forward_length(16)
    writer.add_head_count(sizes["head_count"])
    writer.add_head_count_kv(sizes["head_count_kv"])
    writer.add_vocab_size(16)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    return finish(writer, path)


@pytest.mark.parametrize("key", ["block_count", "embedding_length", "head_count", "head_count_kv"])
def test_a_zero_size_names_its_metadata_key_and_value(tmp_path, key):
    path = _gguf(tmp_path / "zero.gguf", **{key: 0})
    full_key = key if key in ("block_count", "embedding_length") else f"attention.{key}"
    with pytest.raises(ModelLoadError, match=rf"zero\.gguf: GGUF metadata llama\.{full_key} = 0, but it must be "
                                             r"an integer >= 1"):
        gguf_hf_config(open_gguf(path), path)


def test_valid_sizes_pass(tmp_path):
    path = _gguf(tmp_path / "ok.gguf")
    cfg = gguf_hf_config(open_gguf(path), path)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (2, 1, 4)


def test_the_engine_reports_it_too(tmp_path):
    path = _gguf(tmp_path / "zero.gguf", head_count=0)
    with pytest.raises(ModelLoadError, match=r"llama\.attention\.head_count = 0"):
        LLM(str(path), skip_tokenizer_init=True)
