"""``fastattn-dist generate`` and ``fastattn-dist bench-model``: the model from the command line.

Both run on gloo ranks spawned on CPU (like ``demo``) or under torchrun / mpirun (NCCL on GPUs).
Everything checkable is checked before a rank starts (the checkpoint, the world size against its
heads, the prompt against the vocabulary and the context length): a one-line error and exit code 2.
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from datetime import date
from typing import List, Optional

import torch

MODEL_HELP = "checkpoint directory (Hugging Face format), or 'tiny' (a small random model made once, locally)"
SHAPE_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768, rope_theta=10000.0,
                rms_norm_eps=1e-5)
# Llama-2-7B's shape (multi-head: 32 kv heads, 512 KiB of KV per token), with a context long enough for 256K
SHAPE_7B_MHA = dict(SHAPE_7B, intermediate_size=11008, num_key_value_heads=32, max_position_embeddings=1 << 20)
SHAPES = {"7b": ("MistralForCausalLM", "mistral", SHAPE_7B), "7b-mha": ("LlamaForCausalLM", "llama", SHAPE_7B_MHA)}


def resolve_model(name: str, layers: Optional[int] = None) -> str:
    if name == "tiny":
        from .tiny import tiny_checkpoint
        path = tiny_checkpoint()
        if layers is None:
            return path
        # a variant with another depth, made once beside it (same weights for the layers they share)
        from .config import LlamaConfig
        from .tiny import random_checkpoint
        variant = f"{path}-{layers}layers"
        if not os.path.exists(os.path.join(variant, "config.json")):
            cfg = LlamaConfig.from_file(os.path.join(path, "config.json")).replace(num_hidden_layers=layers)
            random_checkpoint(variant, cfg)
        return variant
    if not os.path.isdir(name):
        raise ValueError(f"--model {name!r} is not a checkpoint directory (or 'tiny')")
    return name


def check_world(path: str, world: int) -> None:
    from .checkpoint import Checkpoint
    from .llama import TPShard

    ckpt = Checkpoint(path)
    ckpt.check_complete()
    TPShard(ckpt.config, world, 0)


# -- generate --------------------------------------------------------------------------------------------
def generate_rank(rank: int, world: int, opts: dict) -> Optional[dict]:
    from ..config import LinkModel
    from ..runner import job_device
    from .generate import GenerateStats
    from .llama import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(opts["model"], dtype=opts["dtype"], device=job_device(),
                                             tiles=opts["tiles"], link=LinkModel(*opts["link"]) if opts["link"] else None,
                                             kv_offload=opts["kv_offload"], host_budget_gb=opts["host_budget_gb"],
                                             prefill_chunk=opts["prefill_chunk"])
    stats = GenerateStats()
    stream = TokenStream(opts["tokenizer"], opts["prompts"], opts["max_new_tokens"]) \
        if rank == 0 and not opts["json"] else None
    tokens = model.generate(opts["prompts"], opts["max_new_tokens"], temperature=opts["temperature"],
                            top_p=opts["top_p"], seed=opts["seed"], stop_tokens=opts["stop_tokens"], stats=stats,
                            on_tokens=stream)
    if stream is not None:
        stream.close()
    if rank != 0:
        return None
    plan = model.kv_plan
    return {"tokens": tokens, "kv_cache": plan.describe() if plan else None, "prefill_tokens_per_s": stats.prefill_tokens_per_s,
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
            from tokenizers import Tokenizer
            self.tok = Tokenizer.from_file(tokenizer_file)
        self.prompts = prompts
        self.new: List[List[int]] = [[] for _ in prompts]
        self.streams_text = len(prompts) == 1
        self.bar = None
        if self.streams_text:
            self.shown = self._text(0) if self.tok is not None else ""
            print(f"[0] {self.shown}" if self.tok is not None else "[0] [", end="", flush=True)
        else:
            from tqdm import tqdm
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


def _tokenizer(path: str):
    from .checkpoint import Checkpoint

    file = Checkpoint(path).tokenizer_file
    if file is None:
        return None
    from tokenizers import Tokenizer
    return Tokenizer.from_file(file)


def _offload_arg(value: str):
    if value in ("off", "auto"):
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"--kv-offload takes off, auto or a number of tokens >= 1, got {value!r}")
    return n


def _parse_ids(text: str) -> List[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise ValueError(f"--prompt-ids takes comma-separated ints, got {text!r}") from None
    if not ids:
        raise ValueError("--prompt-ids is empty: a prompt needs at least one token")
    return ids


def cmd_generate(args) -> int:
    from ..cli import launch_from_args
    from ..runner import run_job
    from ..workload import parse_dtype
    from .checkpoint import Checkpoint

    launch = launch_from_args(args)
    path = resolve_model(args.model)
    cfg = Checkpoint(path).config
    tok = _tokenizer(path)
    if args.prompt:
        if tok is None:
            raise ValueError(f"{path} has no tokenizer.json: give the prompt as ids (--prompt-ids 1,2,3)")
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
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    bad = [t for t in (args.stop_tokens or []) if not 0 <= t < cfg.vocab_size]
    if bad:
        raise ValueError(f"--stop-tokens {bad[:5]} are outside the vocabulary [0, {cfg.vocab_size})")
    dtype = parse_dtype(args.dtype) if args.dtype else None
    if dtype is None:
        dtype = torch.float32 if launch.device_type() == "cpu" else torch.bfloat16
    opts = {"model": path, "dtype": dtype, "tiles": args.tiles, "prompts": prompts,
            "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "seed": args.seed, "stop_tokens": args.stop_tokens,
            "link": None if args.no_link else (args.link_latency_us, args.link_gbps),
            "kv_offload": _offload_arg(args.kv_offload), "host_budget_gb": args.host_budget_gb,
            "prefill_chunk": args.prefill_chunk, "json": args.json, "tokenizer": Checkpoint(path).tokenizer_file}
    if opts["kv_offload"] == "auto" and launch.device_type() != "cuda":
        raise ValueError("--kv-offload auto splits the KV cache between a GPU and host memory: this run is on CPU")
    res = run_job(generate_rank, launch, (opts,), check_world=lambda w: check_world(path, w), label="generate")
    if res is None:
        return 0
    for i, toks in enumerate([] if res["streamed"] else res["tokens"]):
        if tok is not None:
            print(f"[{i}] {tok.decode(prompts[i] + toks, skip_special_tokens=True)}")
        else:
            print(f"[{i}] {toks}")
    print(f"prefill {res['prefill_tokens_per_s']:.1f} tokens/s ({res['prompt_tokens']} tokens), decode "
          f"{res['decode_tokens_per_s']:.1f} tokens/s; {res['world_size']} rank{'s' if res['world_size'] > 1 else ''} "
          f"on {res['device']}", file=sys.stderr)
    if args.json:
        print(json.dumps({k: v for k, v in res.items()}))
    return 0


def add_generate_parser(sub) -> None:
    from ..cli import add_rank_options, positive_float, positive_int, tiles_arg

    p = sub.add_parser("generate", help="generate text (or ids) with a TP Llama-family model")
    add_rank_options(p)
    p.add_argument("--model", required=True, help=MODEL_HELP)
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
    p.add_argument("--host-budget-gb", type=positive_float, default=None,
                   help="host memory the KV cache may take (default: 80%% of what is available)")
    p.add_argument("--prefill-chunk", type=positive_int, default=None,
                   help="prefill in chunks of this many tokens (default: whole prompts; 8192 with offload)")
    p.add_argument("--json", action="store_true", help="one JSON object on the last line (tokens, tokens/s)")
    p.set_defaults(func=cmd_generate)


# -- bench-model -------------------------------------------------------------------------------------------
class StateDictCheckpoint:
    """The ``read`` of models.checkpoint.Checkpoint over tensors in memory (a random model shared with HF)."""

    def __init__(self, config, tensors: dict) -> None:
        self.config, self.tensors = config, tensors

    def read(self, name, dim=None, start=0, end=None, *, dtype=None, device=None):
        t = self.tensors[name]
        if dim is not None:
            t = t.narrow(dim, start, (t.shape[dim] if end is None else end) - start)
        return t.to(device=device, dtype=dtype)


def _hf_model(cfg, dtype, device, seed):
    """A transformers model of ``cfg`` with random weights, made on ``device`` (the 7B-shaped benchmark)."""
    import transformers

    torch.manual_seed(seed)
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_dict())
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def _attn_impl(model, impl: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:  # older transformers
        model.config._attn_implementation = impl


def _peak_and_copy(device: torch.device) -> dict:
    """The two ceilings, measured now: a large bf16 GEMM's FLOP/s and a device copy's bytes/s (read + written)."""
    from ..runner import median_ms

    if device.type != "cuda":
        return {}
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    gemm_ms = median_ms(lambda: a @ a, device, 10, 3)
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    copy_ms = median_ms(lambda: y.copy_(x), device, 10, 3)
    del a, x, y
    return {"gemm_tflops": 2 * 8192 ** 3 / gemm_ms / 1e9, "copy_gbps": 2 * (1 << 30) / copy_ms / 1e6}


def model_flops(cfg, batch: int, seq: int) -> float:
    """Prefill FLOPs: 2 x params (without the embedding table) per token, plus causal attention."""
    D = cfg.head_dim
    per_layer = cfg.hidden_size * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * D + \
        cfg.num_attention_heads * D * cfg.hidden_size + 3 * cfg.hidden_size * cfg.intermediate_size
    params = cfg.num_hidden_layers * per_layer + cfg.vocab_size * cfg.hidden_size  # + LM head
    attn = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * D * seq * (seq + 1) / 2
    return batch * (2 * params * seq + attn)


def decode_bytes(cfg, batch: int, kv_len: int, elem: int) -> float:
    """Bytes one decode step must read: every weight but the embedding table once, and each sequence's KV."""
    D = cfg.head_dim
    per_layer = cfg.hidden_size * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * D + \
        cfg.num_attention_heads * D * cfg.hidden_size + 3 * cfg.hidden_size * cfg.intermediate_size + 2 * cfg.hidden_size
    weights = (cfg.num_hidden_layers * per_layer + cfg.vocab_size * cfg.hidden_size + cfg.hidden_size) * elem
    kv = 2 * cfg.num_hidden_layers * batch * kv_len * cfg.num_key_value_heads * D * elem
    return weights + kv


