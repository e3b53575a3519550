"""A cached GGUF index that does not parse or has the wrong structure is discarded (one
warning) and rebuilt from the file, instead of failing every start."""

from __future__ import annotations

import json
import logging

import pytest

from miaotui.loader.gguf import gguf_hf_config, open_gguf
from miaotui.loader.gguf_index import GGUFIndex, _index_path


@pytest.fixture
def gguf_file(tmp_path, monkeypatch):
    import gguf
    import numpy as np

    from tests.gguf_writer import finish

    monkeypatch.setenv("MIAOTUI_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_vocab_size(16)
    writer.add_tensor("token_embd.weight", np.arange(128, dtype=np.float32).reshape(16, 8))
    finish(writer, path)
    assert not isinstance(open_gguf(path), GGUFIndex)  # the first read writes the index
    assert isinstance(open_gguf(path), GGUFIndex)
    return path


def _tensor_entry(record, **change):
    record["tensors"][0].update(change)
    return record


CORRUPTIONS = {
    "not json": lambda text, record: text[: len(text) // 2],
    "a list": lambda text, record: "[]",
    "no tensors": lambda text, record: json.dumps({k: v for k, v in record.items() if k != "tensors"}),
    "fields a list": lambda text, record: json.dumps({**record, "fields": []}),
    "no architecture": lambda text, record: json.dumps({**record, "fields": {}}),
    "tensor lacks offset": lambda text, record: json.dumps(
        {**record, "tensors": [{k: v for k, v in record["tensors"][0].items() if k != "offset"}]}),
    "shape a string": lambda text, record: json.dumps(_tensor_entry(record, shape="16x8")),
    "offset past the end": lambda text, record: json.dumps(_tensor_entry(record, offset=10**9)),
    "long field not a length": lambda text, record: json.dumps({**record, "long_fields": {"x": "many"}}),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_bad_index_is_discarded_once_and_rebuilt(gguf_file, corruption, caplog):
    index = _index_path(gguf_file)
    text = index.read_text()
    index.write_text(CORRUPTIONS[corruption](text, json.loads(text)))
    caplog.set_level(logging.WARNING, logger="miaotui")
    reader = open_gguf(gguf_file)
    assert not isinstance(reader, GGUFIndex)  # parsed from the file again
    assert gguf_hf_config(reader, gguf_file).hidden_size == 8
    (warning,) = caplog.records
    assert "discarding the cached GGUF index" in warning.getMessage() and "rebuilt" in warning.getMessage()
    caplog.clear()
    rebuilt = open_gguf(gguf_file)
    assert isinstance(rebuilt, GGUFIndex) and not caplog.records
    assert rebuilt.tensors[0].data.view("<f4").ravel().tolist() == list(range(128))
