"""Llama-family models (Llama 2/3, Mistral, Qwen2) from Hugging Face checkpoint directories.

  LlamaForCausalLM: the tensor-parallel decoder (from_pretrained, forward, prefill, decode_step, generate)
  LlamaConfig: the model config, parsed from config.json (LlamaConfig.from_file / from_dict)
  Checkpoint(path): config + safetensors weights, read slice by slice (each rank reads only its own slices)
  tiny_checkpoint(): a small random Llama checkpoint with a tokenizer, made locally once
"""
from .config import LlamaConfig, SUPPORTED_ARCHITECTURES
from .checkpoint import Checkpoint
from .tiny import tiny_checkpoint
from .llama import LlamaForCausalLM
