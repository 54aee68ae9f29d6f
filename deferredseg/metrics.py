"""Evaluation metrics of a deferral system.

Segmentation quality (Dice, IoU, sensitivity, HD95) comes from MONAI's metric
functions, computed per image and per foreground class (HD95 in mm from each image's
voxel spacing where it is known, ``hd95_unit`` "mm", else in pixels, "px"), and averaged over the
classes and images where it is defined (an image without that class in the
ground truth does not count: MONAI's ``ignore_empty``). It is reported for the
fused prediction (``system_*``), the model alone (``model_*``), and inside the
expert-routed and model-routed regions. Deferral is described by its rate, each
expert's share of the deferred pixels, and its fragmentation (connected
components of the deferral mask per image). The risk-coverage curve sweeps the
gate threshold and records system Dice against deferral rate.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .train.routing import route_logits

DEFAULT_THRESHOLDS = tuple(i / 20 for i in range(21))


def _one_hot(labels: torch.Tensor, num_labels: int, mask: torch.Tensor) -> torch.Tensor:
    """(B, *S) labels -> (B, C, *S) float one-hot, all zeros outside ``mask``."""
    safe = torch.where(
        mask, labels.long().clamp(0, num_labels - 1), torch.zeros_like(labels.long())
    )
    oh = torch.nn.functional.one_hot(safe, num_labels).movedim(-1, 1).float()
    return oh * mask.unsqueeze(1)


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(sum(finite) / len(finite)) if finite else float("nan")


def per_image_scores(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_labels: int,
    region: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    with_hd95: bool = True,
    spacing: Optional[torch.Tensor] = None,
) -> Dict[str, List[float]]:
    """Dice, IoU, sensitivity (and HD95) of each image, averaged over foreground classes.

    ``pred`` and ``target`` are (B, *S) labels; ``region`` restricts the pixels
    compared (e.g. the expert-routed ones). A value is NaN for an image whose
    region holds no foreground in the ground truth. ``spacing`` (B, D): each image's
    voxel size, so that HD95 is in its physical unit (MONAI's ``spacing``); without it
    (or where it holds NaN) HD95 is in pixels.
    """
    from monai.metrics import (
        compute_confusion_matrix_metric,
        compute_dice,
        compute_hausdorff_distance,
        compute_iou,
        get_confusion_matrix,
    )

    mask = target != ignore_index
    if region is not None:
        mask = mask & region
    p = _one_hot(pred, num_labels, mask).cpu()
    t = _one_hot(target, num_labels, mask).cpu()
    dice = compute_dice(p, t, include_background=False, ignore_empty=True)
    iou = compute_iou(p, t, include_background=False, ignore_empty=True)
    cm = get_confusion_matrix(p, t, include_background=False)
    sens = compute_confusion_matrix_metric("sensitivity", cm)
    out = {"dice": dice, "iou": iou, "sensitivity": sens}
    if with_hd95:
        has_both = (p[:, 1:].flatten(2).sum(-1) > 0) & (t[:, 1:].flatten(2).sum(-1) > 0)
        hd = torch.full(dice.shape, float("nan"))
        if bool(has_both.any()):
            import warnings

            with warnings.catch_warnings():  # MONAI warns on empty masks, which we mark NaN
                warnings.simplefilter("ignore")
                hd = compute_hausdorff_distance(
                    p,
                    t,
                    include_background=False,
                    percentile=95,
                    spacing=_spacing_arg(spacing, p.shape[0]),
                )
            hd = torch.where(has_both, hd.float(), torch.full_like(hd.float(), float("nan")))
        out["hd95"] = hd
    return {k: [_nanmean(row.tolist()) for row in v] for k, v in out.items()}


def has_spacing(spacing: Optional[torch.Tensor]) -> bool:
    """Whether every image of a batch has a known voxel size."""
    return spacing is not None and bool(torch.isfinite(spacing).all())


def _spacing_arg(spacing: Optional[torch.Tensor], batch: int):
    """MONAI's ``spacing`` argument: one list per image, or None (pixels)."""
    if not has_spacing(spacing):
        return None
    rows = spacing.reshape(batch, -1).double().cpu().tolist()
    return [[float(v) for v in row] for row in rows]


def count_components(mask: torch.Tensor) -> List[int]:
    """Connected components (face connectivity) of each (B, *S) boolean mask."""
    from scipy import ndimage

    return [int(ndimage.label(m)[1]) for m in mask.cpu().numpy().astype(bool)]


class DeferralEvaluator:
    """Accumulates the metrics of a deferral system over batches.

    ``update(logits, target, expert_labels)`` routes with ``threshold`` / ``mode``
    (docs/objective.md section 4) and records every metric; ``result()`` returns them as a
    JSON-ready dict (NaN becomes None).
    """

    def __init__(
        self,
        num_classes: int,
        num_experts: int,
        threshold: float = 0.5,
        mode: str = "gate",
        ignore_index: int = -100,
        with_hd95: bool = True,
        thresholds: Optional[Sequence[float]] = None,
        backend: str = "auto",
        scores: str = "softmax",
        expert_cost: Optional[Sequence[float]] = None,
    ) -> None:
        self.K, self.E = num_classes, num_experts
        self.num_labels = max(num_classes, 2)
        self.threshold, self.mode = threshold, mode
        self.ignore_index = ignore_index
        self.with_hd95 = with_hd95
        if thresholds is None:
            thresholds = sweep_thresholds(mode)
        self.thresholds = tuple(thresholds)
        self.backend = backend
        self.route_kw = dict(scores=scores, expert_cost=expert_cost, backend=backend)
        self.scores: Dict[str, List[float]] = {}
        self.deferred = 0
        self.valid = 0
        self.per_expert = [0] * num_experts
        self.components: List[int] = []
        self.sweep_dice: List[List[float]] = [[] for _ in self.thresholds]
        self.sweep_deferred = [0] * len(self.thresholds)
        self.hd95_units: set = set()  # "mm" (batches with a voxel size), "px" (without)

    def _add(self, prefix: str, values: Dict[str, List[float]]) -> None:
        for k, v in values.items():
            self.scores.setdefault(f"{prefix}_{k}", []).extend(v)

    @torch.no_grad()
    def update(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        expert_labels: torch.Tensor,
        spacing: Optional[torch.Tensor] = None,
    ) -> None:
        """``spacing`` (B, D): the images' voxel sizes in mm (HD95 in mm), else pixels."""
        if target.dim() == logits.dim():
            target = target.squeeze(1)
        out = route_logits(
            logits, self.K, self.E, self.mode, self.threshold, expert_labels, **self.route_kw
        )
        valid = target != self.ignore_index
        deferred = (out.assignment >= 0) & valid
        nl, ii, hd = self.num_labels, self.ignore_index, self.with_hd95
        if not has_spacing(spacing):
            spacing = None
        self.hd95_units.add("mm" if spacing is not None else "px")
        self._add("system", per_image_scores(out.final, target, nl, None, ii, hd, spacing))
        self._add("model", per_image_scores(out.model_pred, target, nl, None, ii, hd, spacing))
        self._add("expert_region", per_image_scores(out.final, target, nl, deferred, ii, False))
        self._add("model_region", per_image_scores(out.final, target, nl, ~deferred, ii, False))
        self.valid += int(valid.sum())
        self.deferred += int(deferred.sum())
        for j in range(self.E):
            self.per_expert[j] += int(((out.assignment == j) & valid).sum())
        self.components += count_components(deferred)
        for i, t in enumerate(self.thresholds):
            swept = route_logits(
                logits, self.K, self.E, self.mode, t, expert_labels, **self.route_kw
            )
            self.sweep_dice[i] += per_image_scores(swept.final, target, nl, None, ii, False)["dice"]
            self.sweep_deferred[i] += int(((swept.assignment >= 0) & valid).sum())

    def risk_coverage(self) -> List[Dict[str, float]]:
        """System Dice against deferral rate, one point per threshold."""
        return [
            {"threshold": t, "deferral_rate": d / max(self.valid, 1), "system_dice": _nanmean(dice)}
            for t, d, dice in zip(self.thresholds, self.sweep_deferred, self.sweep_dice)
        ]

    def result(self) -> Dict[str, object]:
        res: Dict[str, object] = {k: _nanmean(v) for k, v in self.scores.items()}
        res["deferral_rate"] = self.deferred / max(self.valid, 1)
        total = sum(self.per_expert)
        res["expert_share"] = [n / total if total else 0.0 for n in self.per_expert]
        res["deferral_components_per_image"] = (
            float(np.mean(self.components)) if self.components else float("nan")
        )
        curve = self.risk_coverage()
        res["risk_coverage"] = curve
        res["risk_coverage_auc"] = risk_coverage_auc(curve)
        res["images"] = len(self.components)
        if self.with_hd95:  # the unit of system_hd95 and model_hd95
            units = sorted(self.hd95_units)
            res["hd95_unit"] = units[0] if len(units) == 1 else "mixed (mm where known, else px)"
        return _json_ready(res)


def sweep_thresholds(mode: str) -> Tuple[float, ...]:
    """The thresholds a risk-coverage sweep uses for a routing mode's score."""
    if mode == "gain":
        return tuple(i / 10 - 1 for i in range(21))  # the gain lies in [-1, 1]
    if mode == "router":
        return (0.5,)  # the router decides by its argmax: one point
    return DEFAULT_THRESHOLDS


def risk_coverage_auc(curve: Sequence[Dict[str, float]]) -> float:
    """Area under system Dice over deferral rate (trapezoids), divided by the rate span.

    The mean system Dice over the deferral rates the sweep reached; NaN when the
    sweep reached a single rate.
    """
    pts = sorted(
        (c["deferral_rate"], c["system_dice"]) for c in curve if not math.isnan(c["system_dice"])
    )
    if len(pts) < 2 or pts[-1][0] == pts[0][0]:
        return float("nan")
    area = sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(pts, pts[1:]))
    return area / (pts[-1][0] - pts[0][0])


def _json_ready(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value
