"""The loss options (docs/objective.md sections 3 and 5): their names, validation and cache.

:class:`LossOptions` is the one statement of which options exist, their types and
their defaults; :data:`OPTION_NAMES`, the keywords :func:`make_options` accepts, is
read from its fields. :func:`make_options` validates a call's options once and
keeps the result for calls that repeat them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional, Sequence, Tuple

from ._checks import check_choice, check_float, check_float_vector, check_int, type_name
from .types import MAX_EXPERTS

SURROGATES = ("softmax", "paper", "ova")
GATE_TARGETS = ("router", "benefit")
COHERENCES = ("l1", "l2")
COHERENCE_MAPS = ("router", "gate")
BALANCES = ("cv2", "band")


@dataclass(frozen=True)
class LossOptions:
    """The validated options of docs/objective.md section 3 (names as in section 5)."""

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


# The keyword options of make_options / deferredseg_loss: every field but the two counts.
OPTION_NAMES = tuple(
    f.name for f in fields(LossOptions) if f.name not in ("num_classes", "num_experts")
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


# The presets of the objective (docs/objective.md section 5): the options a preset sets
# where a call does not. "default": what the training system uses and what the evidence in
# the README supports (one-vs-all correctness heads, a gate trained on "the model is wrong
# and the chosen expert is right", no pull of the gate towards D, a lighter gate term);
# "paper": nothing, so the fields' defaults of LossOptions, the paper's objective.
PRESETS = {
    "default": {
        "surrogate": "ova",
        "gate_target": "benefit",
        "gate_mse": 0.0,
        "gate_sparsity": 0.0,
        "lambda_gate": 0.3,
    },
    "paper": {},
}


def default_option(name: str, preset: str = "default") -> Any:
    """The value option ``name`` takes under ``preset`` when a call does not set it."""
    return PRESETS[preset].get(name, LossOptions.__dataclass_fields__[name].default)


def make_options(
    num_classes: Any, num_experts: Any, preset: str = "default", **options: Any
) -> LossOptions:
    """Validate the loss options and return them as a :class:`LossOptions`.

    ``preset``: ``"default"`` (the training system's objective) or ``"paper"`` (the
    paper's), see :data:`PRESETS`; options given explicitly win over the preset's.
    Unknown option names raise ``TypeError``, like an unexpected keyword argument.
    Options made of plain Python values are validated once and then looked up.
    """
    check_choice("preset", preset, tuple(PRESETS))
    options = {**PRESETS[preset], **options}
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
        kw["ignore_index"] = check_int("ignore_index", options["ignore_index"], -(2**63))
    if options.get("class_weight") is not None:
        kw["class_weight"] = check_float_vector(
            "class_weight", options["class_weight"], max(K, 2), minimum=0.0
        )
    for name in (
        "lambda_seg",
        "lambda_collab",
        "lambda_gate",
        "lambda_coherence",
        "lambda_balance",
        "gate_mse",
        "gate_sparsity",
    ):
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
            raise TypeError(
                f"coherence_maps must be a sequence drawn from {list(COHERENCE_MAPS)}, "
                f"got {type_name(maps)}"
            )
        checked = tuple(check_choice("coherence_maps", m, COHERENCE_MAPS) for m in maps)
        if len(set(checked)) != len(checked):
            raise ValueError(f"coherence_maps must not repeat a map, got {list(checked)}")
        kw["coherence_maps"] = checked
    balance = options.get("balance", "cv2")
    kw["balance"] = check_choice("balance", balance, BALANCES)
    if balance == "band":
        for name in ("balance_low", "balance_high"):
            if options.get(name) is None:
                raise ValueError(
                    f"{name} is required with balance='band': a sequence of "
                    f"num_experts + 1 = {E + 1} numbers"
                )
            kw[name] = check_float_vector(name, options[name], E + 1)
    else:
        for name in ("balance_low", "balance_high"):
            if options.get(name) is not None:
                # Accept but validate, so that switching `balance` later needs no edit.
                kw[name] = check_float_vector(name, options[name], E + 1)
    if "sync_balance" in options:
        sb = options["sync_balance"]
        if not isinstance(sb, bool):
            raise TypeError(f"sync_balance must be a bool, got {type_name(sb)} ({sb!r})")
        kw["sync_balance"] = sb
    return LossOptions(num_classes=K, num_experts=E, **kw)
