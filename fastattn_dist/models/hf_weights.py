"""Hugging Face weight names and this rank's slice of each: what ``LlamaForCausalLM.load`` copies in.

A checkpoint is anything with ``read(name, dim=None, start=0, end=None, *, dtype, device)`` (checkpoint.py reads
safetensors slice by slice; the benchmark wraps a transformers model's state dict): each rank reads only the
rows or columns it holds, never the whole tensor.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..parallel.sharding import TPShape


def load_checkpoint(model, ckpt) -> None:
    """Copy this rank's slices of ``ckpt``'s tensors into ``model`` (a LlamaForCausalLM)."""
    s: TPShape = model.shape
    cfg = model.config

    def read(name: str, dim: Optional[int] = None, rows: Optional[slice] = None) -> torch.Tensor:
        if rows is None:
            return ckpt.read(name, dtype=model.dtype, device=model.device)
        return ckpt.read(name, dim, rows.start, rows.stop, dtype=model.dtype, device=model.device)

    def cat(prefix: str, names, rows, suffix: str) -> torch.Tensor:
        return torch.cat([read(f"{prefix}{n}.{suffix}", 0, r) for n, r in zip(names, rows)])

    def vocab_rows(name: str) -> torch.Tensor:
        """This rank's vocabulary rows (fewer on the last rank, none on a rank past the vocabulary's end)."""
        end = min(cfg.vocab_size, s.vocab_start + s.local_vocab)
        if end <= s.vocab_start:
            return torch.zeros(0, cfg.hidden_size, dtype=model.dtype, device=model.device)
        return read(name, 0, slice(s.vocab_start, end))

    model.embed.load_rows(vocab_rows("model.embed_tokens.weight"))
    if not cfg.tie_word_embeddings:
        rows = vocab_rows("lm_head.weight")
        with torch.no_grad():
            model.lm_head.weight.zero_()
            model.lm_head.weight[: rows.shape[0]].copy_(rows)
    with torch.no_grad():
        model.norm.copy_(read("model.norm.weight"))
    qkv_rows = (s.q_rows, s.kv_rows, s.kv_rows)
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        with torch.no_grad():
            layer.input_norm.copy_(read(p + "input_layernorm.weight"))
            layer.post_norm.copy_(read(p + "post_attention_layernorm.weight"))
        qkv_bias = cat(a, ("q_proj", "k_proj", "v_proj"), qkv_rows, "bias") if cfg.attention_bias else None
        layer.attn.qkv.load(cat(a, ("q_proj", "k_proj", "v_proj"), qkv_rows, "weight"), qkv_bias)
        layer.attn.o_proj.load(read(a + "o_proj.weight", 1, s.q_rows), read(a + "o_proj.bias") if cfg.o_bias else None)
        inter = (s.intermediate_rows, s.intermediate_rows)
        gate_up_bias = cat(m, ("gate_proj", "up_proj"), inter, "bias") if cfg.mlp_bias else None
        layer.mlp.gate_up.load(cat(m, ("gate_proj", "up_proj"), inter, "weight"), gate_up_bias)
        layer.mlp.down.load(read(m + "down_proj.weight", 1, s.intermediate_rows),
                            read(m + "down_proj.bias") if cfg.mlp_bias else None)
