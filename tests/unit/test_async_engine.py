"""AsyncLLMEngine: concurrent streams equal offline results; cancelling a consumer aborts."""

from __future__ import annotations

import asyncio
import time

import pytest

from miaotui import SamplingParams
from miaotui.engine.async_engine import AsyncLLMEngine


PROMPTS = [[30 + i] * (3 + 5 * i) for i in range(4)]
PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def offline(engine_llm):
    """Offline results, computed before the async engine takes the engine over: from then on
    only its thread may touch it."""
    return [engine_llm.generate({"prompt_token_ids": p}, PARAMS, use_tqdm=False)[0] for p in PROMPTS]


@pytest.fixture(scope="module")
def async_engine(engine_llm, offline):
    engine = AsyncLLMEngine(engine_llm.engine)
    yield engine
    engine.shutdown()


def test_concurrent_streams_match_offline_generation(async_engine, offline):
    prompts, params = PROMPTS, PARAMS

    async def collect(p):
        last = None
        deltas = 0
        async for out in async_engine.generate(p, params):
            deltas += 1
            assert not last or len(out.outputs[0].token_ids) > len(last.outputs[0].token_ids)
            last = out
        return last, deltas

    async def main():
        return await asyncio.gather(*(collect(p) for p in prompts))

    results = asyncio.run(main())
    for expected, (out, deltas) in zip(offline, results):
        assert out.finished and deltas == 12  # one streamed output per generated token
        assert out.outputs[0].token_ids == expected.outputs[0].token_ids


def test_cancelled_consumer_aborts_and_frees_blocks(async_engine, engine_llm):
    kv = engine_llm.engine.kv
    free_before = kv.num_free_blocks
    generated_before = engine_llm.engine.generation_tokens_total

    async def main():
        # As long as the context allows: still generating when the consumer leaves, so the freed
        # blocks below are the abort's doing, not the request's end.
        params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
        agen = async_engine.generate([40] * 30, params, request_id="gone")
        async for out in agen:
            if len(out.outputs[0].token_ids) >= 3:
                break
        await agen.aclose()  # what a disconnecting client's handler does
        deadline = time.monotonic() + 30  # the engine loop's next turn frees them; a loaded machine is slow
        while time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            if kv.num_free_blocks == free_before and not engine_llm.engine.has_unfinished_requests():
                return True
        return False

    assert asyncio.run(main())
    assert engine_llm.engine.generation_tokens_total - generated_before < 400  # aborted, not finished


def test_bad_request_raises_in_the_caller_and_the_engine_goes_on(async_engine):
    async def main():
        with pytest.raises(ValueError, match="prompt: must not be empty"):
            async for _ in async_engine.generate([], SamplingParams()):
                pass
        outs = [o async for o in async_engine.generate([50, 51], SamplingParams(max_tokens=2, ignore_eos=True))]
        return outs[-1]

    last = asyncio.run(main())
    assert last.finished and len(last.outputs[0].token_ids) == 2
    assert async_engine.is_running
