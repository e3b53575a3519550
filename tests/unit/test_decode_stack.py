"""The decode stack kernel (models/decode_stack.py, kernels/cpu_decode_stack.cpp): a decode-only
step's hidden states are bit for bit those of the model's own layers, for 4-bit and int8
weights, a Q/K/V bias (Qwen2), per-head Q/K norms (Qwen3) and batches that mix decodes with
prompt chunks; models or steps it does not serve fall back to the layers."""

from __future__ import annotations

import pytest
import torch

from miaotui import LLM, SamplingParams
from miaotui.kernels.cpu_build import cpu_kernels_available
from tests.conftest import make_tiny_checkpoint

pytestmark = pytest.mark.skipif(not cpu_kernels_available(),
                                reason="miaotui's CPU kernels do not build here (needs x86 AVX2 and a C++ compiler)")


class _Checked:
    """Wraps a model's DecodeStack: every step it serves is run again through the layers, and
    the two must be equal to the bit. Counts the steps it served and those it declined."""

    def __init__(self, model) -> None:
        self.model, self.stack = model, model.decode_stack
        self.served = self.declined = 0

    def __call__(self, h, cos, sin, meta):
        out = self.stack(h, cos, sin, meta)
        if out is None:
            self.declined += 1
            return None
        self.served += 1
        eager = h
        for layer in self.model.model.layers:  # writes the same K/V again: identical values
            eager = layer(eager, cos, sin, meta)
        assert torch.equal(out, eager), (out - eager).abs().max()
        return out


