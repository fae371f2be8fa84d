"""Checks that need the other ranks: that every rank was given the same thing."""
from __future__ import annotations

import torch.distributed as dist


def check_same_on_all_ranks(facts: dict, group=None, what: str = "the input") -> None:
    """Raise ValueError on every rank unless all ranks passed equal ``facts`` (one all_gather_object).

    The message names the ranks that differ from the largest group of agreeing ranks (rank 0's on a tie),
    so one odd rank is named whichever it is, and the first fact (in ``facts``' order: put the most telling
    first) on which they differ. Values compare by ``repr`` (a NaN equals a NaN)."""
    n = dist.get_world_size(group)
    gathered: list = [None] * n
    dist.all_gather_object(gathered, facts, group=group)
    groups: dict = {}
    for r, f in enumerate(gathered):
        groups.setdefault(repr(sorted(f.items())), []).append(r)
    if len(groups) == 1:
        return
    common = max(groups.values(), key=lambda rs: (len(rs), -rs[0]))
    ref = gathered[common[0]]
    order = sorted(groups.values(), key=lambda rs: (rs is common, rs[0]))  # the odd ones first

    def first_diff(f):
        return next(k for k in {**f, **ref} if repr(f.get(k)) != repr(ref.get(k)))

    def say(rs):
        who = f"rank {rs[0]} has" if len(rs) == 1 else f"ranks {', '.join(map(str, rs))} have"
        return who + " " + ", ".join(f"{k}={gathered[rs[0]].get(k)}" for k in keys)
    keys = list(dict.fromkeys(first_diff(gathered[rs[0]]) for rs in order[:-1]))
    raise ValueError(f"ranks disagree on {what} ({', '.join(keys)}): " + "; ".join(say(rs) for rs in order))
