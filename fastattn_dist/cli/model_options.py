"""What generate and bench-model share before any rank starts: the model's shard at a world size, the KV cache's
sizes against the budgets (one-line ValueErrors naming the sizes), and the options that set those budgets."""
from __future__ import annotations

from typing import Optional

import torch

from ..models.llama import model_shape
from ..models.offload_plan import GIB, CacheSizing, check_request, default_host_budget
from ..models.presets import model_config
from ..parallel.process_group import local_ranks
from .options import positive_float


def check_world(path: str, world: int) -> None:
    """The model's shape splits over ``world`` ranks (every rank would raise the same error)."""
    model_shape(model_config(path), world, 0)


def rank_sizing(cfg, dtype: torch.dtype, world: int) -> CacheSizing:
    """The sizes of rank 0's shard at this world size (weights, KV bytes per token, activations)."""
    return CacheSizing.of(cfg, model_shape(cfg, world, 0), torch.empty(0, dtype=dtype).element_size())


def gib_bytes(gb: Optional[float]) -> Optional[int]:
    return None if gb is None else int(gb * GIB)


def check_cache_fits(cfg, dtype: torch.dtype, world: int, kv_offload, tokens: int, batch: int,
                     host_budget_gb: Optional[float], gpu_budget_gb: Optional[float]) -> None:
    """The sizes a request decides before any rank starts: a GPU budget holds a rank's weights, and the cache of
    ``tokens`` per sequence fits the budgets (offload_plan.check_request); a one-line ValueError naming them."""
    # the default host budget as each rank will see it: split between this node's ranks (here, before a spawn,
    # no launcher says how many: the world size)
    host = gib_bytes(host_budget_gb) if host_budget_gb is not None else default_host_budget(local_ranks(world))
    check_request(kv_offload, tokens, batch, rank_sizing(cfg, dtype, world), host, gib_bytes(gpu_budget_gb))


def check_precision_offload(attn_precision: str, modes) -> None:
    """8-bit attention takes no host KV tier yet (the model's check_quantization, as the options say it)."""
    if attn_precision != "bf16" and any(m != "off" for m in modes):
        raise ValueError(f"--attn-precision {attn_precision} does not go with a host KV tier yet: use "
                         "--kv-offload off")


def offload_arg(value: str):
    if value in ("off", "auto"):
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"--kv-offload takes off, auto or a number of tokens >= 1, got {value!r}")
    return n


def add_budget_options(p, scope: str = "") -> None:
    """--host-budget-gb and --gpu-budget-gb (here and in bench-model's long-context mode, ``scope`` says so)."""
    p.add_argument("--host-budget-gb", type=positive_float, default=None,
                   help=scope + "host memory the KV cache's host tier may take (default: 80%% of what is available, "
                        "shared by the node's ranks)")
    p.add_argument("--gpu-budget-gb", type=positive_float, default=None,
                   help=scope + "device memory each rank may use in all (weights, activations, cache), so a large "
                        "GPU stands in for a smaller one (labelled so in every output)")
