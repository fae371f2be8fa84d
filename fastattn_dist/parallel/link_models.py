"""The one all-reduce time model, and the fits it runs with.

A ring all-reduce of ``nbytes`` per rank over ``n`` ranks moves ``2 (n - 1) / n * nbytes`` per rank (the
"bus bytes" of nccl-tests), so every time model here is

    seconds = latency + 2 (n - 1) / n * nbytes / bus_bandwidth                         (``ring_allreduce_seconds``)

with its latency and bus bandwidth taken from one of:

* ``LinkModel``: the simulated link of CPU ranks (a latency and a bandwidth the user picks);
* ``GpuLinkModel``: the GPU comm stand-in's model of NCCL over NVLink (the measured fits below for messages of
  16 MB and more, a small-message latency below 256 KiB, interpolated in between), also what the cost model
  assumes for real NCCL on Hopper (``nvlink_model``).

Fits are in one unit: microseconds and GB/s of bus bandwidth.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

# Least-squares fits of t = latency + bus_bytes / bandwidth to NCCL all-reduces of [S, hidden] bf16 tensors
# (16-512 MB: S = 2K..32K, hidden 4096/8192) measured on H200 x2 and x4 over NVLink, 2026-11-22. The intercept
# is larger than NCCL's small-message latency: it also holds the bandwidth ramp of messages in this range,
# the range a prefill tile's all-reduce falls in. TP=8 was not measured and reuses TP=4's fit.
NVLINK_FITS = {2: (78.0, 310.0), 4: (131.0, 347.0)}
FIT_MIN_BYTES = 16 << 20
# Small messages (decode's all-reduces are 8-64 KB): NCCL's ring over NVLink without NVLink SHARP takes about
# 10-25 us on H100/H200 nodes, growing with the rank count (public figures: nccl-tests on 8x H100 in
# NVIDIA/nccl#1259 and #1453; vLLM's custom all-reduce, vllm/distributed/device_communicators/
# custom_all_reduce.py, exists because one-shot peer-to-peer kernels do it in about 5-12 us). A model, not a
# measurement: an option of bench and bench-model overrides it.
SMALL_LATENCY_US = {2: 12.0, 4: 16.0, 8: 22.0}
SMALL_MAX_BYTES = 256 << 10


def ring_allreduce_seconds(nbytes: int, world_size: int, latency_s: float, bus_bytes_per_s: float) -> float:
    """``latency + 2 (n - 1) / n * nbytes / bandwidth``; 0 for one rank or an empty message."""
    if world_size <= 1 or nbytes <= 0:
        return 0.0
    return latency_s + 2.0 * (world_size - 1) / world_size * nbytes / bus_bytes_per_s


def _fit_for(world_size: int):
    return NVLINK_FITS[2] if world_size == 2 else NVLINK_FITS[4]


def _small_latency_for(world_size: int) -> float:
    return SMALL_LATENCY_US[min((w for w in SMALL_LATENCY_US if w >= world_size), default=8)]


@dataclass(frozen=True)
class LinkModel:
    """The simulated interconnect of CPU ranks: each all-reduce takes at least ``latency + bus_bytes / gbps``.

    Transfers on one rank's link run one after another (a tile waits for the link to be free). The wait is a
    sleep, never a spin: a simulated device's comm engine costs no compute.
    """

    latency_us: float = 0.0
    gbps: float = math.inf

    def __post_init__(self) -> None:
        if not (self.latency_us >= 0 and math.isfinite(self.latency_us)):
            raise ValueError(f"link latency must be a finite number >= 0 us, got {self.latency_us}")
        if not (self.gbps > 0):
            raise ValueError(f"link bandwidth must be > 0 GB/s, got {self.gbps}")

    def allreduce_seconds(self, nbytes: int, world_size: int) -> float:
        return ring_allreduce_seconds(nbytes, world_size, self.latency_us * 1e-6, self.gbps * 1e9)

    @property
    def active(self) -> bool:
        return self.latency_us > 0 or math.isfinite(self.gbps)

    def describe(self) -> str:
        return f"simulated link: {self.latency_us:g} us + {self.gbps:g} GB/s bus per all-reduce (sleeps)"


PATHS = ("nccl", "copy_engine")


@dataclass(frozen=True)
class GpuLinkModel:
    """How long a modelled NCCL all-reduce over NVLink takes, and what it holds while it runs (the stand-in).

    ``latency_us``/``bus_gbps``: the fit for messages of ``FIT_MIN_BYTES`` and more; ``small_latency_us``: the
    latency of messages up to ``SMALL_MAX_BYTES``; in between the latency is interpolated in log(bytes). The
    bandwidth term is the same throughout. ``path="nccl"`` holds ``ctas`` CTAs of SMs (NCCL's channels; fewer
    than ``full_bw_ctas`` get proportionally less bandwidth), ``"copy_engine"`` none.
    """

    latency_us: float
    bus_gbps: float
    path: str = "nccl"
    ctas: int = 16             # NCCL ring channels on Hopper NVLink nodes (one CTA each)
    threads: int = 512         # NCCL's threads per CTA for the simple protocol
    full_bw_ctas: int = 16     # the CTA count at which the modelled bandwidth is reached
    small_latency_us: float = 16.0

    def __post_init__(self) -> None:
        for name in ("latency_us", "small_latency_us"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"stand-in {name.replace('_us', '')} must be a finite number >= 0 us, got {v}")
        if not (math.isfinite(self.bus_gbps) and self.bus_gbps > 0):
            raise ValueError(f"stand-in bandwidth must be a finite number > 0 GB/s, got {self.bus_gbps}")
        if self.path not in PATHS:
            raise ValueError(f"stand-in path must be one of {PATHS}, got {self.path!r}")
        for name in ("ctas", "threads", "full_bw_ctas"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"stand-in {name} must be an int >= 1, got {v!r}")
        if self.threads % 32 or self.threads > 1024:
            raise ValueError(f"stand-in threads must be a multiple of 32 up to 1024, got {self.threads}")

    @classmethod
    def for_world_size(cls, world_size: int, **overrides) -> "GpuLinkModel":
        """The model of a TP group of ``world_size`` (fits above; TP=8 and larger reuse TP=4's fit)."""
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 2:
            raise ValueError(f"an emulated TP group needs a world size >= 2, got {world_size!r}")
        lat, bw = _fit_for(world_size)
        return replace(cls(lat, bw, small_latency_us=_small_latency_for(world_size)), **overrides)

    @property
    def effective_gbps(self) -> float:
        if self.path == "copy_engine":
            return self.bus_gbps
        return self.bus_gbps * min(1.0, self.ctas / self.full_bw_ctas)

    def latency_s(self, nbytes: int) -> float:
        """The size-dependent latency term (see the class docstring)."""
        if nbytes >= FIT_MIN_BYTES:
            return self.latency_us * 1e-6
        if nbytes <= SMALL_MAX_BYTES:
            return self.small_latency_us * 1e-6
        f = math.log(nbytes / SMALL_MAX_BYTES) / math.log(FIT_MIN_BYTES / SMALL_MAX_BYTES)
        return (self.small_latency_us + f * (self.latency_us - self.small_latency_us)) * 1e-6

    def bus_bytes(self, nbytes: int, world_size: int) -> int:
        return int(2 * (world_size - 1) * nbytes // world_size)

    def allreduce_seconds(self, nbytes: int, world_size: int) -> float:
        """The modelled time of one all-reduce of ``nbytes`` per rank over ``world_size`` ranks."""
        return ring_allreduce_seconds(nbytes, world_size, self.latency_s(nbytes), self.effective_gbps * 1e9)

    def allgather_seconds(self, nbytes_per_rank: int, world_size: int) -> float:
        """An all-gather moves half an all-reduce's bus bytes: ``(n - 1) / n`` of the gathered result."""
        if world_size <= 1:
            return 0.0
        total = nbytes_per_rank * world_size
        return self.latency_s(total) + (world_size - 1) / world_size * total / (self.effective_gbps * 1e9)

    def describe(self) -> str:
        what = f"{self.ctas} CTAs x {self.threads} threads" if self.path == "nccl" else "copy engines, no SMs"
        return (f"{self.path} stand-in: {self.latency_us:g} us + {self.bus_gbps:g} GB/s bus from 16 MB, "
                f"{self.small_latency_us:g} us below 256 KiB ({what})")


def nvlink_model(world_size: int) -> GpuLinkModel:
    """What the cost model assumes for NCCL over NVLink on Hopper (the stand-in's model of it)."""
    return GpuLinkModel.for_world_size(max(2, world_size))
