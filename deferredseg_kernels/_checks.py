"""Argument and input validation shared by every backend (docs/objective.md sections 5, 6).

The checks of the tensors and of ``route``'s arguments; the loss options are
validated in ``options`` with the scalar checks defined here.

Everything here runs before any kernel is launched, so a bad call fails with an
error that names the argument, what was expected and what was given, whichever
backend was asked for. Nothing in this module reads tensor *values* except
:func:`check_label_range`, which the reference always runs and the kernels run
only where it is cheap (CPU tensors, eager mode).
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Any, Optional, Sequence, Tuple

import torch

from .types import LABEL_DTYPES, LOGITS_DTYPES

if TYPE_CHECKING:  # only named in annotations (options.py imports this module)
    from .options import LossOptions

ROUTE_MODES = ("gate", "router", "gain")
ROUTE_SCORES = ("softmax", "sigmoid")


def type_name(value: Any) -> str:
    return type(value).__name__


def check_int(name: str, value: Any, minimum: int, maximum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type_name(value)} ({value!r})")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def check_float(
    name: str, value: Any, minimum: Optional[float] = None, strictly_positive: bool = False
) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type_name(value)} ({value!r})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if strictly_positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str):
        raise TypeError(
            f"{name} must be one of {list(choices)}, got {type_name(value)} ({value!r})"
        )
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_float_vector(
    name: str, value: Any, length: int, minimum: Optional[float] = None
) -> Tuple[float, ...]:
    """A sequence or 1-D tensor of ``length`` finite reals, returned as a tuple."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 1:
            raise ValueError(
                f"{name} must be 1-D of length {length}, got shape {tuple(value.shape)}"
            )
        if value.is_floating_point() or value.dtype in (torch.int32, torch.int64):
            value = value.detach().cpu().double().tolist()
        else:
            raise TypeError(f"{name} must hold real numbers, got dtype {value.dtype}")
    elif isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(
            f"{name} must be a sequence or 1-D tensor of {length} numbers, got {type_name(value)}"
        )
    if len(value) != length:
        raise ValueError(f"{name} must have length {length}, got length {len(value)}")
    out = []
    for i, v in enumerate(value):
        out.append(check_float(f"{name}[{i}]", v, minimum=minimum))
    return tuple(out)


def check_logits(
    logits: Any, num_channels: int, num_classes: int, num_experts: int, name: str = "logits"
) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type_name(logits)}")
    if logits.dtype not in LOGITS_DTYPES:
        raise TypeError(
            f"{name} must have a floating dtype in "
            f"{[str(d) for d in LOGITS_DTYPES]}, got {logits.dtype}"
        )
    if logits.dim() not in (3, 4, 5):
        raise ValueError(
            f"{name} must have shape (B, C, *S) with 1, 2 or 3 spatial dims, "
            f"got shape {tuple(logits.shape)}"
        )
    if logits.shape[1] != num_channels:
        raise ValueError(
            f"{name} must have num_classes + num_experts + 2 = {num_classes} + {num_experts} + 2 "
            f"= {num_channels} channels, got shape {tuple(logits.shape)} "
            f"({logits.shape[1]} channels)"
        )


def check_labels(
    name: str,
    labels: Any,
    logits: torch.Tensor,
    expected: Tuple[int, ...],
    allow_singleton_channel: bool,
) -> torch.Tensor:
    """Check an integer label tensor's type, device and shape; return it as (B, *S) or as given."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type_name(labels)}")
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(
            f"{name} must have an integer dtype in "
            f"{[str(d) for d in LABEL_DTYPES]}, got {labels.dtype}"
        )
    if labels.device != logits.device:
        raise ValueError(
            f"{name} must be on the same device as logits ({logits.device}), got {labels.device}"
        )
    shape = tuple(labels.shape)
    if (
        allow_singleton_channel
        and len(shape) == len(expected) + 1
        and shape[1] == 1
        and shape[:1] + shape[2:] == expected
    ):
        return labels.squeeze(1)
    if shape != expected:
        extra = f" or {expected[:1] + (1,) + expected[1:]}" if allow_singleton_channel else ""
        raise ValueError(
            f"{name} must have shape {expected}{extra} to match logits of shape "
            f"{tuple(logits.shape)}, got shape {shape}"
        )
    return labels


def check_inputs(
    logits: Any, target: Any, expert_labels: Any, opts: LossOptions
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Validate the tensors of a loss call; return (target as (B, *S), expert_labels)."""
    check_logits(logits, opts.num_channels, opts.num_classes, opts.num_experts)
    B, S = logits.shape[0], tuple(logits.shape[2:])
    target = check_labels("target", target, logits, (B,) + S, allow_singleton_channel=True)
    expert_labels = check_labels(
        "expert_labels",
        expert_labels,
        logits,
        (B, opts.num_experts) + S,
        allow_singleton_channel=False,
    )
    return target, expert_labels


def check_label_range(
    target: torch.Tensor, expert_labels: Optional[torch.Tensor], num_labels: int, ignore_index: int
) -> None:
    """Raise ValueError if a label is outside [0, num_labels) and not ignore_index.

    Reads the tensors' values (a device sync on GPU): the reference always runs it,
    the kernels' dispatch runs it where it is cheap.
    """
    for name, lab in (("target", target), ("expert_labels", expert_labels)):
        if lab is None or lab.numel() == 0:
            continue
        bad = (lab != ignore_index) & ((lab < 0) | (lab >= num_labels))
        if bool(bad.any()):
            values = torch.unique(lab[bad])[:8].tolist()
            raise ValueError(
                f"{name} must hold labels in [0, {num_labels}) or ignore_index={ignore_index}, "
                f"got value(s) {values}"
            )


def is_compiling() -> bool:
    """True while torch.compile traces (value reads and syncs must be skipped then)."""
    return bool(getattr(torch.compiler, "is_compiling", lambda: False)())


def threshold_logit(threshold: Any, mode: str = "gate") -> float:
    """logit(threshold) in float64: ``sigmoid(a) > t`` is decided as ``a > logit(t)``.

    The two are the same in exact arithmetic; comparing on the logit keeps the
    decision independent of how each backend rounds its sigmoid, so every backend
    routes the same pixels bit for bit. ``mode`` only names the routing mode in the
    error message.
    """
    t = check_float("threshold", threshold)
    if t < 0.0 or t > 1.0:
        raise ValueError(f"threshold must be in [0, 1] in mode {mode!r}, got {t}")
    if t == 0.0:
        return -math.inf
    if t == 1.0:
        return math.inf
    return math.log(t) - math.log1p(-t)


def route_threshold(threshold: Any, mode: str) -> float:
    """The number a route backend compares against, for a validated ``mode``.

    Mode "gate" (and "router", which ignores it but validates it the same way):
    logit(threshold), see :func:`threshold_logit`. Mode "gain": the threshold itself,
    any finite real (the gain ``max_j (q_j - cost_j) - q_model`` lies in [-1 - max cost, 1]).
    """
    if mode == "gain":
        return check_float("threshold", threshold)
    return threshold_logit(threshold, mode)


def check_expert_cost(expert_cost: Any, num_experts: int) -> Optional[Tuple[float, ...]]:
    """None, or ``num_experts`` finite costs >= 0 (a sequence or a 1-D tensor) as a tuple."""
    if expert_cost is None:
        return None
    return check_float_vector("expert_cost", expert_cost, num_experts, minimum=0.0)
