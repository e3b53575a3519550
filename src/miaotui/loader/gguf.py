"""GGUF files (llama.cpp's format) via the `gguf` package: config, tensor names, dequantization.

Weights are dequantized to the compute dtype at load, except 4-bit blocks loaded for the int4
path, which keep their codes (loader/gguf_quant.py). llama.cpp's converter permutes the rows
of Q and K for its rotary layout ("llama" and "smollm3" only: loader/gguf_names.py); we undo
that so one model implementation serves both sources. Phi-3's longrope factor lists, stored as
tensors, go into the config. For "gpt2" it stores the Conv1D projections transposed
([out, in]); they are handed on in Hugging Face's [in, out] layout (a view), like a checkpoint.
For "bloom" it regroups query_key_value by q/k/v; it is handed on in the checkpoint's order.
For "gemma2" / "gemma3" it stores every RMSNorm scale as 1 + w; w is handed on, as checkpoints hold it.
"""

from __future__ import annotations

import numbers
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from miaotui.errors import ModelLoadError, UnsupportedModelError
from miaotui.kernels.cpu_build import cpu_kernels_available
from miaotui.layers.packed import GGUFRows, Int4Weight, Int8GroupWeight, Q4Blocks
from miaotui.loader.gguf_config import gemma_config, llama_family_config
from miaotui.loader.gguf_index import load_index, save_index
from miaotui.loader.gguf_names import (CONFIG_TENSORS, PERMUTED_QK, ROPE_FACTORS_LONG, ROPE_FACTORS_SHORT,
                                      ROPE_FREQS, STACKED_EXPERTS, check_tensor_names, expert_names)
from miaotui.loader.gguf_names import hf_tensor_name as _hf_name
from miaotui.loader.gguf_quant import INT4_TYPES, q4_blocks, unpack_int4, unpack_mxfp4, unpack_q8_0

SUPPORTED_QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K",
                         "MXFP4")
# Layer matrices of these types stay as stored, int8 codes with a scale per group of 32
# (Int8GroupWeight: exact for both), in quantized loads.
_GROUP_TYPES = {"Q8_0": unpack_q8_0, "MXFP4": unpack_mxfp4}
SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                           "qwen3moe": "Qwen3MoeForCausalLM",
                           "phi3": "Phi3ForCausalLM", "smollm3": "SmolLM3ForCausalLM",
                           "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM",
                           "gpt2": "GPT2LMHeadModel", "bloom": "BloomForCausalLM"}
# Embedding tables of these types stay as the file's blocks (layers/packed.py: GGUFRows).
_ROW_TYPES = ("Q5_0", "Q5_1", "Q5_K", "Q6_K")
_LLAMA_FAMILY = ("llama", "qwen2", "qwen3", "qwen3moe", "phi3", "smollm3")
_GEMMA = ("gemma2", "gemma3")



