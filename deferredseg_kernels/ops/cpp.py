"""Python side of the compiled ``torch.ops.deferredseg`` ops: fake kernels and wrappers.

The schemas live in ``csrc/deferredseg.cpp``; the CPU and CUDA kernels in
``csrc/cpu`` and ``csrc/cuda``. Registering the fake kernels here is what lets
``torch.compile`` trace through the ops without a graph break.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._ext import EXT
from ..reference import RouteResult, compute_dtype

if EXT is not None:

    @torch.library.register_fake("deferredseg::route")
    def _route_fake(logits, num_classes, num_experts, threshold_logit, router_mode, expert_labels):
        shape = (logits.shape[0],) + tuple(logits.shape[2:])
        return (
            logits.new_empty(shape, dtype=torch.int8),
            logits.new_empty(shape, dtype=compute_dtype(logits.dtype)),
            logits.new_empty(shape, dtype=torch.int64),
            logits.new_empty(shape if expert_labels is not None else (0,), dtype=torch.int64),
        )


def route(logits: torch.Tensor, num_classes: int, num_experts: int, threshold_logit: float,
          mode: str, expert_labels: Optional[torch.Tensor]) -> RouteResult:
    assignment, defer_prob, model_pred, final = torch.ops.deferredseg.route(
        logits.detach(), num_classes, num_experts, threshold_logit, mode == "router", expert_labels)
    return RouteResult(assignment, defer_prob, model_pred, final if expert_labels is not None else None)
