"""The GGUF tokenizer cache's Rust core (tokenizer_core.py) encodes and decodes exactly as the
transformers tokenizer does, loads without importing transformers, and is ignored (then
rewritten) when it is damaged or was written by another transformers install."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from miaotui.tokenizer import load_tokenizer
from miaotui.tokenizer_core import CORE_FILE, META_FILE, CoreTokenizer, transformers_tokenizer

DATA = Path(__file__).resolve().parents[1] / "data" / "public_domain_english.txt"
TEXTS = ["", " ", "Hello world! 🍕 秒推是一个推理引擎。", "  leading spaces\n\nand\ttabs  ",
         "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|>x<|im_end|>",
         "naïve café — “quotes” ½ \u200b zero-width", "def f(x):\n    return x ** 2  # 😀😀"]


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory, embedded_gguf):
    """A tokenizer cache holding the embedded model's tokenizer, built once (a few seconds)."""
    root = tmp_path_factory.mktemp("tokenizer_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIAOTUI_CACHE_DIR", str(root))
        built = load_tokenizer(embedded_gguf, is_gguf=True)
    assert not isinstance(built, CoreTokenizer)  # the first load converts through transformers
    return root


@pytest.fixture()
def cache(built_cache, tmp_path, monkeypatch):
    """A private copy of the built cache (tests damage it); its one entry folder."""
    shutil.copytree(built_cache, tmp_path, dirs_exist_ok=True)
    monkeypatch.setenv("MIAOTUI_CACHE_DIR", str(tmp_path))
    (entry,) = (tmp_path / "tokenizers").iterdir()
    assert (entry / CORE_FILE).is_file() and (entry / META_FILE).is_file()
    return entry


def test_core_encodes_and_decodes_as_transformers(cache, embedded_gguf):
    core = load_tokenizer(embedded_gguf, is_gguf=True)
    assert isinstance(core, CoreTokenizer)
    from transformers import PreTrainedTokenizerFast

    reference = PreTrainedTokenizerFast.from_pretrained(str(cache), local_files_only=True)
    texts = TEXTS + [DATA.read_text(encoding="utf-8")[:4000]]
    for text in texts:
        for special in (True, False):
            assert core.encode(text, add_special_tokens=special) == reference.encode(text, add_special_tokens=special)
    rng = random.Random(0)
    vocab = len(reference)
    specials = reference.all_special_ids
    for _ in range(200):
        ids = [rng.choice(specials) if rng.random() < 0.1 else rng.randrange(vocab) for _ in range(rng.randint(1, 12))]
        for skip in (True, False):
            assert core.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)
    assert core.decode(specials[0]) == reference.decode(specials[0])
    assert (core.eos_token_id, core.bos_token_id) == (reference.eos_token_id, reference.bos_token_id)
    assert core.eos_token_id is not None
    with pytest.raises(ValueError, match="must be a string"):
        core.encode(["not", "text"])


def test_anything_else_goes_to_the_transformers_tokenizer(cache, embedded_gguf):
    from transformers import PreTrainedTokenizerBase

    core = load_tokenizer(embedded_gguf, is_gguf=True)
    assert isinstance(core, CoreTokenizer)
    full = transformers_tokenizer(core)
    assert isinstance(full, PreTrainedTokenizerBase) and full is core.full
    assert core.chat_template == full.chat_template and "<|im_start|>" in core.chat_template
    assert len(core) == len(full)
    with pytest.raises(AttributeError):
        core._no_such_private_name


