"""``fastattn-dist generate``: the TP model from the command line, text streamed as it is decoded.

It runs on gloo ranks spawned on CPU (like ``demo``) or under torchrun / mpirun (NCCL on GPUs). Everything
checkable is checked before a rank starts (the checkpoint, the world size against its heads, the prompt
against the vocabulary and the context length): a one-line error and exit code 2.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from typing import List, Optional

import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from ..models.checkpoint import Checkpoint
from ..models.generate import GenerateStats
from ..models.llama import LlamaForCausalLM
from ..models.presets import resolve_model
from ..parallel.link_models import LinkModel
from ..runner import job_device, run_job
from .model_options import add_budget_options, check_cache_fits, check_precision_offload, check_world, offload_arg
from .options import (add_precision_option, add_rank_options, launch_from_args, parse_dtype, positive_float,
                      positive_int, tiles_arg)


@dataclass(frozen=True)
class GenerateOptions:
    """What every rank of ``generate`` runs."""

    model: str
    dtype: torch.dtype
    tiles: object
    prompts: List[List[int]]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop_tokens: Optional[List[int]]
    link: Optional[LinkModel]
    kv_offload: object
    host_budget_gb: Optional[float]
    prefill_chunk: Optional[int]
    json: bool
    tokenizer: Optional[str]
    attn_precision: str = "bf16"
    gpu_budget_gb: Optional[float] = None


def generate_rank(rank: int, world: int, opts: GenerateOptions) -> Optional[dict]:
    model = LlamaForCausalLM.from_pretrained(opts.model, dtype=opts.dtype, device=job_device(), tiles=opts.tiles,
                                             link=opts.link, kv_offload=opts.kv_offload,
                                             host_budget_gb=opts.host_budget_gb, prefill_chunk=opts.prefill_chunk,
                                             attn_precision=opts.attn_precision,
                                             gpu_budget_gb=opts.gpu_budget_gb)
    stats = GenerateStats()
    stream = TokenStream(opts.tokenizer, opts.prompts, opts.max_new_tokens) if rank == 0 and not opts.json else None
    tokens = model.generate(opts.prompts, opts.max_new_tokens, temperature=opts.temperature, top_p=opts.top_p,
                            seed=opts.seed, stop_tokens=opts.stop_tokens, stats=stats, on_tokens=stream)
    if stream is not None:
        stream.close()
    if rank != 0:
        return None
    plan = model.kv_plan
    return {"tokens": tokens, "kv_cache": plan.describe() if plan else None, "gpu_budget_gb": opts.gpu_budget_gb,
            "prefill_tokens_per_s": stats.prefill_tokens_per_s,
            "decode_tokens_per_s": stats.decode_tokens_per_s, "prompt_tokens": stats.prompt_tokens,
            "new_tokens": sum(len(t) for t in tokens), "prefill_s": stats.prefill_s, "decode_s": stats.decode_s,
            "world_size": world, "device": str(model.device), "plan": list(model.last_plan.bounds),
            "streamed": stream is not None and stream.streams_text}


class TokenStream:
    """Rank 0's output of ``generate`` as tokens are decoded: one prompt streams its text (or ids) to stdout; a
    batch shows a progress bar on stderr and is printed, prompt by prompt, at the end."""

    def __init__(self, tokenizer_file: Optional[str], prompts: List[List[int]], max_new_tokens: int) -> None:
        self.tok = None
        if tokenizer_file is not None:
            self.tok = Tokenizer.from_file(tokenizer_file)
        self.prompts = prompts
        self.new: List[List[int]] = [[] for _ in prompts]
        self.streams_text = len(prompts) == 1
        self.bar = None
        if self.streams_text:
            self.shown = self._text(0) if self.tok is not None else ""
            print(f"[0] {self.shown}" if self.tok is not None else "[0] [", end="", flush=True)
        else:
            self.bar = tqdm(total=max_new_tokens, desc="[generate] decode", unit="tok", file=sys.stderr, delay=1.0)

    def _text(self, i: int) -> str:
        return self.tok.decode(self.prompts[i] + self.new[i], skip_special_tokens=True)

    def __call__(self, new: List[Optional[int]]) -> None:
        for i, t in enumerate(new):
            if t is not None:
                self.new[i].append(t)
        if self.bar is not None:
            self.bar.update(1)
            return
        if new[0] is None:
            return
        if self.tok is None:
            print(("" if len(self.new[0]) == 1 else ", ") + str(new[0]), end="", flush=True)
            return
        # a character split across tokens decodes as U+FFFD until its last byte arrives: hold those back
        text = self._text(0).rstrip("\ufffd")
        if text.startswith(self.shown):
            print(text[len(self.shown):], end="", flush=True)
            self.shown = text

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.tok is None:
            print("]", flush=True)
        else:
            rest = self._text(0)
            print(rest[len(self.shown):] if rest.startswith(self.shown) else "", flush=True)


def _parse_ids(text: str) -> List[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise ValueError(f"--prompt-ids takes comma-separated ints, got {text!r}") from None
    if not ids:
        raise ValueError("--prompt-ids is empty: a prompt needs at least one token")
    return ids


def _prompts(args, cfg, tok) -> List[List[int]]:
    """The prompts as ids, each checked against the vocabulary and the context."""
    if args.prompt:
        if tok is None:
            raise ValueError(f"{args.model} has no tokenizer.json: give the prompt as ids (--prompt-ids 1,2,3)")
        prompts = [tok.encode(p).ids for p in args.prompt]
        if cfg.bos_token_id is not None:
            prompts = [([cfg.bos_token_id] if not p or p[0] != cfg.bos_token_id else []) + p for p in prompts]
    else:
        prompts = [_parse_ids(p) for p in args.prompt_ids]
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty")
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {cfg.vocab_size}): {bad[:5]}")
        if len(p) + args.max_new_tokens > cfg.max_position_embeddings:
            raise ValueError(f"prompt {i} ({len(p)} tokens) + --max-new-tokens {args.max_new_tokens} exceeds the "
                             f"model's context ({cfg.max_position_embeddings})")
    return prompts


def cmd_generate(args) -> int:
    launch = launch_from_args(args)
    path = resolve_model(args.model)
    if path != args.model and args.model != "tiny":
        raise ValueError(f"generate needs a checkpoint: --model {args.model} is a benchmark shape with random weights")
    ckpt = Checkpoint(path)
    cfg = ckpt.config
    tok = None
    if ckpt.tokenizer_file is not None:
        tok = Tokenizer.from_file(ckpt.tokenizer_file)
    prompts = _prompts(args, cfg, tok)
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    bad = [t for t in (args.stop_tokens or []) if not 0 <= t < cfg.vocab_size]
    if bad:
        raise ValueError(f"--stop-tokens {bad[:5]} are outside the vocabulary [0, {cfg.vocab_size})")
    dtype = parse_dtype(args.dtype) if args.dtype else (torch.float32 if launch.device_type() == "cpu" else
                                                         torch.bfloat16)
    kv_offload = offload_arg(args.kv_offload)
    check_precision_offload(args.attn_precision, [kv_offload])
    if kv_offload == "auto" and launch.device_type() != "cuda":
        raise ValueError("--kv-offload auto splits the KV cache between a GPU and host memory: this run is on CPU")
    if args.gpu_budget_gb is not None and launch.device_type() != "cuda":
        raise ValueError("--gpu-budget-gb caps a GPU's memory: this run is on CPU")
    tokens = max(len(p) for p in prompts) + args.max_new_tokens

    def check(world: int) -> None:
        check_world(path, world)
        check_cache_fits(cfg, dtype, world, kv_offload, tokens, len(prompts), args.host_budget_gb, args.gpu_budget_gb)
    opts = GenerateOptions(path, dtype, args.tiles, prompts, args.max_new_tokens, args.temperature, args.top_p,
                           args.seed, args.stop_tokens, None if args.no_link else
                           LinkModel(args.link_latency_us, args.link_gbps), kv_offload, args.host_budget_gb,
                           args.prefill_chunk, args.json, ckpt.tokenizer_file, args.attn_precision, args.gpu_budget_gb)
    res = run_job(generate_rank, launch, (opts,), check_world=check, label="generate")
    if res is None:
        return 0
    for i, toks in enumerate([] if res["streamed"] else res["tokens"]):
        print(f"[{i}] {tok.decode(prompts[i] + toks, skip_special_tokens=True)}" if tok is not None else f"[{i}] {toks}")
    n = res["world_size"]
    view = f" (GPU budget {res['gpu_budget_gb']:g} GB: a smaller GPU's view)" if res.get("gpu_budget_gb") else ""
    print(f"prefill {res['prefill_tokens_per_s']:.1f} tokens/s ({res['prompt_tokens']} tokens), decode "
          f"{res['decode_tokens_per_s']:.1f} tokens/s; {n} rank{'s' if n > 1 else ''} on {res['device']}{view}",
          file=sys.stderr)
    if res.get("kv_cache"):
        print(res["kv_cache"], file=sys.stderr)
    if args.json:
        print(json.dumps(res))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text (or ids) with a TP Llama-family model")
    add_rank_options(p)
    p.add_argument("--model", required=True,
                   help="checkpoint directory (Hugging Face format), or 'tiny' (a small random model made once, locally)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", action="append", help="a prompt (repeat for a batch); needs the checkpoint's tokenizer")
    g.add_argument("--prompt-ids", action="append", help="a prompt as comma-separated token ids (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=positive_int, default=32, help="tokens to generate per prompt (default 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sampling")
    p.add_argument("--top-p", type=positive_float, default=1.0, help="nucleus sampling mass (default 1)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--stop-tokens", type=int, nargs="*", default=None, help="default: the checkpoint's eos tokens")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: float32 on CPU, else bfloat16)")
    p.add_argument("--tiles", type=tiles_arg, default="auto", help="prefill tiles, or auto (default)")
    p.add_argument("--link-latency-us", type=float, default=50.0, help="simulated link of CPU ranks (default 50)")
    p.add_argument("--link-gbps", type=float, default=0.08, help="simulated link bandwidth, GB/s (default 0.08)")
    p.add_argument("--no-link", action="store_true", help="no simulated link")
    p.add_argument("--kv-offload", default="off",
                   help="off (default), auto (split the KV cache between the GPU and host memory when it does not "
                        "fit), or a number of tokens per sequence to keep on the device")
    add_budget_options(p)
    p.add_argument("--prefill-chunk", type=positive_int, default=None,
                   help="prefill in chunks of this many tokens (default: whole prompts; with a host tier the cost "
                        "model's choice)")
    p.add_argument("--json", action="store_true", help="one JSON object on the last line (tokens, tokens/s)")
    add_precision_option(p)
    p.set_defaults(func=cmd_generate)
