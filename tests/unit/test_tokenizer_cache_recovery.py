"""A damaged cached tokenizer.json (of a GGUF file's converted tokenizer) is deleted, rebuilt
from the GGUF file and saved again, with one warning; the load goes on."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

import miaotui.tokenizer as tokenizer_module
from miaotui.tokenizer import load_tokenizer
from miaotui.tokenizer_core import CORE_FILE, META_FILE, CoreTokenizer

TEXT = "Hello world! 🍕 秒推"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, embedded_gguf):
    """A whole cache entry of the embedded model's tokenizer (converted once for this module)."""
    root = tmp_path_factory.mktemp("pristine-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIAOTUI_CACHE_DIR", str(root))
        load_tokenizer(embedded_gguf, is_gguf=True)
    (entry,) = (root / "tokenizers").iterdir()
    return entry


@pytest.fixture
def conversions(monkeypatch, pristine):
    """Stands in for the slow conversion from GGUF metadata (a copy of the pristine entry's
    tokenizer); records each call."""
    calls = []

    def convert(path):
        calls.append(path)
        return tokenizer_module._load_cached(pristine)

    monkeypatch.setattr(tokenizer_module, "_convert_gguf_tokenizer", convert)
    return calls


DAMAGE = {"truncated": lambda text: text[: len(text) // 3], "empty": lambda text: "",
          "a list": lambda text: "[1]", "no model": lambda text: json.dumps({"version": "1.0", "added_tokens": []})}


@pytest.mark.parametrize("with_core", [False, True], ids=["transformers", "core"])
@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_tokenizer_json_is_rebuilt_and_the_load_goes_on(tmp_path, monkeypatch, caplog, embedded_gguf,
                                                                   pristine, conversions, damage, with_core):
    monkeypatch.setenv("MIAOTUI_CACHE_DIR", str(tmp_path))
    entry = tmp_path / "tokenizers" / pristine.name
    shutil.copytree(pristine, entry)
    if not with_core:
        for name in (CORE_FILE, META_FILE):
            (entry / name).unlink()
    good = (pristine / "tokenizer.json").read_text()
    (entry / "tokenizer.json").write_text(DAMAGE[damage](good))
    caplog.set_level(logging.WARNING, logger="miaotui")

    tokenizer = load_tokenizer(embedded_gguf, is_gguf=True)
    assert isinstance(tokenizer, CoreTokenizer) == with_core
    assert tokenizer.chat_template  # behind a core: loads the transformers tokenizer now
    reference = tokenizer_module._load_cached(pristine)
    assert tokenizer.encode(TEXT) == reference.encode(TEXT)
    assert len(conversions) == 1
    (warning,) = caplog.records
    assert "does not load" in warning.getMessage() and "rebuilding it from the GGUF file" in warning.getMessage()
    assert json.loads((entry / "tokenizer.json").read_text()) == json.loads(good)  # repaired on disk

    caplog.clear()
    again = load_tokenizer(embedded_gguf, is_gguf=True)
    assert again.chat_template == reference.chat_template
    assert len(conversions) == 1 and not caplog.records  # the next start reads the repaired cache
