"""Per-image segmentation scores (Dice, IoU, sensitivity, HD95) from MONAI's metrics.

The lowest layer of the user package's measuring: the deferral policy (choosing the
expert on validation) and the evaluator of :mod:`deferredseg.metrics` both use it.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch

from deferredseg_kernels import LossOptions

__all__ = ["IGNORE_INDEX", "per_image_scores", "has_spacing", "nanmean"]

#: The label value of pixels that count nowhere (the objective's default ``ignore_index``).
IGNORE_INDEX = LossOptions.ignore_index


def _one_hot(labels: torch.Tensor, num_labels: int, mask: torch.Tensor) -> torch.Tensor:
    """(B, *S) labels -> (B, C, *S) float one-hot, all zeros outside ``mask``."""
    safe = torch.where(
        mask, labels.long().clamp(0, num_labels - 1), torch.zeros_like(labels.long())
    )
    oh = torch.nn.functional.one_hot(safe, num_labels).movedim(-1, 1).float()
    return oh * mask.unsqueeze(1)


def nanmean(values: Sequence[float]) -> float:
    """The mean of the values that are not NaN.

    Args:
        values: floats.

    Returns:
        Their mean without the NaN values; NaN when every value is NaN or there is none.
    """
    finite = [v for v in values if not math.isnan(v)]
    return float(sum(finite) / len(finite)) if finite else float("nan")


def per_image_scores(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_labels: int,
    region: Optional[torch.Tensor] = None,
    ignore_index: int = IGNORE_INDEX,
    with_hd95: bool = True,
    spacing: Optional[torch.Tensor] = None,
) -> Dict[str, List[float]]:
    """Dice, IoU, sensitivity (and HD95) of each image, averaged over foreground classes.

    ``pred`` and ``target`` are (B, *S) labels; ``region`` restricts the pixels
    compared (e.g. the expert-routed ones). A value is NaN for an image whose
    region holds no foreground in the ground truth. ``spacing`` (B, D): each image's
    voxel size, so that HD95 is in its physical unit (MONAI's ``spacing``); without it
    (or where it holds NaN) HD95 is in pixels.

    Args:
        pred: (B, *S) predicted labels.
        target: (B, *S) true labels; ``ignore_index`` pixels are left out.
        num_labels: K' = max(K, 2), the number of label values.
        region: None, or a (B, *S) boolean mask of the pixels to compare.
        ignore_index: the label of ignored pixels.
        with_hd95: also compute HD95.
        spacing: None, or the images' voxel sizes (B, D).

    Returns:
        ``{"dice": [...], "iou": [...], "sensitivity": [...]}`` (and ``"hd95"``), one
        float per image (NaN where undefined).
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
    return {k: [nanmean(row.tolist()) for row in v] for k, v in out.items()}


def has_spacing(spacing: Optional[torch.Tensor]) -> bool:
    """Whether every image of a batch has a known voxel size."""
    return spacing is not None and bool(torch.isfinite(spacing).all())


def _spacing_arg(spacing: Optional[torch.Tensor], batch: int):
    """MONAI's ``spacing`` argument: one list per image, or None (pixels)."""
    if not has_spacing(spacing):
        return None
    rows = spacing.reshape(batch, -1).double().cpu().tolist()
    return [[float(v) for v in row] for row in rows]
