"""Validation of a latency table: random archs of the space and the presets, timed end to end,
against the table's predictions: MAPE, Spearman rank correlation, and a predicted-vs-measured plot."""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Callable

from jdnas.io import atomic_path
from jdnas.latency.space import HeadSpace, LatencySpace
from jdnas.models.arch import PRESET_NAMES, Arch, Head, preset


def validation_archs(spaces: list[LatencySpace], heads: HeadSpace, count: int, seed: int, width: float,
                     covers: Callable[[Arch], bool]) -> list[tuple[str, Arch, Head]]:
    """`count` random detectors (half with grid widths, half with any widths in range, as pruning
    makes them; each with a random head of the space), then every preset at the base's width
    multiplier that the table covers, with the base's head."""
    rng = random.Random(seed)
    archs = []
    for i in range(count):
        off_grid = i % 2 == 1
        archs.append(("random_off_grid" if off_grid else "random_grid",
                      rng.choice(spaces).sample(rng, off_grid=off_grid), heads.sample(rng)))
    for name in PRESET_NAMES:
        arch = preset(name, width)
        if covers(arch):
            archs.append((f"preset:{name}", arch, heads.base))
    return archs


def _spearman(x: list[float], y: list[float]) -> float | None:
    import pandas as pd
    if len(x) < 3:
        return None
    rho = float(pd.Series(x).rank().corr(pd.Series(y).rank()))
    return None if math.isnan(rho) else rho  # all values tied: no ranking to compare


def summarize(rows: list[dict]) -> dict[str, Any]:
    """MAPE (percent), Spearman rank correlation and the worst error of predicted vs measured."""
    if not rows:
        return {"n": 0, "mape_percent": None, "spearman": None, "max_abs_error_percent": None}
    errors = [abs(r["predicted_ms"] - r["measured_ms"]) / r["measured_ms"] * 100 for r in rows]
    return {"n": len(rows), "mape_percent": round(sum(errors) / len(errors), 3),
            "spearman": _round(_spearman([r["predicted_ms"] for r in rows], [r["measured_ms"] for r in rows])),
            "max_abs_error_percent": round(max(errors), 3)}


def plot_validation(rows: list[dict], path: Path, title: str) -> None:
    """Predicted vs measured scatter with the y = x line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 5.6), dpi=120)
    styles = {"random_grid": ("random archs, grid widths", "o", "tab:blue"),
              "random_off_grid": ("random archs, off-grid widths (interpolated)", "^", "tab:orange")}
    for kind, (label, marker, colour) in styles.items():
        pts = [r for r in rows if r["kind"] == kind]
        if pts:
            ax.scatter([r["measured_ms"] for r in pts], [r["predicted_ms"] for r in pts], marker=marker,
                       color=colour, alpha=0.75, label=label)
    presets = [r for r in rows if r["kind"].startswith("preset:")]
    if presets:
        ax.scatter([r["measured_ms"] for r in presets], [r["predicted_ms"] for r in presets], marker="s",
                   color="tab:green", label="presets")
        for r in presets:
            ax.annotate(r["kind"].split(":", 1)[1], (r["measured_ms"], r["predicted_ms"]),
                        textcoords="offset points", xytext=(5, -10), fontsize=8)
    values = [r[k] for r in rows for k in ("measured_ms", "predicted_ms")]
    lo, hi = min(values), max(values)
    pad = 0.05 * (hi - lo or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=1, label="y = x (perfect prediction)")
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel("measured end-to-end latency (ms)")
    ax.set_ylabel("predicted latency = sum of table entries (ms)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best", framealpha=0.85)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


def fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


