"""Gemma 2 / 3 beyond the decoder parity suite (tests/models/test_decoder_parity.py runs their logits,
greedy ids and mixed batches against transformers): the soft-caps the parity relies on really
change the output, the language model of a Gemma3ForConditionalGeneration checkpoint loads on
its own and equals transformers' text-only forward, a window shorter than the prompt is honoured
in prefill chunks and decode, and configs miaotui cannot run fail before loading."""

from __future__ import annotations

import pytest
import torch

from miaotui import LLM, SamplingParams
from miaotui.config import ModelConfig
from miaotui.errors import UnsupportedModelError
from miaotui.loader import load_model, resolve_model
from miaotui.models.gemma import GemmaForCausalLM
from miaotui.models.registry import model_class
from tests.conftest import TINY_GEMMA3, make_tiny_checkpoint
from tests.model_checks import hf_greedy_ids


def _prompt_logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    """miaotui's logits at the last prompt position, through the engine's own runner and KV manager."""
    from miaotui.request import Request
    from miaotui.step_plan import ScheduledSeq, SchedulerOutput

    engine = llm.engine
    req = Request("r", ids, SamplingParams(temperature=0), frozenset(), 256, "r")
    assert engine.kv.allocate_slots(req, len(ids))
    return engine.runner.forward_logits(SchedulerOutput([ScheduledSeq(req, 0, len(ids))]))[0]


def test_soft_caps_change_the_reference_output(tmp_path):
    """The caps of the tiny Gemma 2 bind (tanh far from linear), so matching transformers with
    them (the parity suite) proves miaotui applies both; here: removing either moves logits."""
    folder, hf_model = make_tiny_checkpoint(tmp_path, "gemma2")
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        capped = hf_model(ids).logits
        hf_model.config.final_logit_softcapping = None
        no_final = hf_model(ids).logits
        for layer in hf_model.model.layers:
            layer.self_attn.attn_logit_softcapping = None
        no_caps = hf_model(ids).logits
    assert (capped - no_final).abs().max() > 1e-3
    assert (no_final - no_caps).abs().max() > 1e-3
    model, _ = load_model(resolve_model(str(folder)), ModelConfig(model=str(folder)))
    assert [layer.self_attn.attn.softcap for layer in model.model.layers] == [0.05] * 4
    assert model.final_softcap == 1.5


def _tiny_multimodal(folder):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=28, patch_size=14)
    config = Gemma3Config(text_config=dict(TINY_GEMMA3), vision_config=vision, mm_tokens_per_image=4,
                          image_token_index=255, boi_token_index=253, eoi_token_index=254)
    config.text_config._attn_implementation = "eager"
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    return model


def test_multimodal_checkpoint_runs_its_language_model(tmp_path, embedded_gguf):
    hf_model = _tiny_multimodal(tmp_path)
    llm = LLM(str(tmp_path), tokenizer=embedded_gguf, block_size=4, num_kv_blocks=64, max_model_len=128)
    cfg = llm.engine.model.config
    assert isinstance(llm.engine.model, GemmaForCausalLM) and cfg.model_type == "gemma3_text"
    assert cfg.vocab_size == 256 and cfg.architectures == ["Gemma3ForConditionalGeneration"]
    ids = torch.randint(0, 250, (19,), generator=torch.Generator().manual_seed(1)).tolist()  # no image tokens
    with torch.no_grad():
        ref = hf_model(input_ids=torch.tensor([ids])).logits[0, -1]
    assert (_prompt_logits(llm, ids) - ref).abs().max().item() <= 1e-4
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0].token_ids
    hf_model.generation_config.eos_token_id = None
    assert out == hf_greedy_ids(hf_model, ids, 12)


def test_window_shorter_than_chunked_prompt_matches_transformers(tmp_path, embedded_gguf):
    """A 40-token prompt through a window of 8, prefilled in chunks of 12 (chunk boundaries
    inside and across windows), then 24 decode steps: transformers' greedy ids."""
    folder, hf_model = make_tiny_checkpoint(tmp_path, "gemma3")
    llm = LLM(str(folder), tokenizer=embedded_gguf, block_size=4, num_kv_blocks=96, max_num_batched_tokens=12,
              max_model_len=128)
    prompt = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0].token_ids
    hf_model.generation_config.eos_token_id = None
    assert out == hf_greedy_ids(hf_model, prompt, 24)


@pytest.mark.parametrize("override,message", [
    ({"hidden_activation": "relu"}, r"activation 'relu' is not supported for Gemma models"),
    ({"use_bidirectional_attention": True}, r"use_bidirectional_attention"),
])
def test_configs_miaotui_cannot_run_fail_fast(override, message):
    from transformers import Gemma3TextConfig

    cfg = Gemma3TextConfig(**{**TINY_GEMMA3, **override}, architectures=["Gemma3ForCausalLM"])
    with pytest.raises(UnsupportedModelError, match=message):
        model_class(cfg).check_config(cfg)


def test_gemma_architectures_are_listed():
    from types import SimpleNamespace

    for arch in ("Gemma2ForCausalLM", "Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"):
        assert model_class(SimpleNamespace(architectures=[arch])) is GemmaForCausalLM
    with pytest.raises(UnsupportedModelError, match=r"Gemma2ForCausalLM.*Gemma3ForCausalLM"):
        model_class(SimpleNamespace(architectures=["NotAModel"]))
