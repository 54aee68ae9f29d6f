"""Structured experts: annotators who disagree the way real ones do.

Real raters rarely flip isolated pixels; they draw the boundary a little
outside or inside the object, trace it with a wobble, are careful in one part
of the image and sloppy in another, and overlook small structures. Each model
here changes pixels only near a boundary (or, for missed components, only the
small components themselves); pixels far from every boundary keep their label.

All of them work on (B, *S) label maps with 1 to 3 spatial dims, binary or
multi-class (0 is background), on the tensor's device, drawing randomness from
the generator they are given; use them in an
:class:`~deferredseg.experts.simulated.ExpertPanel`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ._morph import boundary_band, connected_components, max_filter
from .simulated import ExpertModel, ExpertPanel

__all__ = [
    "dilate_labels",
    "erode_labels",
    "BoundaryShiftExpert",
    "SmoothBoundaryExpert",
    "RegionSkillExpert",
    "MissedComponentsExpert",
    "ChainExpert",
    "structured_experts",
]


def dilate_labels(labels: torch.Tensor, radius: int) -> torch.Tensor:
    """Grow every foreground label by ``radius``: background pixels within reach take
    the largest label in their box; foreground pixels keep theirs.

    Args:
        labels: (B, *S) integer labels (0: background), 1 to 3 spatial dims.
        radius: pixels (a box of side 2 * radius + 1); <= 0 changes nothing.

    Returns:
        The grown labels, shaped like ``labels``.
    """
    if radius <= 0:
        return labels
    grown = max_filter(labels.unsqueeze(1), radius).squeeze(1)
    return torch.where(labels == 0, grown, labels)


def erode_labels(labels: torch.Tensor, radius: int) -> torch.Tensor:
    """Shrink every foreground label by ``radius``: foreground pixels with another label
    within reach become background. The image border does not erode.

    Args:
        labels: (B, *S) integer labels (0: background), 1 to 3 spatial dims.
        radius: pixels (a box of side 2 * radius + 1); <= 0 changes nothing.

    Returns:
        The shrunk labels, shaped like ``labels``.
    """
    if radius <= 0:
        return labels
    edge = boundary_band(labels, radius) & (labels != 0)
    return torch.where(edge, torch.zeros_like(labels), labels)


def _int_range(name: str, value) -> Tuple[int, int]:
    if isinstance(value, (int,)) and not isinstance(value, bool):
        return int(value), int(value)
    try:
        lo, hi = value
    except (TypeError, ValueError):
        raise TypeError(
            f"{name} must be an int or a (min, max) pair of ints, got {value!r}"
        ) from None
    if int(lo) != lo or int(hi) != hi or lo > hi:
        raise ValueError(
            f"{name} must be an int or a (min, max) pair of ints with min <= max, got {value!r}"
        )
    return int(lo), int(hi)


class BoundaryShiftExpert(ExpertModel):
    """Draws every object ``offset`` pixels too large (> 0: dilation) or too small (< 0: erosion).

    ``offset`` is an int or an inclusive ``(min, max)`` range from which each
    image draws its own offset. Only pixels within |offset| of a boundary change.

    Args:
        offset: pixels, an int or a ``(min, max)`` pair of ints.
        name: the expert's name.

    Raises:
        TypeError: ``offset`` neither an int nor a pair.
        ValueError: a pair of non-integers, or with min > max.
    """

    def __init__(self, offset: Union[int, Tuple[int, int]] = 2, name: Optional[str] = None):
        self.offset = _int_range("offset", offset)
        self.name = name or f"boundary-shift{self.offset}"

    def sample(self, target, num_labels, generator):
        lo, hi = self.offset
        B = target.shape[0]
        if lo == hi:
            offsets = torch.full((B,), lo, dtype=torch.int64, device=target.device)
        else:
            offsets = torch.randint(lo, hi + 1, (B,), generator=generator, device=target.device)
        out = target.clone()
        for v in offsets.unique().tolist():  # a loop over distinct offsets, not pixels
            shifted = dilate_labels(target, v) if v > 0 else erode_labels(target, -v)
            rows = (offsets == v).view(B, *([1] * (target.dim() - 1)))
            out = torch.where(rows, shifted, out)
        return out


class SmoothBoundaryExpert(ExpertModel):
    """Traces boundaries with a smooth random wobble.

    A random displacement field, uniform in [-1, 1] per component on control
    points ``scale`` pixels apart and interpolated (bi/tri)linearly in between,
    is multiplied by ``amplitude`` (pixels); the expert's label at p is the true
    label at p + displacement(p), rounded to the nearest pixel and clamped to the
    image. Every component of the displacement is at most ``amplitude``, so only
    pixels within ceil(amplitude) (box distance) of a boundary can change.

    Args:
        amplitude: the largest displacement in pixels (>= 0).
        scale: the control points' spacing in pixels (> 0).
        name: the expert's name.

    Raises:
        ValueError: a negative ``amplitude`` or a ``scale`` <= 0.
    """

    def __init__(self, amplitude: float = 2.0, scale: float = 8.0, name: Optional[str] = None):
        if amplitude < 0:
            raise ValueError(f"amplitude must be >= 0, got {amplitude!r}")
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale!r}")
        self.amplitude = float(amplitude)
        self.scale = float(scale)
        self.name = name or f"smooth-boundary(a={amplitude:g},s={scale:g})"

    def displacement(
        self, shape: Sequence[int], generator: torch.Generator, device
    ) -> torch.Tensor:
        """The random displacement field of a batch.

        Args:
            shape: the batch's shape (B, *S).
            generator: the source of the random control points.
            device: where to build the field.

        Returns:
            (B, d, *S) displacements in pixels, d the number of spatial dims.
        """
        B, S = int(shape[0]), [int(s) for s in shape[1:]]
        nd = len(S)
        coarse = [max(2, math.ceil((s - 1) / self.scale) + 1) for s in S]
        ctrl = torch.rand((B, nd, *coarse), generator=generator, device=device) * 2 - 1
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[nd]
        field = F.interpolate(ctrl, size=S, mode=mode, align_corners=True)
        return field * self.amplitude

    def sample(self, target, num_labels, generator):
        B, S = target.shape[0], target.shape[1:]
        disp = self.displacement(target.shape, generator, target.device)
        flat = torch.zeros(target.shape, dtype=torch.int64, device=target.device)
        stride = 1
        for k in reversed(range(len(S))):
            n = int(S[k])
            shape = [1] * (len(S) + 1)
            shape[k + 1] = n
            pos = torch.arange(n, device=target.device, dtype=disp.dtype).view(shape)
            src = torch.round(pos + disp[:, k]).clamp_(0, n - 1).to(torch.int64)
            flat = flat + src * stride
            stride *= n
        return target.reshape(B, -1).gather(1, flat.reshape(B, -1)).reshape(target.shape)


class RegionSkillExpert(ExpertModel):
    """Skilled in part of the data, sloppy elsewhere: ``base``'s errors, only in a region.

    The region is where the expert lacks skill: ``classes`` (pixels whose true or
    drawn label is one of these classes, e.g. a rater who knows the liver but
    not the tumour) and/or ``half=(axis, "low" | "high")`` (the lower or upper
    half of a spatial axis, e.g. the slices a tired rater hurried through).
    With both given, the region is their intersection. Outside it the expert
    gives the true label.

    Args:
        base: the expert whose errors are kept in the region.
        classes: the classes of the region.
        half: ``(spatial axis, "low" | "high")``.
        name: the expert's name.

    Raises:
        TypeError: ``base`` is not an :class:`ExpertModel`.
        ValueError: neither ``classes`` nor ``half``; a ``half`` that is not
            (axis >= 0, "low" or "high"). A ``half`` axis beyond the target's spatial
            dims raises ``ValueError`` when sampling.
    """

    def __init__(
        self,
        base: ExpertModel,
        classes: Optional[Sequence[int]] = None,
        half: Optional[Tuple[int, str]] = None,
        name: Optional[str] = None,
    ):
        if not isinstance(base, ExpertModel):
            raise TypeError(f"base must be an ExpertModel, got {type(base).__name__}")
        if classes is None and half is None:
            raise ValueError("RegionSkillExpert needs classes and/or half to define its region")
        if half is not None:
            axis, side = half
            if side not in ("low", "high") or int(axis) != axis or axis < 0:
                raise ValueError(f"half must be (spatial axis >= 0, 'low' | 'high'), got {half!r}")
            half = (int(axis), side)
        self.base = base
        self.classes = tuple(int(c) for c in classes) if classes is not None else None
        self.half = half
        self.name = name or f"region-skill({base.name})"

    def region(self, target: torch.Tensor, drawn: torch.Tensor) -> torch.Tensor:
        """Where the expert lacks skill.

        Args:
            target: (B, *S) true labels.
            drawn: (B, *S) the base expert's labels.

        Returns:
            (B, *S) boolean mask of the region.

        Raises:
            ValueError: the ``half`` axis is beyond the target's spatial dims.
        """
        mask = torch.ones(target.shape, dtype=torch.bool, device=target.device)
        if self.classes is not None:
            cls = torch.tensor(self.classes, device=target.device)
            mask &= torch.isin(target, cls) | torch.isin(drawn, cls)
        if self.half is not None:
            axis, side = self.half
            nd = target.dim() - 1
            if axis >= nd:
                raise ValueError(f"half axis {axis} out of range for {nd} spatial dims")
            n = target.shape[axis + 1]
            shape = [1] * target.dim()
            shape[axis + 1] = n
            pos = torch.arange(n, device=target.device).view(shape)
            mask &= (pos >= n // 2) if side == "high" else (pos < n // 2)
        return mask

    def sample(self, target, num_labels, generator):
        drawn = self.base.sample(target, num_labels, generator)
        return torch.where(self.region(target, drawn), drawn, target)


class MissedComponentsExpert(ExpertModel):
    """Overlooks small structures: each connected component (per label, 8/26-connected)
    of at most ``max_size`` pixels is labelled background with probability ``miss_prob``.

    Args:
        max_size: the largest component it may miss, in pixels (an integer >= 1).
        miss_prob: the probability of missing one, in [0, 1].
        name: the expert's name.

    Raises:
        ValueError: ``max_size`` not an integer >= 1, ``miss_prob`` outside [0, 1].
    """

    def __init__(self, max_size: int = 30, miss_prob: float = 0.5, name: Optional[str] = None):
        if int(max_size) != max_size or max_size < 1:
            raise ValueError(f"max_size must be an integer >= 1, got {max_size!r}")
        if not 0.0 <= miss_prob <= 1.0:
            raise ValueError(f"miss_prob must lie in [0, 1], got {miss_prob!r}")
        self.max_size = int(max_size)
        self.miss_prob = float(miss_prob)
        self.name = name or f"missed-components(<={max_size},p={miss_prob:g})"

    def sample(self, target, num_labels, generator):
        B = target.shape[0]
        comp = connected_components(target, num_labels)  # (B, *S), ids in [0, N]
        n = comp[0].numel()
        key = comp.reshape(B, -1) + torch.arange(B, device=target.device).view(B, 1) * (n + 1)
        sizes = torch.bincount(key.reshape(-1), minlength=B * (n + 1))
        u = torch.rand(B * (n + 1), generator=generator, device=target.device)
        drop_key = (sizes <= self.max_size) & (u < self.miss_prob)
        drop = drop_key[key].reshape(target.shape) & (comp > 0)
        return torch.where(drop, torch.zeros_like(target), target)


class ChainExpert(ExpertModel):
    """Applies several expert models one after the other (e.g. a wobble, then missed components).

    Args:
        steps: the expert models, in order.
        name: the expert's name (default: the steps' names joined by "+").

    Raises:
        TypeError: ``steps`` empty or holding something that is not an ExpertModel.
    """

    def __init__(self, steps: Sequence[ExpertModel], name: Optional[str] = None):
        steps = list(steps)
        if not steps or not all(isinstance(s, ExpertModel) for s in steps):
            raise TypeError("steps must be a non-empty sequence of ExpertModel")
        self.steps = steps
        self.name = name or "+".join(s.name for s in steps)

    def sample(self, target, num_labels, generator):
        out = target
        for s in self.steps:
            out = s.sample(out, num_labels, generator)
        return out


def structured_experts(
    num_labels: int = 2,
    seed: int = 0,
    resample: bool = True,
    ignore_index: int = -100,
    scale: float = 1.0,
) -> ExpertPanel:
    """The default panel of five structured experts.

    ``over`` draws objects 1-2 px too large, ``under`` 1-2 px too small,
    ``wobble`` traces boundaries with a smooth wobble of amplitude 2 px,
    ``half-sloppy`` is exact in the lower half of the first spatial axis and
    3 px too generous in the upper half, ``misses-small`` overlooks half of the
    components of at most 30 px. ``scale`` multiplies every length (use > 1 for
    large images); the component-size threshold is multiplied by ``scale ** 2``.

    Args:
        num_labels, seed, resample, ignore_index: as for :class:`ExpertPanel`.
        scale: the length scale (see above).

    Returns:
        The :class:`ExpertPanel` of the five experts.

    Raises:
        ValueError: ``num_labels`` not an integer >= 2; a ``scale`` that makes a
            length invalid (<= 0).
    """

    def px(v: float) -> int:
        return max(1, int(round(v * scale)))

    experts = [
        BoundaryShiftExpert((px(1), px(2)), name="over"),
        BoundaryShiftExpert((-px(2), -px(1)), name="under"),
        SmoothBoundaryExpert(amplitude=2.0 * scale, scale=8.0 * scale, name="wobble"),
        RegionSkillExpert(BoundaryShiftExpert(px(3)), half=(0, "high"), name="half-sloppy"),
        MissedComponentsExpert(
            max_size=max(1, int(round(30 * scale**2))), miss_prob=0.5, name="misses-small"
        ),
    ]
    return ExpertPanel(
        experts, num_labels=num_labels, seed=seed, resample=resample, ignore_index=ignore_index
    )
