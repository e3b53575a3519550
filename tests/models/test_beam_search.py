"""Beam search equals transformers' generate(num_beams=4): same sequences, same scores."""

from __future__ import annotations

import pytest
import torch

from miaotui.sampling_params import BeamSearchParams


def _reference(hf_model, prompt: list[int], eos: int | None, **kwargs) -> tuple[list[list[int]], list[float]]:
    ref = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True,
                            **kwargs)
    seqs = []
    for row in ref.sequences:
        ids = row[len(prompt):].tolist()
        if eos is not None and eos in ids:
            ids = ids[: ids.index(eos) + 1]  # the reference pads after EOS
        seqs.append(ids)
    return seqs, ref.sequences_scores.tolist()


@pytest.mark.parametrize("early_stopping,length_penalty", [(False, 1.0), (True, 0.0), ("never", 2.0)])
def test_tiny_model_matches_transformers(engine_llm, tmp_path_factory, early_stopping, length_penalty):
    from tests.conftest import make_tiny_checkpoint

    # engine_llm is built from the same deterministic tiny checkpoint (seed 0)
    _, hf_model = make_tiny_checkpoint(tmp_path_factory.mktemp("beam_ref"), "llama")
    kv = engine_llm.engine.kv
    free_before = kv.num_free_blocks
    torch.manual_seed(0)
    for n in (5, 17):
        prompt = torch.randint(3, 256, (n,)).tolist()
        params = BeamSearchParams(beam_width=4, max_tokens=12, early_stopping=early_stopping,
                                  length_penalty=length_penalty, num_return_sequences=2)
        out = engine_llm.beam_search({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
        seqs, scores = _reference(hf_model, prompt, eos=2, num_beams=4, max_new_tokens=12,
                                  early_stopping=early_stopping, length_penalty=length_penalty,
                                  num_return_sequences=2)
        assert [o.token_ids for o in out.outputs] == seqs
        assert [o.cumulative_logprob for o in out.outputs] == pytest.approx(scores, abs=1e-4)
    assert kv.num_free_blocks == free_before  # every beam's blocks came back


def test_beams_share_the_prompt_blocks(engine_llm):
    """While a beam search runs, its 4 beams hold the prompt's full blocks once, not 4 times."""
    engine = engine_llm.engine
    prompt = list(range(10, 50))  # 40 tokens = 10 full blocks of 4
    engine.add_beam_search_request("share", prompt, BeamSearchParams(beam_width=4, max_tokens=8, ignore_eos=True))
    for _ in range(4):
        engine.step()
    beams = [r for r in engine.scheduler.running if r.is_beam]
    assert len(beams) == 4
    first_blocks = {tuple(b.block_ids[:10]) for b in beams}
    assert len(first_blocks) == 1
    pool = engine.kv.pool
    assert all(pool.ref_counts[blk] == 4 for blk in beams[0].block_ids[:10])
    engine.abort_request("share")
    assert not engine.has_unfinished_requests()


@pytest.mark.embedded
def test_embedded_model_matches_transformers(embedded_llm, embedded_hf):
    tok, hf_model = embedded_hf
    llm = embedded_llm
    prompts = ["The capital of France is", "def add(a, b):", "My favourite animal is"]
    params = BeamSearchParams(beam_width=4, max_tokens=16, num_return_sequences=2)
    outs = llm.beam_search(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        ids = tok(prompt)["input_ids"]
        seqs, scores = _reference(hf_model, ids, eos=2, num_beams=4, max_new_tokens=16, num_return_sequences=2)
        assert [o.token_ids for o in out.outputs] == seqs, prompt
        assert [o.cumulative_logprob for o in out.outputs] == pytest.approx(scores, abs=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "bloom"])
def test_classic_tiny_models_match_transformers(arch, tmp_path_factory, embedded_gguf):
    from miaotui import LLM
    from tests.conftest import make_tiny_checkpoint

    folder, hf_model = make_tiny_checkpoint(tmp_path_factory.mktemp(f"beam_{arch}"), arch)
    llm = LLM(str(folder), tokenizer=embedded_gguf, block_size=4, num_kv_blocks=256, max_model_len=512)
    torch.manual_seed(4)
    for n in (6, 15):
        prompt = torch.randint(3, 256, (n,)).tolist()
        params = BeamSearchParams(beam_width=4, max_tokens=10, early_stopping=True, num_return_sequences=4)
        out = llm.beam_search({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
        seqs, scores = _reference(hf_model, prompt, eos=2, num_beams=4, max_new_tokens=10,
                                  early_stopping=True, num_return_sequences=4, eos_token_id=2)
        assert [o.token_ids for o in out.outputs] == seqs
        assert [o.cumulative_logprob for o in out.outputs] == pytest.approx(scores, abs=1e-4)
