"""Argument and input validation shared by every backend (SPEC sections 5 and 6).

Everything here runs before any kernel is launched, so a bad call fails with an
error that names the argument, what was expected and what was given, whichever
backend was asked for. Nothing in this module reads tensor *values* except
:func:`check_label_range`, which the reference always runs and the kernels run
only where it is cheap (CPU tensors, eager mode).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

import torch

LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
LABEL_DTYPES = (torch.uint8, torch.int32, torch.int64)
SURROGATES = ("softmax", "paper", "ova")
GATE_TARGETS = ("router", "benefit")
COHERENCES = ("l1", "l2")
COHERENCE_MAPS = ("router", "gate")
BALANCES = ("cv2", "band")
ROUTE_MODES = ("gate", "router", "gain")
ROUTE_SCORES = ("softmax", "sigmoid")
BACKENDS = ("auto", "reference", "triton", "cpu", "cuda")
MAX_EXPERTS = 127  # `route` stores the chosen expert in int8


def _type_name(value: Any) -> str:
    return type(value).__name__


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_int(name: str, value: Any, minimum: int, maximum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {_type_name(value)} ({value!r})")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def check_float(name: str, value: Any, minimum: Optional[float] = None,
                strictly_positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {_type_name(value)} ({value!r})")
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
        raise TypeError(f"{name} must be one of {list(choices)}, got {_type_name(value)} ({value!r})")
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_float_vector(name: str, value: Any, length: int, minimum: Optional[float] = None
                       ) -> Tuple[float, ...]:
    """A sequence or 1-D tensor of ``length`` finite reals, returned as a tuple."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 1:
            raise ValueError(f"{name} must be 1-D of length {length}, got shape {tuple(value.shape)}")
        if value.is_floating_point() or value.dtype in (torch.int32, torch.int64):
            value = value.detach().cpu().double().tolist()
        else:
            raise TypeError(f"{name} must hold real numbers, got dtype {value.dtype}")
    elif isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence or 1-D tensor of {length} numbers, "
                        f"got {_type_name(value)}")
    if len(value) != length:
        raise ValueError(f"{name} must have length {length}, got length {len(value)}")
    out = []
    for i, v in enumerate(value):
        out.append(check_float(f"{name}[{i}]", v, minimum=minimum))
    return tuple(out)


@dataclass(frozen=True)
class LossOptions:
    """The validated options of SPEC section 3 (names as in SPEC section 5)."""

    num_classes: int
    num_experts: int
    ignore_index: int = -100
    class_weight: Optional[Tuple[float, ...]] = None
    lambda_seg: float = 1.0
    lambda_collab: float = 1.0
    lambda_gate: float = 1.0
    lambda_coherence: float = 0.1
    lambda_balance: float = 0.1
    surrogate: str = "softmax"
    paper_eps: float = 1e-8
    gate_mse: float = 0.5
    gate_sparsity: float = 0.1
    gate_target: str = "router"
    coherence: str = "l1"
    coherence_maps: Tuple[str, ...] = ("router", "gate")
    balance: str = "cv2"
    balance_low: Optional[Tuple[float, ...]] = None
    balance_high: Optional[Tuple[float, ...]] = None
    sync_balance: bool = False

    @property
    def num_labels(self) -> int:
        """K' = max(K, 2), the number of label values."""
        return max(self.num_classes, 2)

    @property
    def num_channels(self) -> int:
        return self.num_classes + self.num_experts + 2


OPTION_NAMES = (
    "ignore_index", "class_weight", "lambda_seg", "lambda_collab", "lambda_gate",
    "lambda_coherence", "lambda_balance", "surrogate", "paper_eps", "gate_mse",
    "gate_sparsity", "gate_target", "coherence", "coherence_maps", "balance", "balance_low",
    "balance_high", "sync_balance",
)


# make_options results by a key of the arguments' types and values (see _options_key);
# the functional API validates its options on every call, and most calls repeat them.
_OPTIONS_CACHE: dict = {}
_OPTIONS_CACHE_SIZE = 256


def _options_key(value: Any) -> Any:
    """A hashable key that tells apart any two arguments make_options treats differently
    (True and 1, 1 and 1.0, a list and a tuple), or None for values it does not cover
    (tensors, arrays, other objects: those calls are validated every time)."""
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return (kind, value)
    if kind in (tuple, list):
        parts = tuple(_options_key(v) for v in value)
        return None if any(p is None for p in parts) else (kind, parts)
    return None


def make_options(num_classes: Any, num_experts: Any, **options: Any) -> LossOptions:
    """Validate the loss options and return them as a :class:`LossOptions`.

    Unknown option names raise ``TypeError``, like an unexpected keyword argument.
    Options made of plain Python values are validated once and then looked up.
    """
    key = _options_key((num_classes, num_experts, tuple(sorted(options.items()))))
    if key is not None:
        hit = _OPTIONS_CACHE.get(key)
        if hit is not None:
            return hit
    opts = _make_options(num_classes, num_experts, options)
    if key is not None and len(_OPTIONS_CACHE) < _OPTIONS_CACHE_SIZE:
        _OPTIONS_CACHE[key] = opts
    return opts


