"""Tokenizer and chat template loading, through transformers (folder or GGUF metadata)."""

from __future__ import annotations

from typing import Any

from miaotui.errors import ModelLoadError


def load_tokenizer(path: str, is_gguf: bool) -> Any:
    """A transformers tokenizer for a model folder, a tokenizer folder, or a GGUF file."""
    from pathlib import Path

    from transformers import AutoTokenizer

    p = Path(path)
    try:
        if is_gguf:
            return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load a tokenizer from {path}: {exc}") from exc


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    chat_template: str | None = None) -> list[int]:
    """Render `messages` with the model's chat template and tokenize the result."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError("messages: must be a list of {'role': ..., 'content': ...} dicts")
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model has no chat template; use generate() with a plain prompt")
    text = tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    # The template already wrote any BOS it wants; do not let the tokenizer add a second one.
    return tokenizer.encode(text, add_special_tokens=False)
