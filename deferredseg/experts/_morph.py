"""Vectorised morphology on label maps, on the tensor's own device.

Everything here works on batches of label maps ``(B, *S)`` with 1, 2 or 3
spatial dims and is built from max-pooling, so it runs on the CPU and the GPU
alike without per-pixel Python loops. A *radius* r means the (2r + 1)^d box
around a pixel (Chebyshev distance <= r).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def _check_spatial(x: torch.Tensor, name: str, with_channel: bool) -> int:
    nd = x.dim() - (2 if with_channel else 1)
    if nd not in _POOL:
        shape = "(B, C, *S)" if with_channel else "(B, *S)"
        raise ValueError(
            f"{name} must be {shape} with 1, 2 or 3 spatial dims, got shape {tuple(x.shape)}"
        )
    return nd


def max_filter(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Maximum over the (2r + 1)^d box of every pixel of ``x`` (B, C, *S).

    Integer and boolean inputs are computed in a floating type that holds them
    exactly (float64), and returned in their own dtype. Outside the image counts
    as absent (the padding never wins the maximum).
    """
    nd = _check_spatial(x, "x", with_channel=True)
    r = int(radius)
    if r < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    if r == 0:
        return x
    dtype = x.dtype
    work = x if dtype.is_floating_point else x.to(torch.float64)
    out = _POOL[nd](work, kernel_size=2 * r + 1, stride=1, padding=r)
    return out if dtype.is_floating_point else out.to(dtype)


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation of ``mask`` by a box of radius r.

    Args:
        mask: (B, *S) boolean (or 0/1), 1 to 3 spatial dims.
        radius: r; <= 0 returns the mask as it is.

    Returns:
        (B, *S) bool.

    Raises:
        ValueError: ``mask`` without 1 to 3 spatial dims.
    """
    _check_spatial(mask, "mask", with_channel=False)
    if radius <= 0:
        return mask.bool()
    return max_filter(mask.unsqueeze(1).float(), radius).squeeze(1) > 0


def erode(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary erosion of ``mask`` by a box of radius r; the image border does not erode.

    Args:
        mask: (B, *S) boolean (or 0/1), 1 to 3 spatial dims.
        radius: r; <= 0 returns the mask as it is.

    Returns:
        (B, *S) bool.

    Raises:
        ValueError: ``mask`` without 1 to 3 spatial dims.
    """
    _check_spatial(mask, "mask", with_channel=False)
    if radius <= 0:
        return mask.bool()
    return ~dilate(~mask.bool(), radius)


def boundary_band(labels: torch.Tensor, radius: int) -> torch.Tensor:
    """Pixels of ``labels`` that have a pixel of another label within ``radius``.

    Args:
        labels: (B, *S) labels, 1 to 3 spatial dims.
        radius: r >= 0 (0: no pixel).

    Returns:
        (B, *S) bool.

    Raises:
        ValueError: ``labels`` without 1 to 3 spatial dims, or a negative radius.
    """
    _check_spatial(labels, "labels", with_channel=False)
    x = labels.unsqueeze(1).to(torch.float64)
    hi = max_filter(x, radius)
    lo = -max_filter(-x, radius)
    return (hi != lo).squeeze(1)


def connected_components(
    labels: torch.Tensor, num_labels: int, max_iter: int | None = None
) -> torch.Tensor:
    """Connected components of each foreground label (values 1..num_labels-1).

    Pixels connect when they touch (8-connectivity in 2D, 26 in 3D) and carry the
    same label. Returns (B, *S) int64: 0 on background, elsewhere a component id
    unique within its image (the largest linear index + 1 of its pixels).
    Label propagation by repeated 3^d max-pooling: the number of rounds is the
    longest path inside a component, every round one vectorised pass.

    Args:
        labels: (B, *S) integer labels, 1 to 3 spatial dims.
        num_labels: the number of label values (labels 1..num_labels-1 are foreground).
        max_iter: the most propagation rounds (default: enough for any component).

    Returns:
        (B, *S) int64 component ids.

    Raises:
        ValueError: ``labels`` without 1 to 3 spatial dims.
    """
    _check_spatial(labels, "labels", with_channel=False)
    S = labels.shape[1:]
    n = 1
    for s in S:
        n *= int(s)
    classes = torch.arange(1, num_labels, device=labels.device).view(1, -1, *([1] * len(S)))
    member = labels.unsqueeze(1) == classes  # (B, L - 1, *S)
    idx = torch.arange(1, n + 1, device=labels.device, dtype=torch.float64).view(1, 1, *S)
    ids = torch.where(member, idx, torch.zeros((), dtype=torch.float64, device=labels.device))
    limit = n if max_iter is None else int(max_iter)
    for _ in range(limit):
        new = torch.where(member, max_filter(ids, 1), torch.zeros_like(ids))
        if torch.equal(new, ids):
            break
        ids = new
    return ids.sum(dim=1).to(torch.int64)  # a pixel belongs to at most one class channel