def test_core_loads_and_works_without_importing_transformers(cache, embedded_gguf, tmp_path):
    code = f"""
import sys
from miaotui.tokenizer import load_tokenizer
from miaotui.tokenizer_core import CoreTokenizer
tok = load_tokenizer({embedded_gguf!r}, is_gguf=True)
ids = tok.encode("The capital of France is")
text = tok.decode(ids)
print(type(tok).__name__, "transformers" in sys.modules, text == "The capital of France is", tok.eos_token_id)
tok.chat_template  # the first use beyond encode/decode loads transformers
print("transformers" in sys.modules)
"""
    env = {"MIAOTUI_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    first, second = out.stdout.strip().splitlines()
    assert first.split()[:3] == ["CoreTokenizer", "False", "True"]
    assert second == "True"


def test_core_of_another_transformers_install_is_ignored_and_rewritten(cache, embedded_gguf):
    meta = json.loads((cache / META_FILE).read_text())
    (cache / META_FILE).write_text(json.dumps(dict(meta, transformers="/elsewhere/transformers/__init__.py|1")))
    assert not isinstance(load_tokenizer(embedded_gguf, is_gguf=True), CoreTokenizer)
    assert json.loads((cache / META_FILE).read_text()) == meta
    assert isinstance(load_tokenizer(embedded_gguf, is_gguf=True), CoreTokenizer)


def test_a_damaged_core_is_ignored_and_rewritten(cache, embedded_gguf):
    good = (cache / CORE_FILE).read_text()
    (cache / CORE_FILE).write_text(good[: len(good) // 2])
    tok = load_tokenizer(embedded_gguf, is_gguf=True)
    assert not isinstance(tok, CoreTokenizer) and tok.decode(tok.encode("Hi there")) == "Hi there"
    assert (cache / CORE_FILE).read_text() == good
    assert isinstance(load_tokenizer(embedded_gguf, is_gguf=True), CoreTokenizer)


def test_a_core_paired_with_another_cores_meta_is_ignored(cache, embedded_gguf):
    meta = json.loads((cache / META_FILE).read_text())
    (cache / META_FILE).write_text(json.dumps(dict(meta, core_sha256="0" * 64)))
    assert not isinstance(load_tokenizer(embedded_gguf, is_gguf=True), CoreTokenizer)
    assert json.loads((cache / META_FILE).read_text()) == meta


def test_the_full_tokenizer_is_rebuilt_from_the_gguf_when_the_cache_went_away(cache, embedded_gguf):
    core = load_tokenizer(embedded_gguf, is_gguf=True)
    assert isinstance(core, CoreTokenizer) and core.full_pending
    shutil.rmtree(cache)  # e.g. a cache cleaner, after start-up
    assert "<|im_start|>" in core.chat_template and not core.full_pending
    assert core.decode(core.encode("still works")) == "still works"


def test_a_failed_full_load_is_a_clear_error_raised_again_not_retried():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    calls = []

    def broken():
        calls.append(1)
        raise AttributeError("no such thing")  # from inside a property: must not recurse via __getattr__

    tok = CoreTokenizer(Tokenizer(WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")), {"eos_token_id": 0}, broken)
    for _ in range(3):
        with pytest.raises(RuntimeError, match="could not be loaded: no such thing"):
            tok.chat_template
    assert calls == [1] and not tok.full_pending
    assert tok.decode([0]) == "a" and tok.eos_token_id == 0


def test_decode_takes_numpy_and_torch_ids(cache, embedded_gguf):
    import numpy as np
    import torch

    core = load_tokenizer(embedded_gguf, is_gguf=True)
    ids = core.encode("Hello world")
    assert core.decode(np.array(ids)) == core.decode(torch.tensor(ids)) == core.decode(ids) == "Hello world"
    assert core.decode(np.int64(ids[0])) == core.decode(ids[0])


def test_a_damaged_cache_entry_is_rebuilt_in_place(cache, embedded_gguf):
    (cache / META_FILE).unlink()
    (cache / "tokenizer.json").write_text("{ not json")
    tok = load_tokenizer(embedded_gguf, is_gguf=True)
    assert tok.decode(tok.encode("Hi there")) == "Hi there"
    assert json.loads((cache / "tokenizer.json").read_text())  # the entry itself was replaced
    assert isinstance(load_tokenizer(embedded_gguf, is_gguf=True), CoreTokenizer)
    assert [p.name for p in cache.parent.iterdir()] == [cache.name]  # no temporary folder left
