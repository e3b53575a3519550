"""Write a random-weight GGUF file of a real model's shape, for CPU benchmarks with no download:

    python benchmarks/make_gguf.py --shape qwen3-0.6b|gemma3-270m|qwen3moe-small|tiny-qwen3|tiny-gemma3|tiny-qwen3moe
        [--quant Q4_K_M|F16|...] [--out PATH] [--threads 2] [--force]

Steps (each shows progress): the Hugging Face config of the shape (transformers' config class);
the tensor names and shapes of that config's model (built on the meta device, no memory);
random weights, written as an F16 GGUF with the `gguf` package's writer in the layout llama.cpp's
own converter (convert_hf_to_gguf.py) writes; then, for a quantized type, llama.cpp's quantizer
(llama-cpp-python in .bench-venv, benchmarks/peer_venv.py, run as a child process) and a load
check in llama.cpp. Files go to ~/.cache/miaotui-bench/ unless --out says otherwise, never into
the repository; the F16 file is kept there and reused by later quantizations of the same shape.

The shapes, checked against the published config.json files:
  qwen3-0.6b   Qwen/Qwen3-0.6B: hidden 1024, 28 layers, 16 heads, 8 KV heads, head_dim 128
               (Q is 2048 wide, not 1024), intermediate 3072, vocab 151,936, tied embeddings,
               rope_theta 1e6, rms_norm_eps 1e-6, Q/K RMSNorm per head, no attention bias,
               max_position_embeddings 40,960.
  gemma3-270m  google/gemma-3-270m: hidden 640, 18 layers, 4 heads, 1 KV head, head_dim 256,
               intermediate 2048 (gelu_pytorch_tanh), vocab 262,144, sliding_window 512 with
               layer_types 5 sliding : 1 full (layers 5, 11, 17 full), rope_theta 1e6 on full
               layers and 1e4 on sliding ones, query_pre_attn_scalar 256, rms_norm_eps 1e-6,
               tied embeddings, no logit soft-capping, max_position_embeddings 32,768.
  qwen3moe-small  a Qwen3-MoE (Qwen/Qwen3-30B-A3B's layout: Qwen3 attention, every layer MoE,
               renormalised top-k) scaled to this machine: hidden 1024, 24 layers, 16 heads, 8 KV
               heads, head_dim 128, 8 experts of 1024, 2 per token, vocab 151,936, tied embeddings
               (~0.9 B parameters, 0.3 B active; ~0.55 GB at Q4_K_M).
  tiny-*       the same families at a test's size (tests/unit/test_make_gguf.py).

Q4_K_M is llama.cpp's mix, as in published files: Qwen3-0.6B gets Q4_K with Q6_K for attn_v and
ffn_down in some layers and for the tied embedding; Gemma-3-270M's rows of 640 are no multiple of
Q4_K's 256, so most of its matrices fall back to Q5_0 / Q8_0 (Q8_0 is the file every engine that
reads Gemma 3 GGUF can take).

The converter's conventions kept here: HF names mapped by gguf's TensorNameMap (so Gemma's
pre_feedforward_layernorm is blk.N.ffn_norm); no output.weight when embeddings are tied;
Gemma 3's RMSNorm weights stored with +1 (its norm multiplies by 1 + w; llama.cpp's by w);
neither family's Q/K rows are permuted (only the "llama" architecture's are); 1-D tensors F32;
gemma3.rope.freq_base_swa for the sliding layers' base (llama.cpp takes its 5:1 pattern as
given). Weights are N(0, 0.02) (the families' own initializer_range), norms 1: activations stay
in range through every layer, so no side meets NaNs or overflow that real weights would not give.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gguf_vocab, peer_venv beside this file
import gguf_vocab  # noqa: E402

CACHE = Path.home() / ".cache" / "miaotui-bench"
SHAPES = ("qwen3-0.6b", "gemma3-270m", "qwen3moe-small", "tiny-qwen3", "tiny-gemma3", "tiny-qwen3moe")


def hf_config(shape: str) -> Any:
    """The transformers config of `shape` (see the module docstring for the published values)."""
    from transformers import Gemma3TextConfig, Qwen3Config, Qwen3MoeConfig

    if shape in ("qwen3moe-small", "tiny-qwen3moe"):
        real = shape == "qwen3moe-small"
        return Qwen3MoeConfig(vocab_size=151936 if real else 49152, hidden_size=1024 if real else 64,
                              intermediate_size=1024 if real else 64, moe_intermediate_size=1024 if real else 64,
                              num_hidden_layers=24 if real else 2, num_attention_heads=16 if real else 4,
                              num_key_value_heads=8 if real else 2, head_dim=128 if real else 32, num_experts=8,
                              num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=40960,
                              rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=False,
                              bos_token_id=1, eos_token_id=2)
    if shape in ("qwen3-0.6b", "tiny-qwen3"):
        real = shape == "qwen3-0.6b"
        return Qwen3Config(vocab_size=151936 if real else 49152, hidden_size=1024 if real else 64,
                           intermediate_size=3072 if real else 128, num_hidden_layers=28 if real else 2,
                           num_attention_heads=16 if real else 4, num_key_value_heads=8 if real else 2,
                           head_dim=128 if real else 32, max_position_embeddings=40960, rope_theta=1e6,
                           rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=False,
                           bos_token_id=1, eos_token_id=2)
    if shape in ("gemma3-270m", "tiny-gemma3"):
        real = shape == "gemma3-270m"
        layers = 18 if real else 6
        return Gemma3TextConfig(vocab_size=262144 if real else 4096, hidden_size=640 if real else 64,
                                intermediate_size=2048 if real else 128, num_hidden_layers=layers,
                                num_attention_heads=4 if real else 2, num_key_value_heads=1,
                                head_dim=256 if real else 32, query_pre_attn_scalar=256 if real else 32,
                                sliding_window=512 if real else 16, max_position_embeddings=32768,
                                layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                             for i in range(layers)],
                                rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                                 "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
                                rms_norm_eps=1e-6, tie_word_embeddings=True, pad_token_id=0, eos_token_id=1,
                                bos_token_id=2)
    raise ValueError(f"unknown shape {shape!r}; one of {', '.join(SHAPES)}")


def gguf_arch(config: Any) -> str:
    return {"qwen3": "qwen3", "gemma3_text": "gemma3", "qwen3_moe": "qwen3moe"}[config.model_type]


def hf_tensor_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the config's causal-LM model, built on the meta device; the
    tied lm_head is left out, as a saved checkpoint leaves it out."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def _is_norm(hf_name: str) -> bool:
    return hf_name.endswith("norm.weight")


def tensor_plan(config: Any) -> list[tuple[str, str, tuple[int, ...], np.dtype]]:
    """(GGUF name, HF name, numpy shape, dtype) of every tensor, in the converter's layout:
    names mapped by gguf's TensorNameMap, matrices float16, 1-D tensors (norms) float32."""
    import gguf

    arch = gguf_arch(config)
    arch_enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    names = gguf.get_tensor_name_map(arch_enum, config.num_hidden_layers)
    plan = []
    for hf_name, shape in hf_tensor_shapes(config).items():
        prefix, _, rest = hf_name.rpartition(".mlp.")
        if rest in ("experts.gate_up_proj", "experts.down_proj"):
            # transformers 5 holds each layer's experts stacked ([E, 2I, H], gate rows first;
            # [E, H, I]); the converter writes them as ffn_{gate,up,down}_exps.
            layer = prefix.rsplit(".", 1)[-1]
            if rest == "experts.down_proj":
                plan.append((f"blk.{layer}.ffn_down_exps.weight", hf_name, shape, np.dtype(np.float16)))
            else:
                half = (shape[0], shape[1] // 2, shape[2])
                plan.append((f"blk.{layer}.ffn_gate_exps.weight", hf_name, half, np.dtype(np.float16)))
                plan.append((f"blk.{layer}.ffn_up_exps.weight", hf_name, half, np.dtype(np.float16)))
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"no GGUF name for {hf_name!r} in the {arch} tensor map")
        plan.append((name, hf_name, shape, np.dtype(np.float32 if _is_norm(hf_name) else np.float16)))
    return plan


