"""Decode: one new token per sequence through every layer, by a strategy chosen once, when the cache is made.

  ``FusedDecode``     GPU, one cache tier: per layer norm+residual, q/k/v GEMM, RoPE + cache append, split-K
                      attention, o_proj GEMM + all-reduce, norm+residual, gate/up GEMM, SiLU*up, down GEMM +
                      all-reduce, as fused Triton kernels (triton_fused.py); no host sync and no shape change
                      between steps, so the step can be captured as a CUDA graph (generate.py).
  ``OneTierDecode``   the same layers in plain PyTorch (CPU ranks, float64): the reference path.
  (Both over an int8 cache too, ``Int8KVCache``: the new token's key and value are quantized as they are
  appended, and attention reads int8 keys and values: kv_cache.py.)
  ``TieredDecode``    a KV cache with a host tier (kv_offload.py): each sequence's new key goes to the tier its
                      position falls in; attention runs on the device tier, on the CPU and on streamed host
                      blocks at once, merged by LSE. Host work: no graph. ``FusedTieredDecode``: the same
                      inside FusedDecode's fused layer loop (GPU).

Every all-reduce and the LM head's gather go through the model's comm path (``CommPath``).
"""
from __future__ import annotations

from typing import Optional

import torch

from .kv_cache import Int8KVCache, KVCache
from .kv_offload import DecodeSplit, TieredKVCache, decode_split, stream_units, tiered_decode_attention
from .layers import fused_kernels, rms_norm


