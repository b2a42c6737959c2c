"""Figures people look at: written as PNG under results/<run>/ and shown in the notebooks."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd


def accuracy_bars(table: pd.DataFrame, path: str | Path | None = None, title: str = "Accuracy on the test split"):
    """Bar chart of accuracy per experiment with 95% interval error bars; saved atomically if ``path``."""
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(table) + 2), 3.6))
    acc = 100 * table["Accuracy"]
    err = [acc - 100 * table["CI low"], 100 * table["CI high"] - acc]
    ax.bar(table["Experiment"], acc, yerr=err, capsize=4, color="#4C72B0", alpha=0.85)
    for x, (a, k, n) in enumerate(zip(acc, table["# Questions Correct"], table["n"])):
        ax.annotate(f"{a:.1f}%\n{k}/{n}", (x, a), textcoords="offset points", xytext=(0, 4),
                    ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, max(10.0, float((100 * table["CI high"]).max()) * 1.25))
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    if path is not None:
        save(fig, path)
    return fig


def save(fig, path: str | Path) -> Path:
    """Save a figure atomically (temporary name, then rename)."""
    from .artifacts import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png")
    return path
