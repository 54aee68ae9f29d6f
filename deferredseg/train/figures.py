"""Figures (PNG, matplotlib): example panels, the risk-coverage plot, training curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _middle_slice(t: torch.Tensor) -> np.ndarray:
    """A 2D view of a 2D or 3D map (the middle slice of the first axis for 3D)."""
    a = t.float().numpy()
    while a.ndim > 2:
        a = a[a.shape[0] // 2]
    return a


def save_examples(examples: Sequence[Dict[str, torch.Tensor]], path, num_classes: int) -> List[Path]:
    """One row per image: image, ground truth, deferral mask, final, model-only, expert regions."""
    if not examples:
        return []
    plt = _plt()
    cols = ["image", "ground truth", "deferral mask", "final prediction", "model only",
            "expert regions"]
    fig, axes = plt.subplots(len(examples), len(cols), figsize=(2.2 * len(cols), 2.2 * len(examples)),
                             squeeze=False)
    vmax = max(num_classes, 1)
    for row, ex in zip(axes, examples):
        img = ex["image"][0] if ex["image"].dim() > ex["target"].dim() else ex["image"]
        target = ex["target"].clone()
        target[target < 0] = 0
        assign = ex["assignment"]
        panels = [(_middle_slice(img), "gray", None), (_middle_slice(target), "viridis", vmax),
                  (_middle_slice(assign >= 0), "gray", 1), (_middle_slice(ex["final"]), "viridis", vmax),
                  (_middle_slice(ex["model_pred"]), "viridis", vmax),
                  (_middle_slice(assign.float()), "tab10", None)]
        for ax, (arr, cmap, top) in zip(row, panels):
            ax.imshow(arr, cmap=cmap, vmin=0 if top is not None else None, vmax=top,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
    for ax, title in zip(axes[0], cols):
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def plot_risk_coverage(curves: Dict[str, Sequence[Dict[str, float]]], path,
                       points: Optional[Dict[str, Tuple[float, float]]] = None) -> List[Path]:
    """System Dice against deferral rate, one line per method; dots at the operating points."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, curve in curves.items():
        pts = sorted((c["deferral_rate"], c["system_dice"]) for c in curve
                     if c["system_dice"] is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=name)
    for name, (x, y) in (points or {}).items():
        if x is not None and y is not None:
            ax.scatter([x], [y], s=40, zorder=3)
    ax.set_xlabel("deferral rate (fraction of pixels sent to experts)")
    ax.set_ylabel("system Dice")
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def plot_training_curves(log_path, path) -> List[Path]:
    """Loss terms per step and validation system Dice per epoch, from log.jsonl."""
    steps, epochs = [], []
    with open(log_path) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("event") == "step":
                steps.append(rec)
            elif rec.get("event") == "epoch":
                epochs.append(rec)
    if not steps:
        return []
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    for key in ("loss", "seg", "collab", "gate", "coherence", "balance", "l2d"):
        vals = [(r["step"], r[key]) for r in steps if r.get(key) is not None]
        if vals:
            a1.plot([v[0] for v in vals], [v[1] for v in vals], label=key)
    a1.set_xlabel("optimiser step")
    a1.set_yscale("symlog", linthresh=1e-2)
    a1.legend(fontsize=7)
    a1.set_title("training loss terms")
    if epochs:
        a2.plot([r["epoch"] + 1 for r in epochs], [r.get("val_system_dice") for r in epochs],
                marker="o", label="system Dice")
        a2.plot([r["epoch"] + 1 for r in epochs], [r.get("val_model_dice") for r in epochs],
                marker="o", label="model Dice")
        a2.plot([r["epoch"] + 1 for r in epochs], [r.get("val_deferral_rate") for r in epochs],
                marker="o", label="deferral rate")
        a2.set_xlabel("epoch")
        a2.legend(fontsize=7)
        a2.set_title("validation")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]
