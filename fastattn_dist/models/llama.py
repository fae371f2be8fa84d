"""A tensor-parallel Llama-family decoder (Llama 2/3, Mistral, Qwen2), composed of the block's parallel layers.

Megatron-style TP over a comm path: each decoder layer (layers.py) holds the block's attention sublayer
(``TPAttention``: fused column-parallel q/k/v, RoPE, KV sink, tiled row-parallel o_proj) and an MLP sublayer
(column-parallel gate/up, tiled row-parallel down); the embedding and the LM head are vocabulary-parallel
(parallel/layers.py). Every collective goes through one ``CommPath`` (parallel/comm.py): the process group's
(NCCL, gloo), the copy-engine path, or the GPU stand-in, which makes this process rank 0 of an emulated TP=N
group (``comm=StandInAllReduce(N)``): that rank's shard, on one GPU.

Prefill runs the sublayer chain (prefill.py): tiles flow through every sublayer, so a prefill leaves about one
tile's all-reduce exposed. Decode runs the strategy chosen when the cache is made (decode.py).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import nn

from ..attention import PRECISIONS
from ..block import check_tiles
from ..lru import LRUCache
from ..masks import Mask
from ..parallel.comm import CommPath, group_world_rank
from ..parallel.comm_paths import COMM_PATHS, make_comm
from ..parallel.layers import TileStreams, VocabParallelEmbedding, VocabParallelLMHead
from ..parallel.link_models import LinkModel
from ..parallel.sharding import TPShape
from ..parallel.tile_plan import TilePlan
from ..recorder import BLOCK, span
from ..rope import Rotary
from ..tuning.cost_model import LayerCost, TilePlanOptions, choose_stack_plan, fixed_plan, profile_for
from ..tuning.measured import lookup_model_plan, model_key
from .checkpoint import Checkpoint
from .config import LlamaConfig
from .decode import decode_strategy
from .generate import generate
from .hf_weights import load_checkpoint
from .inputs import check_ids, check_lengths, check_positive_int
from .kv_cache import KV_DTYPES, Int8KVCache, KVCache
from .kv_offload import TieredKVCache, log_offload_plan
from .layers import DecoderLayer, rms_norm
from .offload_plan import GIB, CacheSizing, OffloadPlan, check_gpu_budget
from .prefill import SCHEDULES, SublayerChain, attention_step, mlp_step

MAX_PLANS = 64
DEFAULT_MAX_SEQ_LEN = 4096  # the cache's length unless asked (generate grows it to fit prompt + new tokens)


def _elem_bytes(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _check_gpu_budget_gb(value, device: torch.device) -> Optional[float]:
    """``gpu_budget_gb`` is None or a finite number > 0, on a GPU model."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < float("inf")):
        raise ValueError(f"gpu_budget_gb must be a finite number > 0, got {value!r}")
    if device.type != "cuda":
        raise ValueError(f"gpu_budget_gb caps a GPU's memory: this model is on {device.type}")
    return float(value)


def model_shape(config: LlamaConfig, world: int, rank: int) -> TPShape:
    """This rank's shard shape of ``config`` (divisibility checked, with the config's names in the errors)."""
    return TPShape.checked(config.hidden_size, config.num_attention_heads, config.num_key_value_heads, world, rank,
                           head_dim=config.head_dim, intermediate_size=config.intermediate_size,
                           vocab_size=config.vocab_size)


