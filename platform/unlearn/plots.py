"""Figures a person would rather look at than read: metric bars vs retrain, loss curves, attack ROCs."""

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


def roc_curves(scores: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str) -> Path:
    """ROC of a membership-style attack per model (positives, negatives scored), log-log as LiRA plots them:
    the diagonal is a model the attack cannot tell from its negatives; low-FPR TPR is what matters."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, (pos, neg) in scores.items():
        thresholds = np.unique(np.concatenate([pos, neg]))[::-1]
        tpr = np.array([0.0, *[np.mean(pos >= t) for t in thresholds]])
        fpr = np.array([0.0, *[np.mean(neg >= t) for t in thresholds]])
        ax.plot(np.maximum(fpr, 1e-3), np.maximum(tpr, 1e-3), label=name, linewidth=1.2,
                linestyle="--" if name == "retrain" else "-")
    ax.plot([1e-3, 1], [1e-3, 1], color="grey", linewidth=0.8, linestyle=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(1e-3, 1)
    ax.set_ylim(1e-3, 1)
    ax.set_xlabel("false positive rate (retrain's rows called unlearned)")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
