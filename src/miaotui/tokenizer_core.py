"""The engine's fast-start tokenizer: the `tokenizers` (Rust) object a transformers fast tokenizer
wraps, saved once after transformers set it up, serving encode/decode without importing transformers.

Importing transformers costs ~0.7 s of a ~3 s cold start, and a plain prompt only needs encode
and decode, which a transformers fast tokenizer hands straight to its Rust core. So when the
GGUF tokenizer cache (tokenizer.py) holds a plain fast tokenizer, it also keeps:

  core_tokenizer.json       the core after transformers' __init__ (added special tokens, post-
                            processor for BOS/EOS, truncation and padding as it left them);
  core_tokenizer_meta.json  the ids the engine reads (EOS, BOS), which transformers wrote the core,
                            and the core's SHA-256 (two writers cannot pair one's meta with the
                            other's core).

Invariant: `CoreTokenizer.encode/decode` return what the transformers tokenizer's would. That
holds because they make the same Rust calls with the same settings, and a core is only written
for tokenizers whose Python side adds nothing: no clean-up of decoded text, no splitting of
special tokens. The meta names the transformers install that wrote the core (its __init__.py
path and mtime); another install's core is ignored and rewritten. Everything else (chat
templates, `get_tokenizer()`, any other attribute) goes to the transformers tokenizer, loaded
on first use.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import operator
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

CORE_FILE = "core_tokenizer.json"
META_FILE = "core_tokenizer_meta.json"


def _transformers_install() -> str | None:
    """Which transformers is installed, without importing it: its __init__.py and mtime."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.origin:
        return None
    return f"{spec.origin}|{os.stat(spec.origin).st_mtime_ns}"


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def save_core(folder: Path, hf_tokenizer: Any) -> bool:
    """Write the core of a loaded transformers fast tokenizer into `folder`; False when it has
    Python-side behaviour the core cannot reproduce (then the folder gets no core)."""
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    install = _transformers_install()
    if backend is None or install is None or getattr(hf_tokenizer, "clean_up_tokenization_spaces", False) \
            or getattr(hf_tokenizer, "split_special_tokens", False):
        return False
    try:
        core = backend.to_str()
        meta = {"transformers": install, "core_sha256": _digest(core), "eos_token_id": hf_tokenizer.eos_token_id,
                "bos_token_id": hf_tokenizer.bos_token_id}
        _write_atomically(folder / CORE_FILE, core)
        _write_atomically(folder / META_FILE, json.dumps(meta))  # last: its presence marks a whole core
    except Exception:  # noqa: BLE001 - a read-only cache, or a core that will not serialize, only costs speed
        return False
    return True


def load_core(folder: Path, load_full: Callable[[], Any]) -> CoreTokenizer | None:
    """The core saved in `folder` by this transformers install, else None. `load_full` loads the
    transformers tokenizer when something beyond encode/decode is asked for."""
    try:
        meta = json.loads((folder / META_FILE).read_text())
        if meta.get("transformers") != _transformers_install():
            return None
        text = (folder / CORE_FILE).read_text(encoding="utf-8")
        if _digest(text) != meta.get("core_sha256"):  # written by another install, or damaged
            return None
        from tokenizers import Tokenizer

        core = Tokenizer.from_str(text)
    except Exception:  # noqa: BLE001 - a missing or damaged core (tokenizers raises plain Exception) means: load in full
        return None
    return CoreTokenizer(core, meta, load_full)


def transformers_tokenizer(tokenizer: Any) -> Any:
    """The transformers tokenizer behind an engine's tokenizer (loading it now if it is a core)."""
    return tokenizer.full if isinstance(tokenizer, CoreTokenizer) else tokenizer


class CoreTokenizer:
    """encode/decode/eos_token_id/bos_token_id from the Rust core; any other attribute from the
    transformers tokenizer (`full`), loaded once on first use, thread-safely."""

    def __init__(self, core: Any, meta: dict[str, Any], load_full: Callable[[], Any]) -> None:
        core.no_truncation()  # transformers' encode() turns both off when not asked for
        core.no_padding()
        core.encode_special_tokens = False
        self._core = core
        self.eos_token_id: int | None = meta.get("eos_token_id")
        self.bos_token_id: int | None = meta.get("bos_token_id")
        self._load_full = load_full
        self._full: Any = None
        self._error: Exception | None = None
        self._lock = threading.Lock()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text to tokenize must be a string, not {type(text).__name__}")
        return self._core.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: int | list[int], skip_special_tokens: bool = False) -> str:
        if hasattr(token_ids, "tolist"):  # numpy / torch ids, as transformers takes them
            token_ids = token_ids.tolist()
        ids = [operator.index(token_ids)] if not hasattr(token_ids, "__iter__") else [operator.index(i) for i in token_ids]
        return self._core.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_id(self, text: str) -> int | None:
        """The id of the vocabulary entry spelled exactly `text`, or None."""
        return self._core.token_to_id(text)

    @property
    def full(self) -> Any:
        """The transformers tokenizer (what `LLM.get_tokenizer()` returns). A failed load is
        remembered and raised again, not retried on every request."""
        if self._full is None:
            with self._lock:
                if self._full is None and self._error is None:
                    try:
                        self._full = self._load_full()
                    except Exception as exc:  # noqa: BLE001 - kept and re-raised below
                        self._error = exc
        if self._full is None:
            # Not an AttributeError: from inside a property, that would send Python to
            # __getattr__("full"), which reads this property again.
            raise RuntimeError(f"the model's transformers tokenizer could not be loaded: {self._error}") \
                from self._error
        return self._full

    @property
    def full_pending(self) -> bool:
        """True until the transformers tokenizer has loaded or failed to (reading `full` may block)."""
        return self._full is None and self._error is None

    def __getattr__(self, name: str) -> Any:
        # Only reached for names this class lacks. Private names never go to transformers, so
        # copy/pickle probing an instance whose __init__ has not run cannot recurse.
        if name.startswith("_") or name == "full":
            raise AttributeError(name)
        return getattr(self.full, name)

    def __len__(self) -> int:
        return len(self.full)
