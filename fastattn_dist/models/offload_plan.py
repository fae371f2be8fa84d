"""Where a two-tier KV cache puts its tokens and how it reads its host tier: sizes, measured rates, the plan.

Everything here is arithmetic on sizes (and, once per process, a few milliseconds of measured rates): a plan is
decided, and a request that cannot fit refused with the sizes involved, before any large allocation.

* ``CacheSizing``: this rank's bytes per token, one prefill chunk's activations, the streaming buffers, the
  weights; from the model's shard shape alone.
* ``OffloadPlan.decide``: the split (device tokens, host tokens), the prefill chunk (the cost model's choice:
  a larger chunk streams the host tier fewer times per token, a smaller one leaves more device memory for the
  cache), and the decode split of the host tier between the CPU and the copy engine (``decode_cpu_share``,
  from rates measured with both running at once, so that both finish together).
* ``longest_context``: the longest context ``decide`` accepts for a mode and budgets (``bench-model --context
  max``), computed from the same sizes, so it refuses nothing it could hold and allocates nothing it cannot.
* ``device_free_bytes``: free device memory, capped by a GPU budget (a large GPU standing in for a smaller one).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

from ..attention.host_decode import compiled_kernel, host_decode_attention
from ..attention.int8_kv import Int8KV
from ..parallel.process_group import local_ranks
from ..tuning.cost_model import DeviceProfile, profile_for
from .host_tier import HostArena

GIB = 1 << 30
DEFAULT_PREFILL_CHUNK = 8192   # prefill chunk with a host tier where no cost model applies (CPU-only runs)
CHUNK_CANDIDATES = (2048, 4096, 8192, 16384, 32768, 65536)   # chunks the cost model compares
HOST_BLOCK_TOKENS = 1024       # positions per host block (each head's keys of a block are one contiguous run)
STREAM_BLOCK_TOKENS = 16384    # positions per streamed unit (one copy of a block range)
STREAM_SLOTS = 3               # device slots for streamed units: later units and layers copy while one is read
PREFILL_STAGING_UNITS = 2      # transposed units a prefill chunk holds while attending them
ALLOCATOR_SLACK_BYTES = 2 * GIB  # kept free beside the cache: allocator fragmentation, library workspaces
CHUNK_OVERHEAD_S = 300e-6      # per chunk and layer: its extra kernels and merges (cost model)
DEFAULT_PCIE_GBPS = 25.0       # host -> device rate the cost model assumes before one is measured


def kv_bytes_per_token(shape, num_layers: int, elem_bytes: int) -> int:
    """K and V of one position of one sequence, all layers, on this rank (``shape``: the model's TPShape)."""
    return 2 * num_layers * shape.local_kv_heads * shape.head_dim * elem_bytes


@dataclass(frozen=True)
class CacheSizing:
    """The sizes of one rank's model that decide a cache's split; no tensor is allocated from them."""

    layers: int
    kv_heads: int             # this rank's
    q_heads: int
    head_dim: int
    hidden: int
    intermediate: int         # this rank's
    elem_bytes: int
    weight_bytes: int = 0     # this rank's weights (the GPU budget holds them first)
    window: Optional[int] = None
    kv_dtype: Optional[str] = None  # None: K/V in the model's dtype; "int8": attention/int8_kv.py's format

    @classmethod
    def of(cls, config, shape, elem_bytes: int, kv_dtype: Optional[str] = None) -> "CacheSizing":
        window = config.sliding_window
        return cls(config.num_hidden_layers, shape.local_kv_heads, shape.local_heads, shape.head_dim,
                   shape.hidden_size, shape.local_intermediate, elem_bytes, weight_bytes(config, shape, elem_bytes),
                   window, kv_dtype)

    @classmethod
    def flat(cls, bytes_per_token: int) -> "CacheSizing":
        """Only a size per token (tests of the split alone): no activations, no streaming buffers, no slack."""
        if bytes_per_token < 2 or bytes_per_token % 2:
            raise ValueError(f"bytes_per_token must be an even number >= 2 (K and V), got {bytes_per_token}")
        return cls(1, 1, 1, bytes_per_token // 2, 0, 0, 1)

    @property
    def bytes_per_token(self) -> int:
        if self.kv_dtype == "int8":
            return self.layers * Int8KV.bytes_per_token(self.kv_heads, self.head_dim)
        return 2 * self.layers * self.kv_heads * self.head_dim * self.elem_bytes

    @property
    def layer_bytes_per_token(self) -> int:
        return self.bytes_per_token // self.layers

    @property
    def gemm_flops_per_token(self) -> float:
        """Per layer: this rank's q/k/v, o_proj, gate/up and down GEMMs."""
        qkv = (self.q_heads + 2 * self.kv_heads) * self.head_dim
        return 2.0 * self.hidden * (qkv + self.q_heads * self.head_dim + 3 * self.intermediate)

    def activation_bytes(self, rows: int) -> int:
        """A prefill of ``rows`` token rows: the residual stream, a sublayer's output and its normalised input, q/k/v,
        the MLP's gate/up and activation (model dtype), and the fp32 accumulators of merged attention partials."""
        if self.hidden <= 0:
            return 0
        qkv = (self.q_heads + 2 * self.kv_heads) * self.head_dim
        per_row = (6 * self.hidden + 4 * self.intermediate + 4 * qkv) * self.elem_bytes + 8 * self.q_heads * self.head_dim
        return rows * per_row

    def stream_bytes(self, batch: int) -> int:
        """The streamed units' device slots and a prefill's transposed units (one layer's worth each)."""
        if self.hidden <= 0:
            return 0
        return (STREAM_SLOTS + PREFILL_STAGING_UNITS) * STREAM_BLOCK_TOKENS * batch * self.layer_bytes_per_token

    def reserve_bytes(self, rows: int, batch: int, host_tier: bool) -> int:
        """Device memory a cache must leave free: activations of ``rows`` prefill rows, the streaming buffers when
        there is a host tier, the allocator's slack."""
        slack = ALLOCATOR_SLACK_BYTES if self.hidden > 0 else 0
        return self.activation_bytes(rows) + (self.stream_bytes(batch) if host_tier else 0) + slack


def weight_bytes(config, shape, elem_bytes: int) -> int:
    """This rank's parameters in bytes, from the config and the shard shape (what the model will allocate)."""
    h, D, Hl, Hkv = shape.hidden_size, shape.head_dim, shape.local_heads, shape.local_kv_heads
    qkv = (Hl + 2 * Hkv) * D
    per_layer = h * qkv + Hl * D * h + 3 * h * shape.local_intermediate + 2 * h
    per_layer += (qkv if config.attention_bias else 0) + (h if config.o_bias else 0)
    per_layer += (2 * shape.local_intermediate + h) if config.mlp_bias else 0
    vocab = shape.local_vocab * h
    return elem_bytes * (config.num_hidden_layers * per_layer + vocab * (1 if config.tie_word_embeddings else 2) + h)


def host_memory_bytes() -> int:
    """Memory available to this process now (MemAvailable), or 0 when it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def default_host_budget(ranks_here: Optional[int] = None) -> int:
    """80% of the host memory available now, shared by the ranks of this node (``ranks_here``, default: as the
    launcher says)."""
    return int(0.8 * host_memory_bytes()) // (ranks_here or local_ranks())


def device_free_bytes(device: torch.device, gpu_budget_bytes: Optional[int] = None) -> Optional[int]:
    """Device memory this process may still use (free, plus what the caching allocator holds unused), capped by
    ``gpu_budget_bytes`` less what is in use (weights, the CUDA context): a large GPU standing in for a smaller one.
    None off CUDA (a CPU "device tier" has no limit of its own)."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    avail = free + cached
    if gpu_budget_bytes is not None:
        avail = min(avail, gpu_budget_bytes - (total - avail))
    return max(0, avail)


def check_gpu_budget(sizing: CacheSizing, batch: int, gpu_budget_bytes: int) -> None:
    """Raise ValueError, naming the sizes, when a GPU budget cannot hold this rank's weights and the smallest
    prefill chunk's activations (checked before the weights are allocated)."""
    need = sizing.weight_bytes + sizing.reserve_bytes(batch * CHUNK_CANDIDATES[0], batch, True)
    if need > gpu_budget_bytes:
        raise ValueError(f"a GPU budget of {gpu_budget_bytes / GIB:.1f} GiB cannot hold this rank's weights "
                         f"({sizing.weight_bytes / GIB:.1f} GiB) and one prefill chunk's activations with the "
                         f"streaming buffers ({(need - sizing.weight_bytes) / GIB:.1f} GiB): raise --gpu-budget-gb "
                         "or use more ranks")


def check_request(mode, context: int, batch: int, sizing: CacheSizing, host_budget_bytes: Optional[int] = None,
                  gpu_budget_bytes: Optional[int] = None) -> None:
    """What sizes alone decide before any rank starts (the CLIs): the GPU budget holds the weights, and the cache
    of ``context`` tokens fits: one tier beside the smallest prefill chunk within the GPU budget, or a host tier
    beside the device tokens asked for (or the most a GPU budget leaves) within the host budget. Raises
    ValueError naming the sizes; what depends on the GPU's free memory is decided on the rank."""
    per_token = batch * sizing.bytes_per_token
    room = None
    if gpu_budget_bytes is not None:
        check_gpu_budget(sizing, batch, gpu_budget_bytes)
        room = gpu_budget_bytes - sizing.weight_bytes
    if mode == "off" or (mode != "auto" and mode >= context):
        if room is not None and one_tier_chunk(sizing, batch, context, room) is None:
            raise ValueError(f"the KV cache of {context} tokens needs {context * per_token / GIB:.1f} GiB on the "
                             f"device, more than the GPU budget of {gpu_budget_bytes / GIB:.1f} GiB leaves beside "
                             f"the weights ({sizing.weight_bytes / GIB:.1f} GiB) and the prefill's activations")
        return
    if mode == "auto" and room is None:
        return  # the GPU's free memory decides, on the rank
    g = min(mode, context) if mode != "auto" else _device_fit(sizing, batch, room, CHUNK_CANDIDATES[0])
    if g < context:
        _check_host(sizing, batch, context, g, host_budget_bytes)


# -- rates ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HostRates:
    """Rates of reading the host tier, GB/s of K/V: by the copy engine (pinned host -> device) and by the CPU decode
    kernel, each alone and both at once (they share host memory's bandwidth)."""

    pcie_gbps: float = 0.0
    cpu_gbps: float = 0.0
    pcie_both_gbps: float = 0.0
    cpu_both_gbps: float = 0.0
    threads: int = 1

    def cpu_share(self) -> float:
        """The share of host keys the CPU attends so that it and the copy engine finish together."""
        pcie, cpu = (self.pcie_both_gbps, self.cpu_both_gbps) if self.pcie_both_gbps > 0 else \
            (self.pcie_gbps, self.cpu_gbps)
        if pcie <= 0:
            return 1.0
        return cpu / (cpu + pcie) if cpu > 0 else 0.0


_RATES: dict = {}  # device -> measured rates: a cache made again later does not measure again


def cpu_threads() -> int:
    """CPU threads one rank's host-tier attention uses: torch's, shared by the ranks of this node."""
    return max(1, torch.get_num_threads() // local_ranks())


def measure_rates(device: torch.device, mb: Optional[int] = None) -> HostRates:
    """The rates of ``HostRates``, measured once per process and device (tens of milliseconds; the first call
    also builds the CPU decode kernel, so no decode step waits for it)."""
    key = str(device)
    if key not in _RATES:
        _RATES[key] = _measure_rates(device, mb)
    return _RATES[key]


def _cpu_probe(mb: int, threads: int):
    """A callable attending one query per head to ``mb`` MiB of bf16 K/V (8 kv heads, head-major), and its bytes."""
    H, D = 8, 128
    L = max(64, (mb << 20) // (2 * H * D * 2))
    k, v = torch.randn(1, H, L, D).to(torch.bfloat16), torch.randn(1, H, L, D).to(torch.bfloat16)  # two: V must
    q = torch.randn(1, 1, 4 * H, D).to(torch.bfloat16)                                               # not hit K's cache
    return (lambda: host_decode_attention(q, k, v, layout="bhtd", threads=threads)), 2 * k.numel() * k.element_size()


def _rate(fn, nbytes: int, runs: int = 3) -> float:
    """GB/s of the fastest of ``runs`` timed calls after one untimed (a busy machine slows some calls, none speeds one)."""
    fn()
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return nbytes / max(best, 1e-9) / 1e9


def _measure_rates(device: torch.device, mb: Optional[int] = None) -> HostRates:
    threads = cpu_threads()
    compiled_kernel()  # built (or loaded) now, at plan time
    mb = mb or (256 if device.type == "cuda" else 16)
    probe, probe_bytes = _cpu_probe(mb, threads)
    cpu = _rate(probe, probe_bytes)
    if device.type != "cuda":
        return HostRates(0.0, cpu, 0.0, cpu, threads)
    # pinned by registering a buffer of our own, unregistered when it goes: torch's pinned allocator would keep
    # the block cached for the life of the process
    arena = HostArena(4 * mb << 20, pin=True)
    src = arena.take((4 * mb << 20,), torch.uint8)
    dst = torch.empty_like(src, device=device)
    side = torch.cuda.Stream(device)
    pcie = _copy_rate(src[:mb << 20], dst[:mb << 20], side)
    # both at once: one long copy on the side stream while the CPU attends until it ends
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(side):
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
    t0, done = time.perf_counter(), 0
    while not end.query() or done == 0:
        probe()
        done += probe_bytes
    cpu_both = done / (time.perf_counter() - t0) / 1e9
    end.synchronize()
    pcie_both = src.numel() / (start.elapsed_time(end) / 1e3) / 1e9
    del src, dst, arena
    return HostRates(pcie, cpu, pcie_both, cpu_both, threads)


def _copy_rate(src: torch.Tensor, dst: torch.Tensor, stream) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        dst.copy_(src, non_blocking=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
    end.synchronize()
    return src.numel() / (start.elapsed_time(end) / 1e3) / 1e9


# -- the prefill cost model ------------------------------------------------------------------------------------
def prefill_seconds(sizing: CacheSizing, batch: int, context: int, gpu_tokens: int, chunk: int, pcie_gbps: float,
                    profile: DeviceProfile) -> float:
    """Predicted prefill of ``context`` tokens in chunks of ``chunk`` with ``gpu_tokens`` on the device: per chunk and
    layer the longer of its compute (GEMMs and attention at the profile's rates) and the streaming of the host
    keys before it (re-read once per chunk), which overlap, plus a fixed cost per chunk."""
    total, D, W = 0.0, sizing.head_dim, sizing.window
    gemm = sizing.gemm_flops_per_token / profile.gemm_flops
    attn = 4.0 * sizing.q_heads * D / profile.attn_flops
    per_key = sizing.layer_bytes_per_token / (max(pcie_gbps, 1e-3) * 1e9)
    for p0 in range(0, context, chunk):
        c = min(chunk, context - p0)
        visible = p0 + c / 2 if W is None else min(W, p0 + c / 2)
        compute = batch * c * (gemm + attn * visible)
        lo = gpu_tokens if W is None else max(gpu_tokens, p0 - W)
        stream = batch * max(0, p0 - lo) * per_key
        total += max(compute, stream) + CHUNK_OVERHEAD_S
    return total * sizing.layers


def host_block_tokens(host_tokens: int) -> int:
    """Positions per host block: HOST_BLOCK_TOKENS, smaller for a short host tier (about 8 blocks at least, so a
    short tier wastes little to the last block's padding and small caches still cross block boundaries)."""
    want = max(1, -(-host_tokens // 8))
    return min(HOST_BLOCK_TOKENS, 1 << (want.bit_length() - 1))


def padded_host_tokens(host_tokens: int) -> int:
    """Host positions allocated for ``host_tokens``: whole blocks."""
    if host_tokens <= 0:
        return 0
    t = host_block_tokens(host_tokens)
    return -(-host_tokens // t) * t


def stream_unit_blocks(host_tokens: int) -> int:
    """Host blocks per streamed unit: STREAM_BLOCK_TOKENS worth, at most a quarter of the tier (so even a short tier
    streams in several units: the slots are reused within and across layers)."""
    t = host_block_tokens(host_tokens)
    blocks = -(-host_tokens // t) if host_tokens > 0 else 1
    return max(1, min(STREAM_BLOCK_TOKENS // t, blocks // 4))


# -- the plan ----------------------------------------------------------------------------------------------------
@dataclass
class OffloadPlan:
    """Where the KV cache lives and how its host tier is read."""

    gpu_tokens: int          # positions per sequence on the device (== max_seq_len: no offload)
    max_seq_len: int
    bytes_per_token: int     # K and V of one position of one sequence, all layers
    batch: int = 1
    prefill_chunk: int = 0   # the prefill chunk with a host tier (the cost model's choice); 0: one tier
    decode_cpu_share: float = 1.0   # share of the host tier's keys decode attends on the CPU; the rest streams
    rates: HostRates = field(default_factory=HostRates)
    gpu_budget_bytes: Optional[int] = None   # the device tier capped as if the GPU were this small
    why: str = ""
    prefill_host: str = "stream"   # a prefill chunk streams the host keys before it to the device

    @property
    def offloaded(self) -> bool:
        return self.gpu_tokens < self.max_seq_len

    @property
    def host_tokens(self) -> int:
        return padded_host_tokens(self.max_seq_len - self.gpu_tokens)

    @property
    def host_block_tokens(self) -> int:
        return host_block_tokens(self.max_seq_len - self.gpu_tokens)

    @property
    def stream_unit_blocks(self) -> int:
        return stream_unit_blocks(self.max_seq_len - self.gpu_tokens)

    @property
    def decode_host(self) -> str:
        """Where decode reads the host tier: "cpu", "stream", or "split" (both at once)."""
        share = self.decode_cpu_share
        return "cpu" if share >= 1.0 else "stream" if share <= 0.0 else "split"

    # kept for the tables: the measured rates
    pcie_gbps = property(lambda self: self.rates.pcie_gbps)
    cpu_gbps = property(lambda self: self.rates.cpu_gbps)

    def budget_label(self) -> str:
        if self.gpu_budget_bytes is None:
            return ""
        return f"GPU budget {self.gpu_budget_bytes / GIB:.1f} GiB (a smaller GPU's view): "

    def describe(self) -> str:
        if not self.offloaded:
            return (f"{self.budget_label()}KV cache on the device ({self.max_seq_len} tokens x "
                    f"{self.bytes_per_token / 1024:.0f} KiB). {self.why}").strip()
        r, gib = self.rates, self.batch * self.bytes_per_token / GIB
        measured = f"measured: CPU attention {r.cpu_gbps:.1f} GB/s of K/V on {r.threads} threads" if r.cpu_gbps > 0 \
            else "rates not measured"
        if r.pcie_gbps > 0:
            measured += (f", {r.cpu_both_gbps:.1f} beside copies; host->device {r.pcie_gbps:.1f} GB/s, "
                         f"{r.pcie_both_gbps:.1f} beside the CPU")
        return (f"{self.budget_label()}KV cache: {self.gpu_tokens} tokens on the device ({self.gpu_tokens * gib:.1f} GiB), "
                f"{self.max_seq_len - self.gpu_tokens} on the host ({self.host_tokens * gib:.1f} GiB); prefill in "
                f"chunks of {self.prefill_chunk}, host keys streamed; decode reads the host tier "
                f"{self.decode_cpu_share:.0%} on the CPU, {1 - self.decode_cpu_share:.0%} streamed ({measured}). "
                f"{self.why}").strip()

    @staticmethod
    def check_mode(mode, device: torch.device) -> None:
        """``mode`` is "off", "auto" or a token count >= 1, and "auto" has a GPU to split against."""
        if mode not in ("off", "auto") and (isinstance(mode, bool) or not isinstance(mode, int) or mode < 1):
            raise ValueError(f"kv_offload must be 'auto', 'off' or a number of tokens on the device, got {mode!r}")
        if mode == "auto" and device.type != "cuda":
            raise ValueError("kv_offload='auto' splits the KV cache between a GPU and host memory: this model is on "
                             f"{device.type}; use a GPU (or give a token count to split a CPU cache, for tests)")

    @classmethod
    def decide(cls, mode, *, max_seq_len: int, batch: int, device: torch.device,
               sizing: Optional[CacheSizing] = None, bytes_per_token: Optional[int] = None,
               host_budget_bytes: Optional[int] = None, gpu_budget_bytes: Optional[int] = None,
               free_bytes: Optional[int] = None, prefill_chunk: Optional[int] = None,
               measure: bool = True) -> "OffloadPlan":
        """``mode``: "off", "auto" or a number of device tokens. Raises ValueError, before any large allocation, when
        the cache cannot fit (the message names the sizes). ``free_bytes``: the device memory to plan against
        (default: what ``device_free_bytes`` says; None off CUDA: no device limit). ``prefill_chunk``: the user's
        chunk (default: the cost model's)."""
        if isinstance(mode, bool) or not (mode in ("off", "auto") or isinstance(mode, int)):
            raise ValueError(f"kv_offload must be 'auto', 'off' or a number of device tokens, got {mode!r}")
        if isinstance(mode, int) and mode < 1:
            raise ValueError(f"kv_offload tokens on the device must be >= 1, got {mode}")
        sizing = sizing or CacheSizing.flat(bytes_per_token)
        free = free_bytes if free_bytes is not None else device_free_bytes(device, gpu_budget_bytes)
        base = dict(max_seq_len=max_seq_len, bytes_per_token=sizing.bytes_per_token, batch=batch,
                    gpu_budget_bytes=gpu_budget_bytes)
        if mode == "auto" and free is None:
            return cls(max_seq_len, why="no GPU: one tier", **base)
        if mode in ("off", "auto") or mode >= max_seq_len:
            chunk = one_tier_chunk(sizing, batch, max_seq_len, free, prefill_chunk)
            if chunk is not None:
                how = "" if not chunk else f", prefill in chunks of {chunk}"
                why = "offload off" if mode == "off" else "the whole cache fits the device"
                return cls(max_seq_len, prefill_chunk=chunk, why=why + how, **base)
            if mode != "auto":
                need = max_seq_len * batch * sizing.bytes_per_token
                raise ValueError(f"the KV cache needs {need / GIB:.1f} GiB for {max_seq_len} tokens x {batch} "
                                 f"sequences; the device has {free / GIB:.1f} GiB free, less the prefill's "
                                 f"activations: use kv_offload='auto' or a shorter context")
        rates = measure_rates(device) if measure else HostRates()
        chunk, gpu_tokens, why = _split(mode, sizing, batch, max_seq_len, free, prefill_chunk, rates, device)
        _check_host(sizing, batch, max_seq_len, gpu_tokens, host_budget_bytes)
        share = rates.cpu_share() if measure else 1.0
        return cls(gpu_tokens, prefill_chunk=chunk, decode_cpu_share=share, rates=rates, why=why, **base)


def one_tier_chunk(sizing: CacheSizing, batch: int, n: int, free: Optional[int],
                   prefill_chunk: Optional[int] = None) -> Optional[int]:
    """How one device tier holds ``n`` tokens per sequence: 0 (a whole-prompt prefill fits beside it), the largest
    prefill chunk that does, or None (nothing does). ``prefill_chunk``: only that chunk is tried."""
    if free is None:
        return prefill_chunk or 0
    room = free - n * batch * sizing.bytes_per_token
    tries = [prefill_chunk] if prefill_chunk else [0] + sorted((c for c in CHUNK_CANDIDATES if c < n), reverse=True)
    for c in tries:
        if sizing.reserve_bytes(batch * (min(c, n) if c else n), batch, False) <= room:
            return c
    return None


def _device_fit(sizing: CacheSizing, batch: int, free: int, chunk: int) -> int:
    """Device tokens per sequence beside ``chunk``'s activations and the streaming buffers (whole host blocks)."""
    room = free - sizing.reserve_bytes(batch * chunk, batch, True)
    fit = max(0, room) // (batch * sizing.bytes_per_token)
    return fit // HOST_BLOCK_TOKENS * HOST_BLOCK_TOKENS if fit >= HOST_BLOCK_TOKENS else fit


def _chunks(max_seq_len: int, prefill_chunk: Optional[int]) -> Tuple[int, ...]:
    if prefill_chunk:
        return (prefill_chunk,)
    return tuple(sorted({min(c, max_seq_len) for c in CHUNK_CANDIDATES}))


def _split(mode, sizing: CacheSizing, batch: int, n: int, free: Optional[int], prefill_chunk: Optional[int],
           rates: HostRates, device: torch.device) -> Tuple[int, int, str]:
    """(prefill chunk, device tokens, why) of an offloaded cache: per candidate chunk the device tokens that fit
    beside it, and the chunk of the shortest predicted prefill (near-ties: the smaller chunk)."""
    if free is None:  # CPU: no device limit and no copy engine to model
        return prefill_chunk or DEFAULT_PREFILL_CHUNK, min(mode, n), f"{min(mode, n)} tokens on the device as asked"
    pcie = rates.pcie_gbps or DEFAULT_PCIE_GBPS
    profile, options = profile_for(device), []
    for c in _chunks(n, prefill_chunk):
        g = min(mode, n) if mode != "auto" else min(_device_fit(sizing, batch, free, c), n - 1)
        room = free - sizing.reserve_bytes(batch * c, batch, True) - g * batch * sizing.bytes_per_token
        if g >= 1 and room >= 0:
            options.append((prefill_seconds(sizing, batch, n, g, c, pcie, profile), c, g))
    if not options:
        c = _chunks(n, prefill_chunk)[0]
        asked = "" if mode == "auto" else \
            f"{min(mode, n)} device tokens ({min(mode, n) * batch * sizing.bytes_per_token / GIB:.1f} GiB) and "
        raise ValueError(f"no room for the KV cache on {device}: {asked}the prefill's activations and streaming "
                         f"buffers ({sizing.reserve_bytes(batch * c, batch, True) / GIB:.1f} GiB) exceed the "
                         f"{free / GIB:.1f} GiB free")
    best = min(t for t, _, _ in options)
    t, c, g = min((o for o in options if o[0] <= 1.02 * best), key=lambda o: o[1])
    head = f"auto: {free / GIB:.1f} GiB free on the device: {g} tokens there" if mode == "auto" else \
        f"{g} tokens on the device as asked"
    return c, g, f"{head}; prefill chunk {c} (predicted prefill {t:.1f} s at {pcie:.0f} GB/s host->device)"


def _check_host(sizing: CacheSizing, batch: int, n: int, gpu_tokens: int, budget: Optional[int]) -> None:
    budget = default_host_budget() if budget is None else budget
    per_token = batch * sizing.bytes_per_token
    need = padded_host_tokens(n - gpu_tokens) * per_token
    if need > budget:
        raise ValueError(f"the KV cache's host tier needs {need / GIB:.1f} GiB for {n} tokens x {batch} sequences, "
                         f"over the host budget of {budget / GIB:.1f} GiB: lower the context or raise the budget "
                         f"(the context both tiers can hold is about {gpu_tokens + host_capacity(budget, per_token)} "
                         "tokens)")


def host_capacity(budget: int, per_token: int) -> int:
    """The most host positions ``budget`` bytes hold at ``per_token`` bytes each, blocks padded."""
    fit = max(0, budget) // per_token
    while fit > 0 and padded_host_tokens(fit) * per_token > budget:  # at most one block's worth of steps
        fit -= 1
    return fit


# -- the longest context ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Capacity:
    """The longest context a mode holds, and its bound: (device memory free after the weights and one prefill
    chunk's activations + the host budget) / KV bytes per token."""

    tokens: int
    prefill_chunk: int       # decide the cache with this chunk to get this split (0: a whole-prompt prefill)
    bound_tokens: int
    gpu_tokens: int

    @property
    def share_of_bound(self) -> float:
        return self.tokens / self.bound_tokens if self.bound_tokens else 0.0


def _one_tier_capacity(sizing: CacheSizing, batch: int, free: int, limit: int) -> Tuple[int, int]:
    """(tokens, chunk): the longest one device tier holds, with the chunk that lets it (the smallest candidate
    when the whole prompt's activations do not fit beside it)."""
    per_token, fixed = batch * sizing.bytes_per_token, sizing.reserve_bytes(0, batch, False)
    whole = max(0, free - fixed) // (per_token + sizing.activation_bytes(batch))
    c = CHUNK_CANDIDATES[0]
    chunked = max(0, free - sizing.reserve_bytes(batch * c, batch, False)) // per_token
    if chunked > max(whole, c):
        return min(chunked, limit), c
    return min(whole, limit), 0


def longest_context(mode, *, batch: int, sizing: CacheSizing, device: torch.device, free_bytes: Optional[int] = None,
                    host_budget_bytes: Optional[int] = None, gpu_budget_bytes: Optional[int] = None,
                    limit: Optional[int] = None, pcie_gbps: float = 0.0) -> Capacity:
    """The longest ``max_seq_len`` that ``OffloadPlan.decide(mode, ...)`` accepts with these budgets (from sizes,
    nothing allocated); ``limit``: the model's own context. Decide with ``prefill_chunk`` = the returned chunk."""
    free = free_bytes if free_bytes is not None else device_free_bytes(device, gpu_budget_bytes)
    limit = limit or 1 << 40
    per_token = batch * sizing.bytes_per_token
    if free is None and mode in ("off", "auto"):
        raise ValueError("the longest context of a device tier needs a device with a memory limit (a GPU)")
    one = _one_tier_capacity(sizing, batch, free, limit) if free is not None else (0, 0)
    if mode == "off":
        return Capacity(one[0], one[1], max(0, free - sizing.activation_bytes(batch * (one[1] or one[0]))) // per_token,
                        one[0])
    budget = default_host_budget() if host_budget_bytes is None else host_budget_bytes
    host, rates = host_capacity(budget, per_token), HostRates(pcie_gbps=pcie_gbps)
    chunk, n, g = DEFAULT_PREFILL_CHUNK, 0, 0
    for _ in range(4):  # the chunk depends on the context it serves and the context on the chunk: iterate
        g = min(mode, limit) if mode != "auto" else _device_fit(sizing, batch, free, chunk) if free else 0
        n = min(g + host, limit)
        c = _split(mode, sizing, batch, n, free, None, rates, device)[0] if n > g else chunk
        if c == chunk:
            break
        chunk = c
    else:  # not settled: the last chunk with its own device tokens, so that decide() with it accepts the context
        g = min(mode, limit) if mode != "auto" else _device_fit(sizing, batch, free, chunk) if free else 0
        n = min(g + host, limit)
    if mode == "auto" and n <= one[0]:
        n, chunk, g = one[0], one[1], one[0]
    act = sizing.activation_bytes(batch * chunk)
    bound = (max(0, free - act) + budget) // per_token if free is not None else g + budget // per_token
    return Capacity(n, chunk, bound, g)


__all__ = ["OffloadPlan", "CacheSizing", "HostRates", "Capacity", "kv_bytes_per_token", "weight_bytes",
           "longest_context", "check_request", "one_tier_chunk", "host_capacity", "device_free_bytes", "check_gpu_budget", "measure_rates", "host_memory_bytes",
           "default_host_budget", "prefill_seconds", "host_block_tokens", "padded_host_tokens", "stream_unit_blocks",
           "GIB", "DEFAULT_PREFILL_CHUNK", "HOST_BLOCK_TOKENS", "STREAM_BLOCK_TOKENS", "STREAM_SLOTS"]
