"""Matplotlib PNGs beside the JSON results: one figure per scenario, one panel per idea.

``save(path, panels)`` draws each panel from a plain dict so scenarios never touch matplotlib:

    {"kind": "lines", "title": ..., "xlabel": ..., "ylabel": ...,
     "series": {label: (xs, ys)}, "hlines": {label: y}}
    {"kind": "bars", "title": ..., "ylabel": ..., "labels": [...], "values": [...],
     "hlines": {label: y}, "notes": [text over each bar]}
    {"kind": "grid", "title": ..., "rows": [...], "cols": [...], "values": [[row of cols]],
     "vmin": ..., "vmax": ...}  (a heat map, each cell annotated; NaN cells left blank)

Missing matplotlib or a drawing error logs a warning and returns None: a plot never fails a run.
"""
from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def save(path: Path, panels: list[dict], title: str | None = None) -> Path | None:
    panels = [p for p in panels if p]
    if not panels:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot %s", path)
        return None
    try:
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
        for ax, panel in zip(axes[0], panels):
            {"lines": _lines, "bars": _bars, "grid": _grid}[panel["kind"]](ax, panel)
            ax.set_title(panel.get("title", ""), fontsize=10)
            if panel["kind"] != "grid":
                ax.grid(alpha=0.3)
        if title:
            fig.suptitle(title, fontsize=11)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
    except Exception as e:  # noqa: BLE001 - the numbers are in the JSON; the plot is a bonus
        logger.warning("could not draw %s: %s", path, e)
        return None
    logger.info("wrote %s", path)
    return path


def _hlines(ax, hlines: dict) -> None:
    for i, (label, y) in enumerate((hlines or {}).items()):
        if y is not None:
            ax.axhline(y, ls="--", lw=1, color=f"C{(i + 3) % 10}", label=label)


def _lines(ax, p: dict) -> None:
    for label, (xs, ys) in p["series"].items():
        ax.plot(xs, ys, label=label, lw=1.4)
    _hlines(ax, p.get("hlines"))
    ax.set_xlabel(p.get("xlabel", ""))
    ax.set_ylabel(p.get("ylabel", ""))
    if p["series"] or p.get("hlines"):
        ax.legend(fontsize=8)


def _bars(ax, p: dict) -> None:
    values = [0.0 if v is None else float(v) for v in p["values"]]
    bars = ax.bar(range(len(values)), values, color=[f"C{i}" for i in range(len(values))])
    ax.set_xticks(range(len(values)), p["labels"], fontsize=8, rotation=p.get("rotation", 0))
    notes = p.get("notes") or [_num(v) for v in p["values"]]
    for bar, note in zip(bars, notes):
        if note:
            ax.annotate(note, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
    _hlines(ax, p.get("hlines"))
    ax.set_ylabel(p.get("ylabel", ""))
    if p.get("hlines"):
        ax.legend(fontsize=8)


def _grid(ax, p: dict) -> None:
    import numpy as np

    values = np.array(p["values"], dtype=float).reshape(len(p["rows"]), len(p["cols"]))
    ax.imshow(values, cmap="RdYlGn", vmin=p.get("vmin"), vmax=p.get("vmax"), aspect="auto")
    ax.set_xticks(range(len(p["cols"])), p["cols"], fontsize=7, rotation=60)
    ax.set_yticks(range(len(p["rows"])), p["rows"], fontsize=8)
    for (i, j), v in np.ndenumerate(values):
        if not np.isnan(v):
            ax.annotate(_num(v), (j, i), ha="center", va="center", fontsize=7)


def _num(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