def check_magic(path: Path, kind: str = "model") -> None:
    """Raise ModelLoadError unless `path` starts with GGUF's magic: a text file, a config.json or
    a safetensors file given where a `kind` ("model" or "tokenizer") file or folder is wanted."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return
    if path.suffix in (".json", ".safetensors"):
        hint = f"give the {kind} folder that holds it"
    elif kind == "tokenizer":
        hint = "give a .gguf file or a folder with tokenizer files (tokenizer.json, tokenizer.model or vocab files)"
    else:
        hint = "give a .gguf file or a Hugging Face model folder (config.json + *.safetensors)"
    raise ModelLoadError(f"{path} is not a GGUF file (magic {magic!r}, expected b'GGUF') and not a {kind} "
                         f"folder; {hint}")


# GGUF value types of fixed size (gguf.GGUFValueType: UINT8 ... FLOAT64, BOOL), in bytes.
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING = 8


def peek_architecture(path: Path) -> str | None:
    """general.architecture from the first few header fields, where llama.cpp's writer puts it,
    without GGUFReader's parse of every field (the vocabulary included: seconds on a large file).
    None when it is not among them; the full read then decides."""
    try:
        with open(path, "rb") as f:
            magic, version, _, n_kv = struct.unpack("<4sIQQ", f.read(24))
            if magic != b"GGUF" or not 2 <= version <= 3:  # big-endian files read as a huge version
                return None
            for _ in range(min(n_kv, 16)):
                (key_len,) = struct.unpack("<Q", f.read(8))
                if key_len > 256:
                    return None
                key = f.read(key_len)
                (vtype,) = struct.unpack("<I", f.read(4))
                if vtype == _STRING:
                    (n,) = struct.unpack("<Q", f.read(8))
                    if key == b"general.architecture":
                        return f.read(n).decode("utf-8", "replace") if n <= 256 else None
                    f.seek(n, 1)
                elif vtype in _SCALAR_SIZES:
                    f.seek(_SCALAR_SIZES[vtype], 1)
                else:  # an array before the architecture: leave it to the full read
                    return None
    except (OSError, struct.error):
        return None
    return None


def check_architecture(arch: Any, path: Path) -> str:
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path}: unsupported GGUF architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def open_gguf(path: Path) -> Any:
    """A GGUFReader, or on later starts the cached index of the same file (loader/gguf_index.py).
    The magic and (when the header shows it early) the architecture are checked before the parse."""
    import gguf

    check_magic(path)
    arch = peek_architecture(path)
    if arch is not None:
        check_architecture(arch, path)
    index = load_index(path)
    if index is not None:
        return index
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError/IndexError/struct errors on bad data
        raise ModelLoadError(f"{path} is truncated or corrupt: {exc}") from exc
    save_index(path, reader)
    return reader


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def gguf_architecture(reader: Any, path: Path) -> str:
    return check_architecture(_field(reader, "general.architecture"), path)


def has_tokenizer(reader: Any) -> bool:
    """Whether the file's metadata holds a tokenizer (llama.cpp's tokenizer.ggml.* fields)."""
    return "tokenizer.ggml.tokens" in reader.fields


def check_quant_types(reader: Any, path: Path) -> None:
    unsupported: dict[str, str] = {}  # type -> its first tensor
    for tensor in reader.tensors:
        name = tensor.tensor_type.name
        if name not in SUPPORTED_QUANT_TYPES:
            unsupported.setdefault(name, tensor.name)
    if unsupported:
        found = ", ".join(f"tensor {first!r} is {kind}" for kind, first in unsupported.items())
        raise UnsupportedModelError(
            f"{path}: unsupported GGUF tensor type: {found}; supported: {', '.join(SUPPORTED_QUANT_TYPES)} "
            f"(a file quantized to one of them, e.g. Q4_K_M or Q8_0, loads)"
        )


def _check_positive(path: Path, key: str, value: Any) -> None:
    """Sizes the model divides by or builds from (head_dim = embedding_length / head_count, heads
    per KV head, layers) must be positive integers; a broken converter writes 0 or a list."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ModelLoadError(f"{path}: GGUF metadata {key} = {value!r}, but it must be an integer >= 1; the file "
                             "is corrupt or was written by a broken converter (re-convert or re-download it)")


