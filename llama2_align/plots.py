"""Training-curve plots as PNG files (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def plot_curves(rows: Sequence[dict], keys: Sequence[str], out_png: str | Path, title: str = "",
                x: str = "step") -> Path | None:
    """One panel per key present in ``rows`` (metrics.jsonl lines); returns None when there is nothing to plot."""
    present = [k for k in keys if any(k in r for r in rows)]
    if not present:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(present), figsize=(4.2 * len(present), 3.2), squeeze=False)
    for ax, key in zip(axes[0], present):
        pts = [(r[x], r[key]) for r in rows if key in r and x in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 40 else None)
        ax.set_title(key)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _write_png(fig, out_png)


def plot_histograms(series: dict[str, list[float]], out_png: str | Path, title: str = "") -> Path | None:
    """Overlaid histograms on shared bins, one per named series (legend shows n and mean); None when all empty."""
    present = {k: [float(v) for v in vals] for k, vals in series.items() if vals}
    if not present:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lo = min(min(v) for v in present.values())
    hi = max(max(v) for v in present.values())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    bins = np.linspace(lo, hi, 31)
    fig, ax = plt.subplots(figsize=(5.6, 3.4))
    for name, vals in present.items():
        ax.hist(vals, bins=bins, alpha=0.5, density=True,
                label=f"{name} (n={len(vals)}, mean={sum(vals) / len(vals):.3f})")
    ax.set_ylabel("density")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return _write_png(fig, out_png)


def _write_png(fig, out_png: str | Path) -> Path:
    """Lay out, render and write a figure atomically, then free it."""
    import io

    import matplotlib.pyplot as plt

    from .io import atomic_write_bytes

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return atomic_write_bytes(out_png, buf.getvalue())


def plot_trajectory(points: Sequence[dict], out_png: str | Path, xlabel: str, ylabel: str, title: str = ""
                    ) -> Path | None:
    """Points in order (``{"x", "y", "label", "filled"}``), joined by a line through the filled ones (e.g. the
    promoted rounds) and labelled; hollow markers for the others. None when no point has both coordinates."""
    shown = [p for p in points if p.get("x") is not None and p.get("y") is not None]
    if not shown:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.4, 4.2))
    path = [p for p in shown if p.get("filled", True)]
    ax.plot([p["x"] for p in path], [p["y"] for p in path], color="tab:blue", alpha=0.5, zorder=1)
    for p in shown:
        filled = p.get("filled", True)
        ax.scatter([p["x"]], [p["y"]], s=60, zorder=2, color="tab:blue" if filled else "white",
                   edgecolors="tab:blue", linewidths=1.5)
        ax.annotate(p.get("label", ""), (p["x"], p["y"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    xs, ys = [p["x"] for p in shown], [p["y"] for p in shown]
    pad_x, pad_y = max(0.02, 0.15 * (max(xs) - min(xs))), max(0.02, 0.15 * (max(ys) - min(ys)))
    ax.set_xlim(min(xs) - pad_x, max(xs) + pad_x)
    ax.set_ylim(min(ys) - pad_y, max(ys) + pad_y)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    return _write_png(fig, out_png)


def plot_by_turn(panels: dict[str, dict[str, list[float | None]]], out_png: str | Path, title: str = "",
                 bands: dict[str, dict[str, list[list[float] | None]]] | None = None) -> Path | None:
    """One panel per metric (``panels[metric][series] = value per turn``, turn 1 first), one line per series, with
    an optional shaded interval per point (``bands[metric][series] = [lo, hi] per turn``); None when empty."""
    present = {m: {s: v for s, v in series.items() if any(x is not None for x in v)} for m, series in panels.items()}
    present = {m: s for m, s in present.items() if s}
    if not present:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(present), figsize=(4.6 * len(present), 3.4), squeeze=False)
    for ax, (metric, series) in zip(axes[0], present.items()):
        for name, values in series.items():
            pts = [(t + 1, v) for t, v in enumerate(values) if v is not None]
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
            band = ((bands or {}).get(metric) or {}).get(name)
            if band:
                tb = [(t + 1, b) for t, b in enumerate(band) if b is not None]
                ax.fill_between([p[0] for p in tb], [p[1][0] for p in tb], [p[1][1] for p in tb],
                                color=line.get_color(), alpha=0.15)
        ax.set_title(metric)
        ax.set_xlabel("turn")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _write_png(fig, out_png)
