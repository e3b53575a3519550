"""Tokenizer and chat template loading, through transformers (folder or GGUF metadata).

Building a tokenizer from GGUF metadata takes seconds (transformers converts the whole vocab
and merges in Python), so the converted tokenizer is saved once under the cache directory,
keyed by the file's path, size and mtime, and later loads read that folder instead. A cached
entry that fails to load (a truncated or hand-edited tokenizer.json) is deleted, rebuilt from
the GGUF file and saved again, with one warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from miaotui.config import cache_dir
from miaotui.errors import ModelLoadError
from miaotui.tokenizer_core import load_core, save_core, transformers_tokenizer


# What a transformers tokenizer is built from: a fast tokenizer's tokenizer.json, a SentencePiece
# or tiktoken model, or a BPE / WordPiece vocabulary. A folder without any of them makes
# transformers fail with an unrelated message ("You need to have sentencepiece or tiktoken installed").
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json",
                   "vocab.txt", "*.tiktoken")
NO_TOKENIZER_HINT = "pass --tokenizer PATH or --skip-tokenizer-init"

logger = logging.getLogger("miaotui")


def tokenizer_files(folder: Path) -> list[str]:
    """The tokenizer files in `folder` (TOKENIZER_FILES), by name."""
    return sorted({p.name for pattern in TOKENIZER_FILES for p in folder.glob(pattern)})


def check_tokenizer_folder(folder: Path) -> None:
    """Raise ModelLoadError naming the way out when `folder` holds no tokenizer files."""
    if not tokenizer_files(folder):
        raise ModelLoadError(f"no tokenizer files in {folder} (tokenizer.json, tokenizer.model or vocab files); "
                             f"{NO_TOKENIZER_HINT}")


def _gguf_cache_folder(gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    key = f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return Path(cache_dir()) / "tokenizers" / digest


# Classes transformers saves for a tokenizer built from GGUF metadata that are plain fast
# tokenizers (all their behaviour is in tokenizer.json and the config), by version.
_PLAIN_FAST_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _is_plain_fast(folder: Path) -> bool:
    config = json.loads((folder / "tokenizer_config.json").read_text())
    return config.get("tokenizer_class") in _PLAIN_FAST_CLASSES


def _load_cached(folder: Path) -> Any:
    """The cached tokenizer through transformers. A plain fast tokenizer is loaded by its own
    class: AutoTokenizer would first index every model transformers knows (~0.5 s)."""
    if _is_plain_fast(folder):
        from transformers import PreTrainedTokenizerFast as loader
    else:
        from transformers import AutoTokenizer as loader
    return loader.from_pretrained(str(folder), local_files_only=True)


def _convert_gguf_tokenizer(path: Path) -> Any:
    # One step with no inner progress to report: the bar shows that work is going on and its time.
    with tqdm(total=1, desc=f"Building the tokenizer of {path.name} (cached after the first load)",
              bar_format="{desc}: {elapsed}", leave=False) as bar:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        bar.update(1)
    return tokenizer


def _load_cached_or_discard(path: Path, cached: Path) -> Any | None:
    """The cached tokenizer, or None after deleting a damaged entry (logged) for a rebuild."""
    try:
        return _load_cached(cached)
    except ImportError:
        raise  # transformers itself is missing or broken: the entry is not at fault
    except Exception as exc:  # noqa: BLE001 - a damaged file fails in json (ValueError), transformers
        # (KeyError, TypeError, OSError) or tokenizers (a plain Exception), whichever reads it first
        logger.warning("the cached tokenizer of %s in %s does not load (%s: %s); rebuilding it from the GGUF file",
                       path.name, cached, type(exc).__name__, exc)
        shutil.rmtree(cached, ignore_errors=True)
        return None


def _full_gguf_tokenizer(path: Path, cached: Path) -> Any:
    """The transformers tokenizer behind a core: from the cache, else (the cache was removed or
    damaged since) rebuilt from the GGUF file and saved again."""
    tokenizer = _load_cached_or_discard(path, cached)
    return tokenizer if tokenizer is not None else _rebuild_gguf_tokenizer(path, cached)


def _rebuild_gguf_tokenizer(path: Path, cached: Path) -> Any:
    """Convert the GGUF file's tokenizer and save it (with its core) as the cache entry `cached`."""
    tokenizer = _convert_gguf_tokenizer(path)
    tmp = None
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        # Write to a temporary folder and rename, so a concurrent reader never sees half a cache.
        tmp = Path(tempfile.mkdtemp(dir=cached.parent))
        tokenizer.save_pretrained(str(tmp))
        if _is_plain_fast(tmp):
            save_core(tmp, tokenizer)
        if cached.exists():  # a damaged entry: a rename cannot replace a non-empty folder
            shutil.rmtree(cached, ignore_errors=True)
        os.replace(tmp, cached)
    except OSError:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # a read-only cache only costs speed
    return tokenizer


