"""Loading of the compiled extension ``deferredseg_kernels._C``.

Three outcomes, each told plainly:
- the extension is absent (pure-Python install): ``EXT`` is None and
  ``EXT_MISSING_REASON`` says why; the reference (and Triton) still work;
- it was built for another CUDA, or against another torch, than the one running:
  importing ``deferredseg_kernels`` raises an error naming both versions and the
  rebuild command, instead of an undefined symbol or a wrong kernel later;
- it was built from a csrc/contract.h that differs from the option encoding of
  deferredseg_kernels/contract.py (the extension reports its constants as
  ``_C.contract``): importing raises an error naming the first field that differs;
- it loads: its ops are in ``torch.ops.deferredseg``.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Mapping, Optional

import torch

from . import contract

REBUILD_HINT = (
    "rebuild it against the installed torch: `pip install --no-build-isolation "
    "--force-reinstall --no-deps .` in the deferredseg source folder "
    "(or `make build` in a checkout)"
)


class ExtensionMismatchError(RuntimeError):
    """The compiled extension does not match the running torch."""


def check_build(
    built_torch: str, built_cuda: str, running_torch: str, running_cuda: Optional[str]
) -> None:
    """Raise ExtensionMismatchError when the extension's build does not fit this torch."""
    if built_cuda and running_cuda and built_cuda != running_cuda:
        raise ExtensionMismatchError(
            f"deferredseg_kernels._C was built with CUDA {built_cuda}, but the running torch "
            f"{running_torch} uses CUDA {running_cuda}; {REBUILD_HINT}"
        )
    if built_cuda and running_cuda is None:
        raise ExtensionMismatchError(
            f"deferredseg_kernels._C was built with CUDA {built_cuda} for torch {built_torch}, "
            f"but the running torch {running_torch} is a CPU-only build; {REBUILD_HINT}"
        )
    base = lambda v: v.split("+")[0].split(".")[:2]  # noqa: E731  (major.minor is the ABI)
    if built_torch != "unknown" and base(built_torch) != base(running_torch):
        raise ExtensionMismatchError(
            f"deferredseg_kernels._C was built against torch {built_torch}, but torch "
            f"{running_torch} is running; {REBUILD_HINT}"
        )


def check_contract(built: Optional[Mapping[str, Any]]) -> None:
    """Raise ExtensionMismatchError when the constants the extension was compiled with
    (``_C.contract``; None for an extension that reports none) differ from the option
    encoding declared in deferredseg_kernels/contract.py, naming the first field."""
    try:
        contract.check_constants(built, "deferredseg_kernels._C")
    except RuntimeError as exc:
        raise ExtensionMismatchError(f"{exc}; {REBUILD_HINT}") from None


def _load() -> "tuple[Optional[ModuleType], Optional[str]]":
    try:
        ext = importlib.import_module("deferredseg_kernels._C")
    except ModuleNotFoundError as exc:
        if exc.name != "deferredseg_kernels._C":
            raise
        return None, (
            "the C++ extension deferredseg_kernels._C is not built (pure-Python "
            "install); build it with `pip install --no-build-isolation .`"
        )
    except (ImportError, OSError) as exc:
        raise ExtensionMismatchError(
            f"deferredseg_kernels._C failed to load ({exc}); it was most likely built against "
            f"a different torch than the installed {torch.__version__}; {REBUILD_HINT}"
        ) from exc
    check_build(ext.torch_version, ext.cuda_version, torch.__version__, torch.version.cuda)
    check_contract(getattr(ext, "contract", None))
    return ext, None


EXT, EXT_MISSING_REASON = _load()


def has_cuda_kernels() -> bool:
    """Whether the loaded extension contains the CUDA kernels."""
    return (
        EXT is not None
        and bool(EXT.with_cuda)
        and torch._C._dispatch_has_kernel_for_dispatch_key("deferredseg::route", "CUDA")
    )
