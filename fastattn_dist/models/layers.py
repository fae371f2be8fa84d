"""A decoder layer of a TP Llama-family model: the block's attention sublayer and an MLP sublayer, each behind an
RMSNorm on the residual stream and each ending in a tiled row-parallel projection (the all-reduce).

``TPMLP``: fused column-parallel gate/up, SiLU(gate) * up, tiled row-parallel down. ``DecoderLayer`` holds a
``TPAttention`` (block.py, the same class the standalone block is) and a ``TPMLP``; models/prefill.py chains
their per-tile work, models/decode.py runs them one token at a time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..block import TPAttention
from ..parallel.comm import CommPath
from ..parallel.layers import ColumnParallelLinear, TiledRowParallelLinear
from ..parallel.sharding import TPShape
from ..rope import Rotary
from .config import LlamaConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's LlamaRMSNorm: normalised in float32, cast back, then scaled."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def fused_kernels(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the elementwise chains run as the fused Triton kernels (triton_fused.py): on GPUs, not float64."""
    return device.type == "cuda" and dtype != torch.float64


class TPMLP(nn.Module):
    """The MLP sublayer's shard: ``down(silu(gate(x)) * up(x))`` over this rank's slice of the intermediate size."""

    def __init__(self, shape: TPShape, *, bias: bool, dtype, device) -> None:
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.gate_up = ColumnParallelLinear(shape.hidden_size, 2 * shape.local_intermediate, bias=bias, **kw)
        self.down = TiledRowParallelLinear(shape.local_intermediate, shape.hidden_size, bias=bias, **kw)

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        """The down projection's input rows of ``x`` (normalised rows ``[n, hidden]``)."""
        gu = self.gate_up(x)
        if fused_kernels(gu.device, gu.dtype):
            from .triton_fused import silu_mul  # Triton is optional: its kernels load where they run
            return silu_mul(gu)
        g, u = gu.chunk(2, dim=-1)
        return F.silu(g) * u


class DecoderLayer(nn.Module):
    """Norm -> attention sublayer -> residual, norm -> MLP sublayer -> residual; this rank's shard of both."""

    def __init__(self, cfg: LlamaConfig, shape: TPShape, comm: CommPath, rotary: Rotary, attn_backend: str,
                 dtype, device, attn_precision: str = "bf16") -> None:
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        H = cfg.hidden_size
        self.input_norm = nn.Parameter(torch.ones(H, **kw), requires_grad=False)
        self.attn = TPAttention(H, cfg.num_attention_heads, cfg.num_key_value_heads, head_dim=cfg.head_dim, tiles=1,
                                comm=comm, rotary=rotary, backend=attn_backend, qkv_bias=cfg.attention_bias,
                                o_bias=cfg.o_bias, attn_precision=attn_precision, **kw)
        self.post_norm = nn.Parameter(torch.ones(H, **kw), requires_grad=False)
        self.mlp = TPMLP(shape, bias=cfg.mlp_bias, **kw)

    @property
    def linears(self):
        return (self.attn.qkv, self.attn.o_proj, self.mlp.gate_up, self.mlp.down)
