"""A tensor-parallel Llama-family decoder (Llama 2/3, Mistral, Qwen2) built from the block's parallel layers.

Megatron-style TP over a process group: q/k/v and the MLP's gate/up projections are column-parallel
(each rank holds its heads and its slice of the intermediate size), o_proj and the MLP's down
projection are row-parallel through the same tiled row-parallel linear as the attention block
(parallel/row_parallel.py), the embedding and the LM head are vocab-parallel (each rank holds a slice
of the vocabulary; the embedding is summed over ranks, the logits of the positions asked for gathered).

Prefill: the token rows are cut into tiles once (the block's cost model), and every sublayer runs
tile by tile in order: tile i's rows wait for the previous sublayer's all-reduce of tile i only,
add it to the residual stream, normalise, compute, and issue their own all-reduce. Causality makes
this legal (tile i of layer L+1 needs keys of rows 0..i only), so the all-reduces of one sublayer
hide under the next sublayer's compute and a prefill leaves about one tile's all-reduce exposed in
total, not one per sublayer. Decode: one row per sequence, the KV cache appended in place, the whole
step capturable as a CUDA graph (generate.py).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..attention import kernel_for, run_kernel
from ..attention.decode import decode_attention
from ..block import check_tiles
from ..config import LinkModel, TilePlanOptions
from ..masks import Mask
from ..parallel.comm import group_world_rank, make_comm
from ..parallel.row_parallel import TiledRowParallelLinear
from ..parallel.tiling_allreduce import TilePlan, tile_segments
from ..profiler.recorder import BLOCK, span
from ..rope import Rotary
from ..tuning import LayerCost, choose_stack_plan, fixed_plan, profile_for
from .config import LlamaConfig
from .kv_cache import KVCache


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's LlamaRMSNorm: normalised in float32, cast back, then scaled."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class TPShard:
    """What this rank holds of a config's dimensions (checks divisibility once, with clear errors)."""

    def __init__(self, cfg: LlamaConfig, world: int, rank: int) -> None:
        for name, n in (("num_attention_heads", cfg.num_attention_heads), ("num_key_value_heads", cfg.num_key_value_heads),
                        ("intermediate_size", cfg.intermediate_size)):
            if n % world:
                raise ValueError(f"{name} ({n}) is not divisible by the world size ({world})")
        self.world, self.rank = world, rank
        self.heads = cfg.num_attention_heads // world
        self.kv_heads = cfg.num_key_value_heads // world
        self.head_dim = cfg.head_dim
        self.inter = cfg.intermediate_size // world
        self.vocab = -(-cfg.vocab_size // world)  # rows per rank; the last rank's tail is zero padding
        self.vocab_start = rank * self.vocab

    def rows(self, what: str) -> slice:
        D = self.head_dim
        n = {"q": self.heads * D, "kv": self.kv_heads * D, "inter": self.inter}[what]
        return slice(self.rank * n, (self.rank + 1) * n)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, tp: TPShard, dtype, device) -> None:
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        H, D = cfg.hidden_size, tp.head_dim
        self.input_norm = nn.Parameter(torch.ones(H, **kw), requires_grad=False)
        self.post_norm = nn.Parameter(torch.ones(H, **kw), requires_grad=False)
        # q, k, v fused: one column-parallel GEMM, split after
        self.qkv = nn.Linear(H, (tp.heads + 2 * tp.kv_heads) * D, bias=cfg.attention_bias, **kw)
        self.o_proj = TiledRowParallelLinear(tp.heads * D, H, **kw)
        self.o_bias = nn.Parameter(torch.zeros(H, **kw), requires_grad=False) if cfg.o_bias else None
        self.gate_up = nn.Linear(H, 2 * tp.inter, bias=cfg.mlp_bias, **kw)
        self.down = TiledRowParallelLinear(tp.inter, H, **kw)
        self.down_bias = nn.Parameter(torch.zeros(H, **kw), requires_grad=False) if cfg.mlp_bias else None
        for p in self.parameters():
            p.requires_grad_(False)

    def mlp_input(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_up(x).chunk(2, dim=-1)
        return F.silu(g) * u


class LlamaForCausalLM(nn.Module):
    """The TP decoder; see the module docstring. Build it with ``from_pretrained``.

    ``tiles``: tile count of every sublayer's tiling-AllReduce in prefill, or "auto" (the cost model).
    ``max_seq_len``: the KV cache's length (default: the checkpoint's max_position_embeddings, capped
    at 4096; generate grows it to fit prompt + new tokens).
    """

    def __init__(self, config: LlamaConfig, *, dtype: Optional[torch.dtype] = None,
                 device: Optional[torch.device] = None, group=None, tiles="auto", max_seq_len: Optional[int] = None,
                 comm: str = "nccl", link: Optional[LinkModel] = None, attn_backend: str = "auto",
                 kv_offload="off", host_budget_gb: Optional[float] = None, prefill_chunk: Optional[int] = None) -> None:
        super().__init__()
        if not isinstance(config, LlamaConfig):
            raise TypeError(f"config must be a LlamaConfig, got {type(config).__name__}")
        dtype = dtype or torch.float32
        device = torch.device(device) if device is not None else torch.device("cpu")
        world, rank = group_world_rank(group)
        self.config, self.group, self.dtype, self.device = config, group, dtype, device
        self.tp = TPShard(config, world, rank)
        self.tiles = check_tiles(tiles)
        self.attn_backend = attn_backend
        if max_seq_len is not None and (isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int)
                                        or max_seq_len < 1):
            raise ValueError(f"max_seq_len must be an int >= 1, got {max_seq_len!r}")
        self.max_seq_len = max_seq_len or min(config.max_position_embeddings, 4096)
        kw = {"dtype": dtype, "device": device}
        H = config.hidden_size
        self.embed = nn.Parameter(torch.zeros(self.tp.vocab, H, **kw), requires_grad=False)
        self.layers = nn.ModuleList(DecoderLayer(config, self.tp, dtype, device) for _ in range(config.num_hidden_layers))
        self.norm = nn.Parameter(torch.ones(H, **kw), requires_grad=False)
        self.lm_head = self.embed if config.tie_word_embeddings else \
            nn.Parameter(torch.zeros(self.tp.vocab, H, **kw), requires_grad=False)
        self.rotary = Rotary(config.head_dim, config.rope_theta, config.rope_scaling)
        if comm != "nccl":
            # the copy-engine path reuses one symmetric buffer per shape, and a model's sublayers follow each other
            # without the end-of-block barrier that keeps a rank from rewriting it while peers still read it
            raise ValueError(f"the model's all-reduces take comm='nccl' (the process group's; gloo on CPU ranks), "
                             f"got {comm!r}")
        self.comm = make_comm(comm, group, device, link)
        self.link = link
        if kv_offload not in ("off", "auto") and (isinstance(kv_offload, bool) or not isinstance(kv_offload, int)
                                                 or kv_offload < 1):
            raise ValueError(f"kv_offload must be 'auto', 'off' or a number of tokens on the device, got {kv_offload!r}")
        if kv_offload != "off" and device.type != "cuda" and kv_offload == "auto":
            raise ValueError("kv_offload='auto' splits the KV cache between a GPU and host memory: this model is on "
                             f"{device.type}; use a GPU (or give a token count to split a CPU cache, for tests)")
        if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int)
                                          or prefill_chunk < 1):
            raise ValueError(f"prefill_chunk must be an int >= 1, got {prefill_chunk!r}")
        self.kv_offload, self.host_budget_gb, self.prefill_chunk = kv_offload, host_budget_gb, prefill_chunk
        self.kv_plan = None  # models.kv_offload.OffloadPlan of the current cache
        self.cache: Optional[KVCache] = None
        self.recorder = None
        self.last_plan: Optional[TilePlan] = None
        self._plans: dict = {}
        self.has_weights = False  # set by load() / init_random_weights(): nothing computes on uninitialised memory

    # -- checkpoints --------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, *, dtype: Optional[torch.dtype] = None, device=None, group=None,
                        tiles="auto", max_seq_len: Optional[int] = None, **kwargs) -> "LlamaForCausalLM":
        """Read a Hugging Face checkpoint directory; each rank reads only its own slices (safetensors)."""
        from .checkpoint import Checkpoint

        ckpt = Checkpoint(path)
        ckpt.check_complete()
        if dtype is None:
            dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(ckpt.config.torch_dtype or "",
                                                                             torch.float32)
        model = cls(ckpt.config, dtype=dtype, device=device, group=group, tiles=tiles, max_seq_len=max_seq_len,
                    **kwargs)
        model.load(ckpt)
        return model

    @torch.no_grad()
    def load(self, ckpt) -> None:
        """Copy this rank's slices of ``ckpt``'s tensors in (nothing else is read)."""
        tp, cfg = self.tp, self.config

        def read(name, dim=None, rows: Optional[slice] = None):
            if rows is None:
                return ckpt.read(name, dtype=self.dtype, device=self.device)
            return ckpt.read(name, dim, rows.start, rows.stop, dtype=self.dtype, device=self.device)

        def vocab_rows(name):
            end = min(cfg.vocab_size, tp.vocab_start + tp.vocab)
            w = torch.zeros(tp.vocab, cfg.hidden_size, dtype=self.dtype, device=self.device)
            if end > tp.vocab_start:
                w[: end - tp.vocab_start] = read(name, 0, slice(tp.vocab_start, end))
            return w

        self.embed.copy_(vocab_rows("model.embed_tokens.weight"))
        if not cfg.tie_word_embeddings:
            self.lm_head.copy_(vocab_rows("lm_head.weight"))
        self.norm.copy_(read("model.norm.weight"))
        qr, kvr, ir = tp.rows("q"), tp.rows("kv"), tp.rows("inter")
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            layer.input_norm.copy_(read(p + "input_layernorm.weight"))
            layer.post_norm.copy_(read(p + "post_attention_layernorm.weight"))
            a = p + "self_attn."
            layer.qkv.weight.copy_(torch.cat([read(a + "q_proj.weight", 0, qr), read(a + "k_proj.weight", 0, kvr),
                                              read(a + "v_proj.weight", 0, kvr)]))
            if cfg.attention_bias:
                layer.qkv.bias.copy_(torch.cat([read(a + "q_proj.bias", 0, qr), read(a + "k_proj.bias", 0, kvr),
                                                read(a + "v_proj.bias", 0, kvr)]))
            layer.o_proj.weight.copy_(read(a + "o_proj.weight", 1, qr))
            if layer.o_bias is not None:
                layer.o_bias.copy_(read(a + "o_proj.bias"))
            m = p + "mlp."
            layer.gate_up.weight.copy_(torch.cat([read(m + "gate_proj.weight", 0, ir), read(m + "up_proj.weight", 0, ir)]))
            if cfg.mlp_bias:
                layer.gate_up.bias.copy_(torch.cat([read(m + "gate_proj.bias", 0, ir), read(m + "up_proj.bias", 0, ir)]))
                layer.down_bias.copy_(read(m + "down_proj.bias"))
            layer.down.weight.copy_(read(m + "down_proj.weight", 1, ir))
        self.has_weights = True

    @torch.no_grad()
    def init_random_weights(self, seed: int = 0) -> None:
        """Random weights in place (N(0, 0.02), norms 1, biases 0): a model shape to time without a checkpoint.
        Each rank draws its own slices from (``seed``, its rank), so a rank's shard depends only on the seed, the
        world size and the rank: an emulated rank 0 of TP=N holds what rank 0 of a real TP=N run holds."""
        g = torch.Generator(device=self.device).manual_seed(seed + 1000 * self.tp.rank)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                p.fill_(0.0 if name.endswith("bias") else 1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
        self.has_weights = True

    def _require_weights(self) -> None:
        if not self.has_weights:
            raise ValueError("the model has no weights yet: build it with LlamaForCausalLM.from_pretrained(path), or "
                             "call load(checkpoint) or init_random_weights(seed) first")

    # -- vocab-parallel embedding and LM head ---------------------------------------------------------
    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.tp.world > 1:
            dist.all_reduce(t, group=self.group)
        return t

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids`` ``[N]`` -> ``[N, hidden]`` on every rank (each rank looks up its vocab slice; summed)."""
        local = ids - self.tp.vocab_start
        mine = (local >= 0) & (local < self.tp.vocab)
        e = F.embedding(local.clamp(0, self.tp.vocab - 1), self.embed) * mine[:, None].to(self.dtype)
        return self._all_reduce(e)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head of rows ``h`` ``[N, hidden]`` -> ``[N, vocab]`` float32 on every rank."""
        return self._lm_head(rms_norm(h, self.norm, self.config.rms_norm_eps))

    def _lm_head(self, normed: torch.Tensor) -> torch.Tensor:
        local = (normed @ self.lm_head.t()).float()
        if self.tp.world > 1:
            parts = [torch.empty_like(local) for _ in range(self.tp.world)]
            dist.all_gather(parts, local, group=self.group)
            local = torch.cat(parts, dim=-1)
        return local[:, : self.config.vocab_size]

    # -- checks ------------------------------------------------------------------------------------------
    def _check_ids(self, ids) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(ids).__name__}")
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an int64 [batch, seq] tensor, got {ids.dtype} {list(ids.shape)}")
        if ids.shape[0] < 1 or ids.shape[1] < 1:
            raise ValueError(f"input_ids is empty: shape {list(ids.shape)}")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}) (the vocabulary), got min {lo}, max {hi}")
        return ids.to(self.device, torch.int64)

    def _check_lengths(self, lengths, batch: int, seq: int) -> Optional[torch.Tensor]:
        if lengths is None:
            return None
        lengths = torch.as_tensor(lengths)
        if lengths.dtype.is_floating_point or lengths.shape != (batch,):
            raise ValueError(f"lengths must be {batch} ints (one per sequence), got {lengths.tolist()}")
        if int(lengths.min()) < 1 or int(lengths.max()) > seq:
            raise ValueError(f"lengths must lie in [1, {seq}] (the padded prompt length), got {lengths.tolist()}")
        return None if int(lengths.min()) == seq else lengths.to(self.device, torch.int64)

    # -- prefill --------------------------------------------------------------------------------------
    def plan_for(self, batch: int, seq: int, tiles=None) -> TilePlan:
        """The tile plan of a prefill of ``batch`` x ``seq`` rows (the attention sublayer's cost model)."""
        tiles = self.tiles if tiles is None else check_tiles(tiles)
        key = (batch, seq, tiles)
        if key not in self._plans:
            cfg, tp = self.config, self.tp
            cost = LayerCost(batch, seq, cfg.hidden_size, tp.heads, tp.head_dim, tp.world, self.embed.element_size(),
                             kv_heads=tp.kv_heads, intermediate=tp.inter)
            prof = profile_for(self.device)
            mask = Mask(True, None, None)
            if isinstance(tiles, TilePlan):
                plan = tiles
            elif tiles == "auto":
                plan = choose_stack_plan(cost, mask, len(self.layers), profile=prof, link=self.link,
                                         comm_model=getattr(self.comm, "model", None)).plan
            else:
                plan = fixed_plan(cost, mask, tiles, profile=prof, options=TilePlanOptions())
            self._plans[key] = plan
        return self._plans[key]

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, *, lengths=None, tiles=None, last_only: bool = False) -> torch.Tensor:
        """Logits ``[B, S, vocab]`` (float32, on every rank) of ``input_ids`` ``[B, S]``; no cache is kept.
        ``lengths``: real lengths of right-padded prompts. ``last_only``: only each sequence's last real
        position, ``[B, vocab]``."""
        self._require_weights()
        ids = self._check_ids(input_ids)
        B, S = ids.shape
        if S > self.max_seq_len:
            raise ValueError(f"the prompt has {S} tokens, more than max_seq_len={self.max_seq_len}")
        lengths = self._check_lengths(lengths, B, S)
        kv = self._scratch_kv(B, S)
        h = self._prefill(ids, lengths, kv, 0, tiles)
        return self._gather_logits(h, B, S, lengths, last_only)

    def _gather_logits(self, h, B, S, lengths, last_only):
        if not last_only:
            return self.logits(h).view(B, S, -1)
        last = (lengths if lengths is not None else torch.full((B,), S, dtype=torch.int64)).to(h.device) - 1
        rows = torch.arange(B, device=h.device) * S + last
        return self.logits(h[rows])

    def _scratch_kv(self, batch: int, seq: int) -> KVCache:
        """Keys/values for a forward without a cache: layers run one after another and each reads only its own,
        so every layer shares one layer's buffers, kept for the next call of the same shape."""
        tp = self.tp
        key = (batch, seq, self.dtype)
        if getattr(self, "_scratch", (None,))[0] != key:
            self._scratch = (key, KVCache.shared_layers(len(self.layers), batch, seq, tp.kv_heads, tp.head_dim,
                                                        self.dtype, self.device))
        return self._scratch[1]

    def _prefill(self, ids: torch.Tensor, lengths: Optional[torch.Tensor], kv: KVCache, start: int, tiles) -> torch.Tensor:
        """Run every layer over ``ids`` ``[B, S]`` at positions start.., writing keys/values into ``kv``;
        returns the final residual stream ``[B * S, hidden]``. Sublayers run tile by tile (module docstring)."""
        cfg, tp, comm, rec = self.config, self.tp, self.comm, self.recorder
        B, S = ids.shape
        rows, H, D = B * S, cfg.hidden_size, tp.head_dim
        plan = self.plan_for(B, S, tiles)
        self.last_plan = plan
        comm.enable_timing(rec is not None)
        with span(rec, "block", -1, BLOCK):  # the profiler's unit: one prefill
            h = self._prefill_layers(ids, lengths, kv, start, plan)
        return h

    def _prefill_layers(self, ids, lengths, kv: KVCache, start: int, plan: TilePlan) -> torch.Tensor:
        cfg, tp, comm, rec = self.config, self.tp, self.comm, self.recorder
        B, S = ids.shape
        rows, H, D = B * S, cfg.hidden_size, tp.head_dim
        all_handles = []
        with span(rec, "embed"):
            h = self.embed_tokens(ids.reshape(-1))
        positions = torch.arange(start, start + S, device=self.device)
        self.rotary.reserve(start + S, self.device, self.dtype)  # device positions are never read back
        window = cfg.sliding_window if cfg.sliding_window is not None and cfg.sliding_window < start + S else None
        prev = {"handles": None, "out": None, "bias": None}  # the previous sublayer's all-reduced output

        fused = self.device.type == "cuda" and self.dtype != torch.float64
        from .kv_offload import TieredKVCache, tiered_chunk_attention
        tiered = isinstance(kv, TieredKVCache)

        def take_previous(i: int, r0: int, r1: int, norm: Optional[torch.Tensor] = None):
            """Tile i's rows of the previous sublayer are reduced: add them to the residual stream; with ``norm``
            return the normalised rows too (one fused kernel on GPUs)."""
            has_prev = prev["handles"] is not None
            if has_prev:
                comm.wait(prev["handles"][i])
            if fused and norm is not None:
                from .triton_fused import add_rms_norm
                return add_rms_norm(h[r0:r1], norm, cfg.rms_norm_eps, delta=prev["out"][r0:r1] if has_prev else None,
                                    bias=prev["bias"])
            if has_prev:
                out = prev["out"][r0:r1]
                h[r0:r1] += out if prev["bias"] is None else out + prev["bias"]
            return None if norm is None else rms_norm(h[r0:r1], norm, cfg.rms_norm_eps)

        for li, layer in enumerate(self.layers):
            def attention_rows(i: int, r0: int, r1: int, layer=layer, li=li) -> torch.Tensor:
                x = take_previous(i, r0, r1, layer.input_norm)
                with span(rec, "attention", i):
                    q, k, v = layer.qkv(x).split([tp.heads * D, tp.kv_heads * D, tp.kv_heads * D], dim=-1)
                    out = torch.empty(r1 - r0, tp.heads * D, dtype=self.dtype, device=self.device)
                    for b0, b1, s0, s1 in tile_segments(r0, r1, S):
                        n, o0 = b1 - b0, (b0 * S + s0) - r0
                        seg = slice(o0, o0 + n * (s1 - s0))
                        qs = self.rotary.apply(q[seg].view(n, s1 - s0, tp.heads, D), positions[s0:s1])
                        ks = self.rotary.apply(k[seg].view(n, s1 - s0, tp.kv_heads, D), positions[s0:s1])
                        vs = v[seg].view(n, s1 - s0, tp.kv_heads, D)
                        kv.write_block(li, b0, b1, start + s0, ks, vs)
                        if tiered:
                            o = tiered_chunk_attention(kv, li, b0, b1, qs, ks, vs, start + s0,
                                                       None if lengths is None else lengths[b0:b1], window,
                                                       self.kv_plan.prefill_host)
                        else:
                            keys, vals = kv.k[li][b0:b1, : start + s1], kv.v[li][b0:b1, : start + s1]
                            kl = None if lengths is None else lengths[b0:b1].clamp(max=start + s1)
                            mask = Mask(True, window, kl)
                            which = kernel_for(self.attn_backend, qs, keys, mask, start + s0, False)
                            o = run_kernel(which, qs, keys, vals, mask, q_offset=start + s0)
                        out[seg] = o.reshape(n * (s1 - s0), tp.heads * D).to(self.dtype)
                    return out

            o = torch.empty(rows, H, dtype=self.dtype, device=self.device)
            handles = layer.o_proj.run(plan, attention_rows, o, comm, rec, "o_proj", tile_streams="one")
            prev.update(handles=handles, out=o, bias=layer.o_bias)
            all_handles += handles

            def mlp_rows(i: int, r0: int, r1: int, layer=layer) -> torch.Tensor:
                x = take_previous(i, r0, r1, layer.post_norm)
                with span(rec, "mlp", i):
                    if fused:
                        from .triton_fused import silu_mul
                        return silu_mul(layer.gate_up(x))
                    return layer.mlp_input(x)

            o = torch.empty(rows, H, dtype=self.dtype, device=self.device)
            handles = layer.down.run(plan, mlp_rows, o, comm, rec, "down_proj", tile_streams="one")
            prev.update(handles=handles, out=o, bias=layer.down_bias)
            all_handles += handles
        for i, (r0, r1) in enumerate(plan.ranges):
            take_previous(i, r0, r1)
        if rec is not None:
            rec.comm(all_handles)
        return h

    # -- the KV cache and decode ---------------------------------------------------------------------------
    def reset_cache(self, batch: int, max_seq_len: Optional[int] = None) -> KVCache:
        """A KV cache for ``batch`` sequences (reused when the size fits)."""
        n = max_seq_len or self.max_seq_len
        if n > self.config.max_position_embeddings:
            raise ValueError(f"max_seq_len {n} exceeds the checkpoint's max_position_embeddings "
                             f"({self.config.max_position_embeddings})")
        c = self.cache
        if c is None or c.batch != batch or c.max_seq_len < n:
            self.cache = None  # free the old one first
            c = self.cache = self._new_cache(batch, n)
            self.rotary.reserve(c.max_seq_len, self.device)
        c.reset()
        return c

    def kv_bytes_per_token(self) -> int:
        """K and V of one position of one sequence, all layers, on this rank."""
        return 2 * len(self.layers) * self.tp.kv_heads * self.tp.head_dim * self.embed.element_size()

    def kv_reserve_bytes(self) -> int:
        """Device memory a KV cache must leave free: a prefill chunk's activations, the streamed host blocks,
        and 2 GiB of slack (allocator, workspaces)."""
        tp, chunk = self.tp, self.prefill_chunk or 8192
        acts = chunk * (6 * self.config.hidden_size + 4 * tp.inter + 4 * (tp.heads + 2 * tp.kv_heads) * tp.head_dim)
        return acts * self.embed.element_size() + 2 * 16384 * self.kv_bytes_per_token() // len(self.layers) + (2 << 30)

    def _new_cache(self, batch: int, n: int):
        from .kv_offload import OffloadPlan, TieredKVCache

        tp = self.tp
        budget = None if self.host_budget_gb is None else int(self.host_budget_gb * (1 << 30))
        plan = OffloadPlan.decide(self.kv_offload, max_seq_len=n, batch=batch, bytes_per_token=self.kv_bytes_per_token(),
                                  device=self.device, host_budget_bytes=budget, reserve_bytes=self.kv_reserve_bytes())
        self.kv_plan = plan
        if not plan.offloaded:
            return KVCache(len(self.layers), batch, n, tp.kv_heads, tp.head_dim, self.dtype, self.device)
        if self.tp.rank == 0:
            import logging
            logging.getLogger("fastattn_dist").warning("%s", plan.describe())
        return TieredKVCache(len(self.layers), batch, n, plan.gpu_tokens, tp.kv_heads, tp.head_dim, self.dtype,
                             self.device)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, lengths=None, tiles=None) -> torch.Tensor:
        """Fill the cache (``reset_cache`` first) with right-padded prompts; logits of each last real token."""
        self._require_weights()
        ids = self._check_ids(input_ids)
        B, S = ids.shape
        c = self.cache
        if c is None or c.batch != B:
            raise ValueError("call reset_cache(batch) before prefill")
        if S > c.max_seq_len:
            raise ValueError(f"the prompt has {S} tokens, more than max_seq_len={c.max_seq_len}")
        lengths = self._check_lengths(lengths, B, S)
        real = lengths if lengths is not None else torch.full((B,), S, device=self.device)
        from .kv_offload import TieredKVCache
        chunk = self.prefill_chunk or (8192 if isinstance(c, TieredKVCache) else S)
        last = torch.empty(B, self.config.hidden_size, dtype=self.dtype, device=self.device)
        for c0 in range(0, S, chunk):  # chunked prefill: activations bounded by the chunk, keys in the cache
            c1 = min(S, c0 + chunk)
            h = self._prefill(ids[:, c0:c1], None if lengths is None else lengths, c, c0, tiles)
            rows = ((real - 1 >= c0) & (real - 1 < c1)).nonzero()[:, 0]  # sequences ending in this chunk
            last[rows] = h.view(B, c1 - c0, -1)[rows, real[rows] - 1 - c0]
        if isinstance(c, TieredKVCache):
            c.set_lengths(real.tolist())
        else:
            c.lengths.copy_(real)
        return self.logits(last)

    @torch.no_grad()
    def decode_step(self, ids: torch.Tensor) -> torch.Tensor:
        """One new token per sequence (``ids`` ``[B]`` on the device): append to the cache; logits ``[B, vocab]``.
        No host sync and no shape change between steps: the step can be captured as a CUDA graph. On GPUs
        the elementwise chains run as fused kernels (triton_fused.py), elsewhere as plain PyTorch."""
        from .kv_offload import TieredKVCache
        if isinstance(self.cache, TieredKVCache):
            return self._decode_step_tiered(ids)
        if self.device.type == "cuda" and self.dtype != torch.float64:
            return self._decode_step_fused(ids)
        c, window = self.cache, self._decode_window()
        kv_len = c.lengths + 1

        def attend(li: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            c.append(li, k, v)
            return decode_attention(q, c.k[li], c.v[li], kv_len, window=window)

        return self._decode_layers(ids, attend)

    def _decode_layers(self, ids: torch.Tensor, attend) -> torch.Tensor:
        """The plain-PyTorch decode step; ``attend(layer, q, k, v)`` stores the new key/value and returns the
        attention output ``[B, 1, heads, D]`` (one cache tier, or two)."""
        cfg, tp, c = self.config, self.tp, self.cache
        B, D = ids.shape[0], tp.head_dim
        pos = c.lengths[:, None]
        h = self.embed_tokens(ids)
        for li, layer in enumerate(self.layers):
            x = rms_norm(h, layer.input_norm, cfg.rms_norm_eps)
            q, k, v = layer.qkv(x).split([tp.heads * D, tp.kv_heads * D, tp.kv_heads * D], dim=-1)
            q = self.rotary.apply(q.view(B, 1, tp.heads, D), pos)
            k = self.rotary.apply(k.view(B, 1, tp.kv_heads, D), pos)
            a = attend(li, q, k, v.reshape(B, 1, tp.kv_heads, D)).reshape(B, tp.heads * D)
            o = self._all_reduce(a @ layer.o_proj.weight.t())
            h = h + (o if layer.o_bias is None else o + layer.o_bias)
            m = layer.mlp_input(rms_norm(h, layer.post_norm, cfg.rms_norm_eps))
            d = self._all_reduce(m @ layer.down.weight.t())
            h = h + (d if layer.down_bias is None else d + layer.down_bias)
        c.lengths.add_(1)
        return self.logits(h)

    def _decode_step_tiered(self, ids: torch.Tensor) -> torch.Tensor:
        """decode_step over a device + host KV cache: each sequence's new key goes to the tier its position falls
        in; attention runs on both tiers and is merged by LSE (kv_offload.py). Not a CUDA graph (host work)."""
        from .kv_offload import tiered_decode_attention

        c, window = self.cache, self._decode_window()
        lens = [n + 1 for n in c.host_lengths]
        if max(lens) > c.max_seq_len:
            raise ValueError(f"the KV cache holds {c.max_seq_len} tokens per sequence: no room for another")

        def attend(li: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            for b, n in enumerate(c.host_lengths):  # sequences sit at different positions
                c.write_block(li, b, b + 1, n, k[b:b + 1], v[b:b + 1])
            return tiered_decode_attention(c, li, q, lens, self.kv_plan.decode_host, window)

        logits = self._decode_layers(ids, attend)
        c.host_lengths = lens
        return logits

    @property
    def decode_step_capturable(self) -> bool:
        """Whether ``decode_step`` on the current cache can be captured as a CUDA graph: not over a host tier
        and not with a sliding window shorter than the cache (both read lengths back to the host)."""
        from .kv_offload import TieredKVCache
        return (self.device.type == "cuda" and self.cache is not None and not isinstance(self.cache, TieredKVCache)
                and self._decode_window() is None)

    def _decode_window(self) -> Optional[int]:
        w = self.config.sliding_window
        return w if w is not None and w < self.cache.max_seq_len else None

    def _decode_step_fused(self, ids: torch.Tensor) -> torch.Tensor:
        """decode_step with the fused kernels: per layer norm+residual, qkv GEMM, RoPE+cache append, attention,
        o_proj GEMM, norm+residual, gate/up GEMM, silu*up, down GEMM (the next layer's norm folded in)."""
        from .triton_fused import add_rms_norm, rope_append, silu_mul

        cfg, tp, c = self.config, self.tp, self.cache
        B, eps = ids.shape[0], cfg.rms_norm_eps
        cos, sin = self.rotary.tables(c.max_seq_len, self.device, torch.float32)
        kv_len = c.lengths + 1
        window = self._decode_window()
        h = self.embed_tokens(ids)
        n = add_rms_norm(h, self.layers[0].input_norm, eps)
        for li, layer in enumerate(self.layers):
            q = rope_append(layer.qkv(n), cos, sin, c.lengths, c.k[li], c.v[li], tp.heads, tp.kv_heads)
            a = decode_attention(q, c.k[li], c.v[li], kv_len, window=window).reshape(B, -1)
            o = self._all_reduce(a @ layer.o_proj.weight.t())
            n = add_rms_norm(h, layer.post_norm, eps, delta=o, bias=layer.o_bias)
            d = self._all_reduce(silu_mul(layer.gate_up(n)) @ layer.down.weight.t())
            last = li + 1 == len(self.layers)
            n = add_rms_norm(h, self.norm if last else self.layers[li + 1].input_norm, eps, delta=d,
                             bias=layer.down_bias)
        c.lengths.add_(1)
        return self._lm_head(n)

    def generate(self, prompts: Union[torch.Tensor, Sequence[Sequence[int]]], max_new_tokens: int, **kwargs) -> List[List[int]]:
        """New token ids per prompt (prompt excluded); see ``models.generate.generate``."""
        from .generate import generate
        return generate(self, prompts, max_new_tokens, **kwargs)
