"""fastattn-dist: a tensor-parallel attention block that hides its all-reduce behind attention.

Public API:
  attention(q, k, v, mask="causal", q_offset=0, backend="auto", return_lse=False)
  TPAttention(hidden_size, num_heads, num_kv_heads=None, *, tiles="auto", group=None, ...)
  masks: NoMask, Causal, SlidingWindow(window), KeyPadding(lengths)
  LinkModel(latency_us, gbps): the simulated interconnect of CPU ranks
  LlamaForCausalLM.from_pretrained(path, *, dtype=None, device=None, group=None, tiles="auto", ...):
    the TP Llama-family model (models/)
  init_distributed(...), shutdown(), spawn_ranks(fn, world_size, ...)
"""
from .attention import attention
from .block import TPAttention
from .parallel.link_models import LinkModel
from .masks import Causal, KeyPadding, Mask, NoMask, SlidingWindow
from .models import LlamaForCausalLM
from .parallel.process_group import DistContext, RendezvousError, init_distributed, shutdown
from .parallel.spawn import RankFailedError, spawn_ranks
from .parallel.tile_plan import TilePlan
from .tuning.cost_model import TilePlanOptions

from .version import __version__

__all__ = ["attention", "TPAttention", "LinkModel", "TilePlanOptions", "Causal", "KeyPadding", "Mask",
           "NoMask", "SlidingWindow", "DistContext", "init_distributed", "shutdown", "spawn_ranks",
           "RankFailedError", "RendezvousError", "TilePlan", "LlamaForCausalLM", "__version__"]
