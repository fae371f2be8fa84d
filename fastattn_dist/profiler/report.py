"""A profile's files (trace.json, timeline.png, metrics.json), rendered from a gathered profile.

The files are rendered in memory from validated metrics and only then written (temporary names, then
renamed), so a failed run leaves no half-written or stale-looking set behind.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

from .export import chrome_trace, dumps
from .gather import Profile
from .metrics import compute_metrics
from .plot import timeline_png


def title_for(prof: Profile, metrics: dict) -> str:
    meta = prof.meta
    runs = metrics["runs"]
    head = f"{meta.get('what', 'TP attention')}, {prof.world_size} ranks ({prof.backend}, {meta.get('device', '?')}): {meta.get('describe', '')}"
    if prof.world_size == 1:
        tail = "one rank: no comm to hide, " + ", ".join(f"{r} {m['block_ms']:.2f} ms" for r, m in runs.items())
    elif "speedup" in metrics:
        tail = (f"tiled ({runs['tiled']['tiles']} tiles) {runs['tiled']['block_ms']:.2f} ms vs sequential "
                f"{runs['sequential']['block_ms']:.2f} ms: speedup {metrics['speedup']:.2f}x")
    else:
        tail = ", ".join(f"{r} {m['block_ms']:.2f} ms" for r, m in runs.items())
    return f"{head}\n{tail}"


def render(prof: Profile, compare: bool, config: dict) -> Tuple[Dict[str, bytes], dict]:
    """The files' bytes and the metrics, from a gathered profile (validated here).

    matplotlib is optional (the ``plot`` extra): without it there is no timeline.png, and
    metrics.json and the printed report say so.
    """
    metrics = compute_metrics(prof.spans, prof.world_size)
    # two runs of the same work: their ratio is noise, not a speedup
    if prof.world_size == 1:
        metrics.pop("speedup", None)
        metrics["note"] = "no comm at world size 1: tiling has nothing to hide"
    elif metrics["runs"].get("tiled", {}).get("tiles") == 1:
        metrics.pop("speedup", None)
        metrics["note"] = "the plan has one tile: 'tiled' is the sequential block, so there is no speedup to show"
    shown: List[str] = [r for r in prof.runs() if compare or r == "tiled"] or prof.runs()
    title = title_for(prof, metrics)
    try:
        png, png_note = timeline_png(prof, metrics, shown, title), "timeline.png"
    except ImportError as e:
        png, png_note = None, f"not written: matplotlib is not importable ({e}); pip install matplotlib"
    summary = {"world_size": prof.world_size, "backend": prof.backend, **prof.meta, "config": config,
               "shown_runs": shown, "timeline_png": png_note,
               "clock_offsets": [c.to_dict() for c in prof.clocks], **metrics}
    trace = chrome_trace(prof, shown, other={"title": title, "config": config, "speedup": metrics.get("speedup")})
    files = {"trace.json": dumps(trace), "metrics.json": dumps(summary, indent=2)}
    if png is not None:
        files["timeline.png"] = png
    return files, summary