def bench_model_rank(rank: int, world: int, opts: dict) -> Optional[dict]:
    from ..config import LinkModel
    from ..runner import interleaved_median_ms, job_device, median_ms, sync
    from .config import LlamaConfig
    from .generate import GenerateStats
    from .llama import LlamaForCausalLM

    device = job_device()
    dtype = opts["dtype"]
    link = LinkModel(*opts["link"]) if opts["link"] else None
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if rank == 0 else (lambda m: None)
    hf = None
    if opts["model"] in SHAPES:
        arch, mtype, shape = SHAPES[opts["model"]]
        cfg = LlamaConfig.from_dict({"architectures": [arch], "model_type": mtype, "torch_dtype": "bfloat16",
                                     "sliding_window": None, **shape})
        ours = LlamaForCausalLM(cfg, dtype=dtype, device=device, tiles="auto", link=link,
                                max_seq_len=opts["seq"] + opts["decode_tokens"] + 1)
        if opts["hf"]:
            log(f"[bench-model] building a random {opts['model']}-shaped model (transformers, on the device)")
            hf = _hf_model(cfg, dtype, device, opts["seed"])
            ours.load(StateDictCheckpoint(cfg, dict(hf.state_dict())))
        else:
            log(f"[bench-model] random {opts['model']}-shaped weights, on the device")
            ours.init_random_weights(opts["seed"])
    else:
        ours = LlamaForCausalLM.from_pretrained(opts["model"], dtype=dtype, device=device, link=link,
                                                max_seq_len=opts["seq"] + opts["decode_tokens"] + 1)
        cfg = ours.config
        if opts["hf"] and world > 1:
            log("[bench-model] no transformers baselines: they run at --world-size 1 only (one process, whole model)")
        if opts["hf"] and world == 1:
            import transformers
            hf = transformers.AutoModelForCausalLM.from_pretrained(opts["model"], dtype=dtype,
                                                                   attn_implementation="sdpa").to(device).eval()
    if opts.get("contexts"):
        return long_context(ours, cfg, opts, rank, world, log)
    B, S = opts["batch"], opts["seq"]
    g = torch.Generator().manual_seed(opts["seed"])
    ids = torch.randint(3, cfg.vocab_size, (B, S), generator=g).to(device)
    profile = _profile_prefill(ours, ids, opts) if opts.get("profile") else None
    res = {"model": opts["model_label"], "batch": B, "seq": S, "world": world, "device": str(device),
           "dtype": str(dtype).replace("torch.", ""), "prefill_ms": {}, "decode_tokens_per_s": {}}
    reps, warm = opts["repeats"], opts["warmup"]
    with torch.no_grad():
        log(f"[bench-model] prefill ours, tiles auto and 1, in turn ({B} x {S} tokens)")
        res["prefill_ms"].update(interleaved_median_ms(
            {"ours": lambda: ours(ids, tiles="auto", last_only=True),
             "ours_tiles1": lambda: ours(ids, tiles=1, last_only=True)}, device, reps, warm))
        res["plan"] = list(ours.plan_for(B, S, "auto").bounds)
        if hf is not None:
            for impl in ("eager", "sdpa"):
                log(f"[bench-model] prefill transformers {impl}")
                _attn_impl(hf, impl)
                res["prefill_ms"][f"hf_{impl}"] = median_ms(lambda: hf(ids, logits_to_keep=1), device, reps, warm)
        # decode: prefill once, then decode_tokens greedy steps (CUDA graphs on GPUs)
        n = opts["decode_tokens"]
        st = GenerateStats()
        for _ in range(2):  # the first run captures the graph and warms up
            ours.generate(ids, n, stop_tokens=[], stats=st)
        res["decode_tokens_per_s"]["ours"] = st.decode_tokens_per_s
        if hf is not None:
            _attn_impl(hf, "sdpa")
            res["decode_tokens_per_s"]["hf_sdpa"] = hf_decode_tokens_per_s(hf, ids, n, device)
        sync(device)
    if rank != 0:
        return None
    if profile is not None:
        res["profile"] = profile
    res.update(_peak_and_copy(device))
    flops = model_flops(cfg, B, S) / world
    for label, ms in res["prefill_ms"].items():
        res.setdefault("prefill_tokens_per_s", {})[label] = B * S / (ms / 1e3)
        if "gemm_tflops" in res:
            f = flops if label.startswith("ours") else flops * world  # transformers runs the whole model here
            res.setdefault("mfu", {})[label] = f / (ms / 1e3) / (res["gemm_tflops"] * 1e12)
    if "copy_gbps" in res:
        per_step = decode_bytes(cfg, B, S + n // 2, torch.tensor([], dtype=dtype).element_size()) / world
        bound_tps = B / (per_step / (res["copy_gbps"] * 1e9))
        res["decode_bound_tokens_per_s"] = bound_tps
        res["decode_share_of_bound"] = {k: v / bound_tps for k, v in res["decode_tokens_per_s"].items()}
    return res


def hf_decode_tokens_per_s(hf, ids: torch.Tensor, steps: int, device: torch.device) -> float:
    """transformers' decode rate, timed over its decode steps alone (greedy, its own KV cache): one prefill
    untimed, then ``steps`` single-token forwards between two clock reads. A rate measured directly, never
    the difference of two end-to-end timings (which include a prefill each and went negative under load)."""
    from ..runner import sync

    out = hf(ids, use_cache=True, logits_to_keep=1)
    cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = hf(tok, past_key_values=cache, use_cache=True)
        cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    sync(device)
    return ids.shape[0] * steps / (time.perf_counter() - t0)


def long_context(model, cfg, opts, rank: int, world: int, log) -> Optional[dict]:
    """Prefill of each context, then decode steps, for each KV offload mode: tokens/s, the KV split between the
    tiers, where decode attention ran; and the longest context the device alone holds."""
    from ..runner import sync
    from .generate import GenerateStats

    device = model.device
    res = {"model": opts["model_label"], "world": world, "device": str(device), "runs": []}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        res["device_free_gib"] = free / (1 << 30)
        model.kv_offload = "off"
        res["longest_without_offload"] = int((free - model.kv_reserve_bytes()) // model.kv_bytes_per_token())
    # Untimed: each path once at a short context (kernel compiles, cuDNN plans, the first pinned allocations),
    # the offloaded one with half of it on the host.
    warm_ctx = min(min(opts["contexts"]), 512)
    warm_ids = torch.randint(3, cfg.vocab_size, (1, warm_ctx), generator=torch.Generator().manual_seed(1)).to(device)
    for mode in dict.fromkeys("off" if m == "off" else max(1, warm_ctx // 2) for m in opts["kv_offload"]):
        model.cache, model.kv_plan, model.kv_offload = None, None, mode
        model.generate(warm_ids, 2, stop_tokens=[])
    for ctx in opts["contexts"]:
        for mode in opts["kv_offload"]:
            run = {"context": ctx, "kv_offload": mode}
            model.cache, model.kv_plan = None, None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            model.kv_offload = int(mode) if mode not in ("auto", "off") else mode
            ids = torch.randint(3, cfg.vocab_size, (1, ctx), generator=torch.Generator().manual_seed(0)).to(device)
            log(f"[bench-model] context {ctx}, kv offload {mode}")
            st = GenerateStats()
            try:
                model.generate(ids, opts["decode_tokens"], stop_tokens=[], stats=st)
            except (ValueError, torch.OutOfMemoryError) as e:
                run["error"] = f"{type(e).__name__}: {e}"[:300]
                log(f"[bench-model]   does not run: {run['error']}")
                res["runs"].append(run)
                continue
            sync(device)
            plan = model.kv_plan
            run.update(prefill_tokens_per_s=st.prefill_tokens_per_s, decode_tokens_per_s=st.decode_tokens_per_s,
                       prefill_s=st.prefill_s, decode_s=st.decode_s, kv_plan=plan.describe() if plan else None,
                       gpu_tokens=plan.gpu_tokens if plan else ctx,
                       kv_device_gib=getattr(model.cache, "gpu_bytes", None) and model.cache.gpu_bytes / (1 << 30),
                       kv_host_gib=getattr(model.cache, "host_bytes", 0) / (1 << 30),
                       decode_host=plan.decode_host if plan and plan.offloaded else None,
                       pcie_gbps=plan.pcie_gbps if plan else None, cpu_gbps=plan.cpu_gbps if plan else None)
            if run["kv_device_gib"] is None:
                run["kv_device_gib"] = model.cache.nbytes / (1 << 30)
            log(f"[bench-model]   prefill {run['prefill_tokens_per_s']:.0f} tokens/s, decode "
                f"{run['decode_tokens_per_s']:.2f} tokens/s; {run['kv_plan']}")
            res["runs"].append(run)
            model.cache = None
    return res if rank == 0 else None


def _profile_prefill(model, ids, opts):
    """Record the 1-tile and the tiled prefill (``repeats`` iterations each) on every rank; the gathered
    Profile on rank 0 (profiler/: the timeline, exposed comm per run)."""
    from ..profiler.gather import estimate_clock_offsets, gather_profile
    from ..profiler.recorder import SpanRecorder
    from ..runner import barrier

    rec = SpanRecorder(model.tp.rank, ids.device)
    with torch.no_grad():
        for label, tiles in (("sequential", 1), ("tiled", "auto")):
            model(ids, tiles=tiles, last_only=True)  # warm
            rec.run = label
            for i in range(opts["repeats"]):
                rec.step = i
                barrier(ids.device)
                model.recorder = rec
                try:
                    model(ids, tiles=tiles, last_only=True)
                finally:
                    model.recorder = None
    meta = {"what": "TP model prefill", "device": str(ids.device), "attention_backend": model.attn_backend,
            "plan": list(model.last_plan.bounds),
            "num_tiles": model.last_plan.num_tiles,
            "describe": f"{opts['model_label']} model, {model.config.num_hidden_layers} layers, prefill of "
                        f"{ids.shape[0]} x {ids.shape[1]} tokens"}
    return gather_profile(rec.spans(), estimate_clock_offsets(), meta)


def out_label(model: str) -> str:
    """The model's part of an output file name: the built-in names, else 'ckpt' (a path has slashes)."""
    return model if model in ("tiny", *SHAPES) else "ckpt"


def cmd_bench_model(args) -> int:
    from ..cli import launch_from_args
    from ..runner import run_job
    from ..workload import parse_dtype

    launch = launch_from_args(args)
    gpu = launch.device_type() == "cuda"
    if args.model in SHAPES:
        if not gpu:
            raise ValueError(f"--model {args.model} needs a GPU (the model, and with transformers twice)")
        path = args.model
    else:
        path = resolve_model(args.model, args.layers)
    if args.layers is not None and args.model != "tiny":
        raise ValueError("--layers applies to --model tiny only")
    want_hf = not args.no_hf
    if want_hf:
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise ValueError("the transformers baselines need the 'hf' extra (pip install 'fastattn-dist[hf]'); "
                             "or pass --no-hf") from None
    if path not in SHAPES:
        from .checkpoint import Checkpoint
        limit = Checkpoint(path).config.max_position_embeddings
        longest = max(args.context) if args.context else args.seq
        if longest + args.decode_tokens > limit:
            raise ValueError(f"{'--context' if args.context else '--seq'} {longest} + --decode-tokens "
                             f"{args.decode_tokens} exceeds the model's context ({limit})")
    modes = args.kv_offload if args.kv_offload is not None else (["off", "auto"] if gpu else ["off"])
    modes = [_offload_arg(m) for m in modes]
    if not args.context and args.kv_offload is not None:
        raise ValueError("--kv-offload goes with --context (long-context mode)")
    if "auto" in modes and not gpu:
        raise ValueError("--kv-offload auto splits the KV cache between a GPU and host memory: this run is on CPU "
                         "(give a number of tokens to split a CPU cache, e.g. --kv-offload off 1024)")
    if args.out:
        from ..profiler.export import check_writable
        check_writable(args.out)
    dtype = parse_dtype(args.dtype) if args.dtype else (torch.bfloat16 if gpu else torch.float32)
    opts = {"model": path, "model_label": args.model, "dtype": dtype, "batch": args.batch, "seq": args.seq,
            "decode_tokens": args.decode_tokens, "repeats": args.repeats, "warmup": args.warmup, "seed": args.seed,
            "hf": want_hf, "link": None if (args.no_link or gpu) else (args.link_latency_us, args.link_gbps),
            "profile": args.profile}
    if args.profile:
        from ..profiler.export import check_writable
        check_writable(args.profile)
    check = None if path in SHAPES else (lambda w: check_world(path, w))
    if args.context:
        if args.profile:
            raise ValueError("--profile and --context do not go together")
        opts.update(contexts=args.context, kv_offload=[str(m) for m in modes], hf=False)
    res = run_job(bench_model_rank, launch, (opts,), check_world=check, label="bench-model")
    if res is None:
        return 0
    res["command"] = "fastattn-dist " + " ".join(sys.argv[1:])
    res["date"] = date.today().isoformat()
    res["torch"] = torch.__version__
    res["device_name"] = torch.cuda.get_device_name(0) if gpu else (platform.processor() or "CPU")
    if args.context:
        print(context_markdown(res))
        return _write_results(res, args, "bench_context")
    prof = res.pop("profile", None)
    if prof is not None:
        from ..profiler.export import write_outputs
        from ..profiler.metrics import format_runs
        from ..profiler.report import render
        files, summary = render(prof, True, {"command": "fastattn-dist " + " ".join(sys.argv[1:])})
        paths = write_outputs(args.profile, files)
        res["profile_runs"] = {k: {m: v[m] for m in ("tiles", "block_ms", "compute_ms", "comm_ms", "exposed_comm_ms",
                                                     "overlap_fraction")} for k, v in summary["runs"].items()}
        print(format_runs(summary))
        print("wrote " + ", ".join(paths), file=sys.stderr)
    print(markdown(res))
    return _write_results(res, args, "bench_model")


def _write_results(res: dict, args, kind: str) -> int:
    """``--out``: ``<kind>_<model label>.json`` there; ``--json``: the same object on the last line."""
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"{kind}_{out_label(args.model)}.json"), "w") as f:
            json.dump(res, f, indent=1)
    if args.json:
        print(json.dumps(res))
    return 0


def context_markdown(r: dict) -> str:
    lines = [f"Command: `{r['command']}`  ", f"Device: {r['device_name']} ({r['world']} ranks); torch {r['torch']}; date "
             f"{r['date']}; longest context the device alone holds: {r.get('longest_without_offload', '-')} tokens  ",
             "", "| context | kv offload | prefill tokens/s | decode tokens/s | KV on device GiB | KV on host GiB | "
             "decode host attention | note |", "|---|---|---|---|---|---|---|---|"]
    for run in r["runs"]:
        if "error" in run:
            lines.append(f"| {run['context']} | {run['kv_offload']} | - | - | - | - | - | {run['error'][:120]} |")
            continue
        lines.append(f"| {run['context']} | {run['kv_offload']} | {run['prefill_tokens_per_s']:.0f} | "
                     f"{run['decode_tokens_per_s']:.2f} | {run['kv_device_gib']:.1f} | {run['kv_host_gib']:.1f} | "
                     f"{run['decode_host'] or '-'} | {run['kv_plan'] or ''} |")
    return "\n".join(lines)


def markdown(r: dict) -> str:
    lines = [f"Command: `{r['command']}`  ", f"Device: {r['device_name']} ({r['world']} ranks, {r['dtype']}); torch "
             f"{r['torch']}; date {r['date']}; prompt {r['batch']} x {r['seq']} tokens, our prefill plan {r.get('plan')}  ",
             "", "| prefill | ms | tokens/s | speedup of ours over this row | MFU |", "|---|---|---|---|---|"]
    ours = r["prefill_ms"]["ours"]
    for k, ms in r["prefill_ms"].items():
        mfu = r.get("mfu", {}).get(k)
        lines.append(f"| {k} | {ms:.2f} | {r['prefill_tokens_per_s'][k]:.0f} | {ms / ours:.2f}x | "
                     f"{'-' if mfu is None else f'{mfu:.0%}'} |")
    lines += ["", "| decode | tokens/s | share of the bandwidth bound |", "|---|---|---|"]
    for k, tps in r["decode_tokens_per_s"].items():
        share = r.get("decode_share_of_bound", {}).get(k)
        lines.append(f"| {k} | {tps:.1f} | {'-' if share is None else f'{share:.0%}'} |")
    if "copy_gbps" in r:
        lines.append(f"\nCeilings measured in the same run: bf16 GEMM {r['gemm_tflops']:.0f} TFLOP/s, device copy "
                     f"{r['copy_gbps']:.0f} GB/s (read + written); decode bound {r['decode_bound_tokens_per_s']:.1f} "
                     "tokens/s (weights but the embedding table + KV read once per step)")
    return "\n".join(lines)


def add_bench_model_parser(sub) -> None:
    from ..cli import add_rank_options, nonneg_int, positive_int

    p = sub.add_parser("bench-model", help="time prefill and decode of the TP model against transformers "
                                           "(eager and sdpa) and our model with tiles=1")
    add_rank_options(p, world_default=2)
    p.add_argument("--model", default="tiny", help=MODEL_HELP + ", or '7b' / '7b-mha' (random Mistral-7B / "
                                                               "Llama-2-7B-shaped weights, GPU); default tiny")
    p.add_argument("--context", type=positive_int, nargs="*", default=None,
                   help="long-context mode: prefill each of these contexts, then --decode-tokens steps, per --kv-offload")
    p.add_argument("--kv-offload", nargs="+", default=None,
                   help="with --context: KV cache modes to run: off, auto (GPU), or a number of tokens on the device "
                        "(default: off auto on GPUs, off on CPU)")
    p.add_argument("--seq", type=positive_int, default=1024, help="prompt tokens per sequence (default 1024)")
    p.add_argument("--batch", type=positive_int, default=1, help="sequences per prompt batch (default 1)")
    p.add_argument("--decode-tokens", type=positive_int, default=32, help="decode steps timed (default 32)")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on GPUs, float32 on CPU")
    p.add_argument("--no-hf", action="store_true",
                   help="skip the transformers baselines (they run at --world-size 1 only, or with --model 7b/7b-mha)")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed prefills per variant (default 5)")
    p.add_argument("--warmup", type=nonneg_int, default=3, help="untimed runs before timing (default 3: the first runs plan tiles and allocate)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompt (default 0)")
    p.add_argument("--layers", type=positive_int, default=None, help="with --model tiny: a variant of this depth")
    p.add_argument("--link-latency-us", type=float, default=50.0, help="simulated link of CPU ranks (default 50)")
    p.add_argument("--link-gbps", type=float, default=0.04,
                   help="simulated link bandwidth of CPU ranks, GB/s (default 0.04: a prefill's all-reduces then take "
                        "about what its compute takes, as at TP=4 on H200s)")
    p.add_argument("--no-link", action="store_true", help="no simulated link")
    p.add_argument("--profile", default=None, help="record the 1-tile and the tiled prefill: timeline, trace and "
                                                   "metrics into this folder")
    p.add_argument("--out", default=None, help="folder for the JSON: bench_model_<name>.json (bench_context_<name>.json "
                                               "with --context), name = tiny, 7b, 7b-mha, or ckpt for a directory")
    p.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    p.set_defaults(func=cmd_bench_model)
