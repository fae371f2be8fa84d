"""One tile of query rows at its causal offset: the Triton kernel against the cuDNN split backend.

    python scripts/bench_tile_backends.py [--out DIR]     (on a CUDA GPU; writes tile_backends.json)

Per (S, heads): the whole sequence and the 1st, 2nd and 4th quarter of its rows, each written into a
slice of a [tokens, heads*d] buffer, bf16, d = 128, causal. Times: triton.testing.do_bench_cudagraph
(kernel time under graph replay). `cost_vs_sdpa_share` = tile time / (whole-sequence SDPA time x the
tile's share of the visible query-key pairs): 1.0 means the tile costs exactly its part of one call.
"""
import argparse
import json
import os

import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

from fastattn_dist import Causal
from fastattn_dist.attention.cudnn_split import cudnn_attention
from fastattn_dist.attention.triton_fa import triton_attention


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for S, H in [(8192, 16), (8192, 32), (32768, 16)]:
        q, k, v = (torch.randn(1, S, H, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        whole = do_bench_cudagraph(lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=True), rep=200)
        buf = torch.empty(S, H * 128, device="cuda", dtype=torch.bfloat16)
        tiles = {"whole": (0, S), "q1": (0, S // 4), "q2": (S // 4, S // 2), "q4": (3 * S // 4, S)}
        for name, (r0, r1) in tiles.items():
            pairs = (r1 * (r1 + 1) - r0 * (r0 + 1)) / 2
            share = pairs / (S * (S + 1) / 2)
            out = buf[r0:r1].view(1, r1 - r0, H, 128)
            row = {"S": S, "H": H, "tile": name, "rows": [r0, r1], "sdpa_whole_ms": whole}
            for bname, fn in (("triton", triton_attention), ("cudnn", cudnn_attention)):
                def call():
                    fn(q[:, r0:r1], k, v, Causal(), q_offset=r0, out=out)
                call()
                torch.cuda.synchronize()
                t = do_bench_cudagraph(call, rep=200)
                row[bname] = {"ms": round(t, 4), "tflops": round(4 * H * pairs * 128 / t / 1e9, 1),
                              "cost_vs_sdpa_share": round(t / (whole * share), 3)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tile_backends.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
