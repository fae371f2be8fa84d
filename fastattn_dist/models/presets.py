"""Model shapes the benchmarks build with random weights (no checkpoint), and what ``--model`` names mean.

  7b      Mistral-7B's shape (32 layers, hidden 4096, 32 heads / 8 kv heads, intermediate 14336, vocab 32000)
  7b-mha  Llama-2-7B's shape (multi-head: 32 kv heads, 512 KiB of KV per token), context 1M (long-context runs)
  8b      Llama-3-8B (hidden 4096, 32 layers, 32 heads / 8 kv heads, intermediate 14336, vocab 128256, theta 5e5)
  8b-262k Llama-3-8B's shape with 262144 positions (Gradient's Llama-3-8B-Instruct-262k: rope theta 283461213),
          a GQA shape for 256K-token runs
  70b     Llama-3-70B (hidden 8192, 80 layers, 64 heads / 8 kv heads, intermediate 28672, vocab 128256, theta 5e5)
  tiny    a small random Llama checkpoint with a tokenizer, written once locally (tiny.py)
"""
from __future__ import annotations

import os
from typing import Optional

from .checkpoint import Checkpoint
from .config import LlamaConfig
from .tiny import random_checkpoint, tiny_checkpoint

_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
           num_key_value_heads=8, max_position_embeddings=32768, rope_theta=10000.0, rms_norm_eps=1e-5)
_LLAMA3 = dict(vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072,
               num_key_value_heads=8, intermediate_size=14336)
SHAPES = {
    "7b": ("MistralForCausalLM", "mistral", _7B),
    "7b-mha": ("LlamaForCausalLM", "llama", dict(_7B, intermediate_size=11008, num_key_value_heads=32,
                                                 max_position_embeddings=1 << 20)),
    "8b": ("LlamaForCausalLM", "llama", dict(_LLAMA3, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32)),
    "8b-262k": ("LlamaForCausalLM", "llama", dict(_LLAMA3, hidden_size=4096, num_hidden_layers=32,
                                                  num_attention_heads=32, rope_theta=283461213.0,
                                                  max_position_embeddings=262144)),
    "70b": ("LlamaForCausalLM", "llama", dict(_LLAMA3, hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                                              intermediate_size=28672)),
}
MODEL_HELP = ("checkpoint directory (Hugging Face format), 'tiny' (a small random model made once, locally), or "
              "one of " + ", ".join(SHAPES) + " (random weights of that shape, GPU)")


def preset_config(name: str) -> LlamaConfig:
    arch, model_type, shape = SHAPES[name]
    return LlamaConfig.from_dict({"architectures": [arch], "model_type": model_type, "torch_dtype": "bfloat16",
                                  "sliding_window": None, **shape})


def resolve_model(name: str, layers: Optional[int] = None) -> str:
    """A checkpoint directory for ``--model`` (a preset name stays a name); ``layers``: a tiny variant of that
    depth, made once beside the tiny model (the same weights for the layers they share)."""
    if name in SHAPES:
        return name
    if name == "tiny":
        path = tiny_checkpoint()
        if layers is None:
            return path
        variant = f"{path}-{layers}layers"
        if not os.path.exists(os.path.join(variant, "config.json")):
            random_checkpoint(variant, Checkpoint(path).config.replace(num_hidden_layers=layers))
        return variant
    if not os.path.isdir(name):
        raise ValueError(f"--model {name!r} is not a checkpoint directory, 'tiny' or one of {', '.join(SHAPES)}")
    return name


def model_config(path: str) -> LlamaConfig:
    """The config of a preset name or a checkpoint directory (the checkpoint checked complete)."""
    if path in SHAPES:
        return preset_config(path)
    ckpt = Checkpoint(path)
    ckpt.check_complete()
    return ckpt.config
