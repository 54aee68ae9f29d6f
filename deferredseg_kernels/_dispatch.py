"""The one place that lists the backends and chooses which implementation runs an op.

The backends are listed once, in ``_BACKEND_TABLE`` below: each row names a
backend, the device types of the tensors it runs on, its rank in ``"auto"``'s
choice and the check of whether it can run on this machine. :data:`BACKENDS`
(what the ``backend`` argument accepts: ``"auto"``, then the rows in order),
:func:`available_backends`, ``"auto"`` and the error messages are read from it.
Implementations plug in with :func:`register`; the public functions of
``deferredseg_kernels`` and the loss modules go through :func:`select`, and the
CLIs take their choices from ``BACKENDS``, so none of them changes for a new backend.

Adding a backend takes two steps:

1. a row of ``_BACKEND_TABLE`` (its availability check is a function here);
2. one ``register(name, op, fn)`` call for each op ("loss", "route") it
   implements, in ``_register_backends`` of ``deferredseg_kernels/__init__.py``.

Its documentation is one more line in docs/objective.md section 5, and one entry in
the table of tests/_backends.py runs the whole conformance suite
(tests/test_conformance.py) on it.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch

from ._checks import check_choice
from ._ext import EXT, EXT_MISSING_REASON, has_cuda_kernels

OPS = ("loss", "route")


def _triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def _no_devices() -> Tuple[str, ...]:
    return ()


class Backend(NamedTuple):
    """One row of the table of backends."""

    name: str
    # The device types of the inputs it runs on (None: any); "auto" picks it only there.
    devices: Optional[Tuple[str, ...]]
    # "auto" tries the backends that run on the inputs' device type, lowest rank first.
    auto_rank: int
    # None when it can run on this machine, else the reason it cannot.
    unavailable: Callable[[], Optional[str]]
    # Device types it also runs on when asked for by name (never by "auto"). What this
    # returns may depend on the Triton interpreter switch only: select() caches by it.
    also_runs_on: Callable[[], Tuple[str, ...]] = _no_devices


def _always_available() -> Optional[str]:
    return None


def _cpu_unavailable() -> Optional[str]:
    return EXT_MISSING_REASON if EXT is None else None


def _cuda_unavailable() -> Optional[str]:
    if EXT is None:
        return EXT_MISSING_REASON
    if not has_cuda_kernels():
        return (
            "the extension was built without CUDA kernels (a CPU-only torch, no nvcc, "
            "or DS_FORCE_CPU=1 at build time)"
        )
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


def _triton_unavailable() -> Optional[str]:
    from .ops import triton_support

    reason = triton_support.why_unavailable()
    if reason is not None:
        return reason
    if not torch.cuda.is_available() and not _triton_interpreter():
        return "no CUDA device is available (set TRITON_INTERPRET=1 to run Triton on the CPU)"
    return None


def _triton_interpreted_devices() -> Tuple[str, ...]:
    return ("cpu",) if _triton_interpreter() else ()


_BACKEND_TABLE = (
    Backend("reference", None, 3, _always_available),
    Backend("triton", ("cuda",), 0, _triton_unavailable, _triton_interpreted_devices),
    Backend("cpu", ("cpu",), 2, _cpu_unavailable),
    Backend("cuda", ("cuda",), 1, _cuda_unavailable),
)
_BY_NAME = {row.name: row for row in _BACKEND_TABLE}
# What the ``backend`` argument accepts.
BACKENDS = ("auto",) + tuple(row.name for row in _BACKEND_TABLE)
_IMPLS: Dict[Tuple[str, str], Callable] = {}


def register(backend: str, op: str, fn: Callable) -> None:
    """Make ``fn`` the implementation of ``op`` ("loss" or "route") for ``backend``."""
    check_choice("backend", backend, BACKENDS[1:])
    check_choice("op", op, OPS)
    _IMPLS[(backend, op)] = fn
    _SELECTED.clear()


def why_unavailable(backend: str) -> Optional[str]:
    """None when ``backend`` can run on this machine, else the reason it cannot."""
    row = _BY_NAME.get(backend)
    reason = row.unavailable() if row is not None else None
    if reason is not None:
        return reason
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


def runs_on(backend: str, device: torch.device) -> bool:
    """Whether ``backend`` runs on inputs on ``device`` (when it is available)."""
    row = _BY_NAME[backend]
    if device.type in row.also_runs_on():
        return True
    return row.devices is None or device.type in row.devices


def _auto_order(device_type: str) -> List[str]:
    """The backends "auto" tries for inputs of ``device_type``, in order."""
    rows = [row for row in _BACKEND_TABLE if row.devices is None or device_type in row.devices]
    return [row.name for row in sorted(rows, key=lambda row: row.auto_rank)]


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
        for name in _auto_order(device.type):
            if (name, op) in _IMPLS and why_unavailable(name) is None and runs_on(name, device):
                return _IMPLS[(name, op)]
        return _IMPLS[("reference", op)]
    reason = why_unavailable(backend)
    if reason is not None:
        raise RuntimeError(
            f"backend={backend!r} cannot run here: {reason}; available: {available_backends(op)}"
        )
    if (backend, op) not in _IMPLS:
        raise RuntimeError(
            f"backend={backend!r} does not implement {op!r} in this version; "
            f"backends implementing it here: {available_backends(op)}"
        )
    if not runs_on(backend, device):
        raise ValueError(
            f"backend={backend!r} runs on {_BY_NAME[backend].devices[0]} tensors, "
            f"got logits on {device}"
        )
    return _IMPLS[(backend, op)]
