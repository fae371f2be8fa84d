"""Tile plans measured on a GPU by ``fastattn-dist tune``: stored in a JSON profile, read by ``tiles="auto"``.

Per block shape the file holds the compute time of each plan tune timed (comm off, CUDA-graph replay); the cost
model then simulates those plans with their measured times and the comm model (cost_model.choose_plan). Per
model shard and prompt shape (``tune --model``) it holds each plan's whole prefill time measured with the comm
path on a slice of the model's layers, and the model's ``tiles="auto"`` takes the fastest.
The file is ``$FASTATTN_TUNED_PROFILE`` or ``~/.cache/fastattn_dist/tuned.json``. Every rank computes the
same plan only if every rank reads the same file.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Dict, Optional

import torch

from ..files import check_writable_dir
from ..masks import Mask
from .cost_model import BlockCost, MeasuredPlans

ENV = "FASTATTN_TUNED_PROFILE"
_CACHE: Dict[str, dict] = {}


def profile_path() -> str:
    return os.environ.get(ENV) or os.path.join(os.path.expanduser("~"), ".cache", "fastattn_dist", "tuned.json")


def shape_key(device: torch.device, cost: BlockCost, mask: Mask) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    causal, window, padded = mask.structure()
    return (f"{name}|{cost.elem_bytes}B|b{cost.batch}|s{cost.seq}|h{cost.hidden}|hl{cost.local_heads}|"
            f"d{cost.head_dim}|tp{cost.world_size}|causal{int(causal)}|w{window or 0}|pad{int(padded)}")


def _load(path: str) -> dict:
    try:
        mtime = os.path.getmtime(path)
    except OSError:
        return {}
    hit = _CACHE.get(path)
    if hit is not None and hit["mtime"] == mtime:
        return hit["entries"]
    try:
        with open(path) as f:
            entries = json.load(f).get("entries", {})
    except (OSError, ValueError):
        entries = {}
    _CACHE[path] = {"mtime": mtime, "entries": entries}
    return entries


def lookup(device: torch.device, cost: BlockCost, mask: Mask) -> Optional[MeasuredPlans]:
    """The measured plans for this exact shape, or None (then the built-in profile decides)."""
    if device.type != "cuda":
        return None
    e = _load(profile_path()).get(shape_key(device, cost, mask))
    if not e:
        return None
    return MeasuredPlans([(tuple(p["bounds"]), p["compute_ms"] / 1e3, p["streams"]) for p in e["plans"]],
                         [(tuple(p["bounds"]), p["comm"], p["streams"], p["ms"] / 1e3) for p in e.get("full", [])])


def comm_label(comm) -> str:
    """What a model plan was measured with: the comm path's time model (a stand-in's), or its kind."""
    model = getattr(comm, "model", None)
    return model.describe() if model is not None and hasattr(model, "describe") else type(comm).__name__


def model_key(device: torch.device, shape, elem_bytes: int, batch: int, seq: int, comm, schedule: str) -> str:
    """A model shard's prompt shape (``shape``: its parallel.sharding.TPShape), the comm path and the schedule."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return (f"model|{name}|{elem_bytes}B|b{batch}|s{seq}|h{shape.hidden_size}|hl{shape.local_heads}|"
            f"kvl{shape.local_kv_heads}|d{shape.head_dim}|i{shape.local_intermediate}|tp{shape.world_size}|"
            f"{schedule}|{comm_label(comm)}")


def lookup_model_plan(device: torch.device, key: str) -> Optional[tuple]:
    """The bounds of the fastest plan ``tune --model`` measured for this key, or None."""
    if device.type != "cuda":
        return None
    e = _load(profile_path()).get(key)
    return tuple(e["best"]) if e else None


def check_profile_writable(path: str) -> None:
    """A clear ValueError, before any timing, if the profile file could not be written at ``path``."""
    if os.path.isdir(path):
        raise ValueError(f"--out {path!r} is a directory: give the profile's file name (e.g. {path}/tuned.json)")
    check_writable_dir(os.path.dirname(os.path.abspath(path)), "the folder of --out")


def store(path: str, entries: Dict[str, dict]) -> None:
    """Merge ``entries`` into the profile file (atomic replace; a clear error if it cannot be written)."""
    current = dict(_load(path))
    current.update(entries)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tuned-", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"entries": current}, f, indent=1)
        os.replace(tmp, path)
    except OSError as e:
        raise ValueError(f"could not write the tuned profile {path}: {e.strerror or e}") from None
    _CACHE.pop(path, None)
