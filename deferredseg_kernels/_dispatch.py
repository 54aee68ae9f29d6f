"""The one place that chooses which implementation runs an op.

Backends plug in with :func:`register`; the public functions in
``deferredseg_kernels`` and every loss module go through :func:`select`, so a
new backend never touches them.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ._checks import BACKENDS, check_choice
from ._ext import EXT, EXT_MISSING_REASON, has_cuda_kernels

OPS = ("loss", "route")
_IMPLS: Dict[Tuple[str, str], Callable] = {}
# The order "auto" tries, by the device type of the inputs.
_AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}
# The device types a backend runs on (None: any).
_DEVICE_TYPES = {"reference": None, "cpu": ("cpu",), "cuda": ("cuda",), "triton": ("cuda",)}


def register(backend: str, op: str, fn: Callable) -> None:
    """Make ``fn`` the implementation of ``op`` ("loss" or "route") for ``backend``."""
    check_choice("backend", backend, BACKENDS[1:])
    check_choice("op", op, OPS)
    _IMPLS[(backend, op)] = fn
    _SELECTED.clear()


def _triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def why_unavailable(backend: str) -> Optional[str]:
    """None when ``backend`` can run on this machine, else the reason it cannot."""
    if backend == "reference":
        return None
    if backend in ("cpu", "cuda") and EXT is None:
        return EXT_MISSING_REASON
    if backend == "cuda":
        if not has_cuda_kernels():
            return ("the extension was built without CUDA kernels (a CPU-only torch, no nvcc, "
                    "or DS_FORCE_CPU=1 at build time)")
        if not torch.cuda.is_available():
            return "no CUDA device is available"
    if backend == "triton":
        from .ops import triton_support

        reason = triton_support.why_unavailable()
        if reason is not None:
            return reason
        if not torch.cuda.is_available() and not _triton_interpreter():
            return "no CUDA device is available (set TRITON_INTERPRET=1 to run Triton on the CPU)"
    if not any(b == backend for b, _ in _IMPLS):
        return "not implemented in this version"
    return None


def available_backends(op: Optional[str] = None) -> List[str]:
    """The backends that can run here, optionally only those implementing ``op``."""
    if op is not None:
        check_choice("op", op, OPS)
    names = [b for b in BACKENDS[1:] if why_unavailable(b) is None]
    if op is not None:
        names = [b for b in names if (b, op) in _IMPLS]
    return names


def _runs_on(backend: str, device: torch.device) -> bool:
    types = _DEVICE_TYPES[backend]
    if backend == "triton" and device.type == "cpu" and _triton_interpreter():
        return True
    return types is None or device.type in types


# select() results by (backend, op, device type, Triton interpreter on); what they
# depend on is fixed for the process except the registrations, which clear it.
_SELECTED: Dict[Tuple[str, str, str, bool], Callable] = {}


def select(backend: str, op: str, device: torch.device) -> Callable:
    """The implementation of ``op`` that ``backend`` names for inputs on ``device``."""
    key = (backend, op, device.type, _triton_interpreter())
    fn = _SELECTED.get(key)
    if fn is None:
        fn = _select(backend, op, device)  # raises when it cannot run: nothing is kept
        _SELECTED[key] = fn
    return fn


def _select(backend: str, op: str, device: torch.device) -> Callable:
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        for name in _AUTO_ORDER.get(device.type, ("reference",)):
            if (name, op) in _IMPLS and why_unavailable(name) is None and _runs_on(name, device):
                return _IMPLS[(name, op)]
        return _IMPLS[("reference", op)]
    reason = why_unavailable(backend)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} cannot run here: {reason}; "
                           f"available: {available_backends(op)}")
    if (backend, op) not in _IMPLS:
        raise RuntimeError(f"backend={backend!r} does not implement {op!r} in this version; "
                           f"backends implementing it here: {available_backends(op)}")
    if not _runs_on(backend, device):
        raise ValueError(f"backend={backend!r} runs on {_DEVICE_TYPES[backend][0]} tensors, "
                         f"got logits on {device}")
    return _IMPLS[(backend, op)]
