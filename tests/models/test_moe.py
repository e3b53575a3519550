"""Mixture-of-experts (Mixtral, Qwen3-MoE, gpt-oss) beyond the shared parity suite: only routed experts
run, routes differ across a batch without changing any row, quantized experts keep a dense
router, and every checkpoint naming of experts loads. transformers' own classes are the reference."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from miaotui import LLM, SamplingParams
from miaotui.errors import UnsupportedModelError
from miaotui.layers.moe import Router, SparseMoE, route
from miaotui.layers.quantized import Int4Linear, Int8Linear
from tests.conftest import make_tiny_checkpoint


def dequantized_reference(hf, model):
    """A copy of transformers' MoE model `hf` holding our `model`'s dequantized weights of every
    quantized matrix (attention, experts, head): a reference for quantized miaotui runs."""
    ref = type(hf)(hf.config).eval()
    ref.load_state_dict(hf.state_dict())
    blocks = [m for m in model.modules() if isinstance(m, SparseMoE)]
    with torch.no_grad():
        for theirs, ours, block in zip(ref.model.layers, model.model.layers, blocks):
            attn = ours.self_attn
            q, k, v = attn.qkv_proj._dense_weight().split([attn.q_size, attn.kv_size, attn.kv_size])
            for proj, w in ((theirs.self_attn.q_proj, q), (theirs.self_attn.k_proj, k), (theirs.self_attn.v_proj, v),
                            (theirs.self_attn.o_proj, attn.o_proj._dense_weight())):
                proj.weight.copy_(w)
            gate_up = [e.gate_up_proj._dense_weight() for e in block.experts]
            down = [e.down_proj._dense_weight() for e in block.experts]
            if hf.config.model_type == "gpt_oss":  # stored for x @ W, gate/up interleaved
                gate_up, down = [_interleaved(w) for w in gate_up], [w.t() for w in down]
            theirs.mlp.experts.gate_up_proj.copy_(torch.stack(gate_up))
            theirs.mlp.experts.down_proj.copy_(torch.stack(down))
        ref.lm_head.weight.copy_(model.lm_head._dense_weight())
    return ref


def assert_top_logprobs_match(out, ref, prompt, tol: float = 2e-3) -> None:
    """`out` (a CompletionOutput with logprobs for its first token) against `ref` on `prompt`."""
    with torch.no_grad():
        expected = torch.log_softmax(ref(torch.tensor([prompt])).logits[0, -1], -1)
    assert out.token_ids[0] == int(expected.argmax())
    for token, lp in out.logprobs[0].items():
        assert abs(lp.logprob - expected[token].item()) <= tol


def _llm(folder, **kw) -> LLM:
    return LLM(str(folder), skip_tokenizer_init=True, block_size=4, num_kv_blocks=256, max_model_len=256, **kw)


def _moe_blocks(llm: LLM) -> list[SparseMoE]:
    return [m for m in llm.engine.runner.model.modules() if isinstance(m, SparseMoE)]


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe", "gpt_oss"])
def tiny(request, tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param)


def test_routing_is_transformers_topk_router():
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    torch.manual_seed(0)
    for normalize in (True, False):
        cfg = Qwen3MoeConfig(hidden_size=32, num_experts=8, num_experts_per_tok=3, norm_topk_prob=normalize)
        ref = Qwen3MoeTopKRouter(cfg)
        torch.nn.init.normal_(ref.weight)
        x = torch.randn(40, 32)
        _, ref_weights, ref_ids = ref(x)
        weights, ids = route(x @ ref.weight.t(), 3, normalize)
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(weights, ref_weights, rtol=0, atol=1e-7)


def _router(mlp):
    return mlp.router if hasattr(mlp, "router") else mlp.gate  # gpt-oss names it router


def _interleaved(gate_up: torch.Tensor) -> torch.Tensor:
    """An expert's fused [2I, H] weight (gate rows first) in gpt-oss's stored [H, 2I] interleaved layout."""
    gate, up = gate_up.chunk(2, dim=0)
    return torch.stack([gate, up], dim=1).reshape(gate_up.shape).t()


def test_batch_1_decode_runs_exactly_top_k_experts_per_layer(tiny):
    folder, hf = tiny
    llm = _llm(folder)
    blocks = _moe_blocks(llm)
    assert len(blocks) == hf.config.num_hidden_layers and all(b.top_k == 2 for b in blocks)
    llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
    before = [b.experts_run for b in blocks]
    llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)
    # The prefill step (3 tokens: up to 6 experts) and two decode steps of one token: 2 each.
    prefill_runs = [b.experts_run - s for b, s in zip(blocks, before)]
    before = [b.experts_run for b in blocks]
    llm.generate({"prompt_token_ids": [5]}, SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)
    # A 1-token prompt, then one decode step: two single-token steps, 2 experts each.
    assert [b.experts_run - s for b, s in zip(blocks, before)] == [4] * len(blocks)
    assert all(2 * 2 < r <= 2 * 2 + 6 for r in prefill_runs)


def test_a_batch_routes_tokens_to_different_experts_and_each_row_equals_it_alone(tiny):
    folder, hf = tiny
    torch.manual_seed(1)
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (7, 12, 3, 9)]
    # From the reference's router: the first layer's tokens go to more than top-k experts in all.
    with torch.no_grad():
        h = hf.model.embed_tokens(torch.tensor([t for p in prompts for t in p]))
        gate = _router(hf.model.layers[0].mlp)
        _, _, ids = gate(hf.model.layers[0].input_layernorm(h))
    assert len(set(ids.flatten().tolist())) > 2
    llm = _llm(folder)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    together = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                             use_tqdm=False)]
    alone = [llm.generate({"prompt_token_ids": p}, params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    assert together == alone
    hf.generation_config.eos_token_id = None
    for p, got in zip(prompts, together):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False)[0, len(p):].tolist()
        assert got == ref


@pytest.mark.parametrize("mode, linear", [("int4", Int4Linear), ("int8", Int8Linear)])
def test_quantized_experts_keep_a_dense_router_and_match_their_dequantized_weights(tiny, mode, linear):
    """Each expert's projections are quantized like any linear; the router stays fp32. The
    reference: transformers' model holding every quantized matrix's dequantized weights (the
    experts, attention and head), so what differs is only the kernels' 16-bit activations."""
    folder, hf = tiny
    llm = _llm(folder, quantization=mode)
    model = llm.engine.runner.model
    blocks = _moe_blocks(llm)
    for block in blocks:
        assert type(block.gate) is Router and block.gate.weight.dtype == torch.float32
        assert all(isinstance(e.gate_up_proj, linear) and isinstance(e.down_proj, linear) for e in block.experts)
    if not blocks[0].experts[0].gate_up_proj.own_kernel:
        pytest.skip("the reference needs miaotui's CPU kernels (whose dequantized weights are exact)")
    ref = dequantized_reference(hf, model)
    torch.manual_seed(2)
    prompt = torch.randint(0, 256, (10,)).tolist()
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=1, temperature=0, logprobs=8),
                       use_tqdm=False)[0].outputs[0]
    assert_top_logprobs_match(out, ref, prompt)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])  # gpt-oss checkpoints are saved stacked already
def test_stacked_expert_tensors_load_as_per_expert_ones(tmp_path, arch):
    """transformers 5's in-memory names (mlp.experts.gate_up_proj [E, 2I, H], down_proj [E, H, I],
    mlp.gate): a checkpoint saved from them loads to the same model as the per-expert one."""
    folder, hf = make_tiny_checkpoint(tmp_path / "per-expert", arch)
    stacked = tmp_path / "stacked"
    stacked.mkdir()
    for f in folder.iterdir():
        if f.suffix == ".json":
            (stacked / f.name).write_text(f.read_text())
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    save_file(state, str(stacked / "model.safetensors"), metadata={"format": "pt"})
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompt = {"prompt_token_ids": [9, 8, 7, 6]}
    a = _llm(folder).generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    b = _llm(stacked).generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    assert a == b


def test_bad_moe_configs_fail_fast(tmp_path):
    folder, _ = make_tiny_checkpoint(tmp_path / "m", "mixtral")
    import json
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_experts_per_tok"] = 9
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="num_experts_per_tok 9 must be in 1..8"):
        _llm(folder)
