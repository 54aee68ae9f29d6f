"""Routing at a deferral budget: scores, thresholds and the metrics that selection uses.

A trained network is used at a budget: the share of pixels the experts can
afford to label. Every routing mode ranks the pixels by a *deferral score*:

- ``"gate"``: the gate's probability sigmoid(a);
- ``"gain"``: the expected gain of asking the best expert, ``max_j (q_j - cost_j) - q_model``
  (q from the routing logits: sigmoid under the one-vs-all surrogate, softmax otherwise);
- ``"uncertainty"``: the segmentation head's own uncertainty, 1 - max class probability
  (confidence deferral), with the routing heads still choosing the expert;
- ``"router"``: the soft deferral mass D; this mode does not use a budget, it defers
  where the router's argmax is an expert (the paper's inference) at its own rate.

The threshold for a budget is the (1 - budget) quantile of the score over the
valid pixels of a split (the validation split during training and evaluation).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

from deferredseg_kernels import RouteResult, route, split_logits

__all__ = ["deferral_score", "route_logits", "budget_threshold", "auroc", "uncertainty"]


def uncertainty(z: torch.Tensor, num_classes: int) -> torch.Tensor:
    """1 - max class probability of segmentation logits (B, K, *S) -> (B, *S)."""
    if num_classes == 1:
        p = torch.sigmoid(z[:, 0].float())
        return 1 - torch.maximum(p, 1 - p)
    return 1 - torch.softmax(z.float(), dim=1).amax(dim=1)


def _q(r: torch.Tensor, scores: str) -> torch.Tensor:
    return torch.sigmoid(r) if scores == "sigmoid" else torch.softmax(r, dim=1)


def deferral_score(
    logits: torch.Tensor,
    num_classes: int,
    num_experts: int,
    mode: str,
    scores: str = "softmax",
    expert_cost: Optional[Sequence[float]] = None,
) -> torch.Tensor:
    """The per-pixel score (B, *S) float32 that ``mode`` thresholds (higher: defer first)."""
    z, r, a = split_logits(logits.float(), num_classes, num_experts)
    E = num_experts
    if mode == "gate":
        return torch.sigmoid(a)
    if mode == "uncertainty":
        return uncertainty(z, num_classes)
    if mode == "router":
        return torch.softmax(r, dim=1)[:, :E].sum(dim=1)
    if mode != "gain":
        raise ValueError(f"mode must be gate, gain, uncertainty or router, got {mode!r}")
    q = _q(r, scores)
    net = q[:, :E]
    if expert_cost is not None:
        net = net - torch.tensor(list(expert_cost), dtype=net.dtype, device=net.device).view(
            1, E, *([1] * (net.dim() - 2))
        )
    return net.amax(dim=1) - q[:, E]


def route_logits(
    logits: torch.Tensor,
    num_classes: int,
    num_experts: int,
    mode: str,
    threshold: float,
    expert_labels: Optional[torch.Tensor] = None,
    scores: str = "softmax",
    expert_cost: Optional[Sequence[float]] = None,
    backend: str = "auto",
) -> RouteResult:
    """:func:`deferredseg_kernels.route` in one of the modes above."""
    kw = dict(expert_labels=expert_labels, backend=backend)
    if scores != "softmax":
        kw["scores"] = scores
    if expert_cost is not None:
        kw["expert_cost"] = list(expert_cost)
    if mode == "uncertainty":
        u = uncertainty(logits[:, :num_classes], num_classes).clamp(1e-7, 1 - 1e-7)
        logits = torch.cat([logits[:, :-1].float(), torch.logit(u).unsqueeze(1)], dim=1)
        mode = "gate"
    if mode == "gate":
        threshold = min(max(float(threshold), 0.0), 1.0)
    return route(logits, num_classes, num_experts, threshold=threshold, mode=mode, **kw)


def budget_threshold(score_values: np.ndarray, budget: float, mode: str) -> float:
    """The threshold at which a ``budget`` share of ``score_values`` lies above it.

    Deferral is ``score > threshold``; for the probability modes the result is
    clipped to [0, 1]. ``budget=0`` never defers.
    """
    if not 0.0 <= budget <= 1.0:
        raise ValueError(f"budget must be in [0, 1], got {budget}")
    v = np.asarray(score_values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    hi = 1.0 if mode in ("gate", "uncertainty") else (float(v.max()) if v.size else 0.0)
    if budget <= 0 or v.size == 0:
        return hi
    thr = float(np.quantile(v, 1.0 - budget))
    if mode in ("gate", "uncertainty"):
        thr = min(max(thr, 0.0), 1.0)
    # a quantile equal to values above it would defer fewer than the budget: step just below
    return float(np.nextafter(thr, -math.inf)) if (v > thr).mean() < budget * 0.5 else thr


def auroc(scores: torch.Tensor, positives: torch.Tensor) -> Optional[float]:
    """Area under the ROC curve of ``scores`` for the boolean ``positives`` (MONAI's)."""
    from monai.metrics import compute_roc_auc

    s = scores.reshape(-1).float().cpu()
    y = positives.reshape(-1).cpu()
    if bool(y.all()) or not bool(y.any()):
        return None
    return float(compute_roc_auc(s, y.long()))