def _load_gguf_tokenizer(path: Path) -> Any:
    """The cached tokenizer: its Rust core alone when the cache has one for this transformers
    (tokenizer_core.py; no transformers import on the way to the first token), else through
    transformers, which then writes the core for next time."""
    cached = _gguf_cache_folder(path)
    if (cached / "tokenizer_config.json").is_file():
        core = load_core(cached, lambda: _full_gguf_tokenizer(path, cached))
        if core is not None:
            return core
        tokenizer = _load_cached_or_discard(path, cached)
        if tokenizer is not None:
            if _is_plain_fast(cached):
                save_core(cached, tokenizer)
            return tokenizer
    return _rebuild_gguf_tokenizer(path, cached)


def load_tokenizer(path: str, is_gguf: bool) -> Any:
    """A transformers tokenizer for a model folder, a tokenizer folder, or a GGUF file; for a GGUF
    file whose cache holds a core, a CoreTokenizer (encode/decode without transformers, the rest
    through it)."""
    p = Path(path)
    try:
        if is_gguf:
            return _load_gguf_tokenizer(p)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load a tokenizer from {path}: {exc}") from exc


def _check_chat(tokenizer: Any, messages: list[dict[str, Any]], chat_template: str | None) -> None:
    if tokenizer is None:
        raise ValueError("messages: chat needs the model's tokenizer and chat template, and this engine runs "
                         "without a tokenizer (skip_tokenizer_init / --skip-tokenizer-init)")
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError("messages: must be a list of {'role': ..., 'content': ...} dicts")
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model has no chat template; use generate() with a plain prompt")


def chat_template_inputs(tokenizer: Any, messages: list[dict[str, Any]],
                         chat_template: str | None = None) -> tuple[str, dict[str, Any]]:
    """What `chat_prompt_ids` renders, for a renderer elsewhere (the server's worker processes):
    the template text (`chat_template`, a template name, or the model's) and the variables
    transformers gives it besides the messages (the special tokens: bos_token, eos_token, ...)."""
    _check_chat(tokenizer, messages, chat_template)
    full = transformers_tokenizer(tokenizer)
    return full.get_chat_template(chat_template), dict(full.special_tokens_map)


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    chat_template: str | None = None) -> list[int]:
    """Render `messages` with the model's chat template and tokenize the result."""
    _check_chat(tokenizer, messages, chat_template)
    from jinja2 import TemplateError  # transformers renders chat templates with jinja2

    try:
        text = tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except TemplateError as exc:
        # The template refused these messages (its raise_exception(...), e.g. "roles must
        # alternate") or is malformed: the caller's input, so a ValueError (a 400 on the server).
        raise ValueError(f"the chat template rejected the messages: {exc}") from exc
    # The template already wrote any BOS it wants; do not let the tokenizer add a second one.
    return tokenizer.encode(text, add_special_tokens=False)
