"""Turn a model reference (None, a Hugging Face folder, or a .gguf file) into a ready nn.Module."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from miaotui.config import ModelConfig, env_default_model
from miaotui.errors import ModelLoadError, ModelNotFoundError, UnsupportedModelError
from miaotui.kernels.cpu_build import load_for_device
from miaotui.layers.quantized import quantization_supported, quantize_model, quantized_linear, quantizes
from miaotui.loader import gguf as gguf_loader
from miaotui.loader import safetensors as st_loader
from miaotui.loader.dummy import dummy_hf_config, fill_random
from miaotui.loader.default_model import embedded_model_path
from miaotui.models.registry import model_class
from miaotui.models.weights import WeightSink
from miaotui.tokenizer import NO_TOKENIZER_HINT, check_tokenizer_folder, tokenizer_files


@dataclass(slots=True)
class ModelSource:
    """Where a model lives: a Hugging Face folder, or a single GGUF file."""

    path: Path
    is_gguf: bool


def _source_at(path: Path, folder_is_its_own: Callable[[], bool]) -> ModelSource:
    """An existing path as a source: a file is a GGUF; a folder is read as it is, unless it lacks
    its own files (`folder_is_its_own`) and holds exactly one .gguf file, which is then the source."""
    if path.is_file():
        return ModelSource(path, is_gguf=True)
    ggufs = sorted(path.glob("*.gguf"))
    if not folder_is_its_own() and len(ggufs) == 1:
        return ModelSource(ggufs[0], is_gguf=True)
    return ModelSource(path, is_gguf=False)


def resolve_model(model: str | None) -> ModelSource:
    """None -> MIAOTUI_MODEL or the embedded default; then check the path exists and is usable."""
    ref = model or env_default_model() or embedded_model_path()
    path = Path(ref).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"model path not found: {ref} (give a Hugging Face model folder or a .gguf file; "
            f"models are never downloaded)"
        )
    return _source_at(path, folder_is_its_own=lambda: (path / "config.json").is_file())


def resolve_tokenizer(tokenizer: str) -> ModelSource:
    """A --tokenizer path: a folder with tokenizer files (a model folder or not), or a .gguf file."""
    path = Path(tokenizer).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"tokenizer path not found: {tokenizer} (give a tokenizer or model folder or a .gguf file, or "
            f"--skip-tokenizer-init to run on token ids)"
        )
    return _source_at(path, folder_is_its_own=lambda: bool(tokenizer_files(path)))


def tokenizer_source(config: ModelConfig, model: ModelSource | None) -> ModelSource | None:
    """Where the tokenizer comes from: nowhere with skip_tokenizer_init, else --tokenizer, else
    the model's own files; for dummy weights (`model` None), the default model's."""
    if config.skip_tokenizer_init:
        return None
    if config.tokenizer:
        return resolve_tokenizer(config.tokenizer)
    if model is not None:
        return model
    try:
        return resolve_model(None)
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(
            f"--load-format dummy takes its tokenizer from --tokenizer or the default model, which is not "
            f"available ({exc}); {NO_TOKENIZER_HINT} to run on token ids") from exc


def check_tokenizer(source: ModelSource, reader: Any = None) -> None:
    """Before any slow work: `source` can hold a tokenizer. A folder needs tokenizer files, a GGUF
    file tokenizer metadata (`reader`: the model's own file, already open; else it is opened)."""
    if not source.is_gguf:
        check_tokenizer_folder(source.path)
        return
    if reader is None:
        gguf_loader.check_magic(source.path, "tokenizer")
        reader = gguf_loader.open_gguf(source.path)
    if not gguf_loader.has_tokenizer(reader):
        raise ModelLoadError(f"{source.path} has no tokenizer in its metadata (no tokenizer.ggml.tokens); "
                             f"{NO_TOKENIZER_HINT}")


@dataclass(slots=True)
class CheckedModel:
    """A model whose files, config, architecture and tensor types passed `check_model`, with what
    that read (the GGUF reader, the safetensors files), for `load_model` to go on from."""

    source: ModelSource
    hf_config: Any
    reader: Any = None  # GGUF files
    files: list[Path] = field(default_factory=list)  # Hugging Face folders
    num_tensors: int = 0


def check_model(source: ModelSource, config: ModelConfig) -> CheckedModel:
    """Everything that can fail about a model without reading its weights (or its tokenizer):
    the file or folder, config, architecture, GGUF tensor types, and whether it runs as configured.
    The engine calls this before any slow work, so such errors come in a second."""
    if source.is_gguf:
        reader = gguf_loader.open_gguf(source.path)
        hf_config = gguf_loader.gguf_hf_config(reader, source.path)
        gguf_loader.check_quant_types(reader, source.path)
        checked = CheckedModel(source, hf_config, reader=reader, num_tensors=gguf_loader.yielded_tensor_count(reader))
    else:
        files = st_loader.check_folder(source.path)
        hf_config = st_loader.read_hf_config(source.path)
        checked = CheckedModel(source, hf_config, files=files, num_tensors=st_loader.count_tensors(files))
    cls = model_class(hf_config)
    check_config = getattr(cls, "check_config", None)
    if check_config is not None:  # the class's own limits: activation, RoPE type, ...
        check_config(hf_config)
    check_runnable(cls, config)
    return checked


def check_runnable(cls: type, config: ModelConfig) -> None:
    """Model class `cls` can run as `config` asks (dtype, tensor parallelism)."""
    if getattr(cls, "is_encoder_decoder", False) and config.dtype is torch.float16:
        # T5 v1.1 / flan / mT5 activations overflow fp16 (transformers clamps them to survive).
        raise UnsupportedModelError("T5 models do not run in float16 (activations overflow); use float32 or bfloat16")
    if config.tensor_parallel_size > 1 and not hasattr(cls, "shard_for_tensor_parallel"):
        raise UnsupportedModelError(
            f"tensor parallelism supports the Llama family (Llama, Mistral, Qwen2, Qwen3, SmolLM2, SmolLM3, Phi-3), "
            f"Gemma 2/3 and Mixtral / Qwen3-MoE, not "
            f"{cls.__name__}; use tensor_parallel_size=1")


def _progress(total: int, desc: str, enabled: bool = True) -> tqdm:
    # delay=1: the bar appears only for loads that take longer than a second.
    return tqdm(total=total, desc=desc, unit="tensor", delay=1.0, leave=False, disable=not enabled)


_INITIALIZERS = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                 "xavier_normal_", "trunc_normal_", "zeros_", "ones_", "constant_")


