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
    return _finish(fig, path)


def save(fig, path: str | Path) -> Path:
    """Save a figure atomically (temporary name, then rename)."""
    from .artifacts import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png")
    return path


def _finish(fig, path: str | Path | None, title: str | None = None):
    """Title (when given), tight layout, saved to ``path`` (when given); returns the figure."""
    if title is not None:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        save(fig, path)
    return fig


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
    return _finish(fig, path)


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
    return _finish(fig, path, title)


def deferral_curve(learned: pd.DataFrame, random: pd.DataFrame | None = None, chosen: dict | None = None,
                   path: str | Path | None = None, title: str = "Accuracy against deferral frequency (validation)"):
    """Accuracy vs actual deferral frequency for learned and random deferral; the chosen η marked.
    Frames have columns ``deferral`` and ``accuracy`` (fractions)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(100 * learned["deferral"], 100 * learned["accuracy"], "o-", label="learned deferral")
    if random is not None:
        ax.plot(100 * random["deferral"], 100 * random["accuracy"], "s--", color="#8C8C8C", label="random deferral")
    if chosen is not None:
        label = (f"chosen: defer when logit > {chosen['eta_logit']:.2f}" if "eta_logit" in chosen
                 else f"chosen η = {chosen['eta']:.3f}")
        ax.plot([100 * chosen["deferral"]], [100 * chosen["accuracy"]], "*", ms=16, color="#C44E52", label=label)
    ax.set_xlabel("tokens written by the assistant (%)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.legend()
    return _finish(fig, path)


def provenance(texts_and_owners: list[tuple[str, list[tuple[str, int]]]], path: str | Path | None = None,
               width: int = 100):
    """Generated solutions drawn token by token, each on the colour of the model that wrote it
    (blue: base, orange: assistant). Input: ``[(title, [(token_text, who), ...]), ...]``."""
    colours = {0: "#cfe3f7", 1: "#f6c28b"}
    lines: list[list[tuple[str, int]]] = []
    for title, tokens in texts_and_owners:
        lines.append([(title, -1)])
        line, used = [], 0
        for text, who in tokens:
            for k, part in enumerate(text.split("\n")):
                if k > 0 or used + len(part) > width:
                    lines.append(line)
                    line, used = [], 0
                if part:
                    line.append((part, who))
                    used += len(part)
        lines.append(line)
        lines.append([])
    fig_h = 0.22 * len(lines) + 0.6
    fig = plt.figure(figsize=(0.085 * width + 0.5, fig_h))
    char_w, line_h = 1.0 / (width + 4), 1.0 / (len(lines) + 1)
    for i, line in enumerate(lines):
        x, y = 0.01, 1 - (i + 1) * line_h
        for text, who in line:
            kw = {"weight": "bold"} if who < 0 else {"bbox": {"facecolor": colours[who], "edgecolor": "none", "pad": 1.2}}
            fig.text(x, y, text, family="monospace", fontsize=8, va="bottom", **kw)
            x += len(text) * char_w
    fig.text(0.99, 0.995, "base", family="monospace", fontsize=8, ha="right", va="top",
             bbox={"facecolor": colours[0], "edgecolor": "none"})
    fig.text(0.93, 0.995, "assistant", family="monospace", fontsize=8, ha="right", va="top",
             bbox={"facecolor": colours[1], "edgecolor": "none"})
    if path is not None:
        save(fig, path)
    return fig


def deferral_breakdown(by_kind: pd.DataFrame, by_position: pd.DataFrame, path: str | Path | None = None,
                       title: str = "Where the base defers"):
    """Deferral rate by kind of token and by relative position in the solution."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.bar(by_kind["kind"], 100 * by_kind["deferral rate"].fillna(0), color="#DD8452")
    for x, n in enumerate(by_kind["tokens"]):
        a.annotate(f"n={n}", (x, 0), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
    a.set_ylabel("deferred (%)")
    a.set_title("by kind of token")
    a.tick_params(axis="x", rotation=20)
    b.bar(by_position["position"], 100 * by_position["deferral rate"].fillna(0), color="#DD8452")
    b.set_title("by position in the solution")
    b.set_xlabel("relative position")
    b.tick_params(axis="x", rotation=45)
    return _finish(fig, path, title)


def reliability(tables: dict[str, pd.DataFrame], path: str | Path | None = None,
                title: str = "Calibration of the deferral probability σ (validation)"):
    """Reliability diagram of deferral heads: per bin of predicted σ, the mean σ against the mean
    posterior responsibility of the assistant, r_t = σ·p_asst / ((1 − σ)·p_base + σ·p_asst) (what σ
    should match under the marginal-likelihood objective: its stationary points satisfy
    Σ_t (r_t − σ_t)·∂logit_t = 0), with the diagonal; below, tokens per bin (log scale). The
    weak-label rate (target is the assistant's top-1, not the base's) is drawn dotted for
    reference. Frames come from ``collm.calibration_table``, keyed by head name."""
    fig, (a, b) = plt.subplots(2, 1, figsize=(5.6, 6.2), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    a.plot([0, 1], [0, 1], ":", color="#8C8C8C", lw=1, label="perfect calibration")
    m = max(len(tables), 1)
    for k, (name, t) in enumerate(tables.items()):
        colour = f"C{k}"
        a.plot(t["mean sigma"], t["responsibility"], "o-", color=colour, label=f"{name}: responsibility")
        if "weak label rate" in t:
            a.plot(t["mean sigma"], t["weak label rate"], "x:", color=colour, alpha=0.6, label=f"{name}: weak label")
        w = 0.9 * (t["bin high"] - t["bin low"]) / m  # bars of the heads side by side in each bin
        b.bar(t["bin low"] + 0.05 * (t["bin high"] - t["bin low"]) + (k + 0.5) * w, t["tokens"], width=w,
              color=colour, alpha=0.7, label=name)
    a.set_xlim(0, 1)
    a.set_ylim(-0.02, 1.02)
    a.set_ylabel("empirical rate")
    a.set_title(title)
    a.legend(fontsize=7, loc="upper left")
    b.set_yscale("log")
    b.set_xlabel("predicted σ (bin mean)")
    b.set_ylabel("tokens")
    return _finish(fig, path)


def head_training(curves: dict[str, dict], references: dict[str, float] | None = None, path: str | Path | None = None,
                  title: str = "Deferral head training"):
    """One panel per training phase: training loss and validation criterion per epoch (epoch 0:
    before training), the kept (best) epoch marked; ``references`` (e.g. the validation NLL of
    always-base / always-assistant) drawn as horizontal lines on the marginal-NLL panel."""
    fig, axes = plt.subplots(1, len(curves), figsize=(5.2 * len(curves), 3.6), squeeze=False)
    for ax, (name, h) in zip(axes[0], curves.items()):
        ax.plot(range(1, len(h["train"]) + 1), h["train"], "-", lw=1.2, label="train (epoch mean)")
        if h.get("validation"):
            xs = [0] + list(range(1, len(h["validation"]) + 1))
            ax.plot(xs, [h["validation_before"]] + list(h["validation"]), "o-", ms=3, color="#C44E52",
                    label="validation")
            best = h.get("best_epoch")
            if best is not None:
                ax.axvline(best, ls="--", color="#C44E52", lw=0.8)
                ax.annotate(f"kept: epoch {best}", (best, h["validation_best"]), textcoords="offset points",
                            xytext=(4, 6), fontsize=8, color="#C44E52")
        if references and "nll" in name.lower():
            for k, (label, v) in enumerate(references.items()):
                ax.axhline(v, ls=":", lw=1, color=("#55A868", "#8172B2", "#937860", "#8C8C8C")[k % 4],
                           label=f"{label} (validation)")
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.legend(fontsize=7)
    return _finish(fig, path, title)


def speculative_curves(table: pd.DataFrame, path: str | Path | None = None, title: str = "Speculative decoding"):
    """α (with its 95% interval) and the measured (solid) and predicted (dashed) speed-up against γ,
    one line per drafter."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, (name, group) in enumerate(table.groupby("drafter", sort=False)):
        group = group.sort_values("gamma")
        color = f"C{i}"
        left.errorbar(group["gamma"], group["alpha"], fmt="o-", color=color, capsize=3, label=name,
                      yerr=[group["alpha"] - group["alpha_low"], group["alpha_high"] - group["alpha"]])
        right.plot(group["gamma"], group["measured_speedup"], "o-", color=color, label=f"{name} (measured)")
        right.plot(group["gamma"], group["predicted_speedup"], "x--", color=color, alpha=0.7)
    left.set(xlabel="γ (draft length)", ylabel="α (acceptance per examined draft)", ylim=(0, 1.02), title="α")
    right.axhline(1.0, color="grey", lw=0.8)
    right.set(xlabel="γ (draft length)", ylabel="speed-up over plain generate", title="speed-up (dashed: predicted)")
    left.legend(fontsize=7)
    return _finish(fig, path, title)
