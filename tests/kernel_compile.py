"""Compile the Triton kernels our wrappers launch for a GPU target, on a machine without a GPU.

Run as a script (``python tests/kernel_compile.py CC``, without TRITON_INTERPRET): every ``kernel[grid](...)``
launch is replaced by ``triton.compile`` of that kernel, with the signature and constexprs of the call, for CUDA
compute capability CC, through ptxas (which Triton's wheels carry) to a cubin. The Triton interpreter runs
kernels as Python and never meets the code generator: a kernel can pass every interpreter test and still fail
to compile (two return types of one helper under different constexprs did). Prints one JSON line: the kernels
compiled and the failures.
"""
from __future__ import annotations

import json
import os
import sys
import traceback

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
          torch.int8: "i8", torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8", torch.bool: "i1",
          torch.float8_e4m3fn: "fp8e4nv"}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def signature(fn: JITFunction, args, kwargs):
    """The ``ASTSource`` signature and constexprs of one call, as the launcher would specialise it (no
    divisibility hints: the kernel must compile for any alignment); ``INTERPRET`` is forced off."""
    bound = dict(zip(fn.arg_names, args))
    bound.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
    sig, const = {}, {}
    for p in fn.params:
        v = bound[p.name] if p.name in bound else p.default
        if p.is_constexpr or v is None:
            sig[p.name] = "constexpr"
            const[p.name] = False if p.name == "INTERPRET" else v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + DTYPES[v.dtype]
        elif isinstance(v, bool):
            sig[p.name] = "i1"
        elif isinstance(v, int):
            sig[p.name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {p.name} of type {type(v).__name__}")
    return sig, const, {k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs}


class Compiler:
    """Stands in for JITFunction.run: compiles each distinct launch for ``target`` and records the outcome."""

    def __init__(self, target: GPUTarget) -> None:
        self.target, self.done, self.failed, self._seen = target, [], [], set()

    def run(self, fn: JITFunction, *args, grid=None, warmup=False, **kwargs):
        sig, const, opts = signature(fn, args, kwargs)
        key = (fn.__name__, tuple(sorted(sig.items())), repr(sorted(const.items())), tuple(sorted(opts.items())))
        if key in self._seen:
            return None
        self._seen.add(key)
        what = f"{fn.__name__}({', '.join(f'{k}={v}' for k, v in const.items() if not isinstance(v, torch.Tensor))})"
        print(f"compiling {what}", file=sys.stderr, flush=True)  # an abort in MLIR ends the process: say where
        try:
            triton.compile(ASTSource(fn, sig, const), target=self.target, options=opts)
            self.done.append(what)
        except Exception as e:  # noqa: BLE001  the report names it
            root = e
            while root.__cause__ is not None or (root.__context__ is not None and "CompilationError" in type(root).__name__):
                root = root.__cause__ or root.__context__
            self.failed.append(f"{what}: {type(e).__name__}: {repr(root)[:300]}")
        return None


def launches(cc: int) -> None:
    """The kernels the GPU paths launch, on small CPU tensors; 8-bit float variants only from cc 89."""
    from fastattn_dist.attention import triton_int8
    from fastattn_dist.attention.decode import split_decode
    from fastattn_dist.attention.int8_kv import Int8KV
    from fastattn_dist.masks import Mask
    from fastattn_dist.models.triton_fused import add_rms_norm, rope_append, silu_mul

    triton_int8._check_device = lambda t, precision: None  # no device here: the compile decides
    g = torch.Generator().manual_seed(0)
    B, S, Hq, Hkv, D = 1, 96, 4, 2, 128
    q = torch.randn(B, S, Hq, D, generator=g).bfloat16()
    k = torch.randn(B, S, Hkv, D, generator=g).bfloat16()
    v = torch.randn(B, S, Hkv, D, generator=g).bfloat16()
    pointer_config = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3, "USE_TMA": False}
    for precision in ("int8", "int8-fp8", "fp8") if cc >= 89 else ("int8",):
        for mask in (Mask(True, None, None), Mask(False, None, torch.tensor([70]))):
            kv = triton_int8.quantize_kv_triton(k, v, precision=precision, key_lengths=mask.key_lengths)
            triton_int8.triton_attention_quantized_kv(q, kv, mask, return_lse=True, config=dict(pointer_config))
    qd = q[:, :1].contiguous()
    kv_len = torch.tensor([S], dtype=torch.int32)
    split_decode(qd, k.contiguous(), v.contiguous(), kv_len, splits=2, return_lse=True)
    cache = Int8KV.zeros(B, S, Hkv, D, "cpu")
    split_decode(qd, cache.k, cache.v, kv_len, splits=2, quant=cache)
    cos = torch.randn(B, D // 2).bfloat16()
    qkv = torch.randn(B, (Hq + 2 * Hkv) * D, generator=g).bfloat16()
    rope_append(qkv, cos, cos, torch.tensor([3]), torch.zeros(B, S, Hkv, D).bfloat16(),
                torch.zeros(B, S, Hkv, D).bfloat16(), Hq, Hkv)
    rope_append(qkv, cos, cos, torch.tensor([3]), cache.k, cache.v, Hq, Hkv, int8=cache)
    h = torch.randn(2, 256, generator=g).bfloat16()
    add_rms_norm(h, torch.ones(256).bfloat16(), 1e-5, delta=h.clone())
    silu_mul(torch.randn(2, 512, generator=g).bfloat16())


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("run without TRITON_INTERPRET: the interpreter does not compile", file=sys.stderr)
        return 2
    cc = int(sys.argv[1])
    comp = Compiler(GPUTarget("cuda", cc, 32))
    JITFunction.run = lambda self, *a, **kw: comp.run(self, *a, **kw)
    try:
        launches(cc)
    except Exception:  # noqa: BLE001  a wrapper that failed before its launch
        comp.failed.append("launching: " + traceback.format_exc(limit=4))
    print(json.dumps({"cc": cc, "compiled": comp.done, "failed": comp.failed}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
