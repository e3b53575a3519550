"""The token-id prompts and banned ids that benchmarks/cpu_peers.py hands every side, for one GGUF file.

Read from the file with the `gguf` package, not miaotui's loader, so a file miaotui cannot run
(an architecture still being added) still gets prompts and the other sides still run.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

CONTROL, UNKNOWN = 3, 2  # gguf.TokenType values that no prompt or generated token may be


def _file_vocab(path: str) -> tuple[int, set[int], str]:
    """(vocabulary size, special ids, a one-line description) from the file's metadata."""
    import gguf

    reader = gguf.GGUFReader(path)

    def field(key: str) -> Any:
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    arch = field("general.architecture")
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    vocab = int(embd.shape[-1])  # GGUF lists dims innermost first: [hidden, vocab]
    special = {int(field(f"tokenizer.ggml.{k}_token_id")) for k in ("bos", "eos", "eot", "eom", "unknown", "padding")
               if field(f"tokenizer.ggml.{k}_token_id") is not None}
    types = field("tokenizer.ggml.token_type")
    if types is not None:
        special |= {i for i, t in enumerate(types) if t in (CONTROL, UNKNOWN)}
    kinds: dict[str, int] = {}
    for t in reader.tensors:
        kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
    about = (f"{Path(path).name}: {arch}, {field(f'{arch}.block_count')} layers x {field(f'{arch}.embedding_length')}, "
             f"vocab {vocab:,}, tensors " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1])))
    return vocab, {i for i in special if i < vocab}, about


def _warm_miaotui_caches(path: str) -> Any | None:
    """miaotui's tokenizer (None where it cannot load one), after loading it and indexing the file
    once, as any earlier start would have; errors are left to the miaotui side to report."""
    from miaotui.errors import ModelLoadError, UnsupportedModelError
    from miaotui.loader.gguf import open_gguf
    from miaotui.tokenizer import load_tokenizer

    try:
        open_gguf(Path(path))
    except (ModelLoadError, UnsupportedModelError) as exc:
        print(f"miaotui cannot index {Path(path).name}: {exc}", file=sys.stderr)
    try:
        return load_tokenizer(path, True)
    except (ModelLoadError, OSError, ValueError, KeyError) as exc:
        print(f"no tokenizer from {Path(path).name} ({exc}); the prompts are random ids", file=sys.stderr)
        return None


def work_prompts(path: str) -> dict:
    """{"gguf", "about", "short" (16 ids), "long" (512), "batch" (16 x 128), "special_ids"} for `path`."""
    from miaotui.bench.throughput import make_prompts

    start = time.perf_counter()
    print(f"reading {Path(path).name}: metadata, tokenizer, miaotui's caches ...", file=sys.stderr, flush=True)
    vocab, special, about = _file_vocab(path)
    tok = _warm_miaotui_caches(path)
    if tok is not None:
        special |= {i for i in tok.all_special_ids if i < vocab}
        short, long = make_prompts(tok, 1, 16, seed=1)[0], make_prompts(tok, 1, 512, seed=2)[0]
        batch = make_prompts(tok, 16, 128, seed=3)
    else:  # ids drawn from the ordinary tokens
        pool = np.setdiff1d(np.arange(vocab), np.fromiter(special, dtype=np.int64))
        rng = np.random.default_rng(0)
        short, long = rng.choice(pool, 16).tolist(), rng.choice(pool, 512).tolist()
        batch = rng.choice(pool, (16, 128)).tolist()
    for prompt in (short, long, *batch):
        bad = [i for i in prompt if not 0 <= i < vocab or i in special]
        if bad:
            raise ValueError(f"{path}: prompt ids {bad[:5]} lie outside the {vocab:,}-token vocabulary or are special")
    print(f"prompts ready in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return {"gguf": path, "about": about, "short": short, "long": long, "batch": batch,
            "special_ids": sorted(special)}