def _run(folder, tokenizer, quantization: str, prompts: int = 3, max_tokens: int = 6, **llm_args):
    llm = LLM(str(folder), tokenizer=tokenizer, block_size=4, num_kv_blocks=128, quantization=quantization,
              **llm_args)
    model = llm.engine.runner.model
    checked = _Checked(model)
    model.decode_stack = checked
    g = torch.Generator().manual_seed(3)
    batch = [{"prompt_token_ids": torch.randint(20, 256, (5 + 7 * i,), generator=g).tolist()} for i in range(prompts)]
    # Staggered lengths: the first steps mix prompt chunks with decodes (declined), later ones are pure decodes.
    params = [SamplingParams(temperature=0, max_tokens=max_tokens + 3 * i, ignore_eos=True) for i in range(prompts)]
    outs = llm.generate(batch, params, use_tqdm=False)
    return checked, [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("arch,quantization,kv_dtype", [("llama", "int4", "float32"), ("llama", "int8", "float32"),
                                                        ("qwen2", "int4", "float32"), ("llama", "int4", "auto")])
def test_stack_equals_layers_bit_for_bit(tmp_path, embedded_gguf, arch, quantization, kv_dtype):
    folder, _ = make_tiny_checkpoint(tmp_path / arch, arch)
    checked, tokens = _run(folder, embedded_gguf, quantization, kv_cache_dtype=kv_dtype)
    assert checked.served >= 6 and checked.stack.enabled
    cache = checked.model.model.layers[0].self_attn.attn.k_cache
    assert cache.dtype == (torch.float16 if kv_dtype == "auto" else torch.float32)  # auto: fp16 for low-bit weights
    assert all(len(t) == 6 + 3 * i for i, t in enumerate(tokens))


@pytest.mark.parametrize("quantization", ["int4", "int8"])
@pytest.mark.parametrize("prompts", [1, 3])
def test_qwen3_qk_norm_stack_equals_layers_bit_for_bit(tmp_path, embedded_gguf, quantization, prompts):
    folder, model = make_tiny_checkpoint(tmp_path / "qwen3", "qwen3")
    # Q/K norm weights are ones at init: random ones, different per layer and between Q and K, show
    # that each layer's own weights reach the kernel (and Q's not in K's place).
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                param.normal_(1.0, 0.5)
    model.save_pretrained(folder)
    checked, tokens = _run(folder, embedded_gguf, quantization, prompts=prompts)
    assert checked.model.model.layers[0].self_attn.qk_norm
    assert checked.served >= (5 if prompts == 1 else 6) and checked.stack.enabled
    assert all(len(t) == 6 + 3 * i for i, t in enumerate(tokens))


def test_stack_gives_the_layers_tokens(tmp_path, embedded_gguf):
    folder, _ = make_tiny_checkpoint(tmp_path / "llama", "llama")
    _, with_stack = _run(folder, embedded_gguf, "int4")
    llm = LLM(str(folder), tokenizer=embedded_gguf, block_size=4, num_kv_blocks=128, quantization="int4")
    llm.engine.runner.model.decode_stack = None
    g = torch.Generator().manual_seed(3)
    batch = [{"prompt_token_ids": torch.randint(20, 256, (5 + 7 * i,), generator=g).tolist()} for i in range(3)]
    params = [SamplingParams(temperature=0, max_tokens=6 + 3 * i, ignore_eos=True) for i in range(3)]
    without = [o.outputs[0].token_ids for o in llm.generate(batch, params, use_tqdm=False)]
    assert with_stack == without


def test_unquantized_and_windowed_models_keep_their_layers(tmp_path, embedded_gguf):
    folder, _ = make_tiny_checkpoint(tmp_path / "llama", "llama")
    checked, _ = _run(folder, embedded_gguf, "none")  # dense fp32 projections: not the kernel's
    assert checked.served == 0 and checked.declined > 0 and not checked.stack.enabled
    folder, _ = make_tiny_checkpoint(tmp_path / "mistral", "mistral", sliding_window=8)
    checked, _ = _run(folder, embedded_gguf, "int4")
    assert checked.served == 0 and not checked.stack.enabled


def test_torch_int4_kernel_keeps_the_layers(tmp_path, embedded_gguf, monkeypatch):
    from miaotui.layers import quantized

    if not quantized.quantization_supported("int4"):
        pytest.skip(f"torch {torch.__version__} has no int4 CPU kernel")
    folder, _ = make_tiny_checkpoint(tmp_path / "llama", "llama")
    original = quantized.Int4Linear.__init__
    monkeypatch.setattr(quantized.Int4Linear, "__init__",
                        lambda self, weight, bias, kernel=None: original(self, weight, bias, "torch"))
    checked, _ = _run(folder, embedded_gguf, "int4")
    assert checked.served == 0 and not checked.stack.enabled


def test_compile_decode_turns_the_stack_off(tmp_path, embedded_gguf):
    from miaotui.config import ModelConfig
    from miaotui.loader import load_model, resolve_model
    from miaotui.runner.compiled_decode import CompiledDecode

    folder, _ = make_tiny_checkpoint(tmp_path / "llama", "llama")
    model, _ = load_model(resolve_model(str(folder)), ModelConfig(model=str(folder)))
    assert model.decode_stack is not None
    CompiledDecode(model)
    assert model.decode_stack is None


def test_stack_refuses_mismatched_inputs():
    op = torch.ops.miaotui_cpu.decode_stack.default
    h = torch.zeros(1, 64)
    cos = torch.ones(1, 1, 16)
    with pytest.raises(RuntimeError, match="weights and one K and one V cache per layer"):
        op(h, cos, cos, [torch.zeros(1)], [torch.zeros(4, 4, 2, 16)], [torch.zeros(4, 4, 2, 16)],
           torch.zeros(1, dtype=torch.int64), torch.zeros(1, 1, dtype=torch.int64),
           torch.ones(1, dtype=torch.int64), 4, 2, 0.25, 1e-5)


def test_fp16_kv_cache_stays_close_to_fp32(tmp_path, embedded_gguf):
    """--kv-cache-dtype float16 only rounds K/V to fp16 when written: the logprobs of the same
    greedy continuation stay within a few thousandths of the fp32 cache's."""
    folder, _ = make_tiny_checkpoint(tmp_path / "llama", "llama")
    prompt = {"prompt_token_ids": list(range(30, 47))}
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=1, ignore_eos=True)
    runs = {}
    for kv_dtype in ("float32", "float16"):
        llm = LLM(str(folder), tokenizer=embedded_gguf, block_size=4, num_kv_blocks=128, quantization="int4",
                  kv_cache_dtype=kv_dtype)
        runs[kv_dtype] = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    exact, half = runs["float32"], runs["float16"]
    compared = 0
    for token, lp32, lp16 in zip(exact.token_ids, exact.logprobs, half.logprobs):
        if token not in lp16:  # a near-tie flipped: the rest of the continuation differs
            break
        assert abs(lp32[token].logprob - lp16[token].logprob) < 5e-3
        compared += 1
    assert compared >= 6, f"the fp16-cache continuation left the fp32 one after {compared} tokens"


def test_kv_cache_dtype_is_validated():
    from miaotui.config import CacheConfig
    from miaotui.runner.model_runner import kv_cache_dtype

    with pytest.raises(ValueError, match="kv_cache_dtype: must be one of auto, float32, float16, bfloat16"):
        CacheConfig(kv_cache_dtype="fp8")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert kv_cache_dtype("auto", torch.bfloat16, cpu, quantized=False) is torch.bfloat16
    assert kv_cache_dtype("auto", torch.float32, cpu, quantized=False) is torch.float32  # the reference path
    assert kv_cache_dtype("auto", torch.float32, cpu, quantized=True) is torch.float16
    assert kv_cache_dtype("float32", torch.float32, cpu, quantized=True) is torch.float32
    assert kv_cache_dtype("auto", torch.bfloat16, cuda, quantized=False) is torch.bfloat16
    with pytest.raises(ValueError, match="supported on the CPU only"):
        kv_cache_dtype("float16", torch.bfloat16, cuda, quantized=False)