@contextmanager
def _skip_initialization() -> Iterator[None]:
    """nn.Linear / nn.Embedding initialise their weights when built; on the meta device that goes
    through torch's reference ops, whose first use imports the compiler stack (~2 s of a cold
    start). Every weight is overwritten by the checkpoint (or by loader/dummy.py), so the
    initialisers do nothing while the model is built (as transformers' no_init_weights does)."""
    saved = {name: getattr(nn.init, name) for name in _INITIALIZERS if hasattr(nn.init, name)}
    try:
        for name in saved:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def _empty_model(hf_config: Any) -> nn.Module:
    """The model of `hf_config` on the meta device: no memory until the weights arrive."""
    with torch.device("meta"), _skip_initialization():
        return model_class(hf_config)(hf_config)


def load_model(source: ModelSource, config: ModelConfig, rank: int = 0,
               progress: bool = True, checked: CheckedModel | None = None) -> tuple[torch.nn.Module, Any]:
    """Build the model on the meta device, stream weights into it, return (model, hf_config).
    With tensor parallelism, the loaded model is then cut down to tensor-parallel rank `rank`'s
    shard (before quantization, which then quantizes the shard). `checked`: `check_model`'s
    result for `source`, when the caller has it."""
    # Tensor parallel: the whole model is read on the CPU and only this rank's shard moves to the
    # device, so no GPU ever holds the full model.
    device = torch.device("cpu" if config.tensor_parallel_size > 1 else config.device)
    load_for_device(config.device)  # CPU kernels, before the layers that bind them are built
    lossy: set[str] = set()  # checkpoint matrices stored with more than 4 bits
    checked = checked or check_model(source, config)
    hf_config, reader, total = checked.hf_config, checked.reader, checked.num_tensors
    if source.is_gguf:
        mode = resolve_quantization(config, reader)
        # 4-bit blocks stay 4-bit; a tensor-parallel shard is cut from dense weights instead.
        unsharded = config.tensor_parallel_size == 1
        weights = gguf_loader.iter_gguf_tensors(reader, hf_config, source.path, int4=mode == "int4" and unsharded,
                                                int8_groups=mode in ("int4", "int8") and unsharded)
        if mode == "int4":
            lossy = gguf_loader.lossy_linear_names(reader, source.path)
    else:
        mode = resolve_quantization(config, None)
        weights = st_loader.iter_safetensors(checked.files)
    model = _empty_model(hf_config)
    early = None
    if mode in ("int4", "int8") and config.tensor_parallel_size == 1 and device.type == "cpu":
        def early(name: str, linear: torch.nn.Module, sources: set[str]) -> torch.nn.Module | None:
            # Quantized as quantize_model would at the end, but now: the dense weights of a file's
            # int8-bound matrices (Q8_0 / K-quants) never pile up in fp32 (a 0.6 GB MoE file
            # peaked at 2.8 GB RSS that way).
            return quantized_linear(name, linear, mode, bool(sources & lossy)) if quantizes(linear) else None
    sink = WeightSink(model, config.dtype, device, on_linear_loaded=early)
    with _progress(total, f"Loading {source.path.name}", progress) as bar:
        def counted():
            for item in weights:
                yield item
                bar.update(1)

        model.load_weights(counted(), sink)
    sink.finish()
    if source.is_gguf:
        factors = gguf_loader.rope_freq_factors(reader)
        if factors is not None:
            model.rotary.inv_freq = model.rotary.inv_freq / factors
    int8_modules = frozenset(name.rpartition(".")[0] for name, sources in sink.sources.items() if sources & lossy)
    return _ready(model, config, rank, mode, int8_modules), hf_config