def random_tensor(config: Any, hf_name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if _is_norm(hf_name):
        # HF initializes Qwen3's norms to 1 and Gemma 3's to 0 (its norm multiplies by 1 + w);
        # the converter stores Gemma's with +1, so both files hold ones.
        hf_value = 0.0 if gguf_arch(config) == "gemma3" else 1.0
        shift = 1.0 if gguf_arch(config) == "gemma3" else 0.0
        return np.full(shape, hf_value + shift, dtype=np.float32)
    data = rng.standard_normal(shape, dtype=np.float32)
    data *= 0.02
    return data.astype(np.float16)


def _add_metadata(writer: Any, config: Any, shape: str) -> None:
    import gguf

    arch = gguf_arch(config)
    writer.add_name(f"random {shape}")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    if arch == "qwen3moe":
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if arch in ("qwen3", "qwen3moe"):
        writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
        gguf_vocab.add_borrowed_gpt2(writer, config.vocab_size)
    else:
        assert config.query_pre_attn_scalar == config.head_dim  # llama.cpp scales by 1/sqrt(head_dim)
        writer.add_rope_freq_base(config.rope_parameters["full_attention"]["rope_theta"])
        writer.add_rope_freq_base_swa(config.rope_parameters["sliding_attention"]["rope_theta"])
        writer.add_sliding_window(config.sliding_window)
        gguf_vocab.add_made_spm(writer, config.vocab_size)


def write_f16(shape: str, out: Path, seed: int = 0, progress: bool = True) -> Path:
    """Write the random-weight F16 GGUF of `shape` to `out` (through a temporary name, so a
    killed run leaves no half file that a later run would reuse)."""
    import gguf
    from tqdm import tqdm

    config = hf_config(shape)
    plan = tensor_plan(config)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    writer = gguf.GGUFWriter(str(tmp), gguf_arch(config))
    _add_metadata(writer, config, shape)
    # Every tensor's shape goes in the header first; the data follows one tensor at a time,
    # so memory holds one tensor, not the model.
    for name, _, shape_, dtype in plan:
        writer.add_tensor_info(name, shape_, dtype, int(np.prod(shape_)) * dtype.itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    total = sum(int(np.prod(s)) for _, _, s, _ in plan)
    with tqdm(total=total, unit="param", unit_scale=True, desc=f"writing {out.name}", disable=not progress) as bar:
        for _, hf_name, shape_, _ in plan:
            data = random_tensor(config, hf_name, shape_, rng)
            writer.write_tensor_data(data)
            bar.update(data.size)
    writer.close()
    tmp.replace(out)
    return out


_QUANTIZE = """
import ctypes, sys
import llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + sys.argv[3])
params.nthread = int(sys.argv[4])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)))
"""

# Load the file in llama.cpp and decode a few tokens: the file is one llama.cpp accepts.
_CHECK = """
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=64, n_threads=int(sys.argv[2]), verbose=False)
out = llm.create_completion(prompt=[1, 2, 3, 4], max_tokens=4, temperature=0.0)
print(f"llama.cpp loads it: n_vocab {llm.n_vocab()}, {out['usage']['completion_tokens']} tokens generated")
"""


def quantize(src: Path, dst: Path, quant: str, threads: int) -> None:
    """llama.cpp's quantizer, `src` -> `dst`, with the bytes written so far as progress."""
    from peer_venv import llama_cpp_python
    from tqdm import tqdm

    python = llama_cpp_python()
    tmp = dst.with_name(dst.name + ".part")
    proc = subprocess.Popen([python, "-c", _QUANTIZE, str(src), str(tmp), quant, str(threads)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with tqdm(unit="B", unit_scale=True, desc=f"quantizing to {quant} (llama.cpp)") as bar:
        while proc.poll() is None:
            time.sleep(1)
            bar.update((tmp.stat().st_size if tmp.exists() else 0) - bar.n)
    if proc.returncode != 0:
        raise RuntimeError(f"llama.cpp's quantizer failed (exit {proc.returncode}): {proc.stderr.read()[-2000:]}")
    tmp.replace(dst)


def check_in_llama_cpp(path: Path, threads: int) -> None:
    from peer_venv import llama_cpp_python

    print(f"loading {path.name} in llama.cpp ...", flush=True)
    subprocess.run([llama_cpp_python(), "-c", _CHECK, str(path), str(threads)], check=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", required=True, choices=SHAPES)
    p.add_argument("--quant", default="Q4_K_M", help="F16, or a llama.cpp LLAMA_FTYPE_MOSTLY_* name (Q4_K_M, Q8_0)")
    p.add_argument("--out", type=Path, help="default: ~/.cache/miaotui-bench/<shape>-<quant>.gguf")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="write the F16 file again even where it exists")
    args = p.parse_args()
    quant = args.quant.upper()
    out = args.out or CACHE / f"{args.shape}-{quant}.gguf"
    f16 = out if quant == "F16" else CACHE / f"{args.shape}-F16.gguf"
    if args.force or not f16.exists():
        start = time.perf_counter()
        write_f16(args.shape, f16, args.seed)
        print(f"wrote {f16} ({f16.stat().st_size / 2**20:,.0f} MiB) in {time.perf_counter() - start:.0f} s")
    else:
        print(f"reusing {f16} (--force writes it again)")
    if quant != "F16":
        start = time.perf_counter()
        quantize(f16, out, quant, args.threads)
        print(f"wrote {out} ({out.stat().st_size / 2**20:,.0f} MiB) in {time.perf_counter() - start:.0f} s")
        check_in_llama_cpp(out, args.threads)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
