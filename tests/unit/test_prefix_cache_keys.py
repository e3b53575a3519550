"""Prefix-cache block keys: a cryptographic hash chained over the prefix, so two different
prompts never share K/V, whatever a client crafts (Python's hash() of a tuple, used before, is 64
bits and not collision-resistant)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import miaotui.engine.kv_cache as kv_cache
from miaotui import LLM, SamplingParams
from miaotui.engine.kv_cache import hash_block
from tests.conftest import make_tiny_checkpoint

PARAMS = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


def test_keys_tell_every_part_apart():
    block = tuple(range(16))
    keys = {
        hash_block(None, block, None),
        hash_block(hash_block(None, block, None), block, None),  # the same tokens one block later
        hash_block(None, block, ""),  # an empty salt is not "no salt"
        hash_block(None, block, "None"),  # nor is the string "None"
        hash_block(None, block, "tenant-a"),
        hash_block(None, block[:-1] + (16,), None),  # one token differs
        hash_block(None, block[::-1], None),  # same tokens, other order
    }
    assert len(keys) == 7
    assert all(isinstance(k, bytes) and len(k) == 32 for k in keys)
    assert hash_block(None, block, "tenant-a") == hash_block(None, block, "tenant-a")


def test_keys_do_not_depend_on_python_hash_randomisation():
    code = ("from miaotui.engine.kv_cache import hash_block; "
            "print(hash_block(hash_block(None, (1, 2, 3), 'salt'), (4, 5, 6), 'salt').hex())")
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(digests) == 1  # Python's hash() of the salt string would change with the seed


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder, _ = make_tiny_checkpoint(tmp_path_factory.mktemp("keys"), "llama")
    return str(folder)


def _hits_of_second_prompt(folder: str, embedded_gguf: str) -> int:
    llm = LLM(folder, tokenizer=embedded_gguf, block_size=16, num_kv_blocks=64, quantization="none")
    g = torch.Generator().manual_seed(0)
    first = torch.randint(20, 256, (48,), generator=g).tolist()
    second = torch.randint(20, 256, (48,), generator=g).tolist()
    llm.generate({"prompt_token_ids": first}, PARAMS, use_tqdm=False)
    before = llm.engine.kv.prefix_hit_tokens
    llm.generate({"prompt_token_ids": second}, PARAMS, use_tqdm=False)
    return llm.engine.kv.prefix_hit_tokens - before


def test_different_prompts_share_no_blocks(tiny_folder, embedded_gguf):
    assert _hits_of_second_prompt(tiny_folder, embedded_gguf) == 0


def test_the_check_sees_colliding_keys(tiny_folder, embedded_gguf, monkeypatch):
    # The same measurement with keys that collide (what a crafted collision of a weak hash gives):
    # the second prompt then reuses the first one's blocks, so the test above can fail.
    monkeypatch.setattr(kv_cache, "hash_block", lambda parent, tokens, salt: b"collide" + (parent or b""))
    assert _hits_of_second_prompt(tiny_folder, embedded_gguf) > 0