def resolve_quantization(config: ModelConfig, gguf_reader: Any) -> str:
    """The weight format to run: the configured one, or for "auto" the file's own — a GGUF with
    4-bit blocks runs int4, one with only other quantized matrices int8, on the CPU and unsharded;
    everything else (Hugging Face checkpoints, float GGUFs, GPUs) dense."""
    if config.quantization != "auto":
        return config.quantization
    if gguf_reader is None or config.tensor_parallel_size > 1 or not str(config.device).startswith("cpu"):
        return "none"
    kinds = {t.tensor_type.name for t in gguf_reader.tensors if len(t.shape) == 2}
    if kinds & set(gguf_loader.INT4_TYPES) and quantization_supported("int4"):
        return "int4"
    if kinds - {"F32", "F16", "BF16"} and quantization_supported("int8"):
        return "int8"
    return "none"


def load_dummy_model(hf_config: Any, config: ModelConfig, rank: int = 0) -> torch.nn.Module:
    """`--load-format dummy`: the model of `hf_config` with random weights (loader/dummy.py)."""
    model = _empty_model(hf_config)
    # Every tensor-parallel rank must draw the same weights: an unset engine seed means 0 here.
    fill_random(model, config.dtype, torch.device("cpu" if config.tensor_parallel_size > 1 else config.device),
                0 if config.seed is None else config.seed)
    return _ready(model, config, rank, resolve_quantization(config, None))


def load_for_config(config: ModelConfig, rank: int = 0, progress: bool = True) -> tuple[torch.nn.Module, Any]:
    """What a tensor-parallel worker loads: the same model as the engine, by either format."""
    if config.load_format == "dummy":
        hf_config = dummy_hf_config(config.model)
        return load_dummy_model(hf_config, config, rank), hf_config
    return load_model(resolve_model(config.model), config, rank, progress)


def _ready(model: torch.nn.Module, config: ModelConfig, rank: int, quantization: str,
           int8_modules: frozenset[str] = frozenset()) -> torch.nn.Module:
    """Cut to this rank's shard, on the device, in eval mode, quantized as resolved."""
    check_runnable(type(model), config)
    if config.tensor_parallel_size > 1:
        model.shard_for_tensor_parallel(rank, config.tensor_parallel_size)
    model.to(torch.device(config.device))
    model.eval()
    quantize_model(model, quantization, int8_modules)
    return model


def eos_token_ids(source: ModelSource | None, hf_config: Any, tokenizer: Any) -> frozenset[int]:
    """EOS ids from generation_config.json and config.json (a GGUF's metadata); the tokenizer's,
    if there is one, as a fallback. `source` None: a model with no files (dummy weights), so
    config.json's ids only."""
    ids: set[int] = set()

    def add(value: Any) -> None:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))

    add(getattr(hf_config, "eos_token_id", None))
    if source is not None and not source.is_gguf and (source.path / "generation_config.json").is_file():
        from transformers import GenerationConfig

        try:
            add(GenerationConfig.from_pretrained(str(source.path)).eos_token_id)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{source.path}/generation_config.json cannot be read: {exc}") from exc
    if not ids and tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if source is not None and source.is_gguf and tokenizer is not None:
        ids.update(end_of_turn_ids(tokenizer))
    return frozenset(ids)


# End-of-turn tokens chat models emit instead of (or before) their EOS, found by their text as
# llama.cpp does for GGUF files whose metadata names no eot id (Gemma's <end_of_turn>, Phi-3's
# <|end|>, ChatML's <|im_end|>, Llama 3's <|eot_id|> / <|eom_id|>, DeepSeek-R1's end of sentence).
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                      "<EOT>", "<｜end▁of▁sentence｜>")


def end_of_turn_ids(tokenizer: Any) -> set[int]:
    lookup = getattr(tokenizer, "token_id", None)
    if lookup is None:  # a transformers tokenizer
        vocab = tokenizer.get_vocab()
        lookup = vocab.get
    return {i for i in map(lookup, END_OF_TURN_TOKENS) if isinstance(i, int)}
