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


def loss_curve(history: dict, path: str | Path | None = None, title: str = "Distillation loss"):
    """Training loss per optimizer step and validation loss per epoch (start marked at step 0)."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(history["step"], history["train_loss"], lw=1, alpha=0.7, label="train (per step)")
    val_x = [0] + list(history["epoch_end_step"])
    val_y = [history["val_loss_before"]] + list(history["val_loss"])
    ax.plot(val_x, val_y, "o-", color="#C44E52", label="validation (per epoch)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    if path is not None:
        save(fig, path)
    return fig


def comparison(table: pd.DataFrame, path: str | Path | None = None, title: str = "Variants compared"):
    """Accuracy (with 95% intervals), share of stated final answers, and KD divergence per experiment."""
    panels = [("Accuracy", "accuracy (%)"), ("Final answer stated", "final answer stated (%)")]
    if "KD divergence (val)" in table and table["KD divergence (val)"].notna().any():
        panels.append(("KD divergence (val)", "KL to teacher (nats/token)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    names = list(table["Experiment"])
    for ax, (col, label) in zip(axes, panels):
        values = table[col].astype(float)
        if col == "Accuracy":
            acc = 100 * values
            err = [acc - 100 * table["CI low"], 100 * table["CI high"] - acc]
            ax.barh(names, acc, xerr=err, capsize=3, color="#4C72B0")
            ax.set_xlim(0, max(10.0, float((100 * table["CI high"]).max()) * 1.1))
        elif col == "Final answer stated":
            ax.barh(names, 100 * values, color="#55A868")
            ax.set_xlim(0, 100)
        else:
            ax.barh(names, values, color="#8172B2")
            ax.set_xlim(0, max(1e-3, float(values.max()) * 1.15))
        ax.set_xlabel(label)
        ax.invert_yaxis()
    for ax in axes[1:]:
        ax.set_yticklabels([])
    fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        save(fig, path)
    return fig
