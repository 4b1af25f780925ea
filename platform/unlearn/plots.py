"""Figures a person would rather look at than read: metric bars vs retrain, loss curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

BAR_METRICS = ("FA", "RA", "TA", "MIA")


def metric_bars(results: dict[str, dict[str, float]], path: Path, title: str) -> Path:
    """Grouped bars: one group per metric, one bar per method (retrain hatched as the reference)."""
    metrics = [m for m in BAR_METRICS if any(m in r for r in results.values())]
    names = list(results)
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(metrics) * max(len(names), 2) * 0.45), 4))
    for i, name in enumerate(names):
        values = [results[name].get(m, np.nan) for m in metrics]
        bars = ax.bar(np.arange(len(metrics)) + i * width, values, width, label=name,
                      hatch="//" if name == "retrain" else None, edgecolor="black", linewidth=0.4)
        if name == "retrain":
            for b in bars:
                b.set_alpha(0.6)
    ax.set_xticks(np.arange(len(metrics)) + width * (len(names) - 1) / 2)
    ax.set_xticklabels(metrics)
    ax.set_ylabel("percent")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=min(len(names), 4), loc="upper center", bbox_to_anchor=(0.5, -0.08))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def loss_curves(history: list[dict[str, float]], path: Path, title: str) -> Path:
    """Each logged loss against the step."""
    keys = sorted({k for row in history for k in row if k != "step"})
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k in keys:
        rows = [r for r in history if k in r]
        ax.plot([r["step"] for r in rows], [r[k] for r in rows], label=k, linewidth=1)
    ax.set_xlabel("step")
    ax.set_title(title)
    if keys:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
