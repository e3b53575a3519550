"""Write tiny mixture-of-experts GGUF files as llama.cpp's convert_hf_to_gguf does: Mixtral as
`llama` (Q/K rows permuted) and Qwen3-MoE as `qwen3moe`, each layer's experts stacked in one
tensor per projection (ffn_gate_exps / ffn_up_exps [E, I, H], ffn_down_exps [E, H, I]) and the
router as ffn_gate_inp [E, H]."""

from __future__ import annotations

from pathlib import Path

from tests.gguf_writer import add_tensor, finish, gguf_name, llama_cpp_permute, llama_family_writer


def write_moe_gguf(path: Path, hf_model, quant_for, arch: str) -> Path:
    """`hf_model`: a transformers MixtralForCausalLM (arch "llama") or Qwen3MoeForCausalLM
    ("qwen3moe"), whose in-memory experts are stacked (mlp.experts.gate_up_proj [E, 2I, H] with
    gate rows first, mlp.experts.down_proj [E, H, I]). quant_for(gguf name) -> a type name."""
    cfg = hf_model.config
    experts = cfg.num_local_experts if arch == "llama" else cfg.num_experts
    expert_size = cfg.intermediate_size if arch == "llama" else cfg.moe_intermediate_size
    writer = llama_family_writer(path, cfg, arch)
    writer.add_expert_count(experts)
    writer.add_expert_used_count(cfg.num_experts_per_tok)
    if arch == "qwen3moe":
        writer.add_expert_feed_forward_length(expert_size)
    for name, tensor in hf_model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w = tensor.detach().float().numpy()
        prefix, _, rest = name.rpartition(".mlp.")
        layer = prefix.rsplit(".", 1)[-1] if prefix else ""
        if rest == "gate.weight":
            targets = [(f"blk.{layer}.ffn_gate_inp.weight", w)]
        elif rest == "experts.gate_up_proj":
            targets = [(f"blk.{layer}.ffn_gate_exps.weight", w[:, :expert_size]),
                       (f"blk.{layer}.ffn_up_exps.weight", w[:, expert_size:])]
        elif rest == "experts.down_proj":
            targets = [(f"blk.{layer}.ffn_down_exps.weight", w)]
        else:
            if arch == "llama" and name.endswith("q_proj.weight"):
                w = llama_cpp_permute(w, cfg.num_attention_heads)
            elif arch == "llama" and name.endswith("k_proj.weight"):
                w = llama_cpp_permute(w, cfg.num_key_value_heads)
            targets = [(gguf_name(name), w)]
        for target, array in targets:
            add_tensor(writer, target, array, quant_for(target))
    return finish(writer, path)
