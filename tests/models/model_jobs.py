"""What spawned ranks run in the model tests (module level, so spawn can import it)."""
from __future__ import annotations

import torch

from fastattn_dist.parallel.link_models import LinkModel


def model_outputs(rank, world, path, prompts, lengths, steps, tile_counts, link):
    """Prefill logits (every tile count), the cache's last logits, then ``steps`` greedy decode steps."""
    from fastattn_dist.models.llama import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, tiles=1,
                                             link=LinkModel(*link) if link else None)
    ids = torch.tensor(prompts)
    out = {"prefill": {}}
    for t in tile_counts:
        out["prefill"][t] = model(ids, lengths=lengths, tiles=t)
        out.setdefault("plans", {})[t] = model.last_plan.bounds
    B, S = ids.shape
    model.reset_cache(B, S + steps + 1)
    logits = model.prefill(ids, lengths)
    decode = [logits]
    tok = logits.argmax(-1)
    toks = [tok.tolist()]
    for _ in range(steps):
        logits = model.decode_step(tok)
        decode.append(logits)
        tok = logits.argmax(-1)
        toks.append(tok.tolist())
    out["decode_logits"] = decode
    out["tokens"] = toks
    out["generate"] = model.generate(prompts if lengths is None else
                                     [p[:n] for p, n in zip(prompts, lengths)], steps + 1, stop_tokens=[])
    return out


def offload_outputs(rank, world, path, prompts, lengths, steps, offload, chunk, tiles, cpu_share=None):
    """The cache's last-token logits after a (chunked) prefill, then ``steps`` greedy decode steps' logits;
    ``cpu_share``: the decode split of the host tier between the CPU and the stream (default: the plan's)."""
    from fastattn_dist.models.llama import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, tiles=tiles, kv_offload=offload,
                                             prefill_chunk=chunk)
    ids = torch.tensor(prompts)
    B, S = ids.shape
    model.reset_cache(B, S + steps + 1)
    if cpu_share is not None:
        model.kv_plan.decode_cpu_share = cpu_share
    logits = [model.prefill(ids, lengths)]
    tok = logits[0].argmax(-1)
    for _ in range(steps):
        logits.append(model.decode_step(tok))
        tok = logits[-1].argmax(-1)
    c = model.cache
    split = None if model.kv_plan is None or not model.kv_plan.offloaded else (c.gpu_tokens, c.max_seq_len - c.gpu_tokens)
    return {"logits": torch.stack(logits), "split": split}


def bad_model_call(rank, world, path, case):
    """One bad use of the model's API, the same on every rank; each rank must raise by itself."""
    from fastattn_dist.models.llama import LlamaForCausalLM

    if case == "missing checkpoint":
        LlamaForCausalLM.from_pretrained(path + "-nonexistent")
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, max_seq_len=64)
    with torch.no_grad():
        if case == "ids out of range":
            model(torch.tensor([[1, 2, model.config.vocab_size]]))
        elif case == "empty input":
            model(torch.zeros(1, 0, dtype=torch.int64))
        elif case == "empty prompt":
            model.generate([[1, 2], []], 4)
        elif case == "prompt longer than the context":
            model.generate([[1] * (model.config.max_position_embeddings - 5)], 10)
        elif case == "prompt longer than the cache":
            model.reset_cache(1, 16)
            model.prefill(torch.ones(1, 20, dtype=torch.int64))
        elif case == "float ids":
            model(torch.ones(1, 4))
    return "no error"


class CountingComm:
    """A comm path that counts what goes through it and passes everything on (parallel.comm.CommPath)."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, {"start": 0, "all_reduce": 0, "all_gather": 0}
        self.world_size, self.rank = inner.world_size, inner.rank

    sm_fraction = property(lambda self: self.inner.sm_fraction)
    model = property(lambda self: self.inner.model)

    def enable_timing(self, on=True):
        self.inner.enable_timing(on)

    def prepare(self, out, slot=0):
        return self.inner.prepare(out, slot)

    def start(self, piece, tile, rows=None):
        self.calls["start"] += 1
        return self.inner.start(piece, tile, rows)

    def wait(self, handle):
        self.inner.wait(handle)

    def wait_all(self, handles):
        self.inner.wait_all(handles)

    def all_reduce(self, t):
        self.calls["all_reduce"] += 1
        return self.inner.all_reduce(t)

    def all_gather(self, t):
        self.calls["all_gather"] += 1
        return self.inner.all_gather(t)


def counted_collectives(rank, world, path, tiles, steps):
    """Prefill and ``steps`` decode steps with the model's collectives counted at the comm interface and at
    torch.distributed itself (every one of the second must be one of the first)."""
    import torch.distributed as dist

    from fastattn_dist.models.llama import LlamaForCausalLM
    from fastattn_dist.parallel.comm import ProcessGroupAllReduce

    comm = CountingComm(ProcessGroupAllReduce())
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, comm=comm, tiles=tiles)
    raw = {"all_reduce": 0, "all_gather": 0}
    originals = {name: getattr(dist, name) for name in raw}

    def counting(name):
        def call(*a, **kw):
            raw[name] += 1
            return originals[name](*a, **kw)
        return call
    for name in raw:
        setattr(dist, name, counting(name))
    try:
        ids = torch.tensor([[3, 17, 9, 40, 2, 77, 5, 11, 60, 8, 13]])
        model.reset_cache(1, ids.shape[1] + steps + 1)
        tok = model.prefill(ids).argmax(-1)
        prefill = dict(comm.calls)
        for _ in range(steps):
            tok = model.decode_step(tok).argmax(-1)
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    return {"prefill": prefill, "all": dict(comm.calls), "raw": raw, "layers": len(model.layers),
            "tiles": model.last_plan.num_tiles}


def shard_state(rank, world, path, seed):
    """This rank's shard of the checkpoint and of random weights (seed), as plain tensors."""
    from fastattn_dist.models.llama import LlamaForCausalLM

    ckpt = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    rand = LlamaForCausalLM(ckpt.config, dtype=torch.float32)
    rand.init_random_weights(seed)
    return {"checkpoint": {k: v.clone() for k, v in ckpt.state_dict().items()},
            "random": {k: v.clone() for k, v in rand.state_dict().items()}}


def schedules_agree(rank, world, path, tiles):
    """Prefill logits of the one-stream and the wavefront schedule (on CPU: the wavefront's issue order)."""
    from fastattn_dist.models.llama import LlamaForCausalLM

    ids = torch.tensor([[3, 17, 9, 40, 2, 77, 5, 11, 60, 8, 13, 90, 1], [4, 4, 8, 15, 16, 23, 42, 0, 0, 0, 0, 0, 0]])
    out = {}
    for schedule in ("one", "wavefront"):
        model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, tiles=tiles, prefill_schedule=schedule)
        out[schedule] = model(ids, lengths=[13, 7])
        model.reset_cache(2, 20)
        out[schedule + "_cache"] = model.prefill(ids, lengths=[13, 7])
    return out
