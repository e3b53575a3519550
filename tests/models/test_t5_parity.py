"""T5 (encoder-decoder) parity with transformers on tiny random checkpoints (fp32, CPU).

Variants: v1.0 (ReLU feed-forward, tied head, decoder output scaled by d_model^-0.5), v1.1
(gated GELU, no output scaling) as transformers saves it, and v1.1 with its own head in the file
(the layout of real flan-T5 checkpoints). Logits match within 1e-4 after the encoder and the
decoder start token and at each of 16 decode steps; a batch of sequences with different encoder
lengths and mixed decoder chunks matches row by row; greedy ids match for 32 tokens; beam search
(4 beams) returns generate()'s sequences and scores; sampled tokens carry the reference's
log-probabilities.
"""

from __future__ import annotations

import pytest
import torch

from miaotui import LLM, SamplingParams
from miaotui.config import CacheConfig, ModelConfig
from miaotui.engine.kv_cache import KVCacheManager
from miaotui.step_plan import ScheduledSeq, SchedulerOutput
from miaotui.loader import load_model, resolve_model
from miaotui.request import EncoderState, Request
from miaotui.runner.model_runner import ModelRunner
from miaotui.sampling_params import BeamSearchParams
from tests.conftest import make_tiny_checkpoint

VARIANTS = {
    "t5-v1.0": {"feed_forward_proj": "relu"},
    "t5-v1.1": {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False},
    "t5-v1.1-own-head": {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False, "untied_head": True},
}
ATOL = 1e-4
START = 0  # decoder_start_token_id of the tiny configs


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def checkpoint(request, tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), "t5", **VARIANTS[request.param])


def _runner(folder):
    config = ModelConfig(model=str(folder))
    model, _ = load_model(resolve_model(str(folder)), config)
    return ModelRunner(model, config, CacheConfig(block_size=4, num_blocks=64), 256), KVCacheManager(64, 4)


def _request(rid: str, encoder_ids: list[int]) -> Request:
    return Request(rid, [START], SamplingParams(temperature=0), frozenset(), 256, rid,
                   encoder=EncoderState(encoder_ids))


def _reference_logits(hf_model, encoder_ids: list[int], decoder_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(input_ids=torch.tensor([encoder_ids]), decoder_input_ids=torch.tensor([decoder_ids])).logits[0]


def test_logits_match_after_encoding_and_16_decode_steps(checkpoint):
    folder, hf_model = checkpoint
    runner, kv = _runner(folder)
    torch.manual_seed(1)
    encoder_ids = torch.randint(2, 256, (21,)).tolist()
    req = _request("r", encoder_ids)
    with torch.no_grad():
        ref = hf_model(input_ids=torch.tensor([encoder_ids]), decoder_input_ids=torch.tensor([[START]]),
                       use_cache=True)
    for step in range(17):  # the start token, then 16 decode steps on the cached K/V
        start = req.num_computed_tokens
        n = req.num_tokens - start
        assert kv.allocate_slots(req, n)
        ours = runner.forward_logits(SchedulerOutput([ScheduledSeq(req, start, n)]))[0]
        ref_logits = ref.logits[0, -1]
        diff = (ours - ref_logits).abs().max().item()
        assert diff <= ATOL, f"step {step}: logits differ by {diff}"
        req.num_computed_tokens += n
        token = int(ref_logits.argmax())
        req.append_output_token(token)
        with torch.no_grad():
            ref = hf_model(encoder_outputs=(ref.encoder_last_hidden_state,), decoder_input_ids=torch.tensor([[token]]),
                           past_key_values=ref.past_key_values, use_cache=True)
    assert runner.encoder_tokens_total == len(encoder_ids)  # the encoder ran once, at the first step


def test_batch_of_different_encoder_lengths_and_decoder_chunks(checkpoint):
    """Four sequences in one flat batch, encoder inputs of 3 to 30 tokens: a fresh start token,
    a 7-token decoder chunk, a decode step after a cached decoder prefix, and a chunk that
    continues a prefix; each row equals transformers on that sequence alone."""
    folder, hf_model = checkpoint
    runner, kv = _runner(folder)
    torch.manual_seed(2)
    encoders = [torch.randint(2, 256, (n,)).tolist() for n in (13, 30, 3, 9)]
    decoders = [[START], [START] + torch.randint(2, 256, (6,)).tolist(),
                [START] + torch.randint(2, 256, (5,)).tolist(), [START] + torch.randint(2, 256, (9,)).tolist()]
    reqs = [_request(str(i), e) for i, e in enumerate(encoders)]
    for req, dec in zip(reqs, decoders):
        for t in dec[1:]:
            req.append_output_token(t)
    warm = [ScheduledSeq(reqs[2], 0, 5), ScheduledSeq(reqs[3], 0, 4)]  # cached decoder prefixes
    for s in warm:
        assert kv.allocate_slots(s.request, s.num_new_tokens)
        s.request.num_computed_tokens = 0
    runner.forward_logits(SchedulerOutput(warm))
    reqs[2].num_computed_tokens, reqs[3].num_computed_tokens = 5, 4
    step = [ScheduledSeq(reqs[0], 0, 1), ScheduledSeq(reqs[1], 0, 7), ScheduledSeq(reqs[2], 5, 1),
            ScheduledSeq(reqs[3], 4, 6)]
    for s in step:
        assert kv.allocate_slots(s.request, s.num_new_tokens)
    ours = runner.forward_logits(SchedulerOutput(step))
    assert ours.shape[0] == 4
    for i in range(4):
        ref = _reference_logits(hf_model, encoders[i], decoders[i])[-1]
        assert (ours[i] - ref).abs().max().item() <= ATOL, f"sequence {i}"


@pytest.fixture(scope="module")
def t5_llm(checkpoint, embedded_gguf):
    folder, hf_model = checkpoint
    llm = LLM(str(folder), tokenizer=embedded_gguf, block_size=4, num_kv_blocks=256, max_model_len=256,
              max_num_batched_tokens=64)
    return llm, hf_model


def test_greedy_ids_match_transformers_for_32_tokens(t5_llm):
    llm, hf_model = t5_llm
    torch.manual_seed(3)
    prompts = [torch.randint(2, 256, (n,)).tolist() for n in (5, 17, 40)]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    hf_model.generation_config.eos_token_id = None
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)
        assert ref[0, 0].item() == START
        assert out.outputs[0].token_ids == ref[0, 1:].tolist()
        assert out.prompt_token_ids == prompt  # the user's prompt is the encoder input
        assert len(set(out.outputs[0].token_ids)) > 3  # the sequence really varies with position


