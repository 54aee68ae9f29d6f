"""Whether Triton can be used here (importable, and a version the kernels support).

The kernels need triton >= 3.2 and a torch that has ``torch.library.triton_op`` /
``wrap_triton`` (torch >= 2.6); CI tests torch 2.6 + triton 3.2, torch 2.11 + triton
3.6 and torch 2.14 + triton 3.8. Nothing here imports triton at module import time.
"""

from __future__ import annotations

from typing import Optional, Tuple

MIN_TRITON = (3, 2)


def _version_tuple(text: str) -> Tuple[int, ...]:
    # String methods only: torch.compile traces this (backend selection runs inside
    # compiled code), and the Dynamo of torch 2.6 cannot trace the `re` module.
    parts = []
    for piece in text.split(".")[:3]:
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def why_unavailable() -> Optional[str]:
    """None when the Triton backend can be imported here, else the reason it cannot."""
    try:
        import triton
    except ImportError:
        return "triton is not installed (pip install triton, or use a CUDA build of torch)"
    except Exception as exc:  # a broken install must not break `import deferredseg_kernels`
        return f"triton failed to import ({type(exc).__name__}: {exc})"
    version = getattr(triton, "__version__", "0")
    if _version_tuple(version) < MIN_TRITON:
        need = ".".join(map(str, MIN_TRITON))
        return f"triton {version} is too old: the kernels need triton >= {need}"
    import torch

    if not hasattr(torch.library, "triton_op") or not hasattr(torch.library, "wrap_triton"):
        return (
            f"torch {torch.__version__} lacks torch.library.triton_op/wrap_triton "
            "(torch >= 2.6 is needed for the Triton backend)"
        )
    return None
