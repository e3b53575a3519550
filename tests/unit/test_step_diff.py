"""The tensor-parallel step diff rebuilds exactly the driver's StepInputs, step after step, through
chunked prefill, preemption (tables rebuilt), n > 1 forks and beam search, while sending only
appended blocks for sequences that keep running."""

from __future__ import annotations

import pickle

import pytest

from miaotui import LLM, SamplingParams
from miaotui.runner.step_diff import StepDiffDecoder, StepDiffEncoder
from miaotui.sampling_params import BeamSearchParams
from tests.conftest import make_tiny_checkpoint


SLIDING = {"num_hidden_layers": 3, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0,
           "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}


# With a window group, 22 blocks of all layers give the full-attention layer 42 (one sequence of
# 160 tokens) and the window layers 12: both budgets preempt.
@pytest.mark.parametrize("arch,overrides,num_blocks,max_len", [("llama", {}, 70, 256), ("qwen2", SLIDING, 22, 160)],
                         ids=["llama", "qwen2-window-group"])
def test_decoded_diffs_equal_the_driver_inputs(arch, overrides, num_blocks, max_len, tmp_path, embedded_gguf):
    folder, _ = make_tiny_checkpoint(tmp_path / arch, arch, **overrides)
    llm = LLM(str(folder), tokenizer=embedded_gguf, block_size=4, num_kv_blocks=num_blocks, max_model_len=max_len,
              max_num_batched_tokens=32, max_num_seqs=8)
    runner = llm.engine.runner
    assert bool(runner.kv_windows) == (arch == "qwen2")  # the sliding layers' own KV group, tables diffed too
    encoder, decoder = StepDiffEncoder(), StepDiffDecoder(runner.block_size)
    stats = {"steps": 0, "appended": 0, "full": 0, "diff_bytes": 0, "full_bytes": 0}
    build = runner.step_inputs

    def checked(sched):
        inputs = build(sched)
        diff = encoder.encode([s.request.request_id for s in sched.seqs], inputs)
        wire = pickle.dumps(diff)
        assert decoder.decode(pickle.loads(wire)) == inputs
        stats["steps"] += 1
        stats["appended"] += sum(c.table is None for c in diff.seqs)
        stats["full"] += sum(c.table is not None for c in diff.seqs)
        stats["diff_bytes"] += len(wire)
        stats["full_bytes"] += len(pickle.dumps(inputs))
        return inputs

    runner.step_inputs = checked
    prompts = [{"prompt_token_ids": [(7 * i + j) % 250 + 3 for j in range(n)]} for i, n in enumerate((5, 40, 90, 13))]
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=60, ignore_eos=True), use_tqdm=False)
    llm.generate(prompts[0], SamplingParams(temperature=1.0, n=3, seed=1, max_tokens=20), use_tqdm=False)
    llm.beam_search(prompts[1], BeamSearchParams(beam_width=3, max_tokens=8), use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0  # tables were torn down and rebuilt
    assert stats["appended"] > 5 * stats["full"]  # running sequences send only their new blocks
    assert stats["diff_bytes"] < stats["full_bytes"]
