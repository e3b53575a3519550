"""Without a seed every request draws fresh randomness; a seed (per request or per engine)
reproduces exactly. The CLI side (three `miaotui generate` runs) is in test_cli.py."""

from __future__ import annotations

import pytest

from miaotui import LLM, SamplingParams

SAMPLED = dict(temperature=1.0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from conftest import make_tiny_checkpoint

    folder, _ = make_tiny_checkpoint(tmp_path_factory.mktemp("unseeded"), "llama")
    return str(folder)


def _llm(folder: str, embedded_gguf: str, seed: int | None = None) -> LLM:
    return LLM(folder, tokenizer=embedded_gguf, num_kv_blocks=64, seed=seed, quantization="none")


def _ids(llm: LLM, seed: int | None = None) -> list[int]:
    out = llm.generate([[1, 2, 3]], SamplingParams(seed=seed, **SAMPLED), use_tqdm=False)
    return out[0].outputs[0].token_ids


def test_unseeded_draws_differ_between_engines_and_from_seed_zero(tiny_folder, embedded_gguf):
    # The tiny random model's next-token distribution is close to uniform over 256 ids, so two
    # independent 24-token draws are equal with probability ~256**-24: a repeat means shared state.
    first, second = _llm(tiny_folder, embedded_gguf), _llm(tiny_folder, embedded_gguf)
    a, b = _ids(first), _ids(second)
    assert a != b, "two engines without a seed drew the same tokens"
    assert a != _ids(first, seed=0) and b != _ids(second, seed=0), "an unseeded request equals seed=0"
    assert _ids(first) != a, "two unseeded requests of one engine drew the same tokens"


def test_seeds_reproduce_exactly(tiny_folder, embedded_gguf):
    first, second = _llm(tiny_folder, embedded_gguf), _llm(tiny_folder, embedded_gguf)
    assert _ids(first, seed=7) == _ids(second, seed=7) == _ids(first, seed=7)
    # An engine seed reproduces the unseeded requests of a whole run.
    one, two = _llm(tiny_folder, embedded_gguf, seed=5), _llm(tiny_folder, embedded_gguf, seed=5)
    assert [_ids(one) for _ in range(2)] == [_ids(two) for _ in range(2)]


def test_engine_seed_is_validated():
    with pytest.raises(ValueError, match="seed"):
        LLM("unused", seed="1")  # type: ignore[arg-type]
