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


#: Who labels a pixel, in the same colours in every figure: the model, then each expert.
MODEL_COLOUR = "#d9d9d9"
EXPERT_COLOURS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)


def reference_name(target) -> str:
    """What the reference column shows, in words."""
    if target is None or target in ("label", "labels"):
        return "reference label"
    return {"majority": "majority vote", "staple": "STAPLE consensus"}.get(
        target, f"rater {target}"
    )


def save_examples(
    examples: Sequence[Dict[str, torch.Tensor]],
    path,
    num_classes: int,
    expert_names: Optional[Sequence[str]] = None,
    reference: str = "ground truth",
) -> List[Path]:
    """One row per image (named by its case, and for 3D the slice shown): image, reference,
    deferral mask, final, model-only, expert regions (with a legend: the model and each
    expert by name, the same colours everywhere)."""
    if not examples:
        return []
    plt = _plt()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    cols = ["image", reference, "deferral mask", "final prediction", "model only", "expert regions"]
    fig, axes = plt.subplots(
        len(examples),
        len(cols),
        figsize=(2.2 * len(cols), 2.2 * len(examples) + 0.6),
        squeeze=False,
    )
    vmax = max(num_classes, 1)
    n_exp = (
        len(expert_names)
        if expert_names
        else max(int(ex["assignment"].max()) + 1 for ex in examples)
    )
    n_exp = max(n_exp, 1)
    names = list(expert_names) if expert_names else [f"expert {j}" for j in range(n_exp)]
    colours = [MODEL_COLOUR] + [EXPERT_COLOURS[j % len(EXPERT_COLOURS)] for j in range(n_exp)]
    regions = ListedColormap(colours)
    for row, ex in zip(axes, examples):
        img = ex["image"][0] if ex["image"].dim() > ex["target"].dim() else ex["image"]
        target = ex["target"].clone()
        target[target < 0] = 0
        assign = ex["assignment"]
        panels = [
            (_middle_slice(img), "gray", None),
            (_middle_slice(target), "viridis", vmax),
            (_middle_slice(assign >= 0), "gray", 1),
            (_middle_slice(ex["final"]), "viridis", vmax),
            (_middle_slice(ex["model_pred"]), "viridis", vmax),
        ]
        for ax, (arr, cmap, top) in zip(row, panels):
            ax.imshow(
                arr,
                cmap=cmap,
                vmin=0 if top is not None else None,
                vmax=top,
                interpolation="nearest",
            )
        row[-1].imshow(
            _middle_slice(assign.float() + 1),
            cmap=regions,
            vmin=-0.5,
            vmax=n_exp + 0.5,
            interpolation="nearest",
        )
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
        label = str(ex.get("id", ""))
        if ex["target"].dim() == 3:
            depth = ex["target"].shape[0]
            label += f"\nslice {depth // 2} of {depth}"
        row[0].set_ylabel(label, fontsize=8)
    for ax, title in zip(axes[0], cols):
        ax.set_title(title, fontsize=9)
    handles = [Patch(color=colours[0], label="model")] + [
        Patch(color=colours[j + 1], label=names[j]) for j in range(n_exp)
    ]
    fig.legend(
        handles=handles,
        loc="lower center",
        ncol=min(len(handles), 6),
        fontsize=8,
        title="expert regions: who labels each pixel",
        title_fontsize=8,
    )
    fig.tight_layout(rect=(0, 0.6 / (2.2 * len(examples) + 0.6) + 0.04, 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def plot_risk_coverage(
    curves: Dict[str, Sequence[Dict[str, float]]],
    path,
    points: Optional[Dict[str, Tuple[float, float]]] = None,
) -> List[Path]:
    """System Dice against deferral rate, one line per method; dots at the operating points,
    each named in the legend by its key."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, curve in curves.items():
        pts = sorted(
            (c["deferral_rate"], c["system_dice"]) for c in curve if c["system_dice"] is not None
        )
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=name)
    for name, (x, y) in (points or {}).items():
        if x is not None and y is not None:
            ax.scatter([x], [y], s=40, zorder=3, label=name)
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


def _read_log(log_path) -> Tuple[list, list]:
    steps, epochs = [], []
    with open(log_path) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("event") == "step":
                steps.append(rec)
            elif rec.get("event") == "epoch":
                epochs.append(rec)
    return steps, epochs


def plot_training_curves(logs, path) -> List[Path]:
    """One row per stage: its loss terms per optimiser step and its validation per epoch
    (integer epochs), from log.jsonl files. ``logs``: a log path, or ``(stage name, log
    path)`` pairs (two-stage training: the base segmentor's log, then the heads')."""
    from matplotlib.ticker import MaxNLocator

    if not isinstance(logs, (list, tuple)):
        logs = [("training", logs)]
    stages = [(name, *_read_log(p)) for name, p in logs if Path(p).exists()]
    stages = [st for st in stages if st[1]]
    if not stages:
        return []
    plt = _plt()
    fig, axes = plt.subplots(len(stages), 2, figsize=(9, 3.3 * len(stages)), squeeze=False)
    for (name, steps, epochs), (a1, a2) in zip(stages, axes):
        for key in ("loss", "seg", "collab", "gate", "coherence", "balance", "l2d"):
            vals = [(r["step"], r[key]) for r in steps if r.get(key) is not None]
            if vals:
                a1.plot([v[0] for v in vals], [v[1] for v in vals], label=key)
        a1.set_xlabel("optimiser step")
        a1.set_yscale("symlog", linthresh=1e-2)
        a1.legend(fontsize=7)
        a1.set_title(f"{name}: training loss terms")
        if epochs:
            x = [r["epoch"] for r in epochs]
            for key, label in (
                ("val_system_dice", "system Dice"),
                ("val_model_dice", "model Dice"),
                ("val_deferral_rate", "deferral rate"),
            ):
                a2.plot(x, [r.get(key) for r in epochs], marker="o", label=label)
            a2.set_xlabel("epoch")
            a2.xaxis.set_major_locator(MaxNLocator(integer=True))
            a2.legend(fontsize=7)
            a2.set_title(f"{name}: validation")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]
