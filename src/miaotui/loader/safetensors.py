"""Hugging Face folders: config.json + *.safetensors, read through mmap."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from miaotui.errors import ModelLoadError
from miaotui.tokenizer import tokenizer_files


def _no_config_hint(folder: Path) -> str:
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    if len(ggufs) > 1:
        return f"; it holds several .gguf files ({', '.join(ggufs)}): give one of them as the model"
    if tokenizer_files(folder):
        return "; it holds tokenizer files: give it as the tokenizer (--tokenizer) and the model folder as the model"
    return "; give a Hugging Face model folder (config.json + *.safetensors) or a .gguf file"


def check_folder(folder: Path) -> list[Path]:
    """A model folder's safetensors files, after checking it has config.json and weights; no file
    is opened, so this is the cheap first check of a folder."""
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} is not a model folder: it has no config.json{_no_config_hint(folder)}")
    return safetensors_files(folder)


def read_hf_config(folder: Path) -> Any:
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} is not a model folder: it has no config.json{_no_config_hint(folder)}")
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (ValueError, OSError, KeyError) as exc:
        raise ModelLoadError(f"{folder}/config.json cannot be read: {exc}") from exc
    return language_model_config(config)


# Image-text checkpoints whose language model miaotui runs on its own (text in, text out).
_TEXT_OF_MULTIMODAL = ("Gemma3ForConditionalGeneration",)


def language_model_config(config: Any) -> Any:
    """For an image-text checkpoint (Gemma 3 4B and up), its `text_config`, which holds what the
    engine reads (vocabulary, context, layers), under the checkpoint's architecture name and with
    the token ids its top level names; any other config as it is."""
    archs = list(getattr(config, "architectures", None) or [])
    text = getattr(config, "text_config", None)
    if text is None or not any(arch in _TEXT_OF_MULTIMODAL for arch in archs):
        return config
    text.architectures = archs
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(text, key, None) is None and getattr(config, key, None) is not None:
            setattr(text, key, getattr(config, key))
    return text


def safetensors_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
        hint = f" (found {', '.join(others)}; only *.safetensors folders and .gguf files load)" if others else ""
        raise ModelLoadError(f"no *.safetensors weights in {folder}{hint}")
    return files


def count_tensors(files: list[Path]) -> int:
    total = 0
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                total += len(f.keys())
        except Exception as exc:  # safetensors raises its own error type for bad headers
            raise ModelLoadError(f"{path} is truncated or not a valid safetensors file: {exc}") from exc
    return total


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor); a file whose data is cut short raises ModelLoadError naming it."""
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"{path} is truncated or not a valid safetensors file: {exc}") from exc