def gguf_hf_config(reader: Any, path: Path) -> Any:
    """Build the config the GGUF metadata describes: transformers' for GPT-2 and BLOOM, our own
    light one for the Llama family (loader/gguf_config.py: it keeps cold starts short). Tensors
    the architecture has no place for are refused here, before any weight loads."""
    arch = gguf_architecture(reader, path)
    check_tensor_names(reader, arch, path)

    def meta(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    tokens = _field(reader, "tokenizer.ggml.tokens")
    heads = meta("attention.head_count")
    hidden = meta("embedding_length")
    if heads is None or hidden is None or meta("block_count") is None:
        raise ModelLoadError(f"{path}: GGUF metadata lacks {arch}.block_count/embedding_length/head_count")
    sizes = {"block_count": meta("block_count"), "embedding_length": hidden, "attention.head_count": heads,
             "attention.head_count_kv": meta("attention.head_count_kv", heads)}
    for key, value in sizes.items():
        _check_positive(path, f"{arch}.{key}", value)
    head_dim = meta("rope.dimension_count") or meta("attention.key_length") or hidden // heads
    names = {t.name for t in reader.tensors}
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    vocab = meta("vocab_size") or (len(tokens) if tokens else None) or (int(embd.shape[-1]) if embd else None)
    if vocab is None:
        raise ModelLoadError(f"{path}: GGUF file has no vocabulary size, tokenizer or token_embd.weight")
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=meta("feed_forward_length"),
        num_hidden_layers=meta("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=meta("attention.head_count_kv", heads),
        head_dim=head_dim,
        max_position_embeddings=meta("context_length", 2048),
        rms_norm_eps=meta("attention.layer_norm_rms_epsilon", 1e-6),
        rope_theta=meta("rope.freq_base", 10000.0),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        architectures=[SUPPORTED_ARCHITECTURES[arch]],
    )
    # llama.cpp ends generation at the end-of-turn / end-of-message tokens too (Phi-3's <|end|>,
    # Llama 3's <|eot_id|> where the file names them): they join the EOS ids, as in a checkpoint's
    # generation_config.json.
    stops = [kwargs["eos_token_id"], _field(reader, "tokenizer.ggml.eot_token_id"),
             _field(reader, "tokenizer.ggml.eom_token_id")]
    stops = list(dict.fromkeys(i for i in stops if isinstance(i, int)))
    if len(stops) > 1 and arch in (*_LLAMA_FAMILY, *_GEMMA):
        kwargs["eos_token_id"] = stops
    if arch == "bloom":
        from transformers import BloomConfig

        return BloomConfig(vocab_size=kwargs["vocab_size"], hidden_size=hidden, n_layer=kwargs["num_hidden_layers"],
                           n_head=heads, layer_norm_epsilon=meta("attention.layer_norm_epsilon", 1e-5),
                           bos_token_id=kwargs["bos_token_id"], eos_token_id=kwargs["eos_token_id"],
                           architectures=[SUPPORTED_ARCHITECTURES[arch]])
    if arch == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(vocab_size=kwargs["vocab_size"], n_embd=hidden, n_layer=kwargs["num_hidden_layers"],
                          n_head=heads, n_inner=kwargs["intermediate_size"],
                          n_positions=kwargs["max_position_embeddings"],
                          layer_norm_epsilon=meta("attention.layer_norm_epsilon", 1e-5),
                          bos_token_id=kwargs["bos_token_id"], eos_token_id=kwargs["eos_token_id"],
                          architectures=[SUPPORTED_ARCHITECTURES[arch]])
    kwargs.pop("architectures")
    if arch in _GEMMA:
        if embd is not None:  # the table's own rows (Gemma 3's are padded past the tokenizer's)
            kwargs["vocab_size"] = int(embd.shape[-1])
        return gemma_config(arch, kwargs, meta, path)
    return llama_family_config(arch, kwargs, meta, _rope_factor_lists(reader, path), path)


def _rope_factor_lists(reader: Any, path: Path) -> dict[str, list[float]]:
    """Phi-3 longrope's long_factor / short_factor, which llama.cpp stores as tensors."""
    lists = {}
    for tensor in reader.tensors:
        key = {ROPE_FACTORS_LONG: "long_factor", ROPE_FACTORS_SHORT: "short_factor"}.get(tensor.name)
        if key is not None:
            try:
                lists[key] = dequantize(tensor).reshape(-1).tolist()
            except (ValueError, IndexError) as exc:
                raise ModelLoadError(f"{path}: tensor {tensor.name!r} is truncated or corrupt: {exc}") from exc
    return lists


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K row permutation (pairs interleaved -> halves split)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _bloom_interleave_qkv(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's [q heads | k heads | v heads] rows -> the checkpoint's per-head [q|k|v]."""
    return w.reshape(3, n_head, w.shape[0] // 3 // n_head, *w.shape[1:]).swapaxes(0, 1).reshape(w.shape)


def dequantize(tensor: Any) -> np.ndarray:
    from gguf import quants

    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims innermost first
    data = np.asarray(quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    if not data.flags.writeable:  # F32 tensors come back as read-only views of the mmap
        data = data.copy()
    return data.reshape(shape)


def hf_tensor_name(name: str, arch: str, path: Path) -> str:
    """The Hugging Face name of GGUF tensor `name` (not a CONFIG_TENSORS one, which is no parameter)."""
    hf_name = _hf_name(name, arch)
    if hf_name is None:
        raise ModelLoadError(f"{path}: unknown GGUF tensor {name!r} for architecture {arch!r}")
    return hf_name


def keeps_int4(arch: str) -> bool:
    """Whether this architecture's 4-bit tensors can stay 4-bit (rows as the model wants them once
    un-permuted, no transpose): the Llama family, Phi-3's pre-fused QKV / gate-up included (their
    rows are whole shards stacked, 4-bit groups run along a row), and Gemma 2 / 3 (stored as the
    checkpoint's rows). GPT-2 and BLOOM are dequantized."""
    return arch in _LLAMA_FAMILY or arch in _GEMMA


def lossy_linear_names(reader: Any, path: Path) -> set[str]:
    """Hugging Face names of layer matrices stored in a quantized format other than 4-bit blocks
    (Q8_0, Q5_0, Q5_1, Q5_K, Q6_K): quantizing those to int4 would lose bits the file has, so they go int8.
    A stacked expert tensor names each of its experts."""
    arch = _field(reader, "general.architecture")
    names: set[str] = set()
    for t in reader.tensors:
        if not t.name.startswith("blk.") or t.tensor_type.name in ("F32", "F16", "BF16", *INT4_TYPES):
            continue
        hf_name = hf_tensor_name(t.name, arch, path)
        if len(t.shape) == 2:
            names.add(hf_name)
        elif STACKED_EXPERTS.match(hf_name):
            names.update(expert_names(hf_name, int(t.shape[2])))
    return names


def yielded_tensor_count(reader: Any) -> int:
    """How many tensors `iter_gguf_tensors` yields: stacked experts come one per expert."""
    return sum(int(t.shape[2]) if t.name.endswith("_exps.weight") and len(t.shape) == 3 else 1
               for t in reader.tensors if t.name not in CONFIG_TENSORS)


def _row_order(rows: int, n_head: int) -> torch.Tensor:
    return torch.from_numpy(_unpermute(np.arange(rows)[:, None], n_head).reshape(-1))


def iter_gguf_tensors(reader: Any, hf_config: Any, path: Path,
                      int4: bool = False, int8_groups: bool = False) -> Iterator[tuple[str, torch.Tensor | Int4Weight | Q4Blocks | Int8GroupWeight]]:
    """Yield Hugging Face-named fp32 tensors; the caller converts to the compute dtype. With `int4`
    (and an architecture that `keeps_int4`), layer matrices stored as Q4_0 / Q4_1 / Q4_K come as
    Int4Weight instead, the file's own codes never dequantized, and a Q8_0 / 4-bit embedding
    table comes packed too (loader/gguf_quant.py); Q4_0 / Q4_1 ones come as Q4Blocks where miaotui's
    q4 kernel runs."""
    arch = _field(reader, "general.architecture")
    permute = arch in PERMUTED_QK
    gpt2 = arch == "gpt2"
    int4 = int4 and keeps_int4(arch)
    # Q4_0 / Q4_1 layer matrices go over as the q4 kernel's blocks (Q4Blocks) where that kernel
    # runs and no layer is Q4_K (one 4-bit form per file, so fused shards never mix forms).
    blk4 = {t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.") and t.tensor_type.name in INT4_TYPES}
    as_blocks = int4 and blk4 <= {"Q4_0", "Q4_1"} and cpu_kernels_available()
    for tensor in reader.tensors:
        name = tensor.name
        if name in CONFIG_TENSORS:  # RoPE tables: in the config (Phi-3) or read by rope_freq_factors
            continue
        hf_name = hf_tensor_name(name, arch, path)
        kind = tensor.tensor_type.name
        if int4 and name == "token_embd.weight" and kind in _ROW_TYPES:
            # Lookups dequantize the rows they read; the head (tied) is an int8 copy anyway.
            rows = int(tensor.shape[1])
            raw = torch.from_numpy(np.asarray(tensor.data, dtype=np.uint8).reshape(rows, -1).copy())
            yield hf_name, GGUFRows(raw, torch.tensor([int(tensor.tensor_type)]))
            continue
        if int4 and name == "token_embd.weight" and kind in ("Q8_0", *INT4_TYPES):
            try:
                yield hf_name, unpack_q8_0(tensor) if kind == "Q8_0" else unpack_int4(tensor)
            except (ValueError, IndexError) as exc:
                raise ModelLoadError(f"{path}: tensor {name!r} is truncated or corrupt: {exc}") from exc
            continue
        stacked = STACKED_EXPERTS.match(hf_name) is not None
        if stacked and len(tensor.shape) != 3:
            raise ModelLoadError(f"{path}: tensor {name!r} has shape {list(reversed(tensor.shape))}; stacked experts "
                                 "are [experts, rows, columns]")
        if (int4 and name.startswith("blk.") and kind in INT4_TYPES) or (
                int8_groups and name.startswith("blk.") and kind in _GROUP_TYPES and len(tensor.shape) >= 2
                and keeps_int4(arch) and not hf_name.endswith(".mlp.gate.weight")):  # MoE routers stay dense
            try:
                if kind in _GROUP_TYPES:
                    packed = _GROUP_TYPES[kind](tensor)
                else:
                    packed = (q4_blocks(tensor) if as_blocks else None) or unpack_int4(tensor)
            except (ValueError, IndexError) as exc:
                raise ModelLoadError(f"{path}: tensor {name!r} is truncated or corrupt: {exc}") from exc
            if stacked:  # expert e's rows, as stored (4-bit groups run along a row)
                rows = int(tensor.shape[1])
                for e, expert_name in enumerate(expert_names(hf_name, int(tensor.shape[2]))):
                    yield expert_name, packed.rows(e * rows, rows)
                continue
            if permute and ".q_proj." in hf_name:
                packed = packed.permute_rows(_row_order(packed.shape[0], hf_config.num_attention_heads))
            elif permute and ".k_proj." in hf_name:
                packed = packed.permute_rows(_row_order(packed.shape[0], hf_config.num_key_value_heads))
            yield hf_name, packed
            continue
        try:
            array = dequantize(tensor)
        except (ValueError, IndexError) as exc:
            raise ModelLoadError(f"{path}: tensor {name!r} is truncated or corrupt: {exc}") from exc
        if stacked:
            for e, expert_name in enumerate(expert_names(hf_name, array.shape[0])):
                yield expert_name, torch.from_numpy(array[e])
            continue
        if permute and ".q_proj." in hf_name:
            array = _unpermute(array, hf_config.num_attention_heads)
        elif permute and ".k_proj." in hf_name:
            array = _unpermute(array, hf_config.num_key_value_heads)
        elif gpt2 and array.ndim == 2 and hf_name.startswith("transformer.h."):
            array = array.T  # back to Conv1D's [in, out], as the model's loader expects
        elif arch == "bloom" and ".query_key_value." in hf_name:
            array = _bloom_interleave_qkv(array, hf_config.n_head)
        elif arch in _GEMMA and name.endswith("norm.weight"):
            array = array - 1.0  # llama.cpp stores Gemma's (1 + w) norm scales; the model takes w
        yield hf_name, torch.from_numpy(array)


def rope_freq_factors(reader: Any) -> torch.Tensor | None:
    for tensor in reader.tensors:
        if tensor.name == ROPE_FREQS:
            return torch.from_numpy(dequantize(tensor).reshape(-1).copy())
    return None
