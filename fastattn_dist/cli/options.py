"""What the subcommands share: the parser type, argument types, option groups, and the checks of an output
folder. Every value is checked before any rank starts: a bad one is a one-line error and exit code 2."""
from __future__ import annotations

import argparse
from typing import Callable

import torch

from ..attention import PRECISIONS
from ..files import check_writable_dir
from ..parallel.link_models import PATHS as STANDIN_PATHS
from ..parallel.process_group import DEFAULT_TIMEOUT_S
from ..runner import Launch


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(sorted(set(DTYPES)))}")
    return DTYPES[name]


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block), like every other error of the CLI."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an int >= ``minimum``."""
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {minimum}, got {value!r}") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"expected an int >= {minimum}, got {n}")
        return n
    return parse


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)


def positive_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value!r}") from None
    if not x > 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {value}")
    return x


def tiles_arg(value: str):
    if value == "auto":
        return value
    try:
        return positive_int(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"tiles must be an int >= 1 or 'auto', got {value!r}") from None


# -- option groups shared by the subcommands ---------------------------------------------------------
def add_rank_options(p: argparse.ArgumentParser, world_default: int = 2, timeout_default: float = DEFAULT_TIMEOUT_S):
    g = p.add_argument_group("ranks")
    g.add_argument("--world-size", "-n", type=positive_int, default=world_default,
                   help=f"ranks to spawn (default {world_default}; under torchrun/mpirun the launcher sets it)")
    g.add_argument("--launcher", choices=("auto", "spawn", "env"), default="auto",
                   help="auto (default): join torchrun/mpirun/Slurm if detected, else spawn local ranks; env: require "
                        "a launcher; spawn: always spawn local ranks")
    g.add_argument("--dist-backend", choices=("gloo", "nccl"), default=None,
                   help="process-group backend (default: nccl under a launcher with GPUs, else gloo)")
    g.add_argument("--timeout-s", type=positive_float, default=timeout_default,
                   help=f"timeout of rendezvous and of every collective, in seconds (default {timeout_default:g})")


def add_shape_options(p: argparse.ArgumentParser, seq_default: int = 1024, dtype_default: str = "float32"):
    g = p.add_argument_group("block")
    g.add_argument("--batch", type=positive_int, default=1, help="sequences per call (default 1)")
    g.add_argument("--seq", type=positive_int, default=seq_default, help=f"tokens per sequence (default {seq_default})")
    g.add_argument("--hidden", type=positive_int, default=1024, help="hidden size (default 1024)")
    g.add_argument("--heads", type=positive_int, default=16, help="attention heads (default 16)")
    g.add_argument("--kv-heads", type=positive_int, default=4, help="kv heads (GQA; default 4)")
    g.add_argument("--tiles", type=tiles_arg, default="auto", help="tile count, or auto (the cost model; default)")
    g.add_argument("--mask", default="causal", help="causal (default), none, or sliding_window:W")
    g.add_argument("--dtype", default=dtype_default, help=f"float32, bfloat16, float16 (default {dtype_default})")
    g.add_argument("--attn-backend", default="auto",
                   help="attention kernel: auto (default: cudnn on Hopper, triton on other GPUs, torch on CPU), "
                        "torch, triton, cudnn, sdpa, reference")
    g.add_argument("--no-rope", action="store_true", help="skip rotary embeddings")
    add_precision_option(g)


def add_precision_option(p) -> None:
    """``--attn-precision``: the attention's arithmetic (``fastattn_dist.attention``'s ``precision``)."""
    p.add_argument("--attn-precision", choices=PRECISIONS, default="bf16",
                   help="attention arithmetic: bf16 (default: no quantization, the run's dtype), int8 (int8 QK^T and "
                        "PV, K smoothed), fp8 (e4m3 both), int8-fp8 (int8 QK^T, e4m3 PV); 8-bit runs on backend auto, "
                        "triton or torch")


def add_link_options(p: argparse.ArgumentParser):
    g = p.add_argument_group("simulated link (CPU ranks)")
    g.add_argument("--link-latency-us", type=float, default=50.0, help="per all-reduce latency in us (default 50)")
    g.add_argument("--link-gbps", type=float, default=0.08,
                   help="link bus bandwidth in GB/s (default 0.08: NVLink scaled to CPU compute speed)")
    g.add_argument("--no-link", action="store_true", help="no link model: real gloo transfers only")


def add_standin_path(g) -> None:
    """The comm path the GPU stand-in plays for a model (bench-model and tune --model with --emulate-tp)."""
    g.add_argument("--standin-path", choices=STANDIN_PATHS, default="nccl",
                   help="what the stand-in holds while it runs: nccl (16 CTAs of SMs, as NCCL's ring kernels) or "
                        "copy_engine (copy engines, no SMs; the symmetric-memory path); default nccl")


def add_timing_options(p: argparse.ArgumentParser, repeats: int = 5, warmup: int = 1):
    g = p.add_argument_group("timing")
    g.add_argument("--warmup", type=nonneg_int, default=warmup, help=f"untimed calls first (default {warmup})")
    g.add_argument("--repeats", type=positive_int, default=repeats, help=f"timed calls (default {repeats})")
    g.add_argument("--seed", type=int, default=0, help="seed of the random weights and input (default 0)")


def launch_from_args(args) -> Launch:
    return Launch(args.world_size, args.launcher, args.dist_backend, args.timeout_s)


def out_dir(path: str, option: str = "--out") -> str:
    """``path`` as a folder the results can be written to (created if needed), or a one-line ValueError."""
    return check_writable_dir(path, option)
