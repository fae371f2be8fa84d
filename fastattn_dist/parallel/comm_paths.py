"""The comm paths by name: what ``comm="nccl" | "copy_engine" | "auto"`` means for a block or a model."""
from __future__ import annotations

from typing import Dict, Optional

import torch

from .comm import CommPath, ProcessGroupAllReduce
from .copy_engine import CopyEngineAllReduce, copy_engine_available
from .link_models import LinkModel

COMM_PATHS = ("nccl", "copy_engine")


def make_comm(path: str, group, device: torch.device, link: Optional[LinkModel] = None) -> CommPath:
    """The comm object for ``path``: "nccl" is the process group's own all-reduce (gloo on CPU ranks),
    "copy_engine" the symmetric-memory path where it can run (one node of GPUs), else the process group's."""
    if path not in COMM_PATHS:
        raise ValueError(f"comm must be one of {COMM_PATHS} or a comm object, got {path!r}")
    if path == "copy_engine" and copy_engine_available(device, group):
        return CopyEngineAllReduce(group, device)
    return ProcessGroupAllReduce(group, link, device)


def paths_for(comm, group, device: torch.device, link: Optional[LinkModel] = None) -> Dict[str, CommPath]:
    """The comm paths a block may choose from, by name: a name's path, "auto"'s (the process group's and, where
    it runs, the copy-engine path), a comm object (under its class name) or a dict of them."""
    if isinstance(comm, dict):
        return dict(comm)
    if not isinstance(comm, str):
        return {type(comm).__name__: comm}
    if comm == "auto":
        paths = {"nccl": make_comm("nccl", group, device, link)}
        if copy_engine_available(device, group):
            paths["copy_engine"] = make_comm("copy_engine", group, device, link)
        return paths
    return {comm: make_comm(comm, group, device, link)}