def test_beam_search_matches_transformers(t5_llm):
    llm, hf_model = t5_llm
    kv = llm.engine.kv
    free_before = kv.num_free_blocks
    torch.manual_seed(4)
    for n in (6, 15):
        prompt = torch.randint(2, 256, (n,)).tolist()
        params = BeamSearchParams(beam_width=4, max_tokens=10, early_stopping=True, num_return_sequences=4)
        out = llm.beam_search({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([prompt]), num_beams=4, max_new_tokens=10, early_stopping=True,
                                    num_return_sequences=4, do_sample=False, eos_token_id=1,
                                    output_scores=True, return_dict_in_generate=True)
        seqs = []
        for row in ref.sequences:
            ids = row[1:].tolist()  # drop the decoder start token
            seqs.append(ids[: ids.index(1) + 1] if 1 in ids else ids)  # the reference pads after EOS
        assert [o.token_ids for o in out.outputs] == seqs
        assert [o.cumulative_logprob for o in out.outputs] == pytest.approx(ref.sequences_scores.tolist(), abs=1e-4)
    assert kv.num_free_blocks == free_before


def test_sampled_tokens_carry_the_reference_logprobs(t5_llm):
    """n=3 seeded samples (temperature 2) share one encoder run; each sampled token's logprob
    (always the raw model's) equals transformers' log-softmax for that decoder prefix, so every
    step samples from the distribution of the right sequence."""
    llm, hf_model = t5_llm
    runner = llm.engine.runner
    torch.manual_seed(5)
    prompt = torch.randint(2, 256, (12,)).tolist()
    before = runner.encoder_tokens_total
    params = SamplingParams(temperature=2.0, max_tokens=12, ignore_eos=True, n=3, seed=7, logprobs=0)
    out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    assert runner.encoder_tokens_total - before == len(prompt)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    for completion in out.outputs:
        ids = completion.token_ids
        ref = torch.log_softmax(_reference_logits(hf_model, prompt, [START] + ids[:-1]), dim=-1)
        expected = [ref[i, t].item() for i, t in enumerate(ids)]
        got = [completion.logprobs[i][t].logprob for i, t in enumerate(ids)]
        assert got == pytest.approx(expected, abs=1e-4)
    again = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in out.outputs]  # the seed reproduces
