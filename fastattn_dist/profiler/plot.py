"""The PNG timeline: one panel per run, ranks as rows, a compute lane and a comm lane per rank.

Each panel draws the run's median iteration (the one its metrics describe). Compute bars are
coloured by kind (qkv, attention, o_proj) and labelled with their tile; all-reduce bars are green
where compute hid them and red (hatched) where they were exposed. Panels share one time scale,
so the shorter tiled block is visibly shorter. Drawn with matplotlib's Agg canvas directly: no
pyplot state, no backend switch in the caller's process.
"""
from __future__ import annotations

import io
from typing import Optional, Sequence

from .gather import Profile
from .metrics import subtract
from ..recorder import BLOCK, COMM, COMPUTE

COLORS = {"qkv": "#9a9a9a", "embed": "#9a9a9a", "attention": ("#3f6fb5", "#7fa3d9"), "o_proj": "#e08a3c",
          "mlp": ("#7b5aa6", "#a98fcb"), "down_proj": "#c9a227",
          "hidden": "#4f9d5b", "exposed": "#d1443f", "block": "#f1f1f1"}
LABELS = {"qkv": "qkv projection", "embed": "embedding", "attention": "attention (tile tN)", "o_proj": "o_proj",
          "mlp": "MLP gate/up (tile tN)", "down_proj": "MLP down_proj"}
TILED = ("attention", "mlp")  # the spans labelled with their tile
LANE_H, RANK_GAP = 0.8, 0.7


def _unit(span_us: float):
    return (1e-3, "ms") if span_us >= 2000 else (1.0, "us")


def _draw_rank(ax, mine, base: float, x, scale: float, xmax: float) -> None:
    """One rank's two lanes: compute spans (coloured by kind, labelled by tile) and comm spans (exposed parts
    hatched red), over the block window (gaps in it are bubbles)."""
    y_comm, y_comp = base, base + LANE_H + 0.2
    for s in mine:
        if s.lane == BLOCK:
            ax.broken_barh([(x(s.start_us), s.dur_us * scale)], (base - 0.1, 2 * LANE_H + 0.4),
                           facecolors=COLORS["block"], edgecolors="#c8c8c8", linewidth=0.6, zorder=0)
    compute = [(s.start_us, s.end_us) for s in mine if s.lane == COMPUTE]
    for s in mine:
        w = s.dur_us * scale
        if s.lane == COMPUTE:
            c = COLORS.get(s.name, "#777777")
            if isinstance(c, tuple):
                c = c[s.tile % 2] if s.tile >= 0 else c[0]
            ax.broken_barh([(x(s.start_us), w)], (y_comp, LANE_H), facecolors=c, edgecolors="white", linewidth=0.4,
                           zorder=2)
            if s.name in TILED and s.tile >= 0 and w > xmax * 0.018:
                ax.text(x(s.start_us) + w / 2, y_comp + LANE_H / 2, f"t{s.tile}", ha="center", va="center",
                        fontsize=7, color="white", zorder=4)
        elif s.lane == COMM:
            ax.broken_barh([(x(s.start_us), w)], (y_comm, LANE_H), facecolors=COLORS["hidden"], edgecolors="white",
                           linewidth=0.4, zorder=2)
            for a, b in subtract([(s.start_us, s.end_us)], compute):
                ax.broken_barh([(x(a), (b - a) * scale)], (y_comm, LANE_H), facecolors=COLORS["exposed"],
                               edgecolors="#7a1f1c", hatch="///", linewidth=0.4, zorder=3)
            if w > xmax * 0.018:
                ax.text(x(s.start_us) + w / 2, y_comm + LANE_H / 2, f"t{s.tile}", ha="center", va="center",
                        fontsize=7, color="white", zorder=4)


def timeline_png(profile: Profile, metrics: dict, runs: Optional[Sequence[str]] = None, title: str = "",
                 dpi: int = 110) -> bytes:
    """PNG bytes of the timeline of ``runs`` (default all, in recorded order), side by side."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # the 'plot' extra: only the PNG needs it
    from matplotlib.figure import Figure  # (the same)
    from matplotlib.patches import Patch  # (the same)

    runs = list(runs) if runs is not None else profile.runs()
    world = profile.world_size
    panels = []
    for run in runs:
        m = metrics["runs"][run]
        ss = [s for s in profile.spans if s.run == run and s.step == m["step"]]
        origin = min(s.start_us for s in ss if s.lane == BLOCK)
        panels.append((run, m, ss, origin, max(s.end_us for s in ss) - origin))
    scale, unit = _unit(max(p[4] for p in panels))
    xmax = max(p[4] for p in panels) * scale * 1.02

    width, height = min(max(11.0, 8.0 * len(runs)), 18.0), 1.8 + 1.25 * world
    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")  # makes room for title and legend
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(runs), squeeze=False, sharey=True)[0]
    pitch = 2 * LANE_H + RANK_GAP + 0.2
    for ax, (run, m, ss, origin, _) in zip(axes, panels):
        yt, yl = [], []
        for rank in range(world):
            base = (world - 1 - rank) * pitch
            _draw_rank(ax, [s for s in ss if s.rank == rank], base, lambda t: (t - origin) * scale, scale, xmax)
            yt += [base + LANE_H + 0.2 + LANE_H / 2, base + LANE_H / 2]
            yl += [f"rank {rank}  compute", f"rank {rank}  comm"]
        ax.set_yticks(yt)
        ax.set_yticklabels(yl, fontsize=8)
        ax.set_xlim(0, xmax)
        ax.set_ylim(-0.4, world * pitch - RANK_GAP + 0.1)
        ax.set_xlabel(f"time in the block ({unit}, ranks on rank 0's clock)", fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="x", color="#dddddd", linewidth=0.5, zorder=-1)
        ov = m["overlap_fraction"]
        ax.set_title(f"{run}: {m['tiles']} tile{'s' if m['tiles'] != 1 else ''}, block {m['block_ms']:.2f} ms, "
                     f"exposed comm {m['exposed_comm_ms']:.2f} ms, overlap "
                     f"{'-' if ov is None else f'{100 * ov:.0f}%'}", fontsize=9)
    present = {s.name for s in profile.spans if s.lane == COMPUTE}
    handles = [Patch(color=c[0] if isinstance(c, tuple) else c, label=LABELS[name])
               for name, c in COLORS.items() if name in LABELS and name in present]
    handles += [Patch(color=COLORS["hidden"], label="all-reduce, hidden by compute"),
               Patch(facecolor=COLORS["exposed"], edgecolor="#7a1f1c", hatch="///", label="all-reduce, exposed"),
               Patch(facecolor=COLORS["block"], edgecolor="#c8c8c8", label="block (gaps: bubble)")]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 8 if width >= 14 else 4), fontsize=8,
               frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
