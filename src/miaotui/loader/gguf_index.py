"""A cached index of a GGUF file: its small metadata fields and its tensor table.

`gguf.GGUFReader` parses every metadata field in Python, including the tokenizer's ~50k token
strings and merges, which takes seconds on each start even though the loader needs only a few
numbers and the tensor offsets. After the first read, those are saved (JSON, under the cache
directory, keyed by the file's path, size and mtime, like the tokenizer cache) and later starts
read the index and map the tensor data straight from the file. An index that does not parse or
has the wrong structure (a crash mid-write on a filesystem without atomic rename, a hand edit,
another tool's file) is discarded with one warning and rebuilt from the file.

`GGUFIndex` offers the subset of GGUFReader's interface the loader uses: `fields[key].contents()`
and `tensors` with name, tensor_type, shape (GGUF order, innermost first) and data (raw bytes
shaped [rows, bytes per row], which gguf's dequantize accepts for every type).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from miaotui.config import cache_dir

_VERSION = 1
_LONG = 64  # list fields longer than this (vocabulary, merges) keep only their length
# An IndexedTensor's fields and their JSON types (bool is an int in Python: refused apart).
_TENSOR_KEYS = {"name": str, "type_id": int, "shape": list, "offset": int, "n_bytes": int}

logger = logging.getLogger("miaotui")


def _index_path(path: Path) -> Path:
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{_VERSION}"
    return Path(cache_dir()) / "gguf-index" / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")


class _Length:
    """Stands in for a long list field whose items the loader never reads (only its length)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


@dataclass(slots=True)
class _Field:
    value: Any

    def contents(self) -> Any:
        return self.value


@dataclass
class IndexedTensor:
    path: str
    name: str
    type_id: int
    shape: list[int]
    offset: int
    n_bytes: int

    @property
    def tensor_type(self) -> Any:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(self.type_id)

    @cached_property
    def data(self) -> np.ndarray:
        rows = int(np.prod(self.shape[1:])) if len(self.shape) > 1 else 1
        raw = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.offset, shape=(self.n_bytes,))
        return raw.reshape(rows, self.n_bytes // rows)


class GGUFIndex:
    def __init__(self, path: Path, record: dict) -> None:
        self.fields = {k: _Field(v) for k, v in record["fields"].items()}
        self.fields.update({k: _Field(_Length(n)) for k, n in record["long_fields"].items()})
        self.tensors = [IndexedTensor(str(path), **t) for t in record["tensors"]]


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tensor_problem(t: Any, file_size: int) -> str | None:
    if not isinstance(t, dict) or set(t) != set(_TENSOR_KEYS):
        return f"a tensor entry is not an object with exactly {', '.join(_TENSOR_KEYS)}"
    for key, kind in _TENSOR_KEYS.items():
        if not isinstance(t[key], kind) or (kind is int and not _is_int(t[key])):
            return f"tensor {t['name']!r}: {key} is not a {kind.__name__}"
    if not t["shape"] or not all(_is_int(d) and d > 0 for d in t["shape"]):
        return f"tensor {t['name']!r}: shape {t['shape']} is not a list of positive integers"
    if t["offset"] < 0 or t["n_bytes"] < 1 or t["offset"] + t["n_bytes"] > file_size:
        return f"tensor {t['name']!r}: bytes {t['offset']}..{t['offset'] + t['n_bytes']} lie outside the file"
    return None


def _record_problem(record: Any, file_size: int) -> str | None:
    """Why `record` is not an index GGUFIndex can use (None when it is): checked on every read,
    so a bad cache fails here with a reason instead of as a KeyError deep in the loader."""
    if not isinstance(record, dict) or set(record) != {"version", "fields", "long_fields", "tensors"}:
        return "not an object with version, fields, long_fields and tensors"
    if not isinstance(record["fields"], dict) or not isinstance(record["fields"].get("general.architecture"), str):
        return "fields is not an object with general.architecture"
    long_fields = record["long_fields"]
    if not isinstance(long_fields, dict) or not all(_is_int(n) and n >= 0 for n in long_fields.values()):
        return "long_fields is not an object of lengths"
    if not isinstance(record["tensors"], list):
        return "tensors is not a list"
    return next(filter(None, (_tensor_problem(t, file_size) for t in record["tensors"])), None)


def load_index(path: Path) -> GGUFIndex | None:
    """The cached index of `path`, or None when there is none (or it was discarded)."""
    target = _index_path(path)
    try:
        text = target.read_text()
    except OSError:  # no index yet, or an unreadable cache: the file is parsed
        return None
    try:
        record = json.loads(text)
    except ValueError as exc:
        problem = f"not JSON ({exc})"
    else:
        if isinstance(record, dict) and record.get("version") != _VERSION:
            return None  # another version's layout (the key holds the version: only a copied file)
        problem = _record_problem(record, path.stat().st_size)
        if problem is None:
            return GGUFIndex(path, record)
    logger.warning("discarding the cached GGUF index %s of %s: %s; it is rebuilt from the file", target, path,
                   problem)
    try:
        target.unlink()
    except OSError:
        pass  # save_index replaces it, or (read-only cache) the file is parsed on every start
    return None


def save_index(path: Path, reader: Any) -> None:
    """Write the index of a file GGUFReader has just parsed; a read-only cache only costs speed."""
    fields, long_fields = {}, {}
    for key, field in reader.fields.items():
        try:
            value = _plain(field.contents())
        except Exception:  # noqa: BLE001 - a field the reader cannot render is not needed
            continue
        if isinstance(value, list) and len(value) > _LONG:
            long_fields[key] = len(value)
        else:
            fields[key] = value
    tensors = [dict(name=t.name, type_id=int(t.tensor_type), shape=[int(d) for d in t.shape],
                    offset=int(t.data_offset), n_bytes=int(t.n_bytes)) for t in reader.tensors]
    record = {"version": _VERSION, "fields": fields, "long_fields": long_fields, "tensors": tensors}
    target = _index_path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Written aside and renamed: a concurrent reader never sees half an index.
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.replace(tmp, target)
    except (OSError, TypeError, ValueError):
        pass
