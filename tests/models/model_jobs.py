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


def offload_outputs(rank, world, path, prompts, lengths, steps, offload, chunk, tiles):
    """The cache's last-token logits after a (chunked) prefill, then ``steps`` greedy decode steps' logits."""
    from fastattn_dist.models.llama import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, tiles=tiles, kv_offload=offload,
                                             prefill_chunk=chunk)
    ids = torch.tensor(prompts)
    B, S = ids.shape
    model.reset_cache(B, S + steps + 1)
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
