"""Python side of the compiled ``torch.ops.deferredseg`` ops: fake kernels and wrappers.

The schemas live in ``csrc/deferredseg.cpp``; the CPU and CUDA kernels in
``csrc/cpu`` and ``csrc/cuda``. Registering the fake kernels here is what lets
``torch.compile`` trace through the ops without a graph break.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._ext import EXT
from ..options import LossOptions
from ..types import RouteResult
from . import fused

if EXT is not None:
    # The fused loss ops (contract: ops/fused.py): fake kernels for torch.compile,
    # and autograd (the gradient is made in the forward pass; backward rescales it).
    torch.library.register_fake("deferredseg::loss_stats")(fused.fake_stats)
    torch.library.register_fake("deferredseg::loss_fused")(fused.fake_loss)
    fused.register_loss_autograd("deferredseg::loss_fused")

    torch.library.register_fake("deferredseg::route")(fused.fake_route)


def route(
    logits: torch.Tensor,
    num_classes: int,
    num_experts: int,
    decision_threshold: float,
    mode: str,
    expert_labels: Optional[torch.Tensor],
    expert_cost: Optional[tuple],
    scores: str,
) -> RouteResult:
    """docs/objective.md section 4 through the C++ kernels (CPU or CUDA, by the device
    of ``logits``)."""
    return fused.route_with(
        torch.ops.deferredseg.route,
        logits,
        num_classes,
        num_experts,
        decision_threshold,
        mode,
        expert_labels,
        expert_cost,
        scores,
    )


def loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    expert_labels: torch.Tensor,
    opts: LossOptions,
    return_terms: bool,
):
    """docs/objective.md section 3 through the C++ kernels (CPU or CUDA, by the device
    of ``logits``).

    Labels are range-checked eagerly on the CPU (the stats pass counts bad targets,
    the loss pass bad expert labels, each where it reads them anyway); on CUDA a bad
    target makes the loss NaN instead of a device sync.
    """
    return fused.fused_loss(
        torch.ops.deferredseg.loss_stats,
        torch.ops.deferredseg.loss_fused,
        logits,
        target,
        expert_labels,
        opts,
        return_terms,
        check_labels_eagerly=(logits.device.type == "cpu"),
        experts_checked_in_loss=(logits.device.type == "cpu"),
    )
