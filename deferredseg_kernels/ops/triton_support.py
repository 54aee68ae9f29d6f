"""Whether Triton can be used here (importable, and a version the kernels support)."""

from __future__ import annotations

from typing import Optional


def why_unavailable() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install triton, or use a CUDA build of torch)"
    return None