class OneTierDecode:
    """The plain-PyTorch decode step; ``attend`` stores a layer's new key/value and returns its attention."""

    capturable = False

    def __init__(self, model) -> None:
        self.model = model

    def window(self) -> Optional[int]:
        w, c = self.model.config.sliding_window, self.model.cache
        return w if w is not None and w < c.max_seq_len else None

    def attend(self, li: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        c = self.model.cache
        c.append(li, k, v)
        return c.attend(li, q, c.lengths + 1, self.window(), self.model.attn_backend)

    def finish(self) -> None:
        self.model.cache.lengths.add_(1)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        m = self.model
        cfg, s, comm = m.config, m.shape, m.comm
        B, D, eps = ids.shape[0], s.head_dim, cfg.rms_norm_eps
        pos = m.cache.lengths[:, None]
        h = m.embed(ids, comm)
        for li, layer in enumerate(m.layers):
            q, k, v = layer.attn.project(rms_norm(h, layer.input_norm, eps))
            q = m.rotary.apply(q.view(B, 1, s.local_heads, D), pos)
            k = m.rotary.apply(k.view(B, 1, s.local_kv_heads, D), pos)
            a = self.attend(li, q, k, v.view(B, 1, s.local_kv_heads, D)).reshape(B, s.local_heads * D)
            h = h + layer.attn.o_proj.run_rows(a, comm)
            h = h + layer.mlp.down.run_rows(layer.mlp.activation(rms_norm(h, layer.post_norm, eps)), comm)
        self.finish()
        return m.logits(h)


class TieredDecode(OneTierDecode):
    """Decode over a device + host KV cache (kv_offload.py). Each step's split of every sequence's keys (device
    tier, newest token, host keys streamed or on the CPU at the plan's ``decode_cpu_share``) is made once, on the
    host, for all layers; at the step's end the new host tokens are scattered into the tier and the next step's
    first streamed units are prefetched while the LM head and sampling run."""

    def __init__(self, model) -> None:
        super().__init__(model)
        self._split: Optional[DecodeSplit] = None
        self._next: Optional[DecodeSplit] = None

    def _split_for(self, lens) -> DecodeSplit:
        share = self.model.kv_plan.decode_cpu_share
        nxt = self._next
        if nxt is not None and nxt.lens == list(lens) and nxt.share == share:
            return nxt
        return decode_split(self.model.cache, lens, self.window(), share)

    def attend(self, li, q, k, v):
        c = self.model.cache
        c.append_token(li, k, v, self._split)
        return tiered_decode_attention(c, li, q, k, v, self._split, self.model.attn_backend)

    def __call__(self, ids):
        c = self.model.cache
        lens = [n + 1 for n in c.host_lengths]  # sequences sit at different positions
        if max(lens) > c.max_seq_len:
            raise ValueError(f"the KV cache holds {c.max_seq_len} tokens per sequence: no room for another")
        c.flush()  # the prefill's host writes (or the last step's tokens) readable before any host read
        c.stream.timing = c.timing is not None
        self._split = self._split_for(lens)
        return super().__call__(ids)

    def finish(self) -> None:
        super().finish()
        c = self.model.cache
        c.host_lengths = self._split.lens
        c.flush()
        lens = [n + 1 for n in self._split.lens]
        self._next = None
        if max(lens) <= c.max_seq_len:
            self._next = self._split_for(lens)
            c.stream.prefetch(stream_units(c, 0, self._next), [e for _, e in self._next.stream])


class FusedDecode(OneTierDecode):
    """The decode step as fused kernels (GPU, one tier); capturable unless a sliding window is shorter than
    the cache (windowed attention reads lengths back to the host)."""

    def __init__(self, model) -> None:
        super().__init__(model)
        self.capturable = self.window() is None

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        from .triton_fused import add_rms_norm, silu_mul  # Triton is optional: GPU runs only

        m = self.model
        cfg, c, comm = m.config, m.cache, m.comm
        B, eps = ids.shape[0], cfg.rms_norm_eps
        cos, sin = m.rotary.tables(c.max_seq_len, m.device, torch.float32)
        self._kv_len, self._window = c.lengths + 1, self.window()  # the step's, for every layer
        h = m.embed(ids, comm)
        n = add_rms_norm(h, m.layers[0].input_norm, eps)
        for li, layer in enumerate(m.layers):
            attn, mlp = layer.attn, layer.mlp
            a = self.fused_attention(li, attn.qkv(n), cos, sin).reshape(B, -1)
            o = comm.all_reduce(a @ attn.o_proj.weight.t())
            n = add_rms_norm(h, layer.post_norm, eps, delta=o, bias=attn.o_proj.bias)
            d = comm.all_reduce(silu_mul(mlp.gate_up(n)) @ mlp.down.weight.t())
            last = li + 1 == len(m.layers)
            n = add_rms_norm(h, m.norm if last else m.layers[li + 1].input_norm, eps, delta=d, bias=mlp.down.bias)
        self.finish()
        return m.lm_head(n, comm)

    def fused_attention(self, li: int, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Layer li's attention of the new tokens' ``qkv`` rows: rotated, appended to the cache (quantized as
        appended for the int8 cache), attended."""
        from .triton_fused import rope_append  # Triton is optional: GPU runs only

        m, c, s = self.model, self.model.cache, self.model.shape
        q = rope_append(qkv, cos, sin, c.lengths, c.k[li], c.v[li], s.local_heads, s.local_kv_heads,
                        int8=c.q8[li] if isinstance(c, Int8KVCache) else None)
        return c.attend(li, q, self._kv_len, self._window, m.attn_backend)


class FusedTieredDecode(TieredDecode, FusedDecode):
    """The fused step over a device + host cache (GPU): TieredDecode's split and attention inside FusedDecode's
    layer loop. The rotated new key and value go to a scratch token, which ``attend`` then places (device tier
    or host staging): per layer about 20 fewer kernels on the thread whose launches chain the layers."""

    capturable = False

    def __init__(self, model) -> None:
        super().__init__(model)
        self.capturable = False  # FusedDecode's __init__ says what a one-tier cache allows
        c, s = model.cache, model.shape
        self._new_k, self._new_v = torch.empty(2, c.batch, 1, s.local_kv_heads, s.head_dim, dtype=model.dtype,
                                               device=model.device)
        # rope_append's cache views of the scratch token, a sequence stride of 0: it writes each sequence's token
        # "at position p", i.e. into the scratch token
        self._as_cache = [t.expand(-1, c.max_seq_len, -1, -1) for t in (self._new_k, self._new_v)]

    def fused_attention(self, li, qkv, cos, sin):
        from .triton_fused import rope_append  # Triton is optional: GPU runs only

        c, s = self.model.cache, self.model.shape
        q = rope_append(qkv, cos, sin, c.lengths, *self._as_cache, s.local_heads, s.local_kv_heads)
        return self.attend(li, q, self._new_k, self._new_v)


def decode_strategy(model):
    """The decode step for the model's current cache (chosen once per cache)."""
    cache = model.cache
    if isinstance(cache, TieredKVCache):
        return FusedTieredDecode(model) if fused_kernels(model.device, model.dtype) else TieredDecode(model)
    if isinstance(cache, KVCache) and fused_kernels(model.device, model.dtype):
        return FusedDecode(model)
    return OneTierDecode(model)