def check_quantization(attn_precision: str, kv_dtype: Optional[str], kv_offload) -> None:
    """``attn_precision`` and ``kv_dtype`` are known values and go with ``kv_offload`` (one-line ValueErrors; the
    attention backend and device are checked by the layers' TPAttention)."""
    if attn_precision not in PRECISIONS:
        raise ValueError(f"attn_precision must be one of {', '.join(PRECISIONS)}, got {attn_precision!r}")
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be None (the model's dtype) or 'int8', got {kv_dtype!r}")
    if kv_offload != "off" and (attn_precision != "bf16" or kv_dtype is not None):
        raise ValueError("8-bit attention and the int8 KV cache do not go with a host tier yet: use kv_offload='off'")


class LlamaForCausalLM(nn.Module):
    """The TP decoder; see the module docstring. Build it with ``from_pretrained`` (or construct it, then ``load``
    a checkpoint or ``init_random_weights``: it refuses to compute before).

    ``tiles``: tile count of every sublayer's tiling-AllReduce in prefill, or "auto" (the cost model).
    ``comm``: "nccl" (the process group's all-reduce, gloo on CPU ranks), "copy_engine", or a comm object.
    ``max_seq_len``: the KV cache's length (default: the checkpoint's max_position_embeddings, capped at 4096).
    ``kv_offload``: "off", "auto" or a number of device tokens (kv_offload.py); ``prefill_chunk``: prefill in
    chunks of this many tokens (default: whole prompts, or the plan's chunk where the cache needs one: the cost
    model's choice with a host tier). ``host_budget_gb``: host memory the cache's host tier may take (default 80%
    of what is available, shared by the node's ranks); ``gpu_budget_gb``: the device memory this rank may use in
    all (weights, activations, cache), so a large GPU stands in for a smaller one. ``prefill_schedule``: how a
    tiled prefill's tiles share a GPU (prefill.py): "wavefront" (each tile on its own stream, issued by
    anti-diagonals), "one" (one stream), or "auto" (default: wavefront on GPUs). ``attn_precision``: "bf16"
    (default: no quantization) or "int8" / "fp8" / "int8-fp8", the prefill's attention through the 8-bit kernels
    (block.py, kv.py). ``kv_dtype``: None (the model's dtype) or "int8", the KV cache in int8 with per-token
    scales (kv_cache.py): about half the bytes per decode step. Neither goes with a host tier (``kv_offload``).
    """

    def __init__(self, config: LlamaConfig, *, dtype: Optional[torch.dtype] = None,
                 device: Optional[torch.device] = None, group=None, tiles="auto", max_seq_len: Optional[int] = None,
                 comm: Union[str, CommPath] = "nccl", link: Optional[LinkModel] = None, attn_backend: str = "auto",
                 kv_offload="off", host_budget_gb: Optional[float] = None, prefill_chunk: Optional[int] = None,
                 prefill_schedule: str = "auto", attn_precision: str = "bf16", kv_dtype: Optional[str] = None,
                 gpu_budget_gb: Optional[float] = None) -> None:
        super().__init__()
        if not isinstance(config, LlamaConfig):
            raise TypeError(f"config must be a LlamaConfig, got {type(config).__name__}")
        dtype = dtype or torch.float32
        device = torch.device(device) if device is not None else torch.device("cpu")
        if isinstance(comm, str) and comm not in COMM_PATHS:
            raise ValueError(f"comm must be one of {COMM_PATHS} or a comm object, got {comm!r}")
        if not isinstance(comm, (str, CommPath)):
            raise TypeError(f"comm must be one of {COMM_PATHS} or a comm object, got {type(comm).__name__}")
        world, rank = group_world_rank(group) if isinstance(comm, str) else (comm.world_size, comm.rank)
        self.config, self.group, self.dtype, self.device, self.link = config, group, dtype, device, link
        self.shape = model_shape(config, world, rank)
        self.tiles = check_tiles(tiles)
        self.max_seq_len = min(config.max_position_embeddings, DEFAULT_MAX_SEQ_LEN) if max_seq_len is None else \
            check_positive_int("max_seq_len", max_seq_len)
        self.gpu_budget_gb = _check_gpu_budget_gb(gpu_budget_gb, device)
        if gpu_budget_gb is not None:  # before any weight is allocated
            check_gpu_budget(CacheSizing.of(config, self.shape, _elem_bytes(dtype)), 1, int(gpu_budget_gb * GIB))
        self.comm = make_comm(comm, group, device, link) if isinstance(comm, str) else comm
        self.attn_backend, self.attn_precision, self.kv_dtype = attn_backend, attn_precision, kv_dtype
        check_quantization(attn_precision, kv_dtype, kv_offload)
        kw = {"dtype": dtype, "device": device}
        self.rotary = Rotary(config.head_dim, config.rope_theta, config.rope_scaling)
        self.embed = VocabParallelEmbedding(self.shape, **kw)
        self.layers = nn.ModuleList(DecoderLayer(config, self.shape, self.comm, self.rotary, attn_backend, dtype,
                                                 device, attn_precision) for _ in range(config.num_hidden_layers))
        self.norm = nn.Parameter(torch.ones(config.hidden_size, **kw), requires_grad=False)
        self.lm_head = VocabParallelLMHead(self.shape, self.embed.weight if config.tie_word_embeddings else None, **kw)
        if prefill_chunk is not None:
            check_positive_int("prefill_chunk", prefill_chunk)
        self.kv_offload, self.host_budget_gb, self.prefill_chunk = kv_offload, host_budget_gb, prefill_chunk
        if prefill_schedule not in ("auto",) + SCHEDULES:
            raise ValueError(f"prefill_schedule must be 'auto' or one of {SCHEDULES}, got {prefill_schedule!r}")
        self.prefill_schedule = ("wavefront" if device.type == "cuda" else "one") if prefill_schedule == "auto" \
            else prefill_schedule
        self._tile_streams = TileStreams(device) if device.type == "cuda" else None
        self.kv_plan: Optional[OffloadPlan] = None  # where the current cache lives
        self.cache: Optional[Union[KVCache, TieredKVCache]] = None
        self._decode = None  # the decode strategy of the current cache (decode.py)
        self.recorder = None
        self.last_plan: Optional[TilePlan] = None
        self._plans = LRUCache(MAX_PLANS)
        self._scratch = None

    # -- weights ------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, *, dtype: Optional[torch.dtype] = None, device=None, group=None,
                        tiles="auto", max_seq_len: Optional[int] = None, **kwargs) -> "LlamaForCausalLM":
        """Read a Hugging Face checkpoint directory; each rank reads only its own slices (safetensors)."""
        ckpt = Checkpoint(path)
        ckpt.check_complete()
        if dtype is None:
            dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(ckpt.config.torch_dtype or "",
                                                                             torch.float32)
        model = cls(ckpt.config, dtype=dtype, device=device, group=group, tiles=tiles, max_seq_len=max_seq_len,
                    **kwargs)
        model.load(ckpt)
        return model

    def load(self, ckpt) -> None:
        """Copy this rank's slices of ``ckpt``'s tensors in (nothing else is read)."""
        load_checkpoint(self, ckpt)

    @torch.no_grad()
    def init_random_weights(self, seed: int = 0) -> None:
        """Random weights in place (N(0, 0.02), norms 1, biases 0): a model shape to time without a checkpoint.
        Each rank draws its own slices from (``seed``, its rank), so a rank's shard depends only on the seed, the
        world size and the rank: an emulated rank 0 of TP=N holds what rank 0 of a real TP=N run holds."""
        g = torch.Generator(device=self.device).manual_seed(seed + 1000 * self.shape.rank)
        self.embed.init_random(g)
        if not self.lm_head.tied:
            self.lm_head.weight.normal_(0.0, 0.02, generator=g)
        for layer in self.layers:
            for lin in layer.linears:
                lin.init_random(g)

    @property
    def has_weights(self) -> bool:
        return self.embed.loaded and all(lin.loaded for layer in self.layers for lin in layer.linears)

    def _require_weights(self) -> None:
        if not self.has_weights:
            raise ValueError("the model has no weights yet: build it with LlamaForCausalLM.from_pretrained(path), or "
                             "call load(checkpoint) or init_random_weights(seed) first")

    def swap_comm(self, comm: CommPath) -> CommPath:
        """Run later calls through ``comm`` (the same group: world size and rank); returns the previous path. The
        benchmark times one shard with the stand-in and with comm off (``NoComm``) this way."""
        if (comm.world_size, comm.rank) != (self.shape.world_size, self.shape.rank):
            raise ValueError(f"a comm path of world size {comm.world_size} rank {comm.rank} for a shard of rank "
                             f"{self.shape.rank} of {self.shape.world_size}")
        prev, self.comm = self.comm, comm
        return prev

    # -- vocabulary-parallel embedding and LM head ------------------------------------------------------------
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids`` ``[N]`` -> ``[N, hidden]`` on every rank."""
        return self.embed(ids, self.comm)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head of rows ``h`` ``[N, hidden]`` -> ``[N, vocab]`` float32 on every rank."""
        return self.lm_head(rms_norm(h, self.norm, self.config.rms_norm_eps), self.comm)

    # -- prefill --------------------------------------------------------------------------------------
    def plan_for(self, batch: int, seq: int, tiles=None) -> TilePlan:
        """The tile plan of a prefill of ``batch`` x ``seq`` rows (the sublayer chain's cost model)."""
        tiles = self.tiles if tiles is None else check_tiles(tiles)
        key = (batch, seq, tiles)
        plan = self._plans.get(key)
        if plan is None:
            s = self.shape
            cost = LayerCost(batch, seq, s.hidden_size, s.local_heads, s.head_dim, s.world_size,
                             self.embed.weight.element_size(), kv_heads=s.local_kv_heads,
                             intermediate=s.local_intermediate)
            prof, mask = profile_for(self.device), Mask(True, None, None)
            measured = None if tiles != "auto" else lookup_model_plan(self.device, self.tuned_key(batch, seq))
            if isinstance(tiles, TilePlan):
                plan = tiles
            elif measured is not None:  # plans tune --model timed with this comm path: the fastest
                plan = TilePlan(measured)
            elif tiles == "auto":
                plan = choose_stack_plan(cost, mask, len(self.layers), profile=prof, link=self.link,
                                         comm_model=self.comm.model).plan
            else:
                plan = fixed_plan(cost, mask, tiles, profile=prof, options=TilePlanOptions())
            self._plans.put(key, plan)
        return plan

    def tuned_key(self, batch: int, seq: int) -> str:
        """The key of this shard's prompt shape in the tuned profile (``fastattn-dist tune --model``)."""
        return model_key(self.device, self.shape, self.embed.weight.element_size(), batch, seq, self.comm,
                         self.prefill_schedule)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, *, lengths=None, tiles=None, last_only: bool = False) -> torch.Tensor:
        """Logits ``[B, S, vocab]`` (float32, on every rank) of ``input_ids`` ``[B, S]``; no cache is kept.
        ``lengths``: real lengths of right-padded prompts. ``last_only``: only each sequence's last real
        position, ``[B, vocab]``."""
        self._require_weights()
        ids = check_ids(input_ids, self.config.vocab_size, self.device)
        B, S = ids.shape
        if S > self.max_seq_len:
            raise ValueError(f"the prompt has {S} tokens, more than max_seq_len={self.max_seq_len}")
        lengths = check_lengths(lengths, B, S, self.device)
        waves = self.prefill_schedule == "wavefront" and self.plan_for(B, S, tiles).num_tiles > 1
        h = self._prefill(ids, lengths, self._scratch_kv(B, S, per_layer=waves), 0, tiles)
        if not last_only:
            return self.logits(h).view(B, S, -1)
        last = (lengths if lengths is not None else torch.full((B,), S, dtype=torch.int64)).to(h.device) - 1
        return self.logits(h[torch.arange(B, device=h.device) * S + last])

    def _scratch_kv(self, batch: int, seq: int, per_layer: bool = False) -> KVCache:
        """Keys/values for a forward without a cache, kept for the next call of the same shape. Layers that run one
        after another each read only their own, so every layer shares one layer's buffers; a wavefront prefill
        (tiles of different layers at once) needs one per layer."""
        s, key = self.shape, (batch, seq, self.dtype, per_layer)
        if self._scratch is None or self._scratch[0] != key:
            self._scratch = None  # free the old one first
            make = KVCache.empty if per_layer else KVCache.shared_layers
            self._scratch = (key, make(len(self.layers), batch, seq, s.local_kv_heads, s.head_dim, self.dtype,
                                       self.device))
        return self._scratch[1]

    def _prefill(self, ids: torch.Tensor, lengths: Optional[torch.Tensor], kv, start: int, tiles) -> torch.Tensor:
        """Every layer over ``ids`` ``[B, S]`` at positions start.., keys and values into ``kv``; returns the final
        residual stream ``[B * S, hidden]``. Sublayers run tile by tile (prefill.py)."""
        B, S = ids.shape
        rec, window = self.recorder, self.config.sliding_window
        plan = self.last_plan = self.plan_for(B, S, tiles)
        mask = Mask(True, window if window is not None and window < start + S else None, lengths)
        self.rotary.reserve(start + S, self.device, self.dtype)  # device positions are never read back
        positions = torch.arange(start + S, device=self.device)
        sinks = [kv.layer(li, self.kv_plan.prefill_host) if isinstance(kv, TieredKVCache) else
                 self.layers[li].attn.sink_for(kv.layer(li)) for li in range(len(self.layers))]
        steps = [step for li, layer in enumerate(self.layers)
                 for step in (attention_step(layer, sinks[li], S, start, positions, mask, rec), mlp_step(layer, rec))]
        self.comm.enable_timing(rec is not None)
        with span(rec, "block", -1, BLOCK):  # the profiler's unit: one prefill
            with span(rec, "embed"):
                h = self.embed_tokens(ids.reshape(-1))
            chain = SublayerChain(self.comm, self.config.rms_norm_eps, rec, self._tile_streams, self.prefill_schedule)
            handles = chain.run(h, plan, steps)
        if rec is not None:
            rec.comm(handles)
        return h

    # -- the KV cache, prefill into it, decode ---------------------------------------------------------------
    @property
    def kv_offload(self):
        return self._kv_offload

    @kv_offload.setter
    def kv_offload(self, mode) -> None:
        """Checked whenever set (8-bit attention and the int8 cache take no host tier yet; "auto" needs a GPU)."""
        check_quantization(self.attn_precision, self.kv_dtype, mode)
        OffloadPlan.check_mode(mode, self.device)
        self._kv_offload = mode

    def reset_cache(self, batch: int, max_seq_len: Optional[int] = None):
        """A KV cache for ``batch`` sequences (reused when the size fits), and the decode strategy for it."""
        n = max_seq_len or self.max_seq_len
        if n > self.config.max_position_embeddings:
            raise ValueError(f"max_seq_len {n} exceeds the checkpoint's max_position_embeddings "
                             f"({self.config.max_position_embeddings})")
        c = self.cache
        if c is None or c.batch != batch or c.max_seq_len < n:
            self.drop_cache()  # free the old one first
            c = self.cache = _new_cache(self, batch, n)
            self.rotary.reserve(c.max_seq_len, self.device)
            self._decode = decode_strategy(self)
        c.reset()
        return c

    def drop_cache(self) -> None:
        """Give the cache's memory back, once its copies (a host tier's streams) have finished with it."""
        getattr(self.cache, "close", lambda: None)()
        self.cache = None

    def kv_bytes_per_token(self) -> int:
        return self.kv_sizing().bytes_per_token

    def kv_sizing(self) -> CacheSizing:
        """This rank's sizes that plan a cache (offload_plan.py)."""
        return CacheSizing.of(self.config, self.shape, self.embed.weight.element_size(), kv_dtype=self.kv_dtype)

    def kv_budgets(self) -> dict:
        """The budgets as OffloadPlan.decide and longest_context take them (bytes, None: the default)."""
        return {"host_budget_bytes": None if self.host_budget_gb is None else int(self.host_budget_gb * GIB),
                "gpu_budget_bytes": None if self.gpu_budget_gb is None else int(self.gpu_budget_gb * GIB)}

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, lengths=None, tiles=None) -> torch.Tensor:
        """Fill the cache (``reset_cache`` first) with right-padded prompts; logits of each last real token."""
        self._require_weights()
        ids = check_ids(input_ids, self.config.vocab_size, self.device)
        B, S = ids.shape
        c = self.cache
        if c is None or c.batch != B:
            raise ValueError("call reset_cache(batch) before prefill")
        if S > c.max_seq_len:
            raise ValueError(f"the prompt has {S} tokens, more than max_seq_len={c.max_seq_len}")
        lengths = check_lengths(lengths, B, S, self.device)
        real = lengths if lengths is not None else torch.full((B,), S, device=self.device)
        tiered = isinstance(c, TieredKVCache)
        chunk = self.prefill_chunk or (self.kv_plan.prefill_chunk if self.kv_plan is not None else 0) or S
        last = torch.empty(B, self.config.hidden_size, dtype=self.dtype, device=self.device)
        for c0 in range(0, S, chunk):  # chunked prefill: activations bounded by the chunk, keys in the cache
            c1 = min(S, c0 + chunk)
            h = self._prefill(ids[:, c0:c1], lengths, c, c0, tiles)
            rows = ((real - 1 >= c0) & (real - 1 < c1)).nonzero()[:, 0]  # sequences ending in this chunk
            last[rows] = h.view(B, c1 - c0, -1)[rows, real[rows] - 1 - c0]
        if tiered:
            c.set_lengths(real.tolist())
        else:
            c.lengths.copy_(real)
        return self.logits(last)

    @torch.no_grad()
    def decode_step(self, ids: torch.Tensor) -> torch.Tensor:
        """One new token per sequence (``ids`` ``[B]`` on the device): append to the cache; logits ``[B, vocab]``.
        On a GPU with one cache tier: no host sync and no shape change between steps (a CUDA graph can replay it)."""
        if self._decode is None:
            raise ValueError("call reset_cache(batch) and prefill before decode_step")
        return self._decode(ids)

    @property
    def decode_step_capturable(self) -> bool:
        """Whether ``decode_step`` on the current cache can be captured as a CUDA graph: on a GPU, not over a host
        tier and not with a sliding window shorter than the cache (both read lengths back to the host)."""
        return self.device.type == "cuda" and self._decode is not None and self._decode.capturable

    def generate(self, prompts: Union[torch.Tensor, Sequence[Sequence[int]]], max_new_tokens: int,
                 **kwargs) -> List[List[int]]:
        """New token ids per prompt (prompt excluded); see ``models.generate.generate``."""
        return generate(self, prompts, max_new_tokens, **kwargs)


def _new_cache(model: "LlamaForCausalLM", batch: int, n: int):
    """The cache the plan decides for ``batch`` sequences of ``n`` positions: one tier (16-bit or int8), or two."""
    s = model.shape
    plan = model.kv_plan = OffloadPlan.decide(model.kv_offload, max_seq_len=n, batch=batch, sizing=model.kv_sizing(),
                                             device=model.device, prefill_chunk=model.prefill_chunk,
                                             **model.kv_budgets())
    if not plan.offloaded:
        cls = Int8KVCache if model.kv_dtype == "int8" else KVCache
        return cls(len(model.layers), batch, n, s.local_kv_heads, s.head_dim, model.dtype, model.device)
    if s.rank == 0:
        log_offload_plan(plan)
    return TieredKVCache(len(model.layers), batch, n, plan.gpu_tokens, s.local_kv_heads, s.head_dim, model.dtype,
                         model.device, block_tokens=plan.host_block_tokens, unit_blocks=plan.stream_unit_blocks)
