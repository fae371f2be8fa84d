"""Generation: prefill once, then one decode step per new token (greedy, or temperature / top-p sampling).

Every rank computes the same logits (the LM head's slices are gathered), so every rank samples the
same token from the same seeded generator: no broadcast is needed. On a GPU the decode step is
captured once as a CUDA graph and replayed per token (its inputs and the cache's lengths stay on the
device); ``stats`` reports prefill and decode throughput.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Union

import torch

from .inputs import check_ids


@dataclass(kw_only=True)
class GenerateStats:
    """What a generate call measured: its prefill, and its decode steps timed apart from it."""

    prompt_tokens: int = 0
    prefill_s: float = 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    new_tokens: int = 0
    decode_s: float = 0.0
    decode_steps: int = 0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second over all sequences (batch x steps / time) of the decode steps."""
        return self.new_tokens / self.decode_s if self.decode_s > 0 else float("nan")


def pad_prompts(prompts: Union[torch.Tensor, Sequence[Sequence[int]]]):
    """``[B, S]`` ids (right padding with 0) and the real lengths, from a tensor or lists of ids."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            raise ValueError(f"prompts must be a [batch, seq] tensor or a list of id lists, got shape {list(prompts.shape)}")
        return prompts, None
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token id lists (or a [batch, seq] tensor)")
    rows = [list(p) for p in prompts]
    for i, p in enumerate(rows):
        if not p:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            raise ValueError(f"prompt {i} must hold ints (token ids)")
    S = max(len(p) for p in rows)
    ids = torch.tensor([p + [0] * (S - len(p)) for p in rows], dtype=torch.int64)
    lengths = torch.tensor([len(p) for p in rows], dtype=torch.int64)
    return ids, (None if int(lengths.min()) == S else lengths)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: Optional[torch.Generator]) -> torch.Tensor:
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(dim=-1) - sorted_p > top_p  # keep the smallest prefix reaching top_p (>= 1 token)
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen)[:, 0]


class GraphedDecode:
    """``model.decode_step`` captured once as a CUDA graph for a batch size; replayed per token."""

    def __init__(self, model, batch: int) -> None:
        self.ids = torch.zeros(batch, dtype=torch.int64, device=model.device)
        c = model.cache
        saved = c.lengths.clone()
        side = torch.cuda.Stream(model.device)
        side.wait_stream(torch.cuda.current_stream(model.device))
        with torch.cuda.stream(side):  # warm-up (autotuning, allocator): its appends are overwritten later
            for _ in range(2):
                model.decode_step(self.ids)
        torch.cuda.current_stream(model.device).wait_stream(side)
        c.lengths.copy_(saved)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model.decode_step(self.ids)
        c.lengths.copy_(saved)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(ids)
        self.graph.replay()
        return self.logits


def _check(model, max_new_tokens, temperature, top_p, stop_tokens) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    for t in stop_tokens:
        if not (isinstance(t, int) and 0 <= t < model.config.vocab_size):
            raise ValueError(f"stop token {t!r} is not a token id of the vocabulary (0..{model.config.vocab_size - 1})")


@torch.no_grad()
def generate(model, prompts, max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
             seed: Optional[int] = None, stop_tokens: Optional[Sequence[int]] = None, cuda_graph: Optional[bool] = None,
             tiles=None, stats: Optional[GenerateStats] = None,
             on_tokens: Optional[Callable[[List[Optional[int]]], None]] = None) -> List[List[int]]:
    """New token ids for each prompt (prompt excluded; a stop token ends its sequence and is included).

    ``prompts``: a ``[B, S]`` id tensor or a list of id lists of any lengths. ``temperature`` 0 is greedy;
    otherwise softmax sampling at that temperature from the top-``top_p`` mass, seeded by ``seed``.
    ``stop_tokens``: default the checkpoint's eos tokens. ``cuda_graph``: replay the decode step as a
    graph (default: on GPUs where the step allows it, ``model.decode_step_capturable``). ``stats``: filled
    with token counts and times. ``on_tokens(new)``: called as tokens are decoded, with each sequence's new token
    (None for a sequence that has stopped): for streaming output.
    """
    stop = set(model.config.eos_token_ids if stop_tokens is None else stop_tokens)
    _check(model, max_new_tokens, temperature, top_p, stop)
    ids, lengths = pad_prompts(prompts)
    ids = check_ids(ids, model.config.vocab_size, model.device)
    B, S = ids.shape
    need = S + max_new_tokens
    if need > model.config.max_position_embeddings:
        raise ValueError(f"prompt ({S} tokens) + max_new_tokens ({max_new_tokens}) = {need} exceeds the checkpoint's "
                         f"max_position_embeddings ({model.config.max_position_embeddings})")
    model.reset_cache(B, max(model.max_seq_len, need))
    graphs = model.decode_step_capturable if cuda_graph is None else bool(cuda_graph)
    if graphs and not model.decode_step_capturable:
        raise ValueError("cuda_graph=True: this decode step cannot be captured (a host KV tier or a sliding window "
                         "shorter than the cache reads lengths back to the host); leave cuda_graph=None")
    gen = None
    if temperature > 0:
        gen = torch.Generator(device=model.device)
        gen.manual_seed(0 if seed is None else seed)
    st = stats if stats is not None else GenerateStats()
    st.__init__()  # a reused stats object describes this call only
    st.prompt_tokens = int(lengths.sum()) if lengths is not None else B * S

    def now() -> float:
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        return time.perf_counter()

    t0 = now()
    tok = _sample(model.prefill(ids, lengths, tiles), temperature, top_p, gen)
    st.prefill_s = now() - t0
    step = GraphedDecode(model, B) if graphs else model.decode_step
    t0 = now()
    out = _decode_loop(tok, lambda t: _sample(step(t), temperature, top_p, gen), max_new_tokens, stop, on_tokens, st)
    st.decode_s = now() - t0
    st.new_tokens = B * st.decode_steps
    return out


def _decode_loop(tok: torch.Tensor, step, max_new_tokens: int, stop: set, on_tokens, st: GenerateStats):
    """Collect each sequence's tokens (the first from the prefill) until its stop token or ``max_new_tokens``."""
    B = tok.shape[0]
    out: List[List[int]] = [[] for _ in range(B)]
    done = [False] * B
    for n in range(max_new_tokens):
        new: List[Optional[int]] = [None] * B
        for b, t in enumerate(tok.tolist()):
            if not done[b]:
                out[b].append(t)
                new[b] = t
                done[b] = t in stop
        if on_tokens is not None:
            on_tokens(new)
        if all(done) or n == max_new_tokens - 1:
            break
        tok = step(tok)
        st.decode_steps += 1
    return out
