"""YaRN RoPE (gpt-oss): inverse frequencies and the cos/sin attention factor equal transformers'
own _compute_yarn_parameters, across truncate, mscale and partial-rotary settings."""

from __future__ import annotations

import pytest
import torch

from miaotui.errors import UnsupportedModelError
from miaotui.layers.rotary import check_rope, compute_inv_freq

YARN_CASES = {
    "gpt-oss": {"factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 4096},
    "truncated-defaults": {"factor": 4.0, "original_max_position_embeddings": 64},
    "mscale-ratio": {"factor": 40.0, "mscale": 1.0, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "beta_fast": 16, "beta_slow": 2},
    "given-attention-factor": {"factor": 8.0, "attention_factor": 1.25, "original_max_position_embeddings": 256},
    "narrow-ramp": {"factor": 2.0, "beta_fast": 4.0, "beta_slow": 4.0, "truncate": True,
                    "original_max_position_embeddings": 64},
}


def _config(rope: dict, head_dim: int = 64, **extra):
    from transformers import GptOssConfig

    return GptOssConfig(hidden_size=256, num_attention_heads=4, head_dim=head_dim, num_hidden_layers=2,
                        max_position_embeddings=131072,
                        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, **rope}, **extra)


@pytest.mark.parametrize("case", sorted(YARN_CASES))
@pytest.mark.parametrize("head_dim", [64, 16])
def test_yarn_matches_transformers_rope_init(case, head_dim):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = _config(YARN_CASES[case], head_dim)
    ref_inv_freq, ref_factor = ROPE_INIT_FUNCTIONS["yarn"](cfg)
    check_rope(cfg, head_dim)
    inv_freq, factor = compute_inv_freq(cfg, head_dim)
    assert inv_freq.shape == ref_inv_freq.shape
    torch.testing.assert_close(inv_freq, ref_inv_freq.float(), rtol=0, atol=0)
    assert factor == pytest.approx(ref_factor, rel=1e-12)


def test_yarn_factor_defaults_as_transformers():
    """The attention factor from the factor alone: 0.1 ln(32) + 1 for gpt-oss."""
    import math

    _, factor = compute_inv_freq(_config(YARN_CASES["gpt-oss"]), 64)
    assert factor == pytest.approx(0.1 * math.log(32.0) + 1.0)


def test_yarn_without_factor_is_refused():
    from types import SimpleNamespace

    cfg = SimpleNamespace(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0},
                          max_position_embeddings=4096)
    with pytest.raises(UnsupportedModelError, match="yarn RoPE needs a factor"):
        check_rope(cfg, 64)
