"""The types and dtype rules every backend shares (docs/objective.md sections 1 and 7).

The backends (``ops/``), the dispatch and the reference all import these from here,
so no backend depends on the oracle in ``reference.py`` for its result type or
its dtypes.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

# The dtypes ``logits`` may have (float64 for gradcheck and checks).
LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# The dtypes of ``target`` and ``expert_labels``.
LABEL_DTYPES = (torch.uint8, torch.int32, torch.int64)
# The terms of the objective, in the order the fused ops return them after the loss.
TERM_NAMES = ("seg", "collab", "gate", "coherence", "balance")
MAX_EXPERTS = 127  # `route` stores the chosen expert in int8


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of logits of ``dtype``: float64 stays float64
    (gradcheck); every other dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class RouteResult(NamedTuple):
    """What :func:`deferredseg_kernels.route` returns (docs/objective.md section 4)."""

    assignment: torch.Tensor  # (B, *S) int8: -1 model keeps the pixel, j expert j takes it
    # (B, *S) float: s (mode "gate"), D (mode "router") or the gain
    # g = max_j (q_j - cost_j) - q_model (mode "gain"; the deferral score, may be negative)
    defer_prob: torch.Tensor
    model_pred: torch.Tensor  # (B, *S) int64: argmax z (K >= 2) or z > 0 (K = 1)
    final: Optional[torch.Tensor]  # (B, *S) int64 when expert_labels is given, else None