def _make_options(num_classes: Any, num_experts: Any, options: dict) -> LossOptions:
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; expected a subset of {list(OPTION_NAMES)}")
    K = check_int("num_classes", num_classes, 1)
    E = check_int("num_experts", num_experts, 1, MAX_EXPERTS)
    kw: dict = {}
    if "ignore_index" in options:
        kw["ignore_index"] = check_int("ignore_index", options["ignore_index"], -(2 ** 63))
    if options.get("class_weight") is not None:
        kw["class_weight"] = check_float_vector("class_weight", options["class_weight"],
                                                max(K, 2), minimum=0.0)
    for name in ("lambda_seg", "lambda_collab", "lambda_gate", "lambda_coherence",
                 "lambda_balance", "gate_mse", "gate_sparsity"):
        if name in options:
            kw[name] = check_float(name, options[name], minimum=0.0)
    if "paper_eps" in options:
        kw["paper_eps"] = check_float("paper_eps", options["paper_eps"], strictly_positive=True)
    if "surrogate" in options:
        kw["surrogate"] = check_choice("surrogate", options["surrogate"], SURROGATES)
    if "gate_target" in options:
        kw["gate_target"] = check_choice("gate_target", options["gate_target"], GATE_TARGETS)
    if "coherence" in options:
        kw["coherence"] = check_choice("coherence", options["coherence"], COHERENCES)
    if "coherence_maps" in options:
        maps = options["coherence_maps"]
        if isinstance(maps, str):
            maps = (maps,)
        if not isinstance(maps, Sequence):
            raise TypeError(f"coherence_maps must be a sequence drawn from {list(COHERENCE_MAPS)}, "
                            f"got {_type_name(maps)}")
        checked = tuple(check_choice("coherence_maps", m, COHERENCE_MAPS) for m in maps)
        if len(set(checked)) != len(checked):
            raise ValueError(f"coherence_maps must not repeat a map, got {list(checked)}")
        kw["coherence_maps"] = checked
    balance = options.get("balance", "cv2")
    kw["balance"] = check_choice("balance", balance, BALANCES)
    if balance == "band":
        for name in ("balance_low", "balance_high"):
            if options.get(name) is None:
                raise ValueError(f"{name} is required with balance='band': a sequence of "
                                 f"num_experts + 1 = {E + 1} numbers")
            kw[name] = check_float_vector(name, options[name], E + 1)
    else:
        for name in ("balance_low", "balance_high"):
            if options.get(name) is not None:
                # Accept but validate, so that switching `balance` later needs no edit.
                kw[name] = check_float_vector(name, options[name], E + 1)
    if "sync_balance" in options:
        sb = options["sync_balance"]
        if not isinstance(sb, bool):
            raise TypeError(f"sync_balance must be a bool, got {_type_name(sb)} ({sb!r})")
        kw["sync_balance"] = sb
    return LossOptions(num_classes=K, num_experts=E, **kw)


def check_logits(logits: Any, num_channels: int, num_classes: int, num_experts: int,
                 name: str = "logits") -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {_type_name(logits)}")
    if logits.dtype not in LOGITS_DTYPES:
        raise TypeError(f"{name} must have a floating dtype in "
                        f"{[str(d) for d in LOGITS_DTYPES]}, got {logits.dtype}")
    if logits.dim() not in (3, 4, 5):
        raise ValueError(f"{name} must have shape (B, C, *S) with 1, 2 or 3 spatial dims, "
                         f"got shape {tuple(logits.shape)}")
    if logits.shape[1] != num_channels:
        raise ValueError(
            f"{name} must have num_classes + num_experts + 2 = {num_classes} + {num_experts} + 2 "
            f"= {num_channels} channels, got shape {tuple(logits.shape)} "
            f"({logits.shape[1]} channels)")


def check_labels(name: str, labels: Any, logits: torch.Tensor, expected: Tuple[int, ...],
                 allow_singleton_channel: bool) -> torch.Tensor:
    """Check an integer label tensor's type, device and shape; return it as (B, *S) or as given."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {_type_name(labels)}")
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"{name} must have an integer dtype in "
                        f"{[str(d) for d in LABEL_DTYPES]}, got {labels.dtype}")
    if labels.device != logits.device:
        raise ValueError(f"{name} must be on the same device as logits ({logits.device}), "
                         f"got {labels.device}")
    shape = tuple(labels.shape)
    if allow_singleton_channel and len(shape) == len(expected) + 1 and shape[1] == 1 \
            and shape[:1] + shape[2:] == expected:
        return labels.squeeze(1)
    if shape != expected:
        extra = f" or {expected[:1] + (1,) + expected[1:]}" if allow_singleton_channel else ""
        raise ValueError(f"{name} must have shape {expected}{extra} to match logits of shape "
                         f"{tuple(logits.shape)}, got shape {shape}")
    return labels


def check_inputs(logits: Any, target: Any, expert_labels: Any, opts: LossOptions
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Validate the tensors of a loss call; return (target as (B, *S), expert_labels)."""
    check_logits(logits, opts.num_channels, opts.num_classes, opts.num_experts)
    B, S = logits.shape[0], tuple(logits.shape[2:])
    target = check_labels("target", target, logits, (B,) + S, allow_singleton_channel=True)
    expert_labels = check_labels("expert_labels", expert_labels, logits,
                                 (B, opts.num_experts) + S, allow_singleton_channel=False)
    return target, expert_labels


def check_label_range(target: torch.Tensor, expert_labels: Optional[torch.Tensor],
                      num_labels: int, ignore_index: int) -> None:
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
                f"got value(s) {values}")


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
