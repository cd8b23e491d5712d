"""The training log: per-step entries from the trainer's history, and their curves as a PNG."""

from __future__ import annotations

import io
from typing import Any


def read_train_log(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-step training entries of a trainer's log history (numbers only)."""
    steps = []
    for entry in log_history:
        if "loss" not in entry or "train_runtime" in entry:
            continue
        steps.append(
            {k: v for k, v in entry.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        )
    return steps


def plot_curves(steps: list[dict[str, Any]], title: str) -> bytes:
    """PNG of loss, reward margin, reward accuracy and learning rate per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("loss", "loss"),
        ("rewards/margins", "reward margin"),
        ("rewards/accuracies", "reward accuracy"),
        ("learning_rate", "learning rate"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    for ax, (key, label) in zip(axes.flat, panels, strict=True):
        points = [(s["step"], s[key]) for s in steps if key in s]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
