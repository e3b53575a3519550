"""A cached index of a GGUF file: its small metadata fields and its tensor table.

`gguf.GGUFReader` parses every metadata field in Python, including the tokenizer's ~50k token
strings and merges, which takes seconds on each start even though the loader needs only a few
numbers and the tensor offsets. After the first read, those are saved (JSON, under the cache
directory, keyed by the file's path, size and mtime, like the tokenizer cache) and later starts
read the index and map the tensor data straight from the file.

`GGUFIndex` offers the subset of GGUFReader's interface the loader uses: `fields[key].contents()`
and `tensors` with name, tensor_type, shape (GGUF order, innermost first) and data (raw bytes
shaped [rows, bytes per row], which gguf's dequantize accepts for every type).
"""

from __future__ import annotations

import hashlib
import json
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


def load_index(path: Path) -> GGUFIndex | None:
    try:
        record = json.loads(_index_path(path).read_text())
    except (OSError, ValueError):
        return None
    if record.get("version") != _VERSION:
        return None
    return GGUFIndex(path, record)


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
