"""Draw the kernel timelines written by trace_tile_overlap.py: one panel per variant, one lane per stream (streams as the graph replay used them).

  python scripts/plot_kernel_trace.py docs/emulation/trace_tp4_h8192_s8192.json --out trace.png \
      --variants compute_s1 compute_s2 nccl_s1_prio-1_ctas16 copy_engine_s1_prio-1_ctas16
"""
from __future__ import annotations

import argparse
import json

KINDS = (  # (name fragment, label, colour); the first match wins
    ("sdpa", "attention (cuDNN)", "#1f77b4"),
    ("attn", "attention (Triton)", "#1f77b4"),
    ("nvjet", "o_proj GEMM", "#2ca02c"),
    ("gemm", "o_proj GEMM", "#2ca02c"),
    ("merge", "LSE merge", "#9467bd"),
    ("hold", "comm stand-in", "#d62728"),
    ("Memcpy", "copy (DtoD)", "#ff7f0e"),
    ("memcpy", "copy (DtoD)", "#ff7f0e"),
)


def kind_of(name: str):
    for frag, label, colour in KINDS:
        if frag in name:
            return label, colour
    return None  # memsets and other sub-microsecond bookkeeping are left out


def main() -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace")
    p.add_argument("--out", required=True)
    p.add_argument("--variants", nargs="+", help="variant names (default: all)")
    args = p.parse_args()
    with open(args.trace) as f:
        data = json.load(f)
    names = args.variants or list(data["variants"])
    missing = [n for n in names if n not in data["variants"]]
    if missing:
        raise SystemExit(f"no such variant(s) {missing}; the file has {list(data['variants'])}")
    fig, axes = plt.subplots(len(names), 1, figsize=(11, 1.2 + 1.0 * len(names)), sharex=True, squeeze=False)
    used = {}
    for ax, name in zip(axes[:, 0], names):
        variant = data["variants"][name]
        streams = sorted({k[0] for k in variant["kernels"]})
        for lane, stream in enumerate(streams):
            for st, start, dur, kname in variant["kernels"]:
                kind = kind_of(kname)
                if st != stream or kind is None:
                    continue
                label, colour = kind
                used[label] = colour
                ax.broken_barh([(start, dur)], (lane - 0.4, 0.8), facecolors=colour, edgecolor="black", linewidth=0.3)
        ax.set_yticks(range(len(streams)))
        ax.set_yticklabels([f"stream {i + 1}" for i in range(len(streams))], fontsize=7)
        ax.set_title(f"{name}: {variant['ms']:.3f} ms (CUDA-graph replay, median)", fontsize=8, loc="left")
    axes[-1, 0].set_xlabel("microseconds from the first kernel")
    fig.legend(handles=[Patch(color=c, label=l) for l, c in used.items()], loc="upper right", fontsize=7, ncol=len(used))
    fig.suptitle(f"{data['shape']}, tile bounds {data['bounds']}", fontsize=9, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(args.out, dpi=130)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
