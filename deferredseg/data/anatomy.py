"""A real-anatomy benchmark: slices and crops of a public brain template with scanner effects.

The images are the ICBM 2009c nonlinear asymmetric MNI152 T1 template (1 mm,
skull-stripped) that ``nilearn`` ships in its wheel, read offline with
``nilearn.datasets.load_mni152_template`` and its grey-matter, white-matter and
brain-mask companions (the optional extra ``deferredseg[anatomy]``). The target
is **grey matter**: a voxel is foreground when its grey-matter probability is
above 0.5 (the three tissue probabilities sum to at most 1, so grey matter is
then also the most probable tissue).

The 1 mm volume is averaged down to 2 mm voxels. A 2D case is a 2 mm thick slab
at a 1 mm position along one axis (``axial``, ``coronal`` or ``sagittal``), 2 mm
in plane, cut to ``size`` x ``size`` pixels (96 by default: the whole brain
section) around the brain's centre; a 3D case is a ``size``^3 crop (32 by
default) of the 2 mm volume. Every case draws its own scanner effects from a
generator seeded by ``(seed, case id)``: a contrast change (gamma), a smooth
multiplicative bias field, blur, a lower resolution (down- and up-sampling
along one axis, as thick slices give), and Rician or Gaussian noise.

Splits never put neighbouring cases in different splits. 2D: each orientation's
1 mm positions are cut into blocks of ``block_mm`` planes separated by ``gap_mm``
unused planes, and whole blocks go to train / val / test (60/20/20 of the
blocks, seeded); no slab of one split shares a voxel with, or lies within
``gap_mm`` of, a slab of another split in the same orientation. (Slices of
other orientations cross every slab; the template is one brain, so 2D splits
keep apart positions, not subjects.) 3D: the crops of each split lie in
disjoint regions at least ``gap_mm`` apart: training crops in one hemisphere
(chosen by the seed), validation crops in the front and test crops in the back
of the other hemisphere (the back holds cortex, thalamus and cerebellum, so
every anatomical region is tested).

Regions (written down so that the readers' competence can be checked):

- ``cerebellum``: MNI y < -34 mm and z < -10 - 0.4 |x| mm (below the tentorium,
  which slopes down laterally);
- ``deep``: the deep grey nuclei: not cerebellum, inside the box |x| <= 32,
  -38 <= y <= 28, -12 <= z <= 24 mm, and at least 20 mm from the brain mask's
  surface (thalamus, caudate, putamen, pallidum);
- ``cortex``: everything else (cerebral cortex; also the little grey matter of the
  brain stem);
- ``outer`` / ``inner``: not cerebellum, less / at least :data:`INNER_MM` (10 mm)
  below the brain mask's surface (gyral crowns and walls / sulcal fundi, insula,
  medial cortex, deep nuclei; about 45% of the grey matter each);
- ``thick`` / ``thin`` (per case, in its own dimensions): ``thick`` is within one
  pixel of the grey matter that survives an opening by a 5-pixel box in 2D (parts
  at least 10 mm across in the slice) or a 3-voxel cube in 3D (at least 6 mm
  across in every direction), ``thin`` the rest (cortical ribbons, thin folia).

Reader panels (every reader is exactly right inside its competence region and
wrong, in the way written, outside it):

- ``"regions"`` (2D and 3D): a *cortex reader* (follows a cortical protocol:
  leaves the deep nuclei out, draws the cerebellum solid with its white-matter
  branches), a *deep-nuclei reader* (draws the cortex only where grey matter is
  at least 70% probable, missing partial-volume boundaries and thin ribbons;
  draws the cerebellum one pixel too tight) and a
  *cerebellum reader* (draws cortical boundaries one pixel too wide; draws only
  the purest grey matter of the deep nuclei);
- ``"depth"`` (2D and 3D; the regions balanced): an *outer-cortex reader* (draws
  inner grey matter only where it is at least 75% probable; the cerebellum solid),
  an *inner-cortex reader* (outer boundaries one pixel too wide; the cerebellum one
  pixel too tight) and a *cerebellum reader* (outer grey matter only where at least
  70% probable; inner boundaries one pixel too wide);
- ``"thickness"`` (2D and 3D): a *thin-structure reader* (right on thin parts,
  draws thick structures one pixel too wide), a *thick-structure reader* (right
  on thick parts, erodes thin parts by a pixel), a *generous
  boundary reader* (draws grey matter where its probability is above 0.3) and a
  *strict boundary reader* (above 0.7); the last two are right wherever the
  tissue is pure and wrong only in partial-volume pixels.

:func:`write_anatomy_benchmark` writes a panel in the ``multirater`` layout
(``images/``, ``raters/<name>/``, ``labels/``, and ``regions/`` with each case's
region codes; ``.npy`` in 2D, NIfTI with 2 mm voxels and MNI coordinates in 3D),
``split.json`` and ``benchmark.json`` (the keys of
:func:`deferredseg.data.benchmark.write_benchmark` plus the readers' Dice per
region).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy import ndimage

from ..experts.simulated import derive_seed
from ..experts.structured import dilate_labels, erode_labels
from .benchmark import oracle_and_best_expert

__all__ = [
    "ANATOMY_PANELS",
    "ORIENTATIONS",
    "AnatomyCase",
    "load_template",
    "anatomy_cases",
    "anatomy_case",
    "anatomy_split",
    "anatomy_panel_names",
    "anatomy_panel_labels",
    "anatomy_regions",
    "case_regions",
    "thick_region",
    "scanner_effects",
    "region_dice",
    "REGION_CODES",
    "write_anatomy_benchmark",
]

ANATOMY_PANELS = ("regions", "depth", "thickness")
ORIENTATIONS = ("sagittal", "coronal", "axial")  # the axis each one cuts: x, y, z
READERS = {
    "regions": ("cortex reader", "deep-nuclei reader", "cerebellum reader"),
    "depth": ("outer-cortex reader", "inner-cortex reader", "cerebellum reader"),
    "thickness": (
        "thin-structure reader",
        "thick-structure reader",
        "generous boundary reader",
        "strict boundary reader",
    ),
}
#: Region codes written to ``regions/<id>`` for each panel (0 is never used).
REGION_CODES = {
    "regions": {"cortex": 1, "deep": 2, "cerebellum": 3},
    "depth": {"outer": 1, "inner": 2, "cerebellum": 3},
    "thickness": {"thin": 1, "thick": 2},
}
GM_THRESHOLD = 0.5
#: The ``depth`` panel's border between outer and inner grey matter, in mm below the
#: brain mask's surface (it halves the cerebrum's grey matter).
INNER_MM = 10.0
VOXEL_MM = 2.0
INSTALL_HINT = (
    "the anatomy benchmark reads the MNI152 template that nilearn ships; install the "
    "optional extra: pip install 'deferredseg[anatomy]' (or pip install nilearn==0.14.1)"
)


# ---------------------------------------------------------------------------------- template
@dataclass(frozen=True, eq=False)
class Template:
    """The 1 mm template, cropped to even sizes: T1, tissue probabilities, mask, depth."""

    t1: np.ndarray  # (X, Y, Z) float32 in [0, 1]
    gm: np.ndarray  # grey-matter probability
    wm: np.ndarray  # white-matter probability
    brain: np.ndarray  # brain mask as float32 0 / 1
    depth: np.ndarray  # mm from the brain mask's surface (0 outside the brain)
    origin: Tuple[float, float, float]  # MNI mm of voxel (0, 0, 0)


def _nilearn_datasets():
    try:
        from nilearn import datasets
    except ImportError as err:
        raise ImportError(f"nilearn is not installed: {INSTALL_HINT}") from err
    return datasets


def load_template() -> Template:
    """The MNI152 template and tissue maps at 1 mm (read once per process, offline)."""
    return _load_template(_nilearn_datasets())


@functools.lru_cache(maxsize=1)
def _load_template(datasets) -> Template:
    imgs = [
        datasets.load_mni152_template(resolution=1),
        datasets.load_mni152_gm_template(resolution=1),
        datasets.load_mni152_wm_template(resolution=1),
        datasets.load_mni152_brain_mask(resolution=1),
    ]
    affine = np.asarray(imgs[0].affine, dtype=np.float64)
    if not np.allclose(affine[:3, :3], np.eye(3)):  # 1 mm voxels, axes along MNI x, y, z
        raise ValueError(f"expected the 1 mm MNI152 template, got affine {affine.tolist()}")
    shape = np.asarray(imgs[0].shape[:3])
    even = tuple(slice(0, int(s - s % 2)) for s in shape)
    t1, gm, wm, brain = (np.asarray(i.dataobj, dtype=np.float32)[even] for i in imgs)
    brain = (brain > 0.5).astype(np.float32)
    # depth from the surface; the field of view's edge counts as surface too
    padded = np.pad(brain > 0, 1)
    depth = ndimage.distance_transform_edt(padded)[1:-1, 1:-1, 1:-1].astype(np.float32)
    origin = tuple(float(v) for v in affine[:3, 3])
    return Template(t1, np.clip(gm, 0, 1), np.clip(wm, 0, 1), brain, depth, origin)


def _block_mean(a: np.ndarray, axes: Sequence[int]) -> np.ndarray:
    """Average pairs of voxels along ``axes`` (1 mm -> 2 mm)."""
    for ax in axes:
        n = a.shape[ax] // 2 * 2
        a = a[(slice(None),) * ax + (slice(0, n),)]
        shape = list(a.shape)
        shape[ax : ax + 1] = [n // 2, 2]
        a = a.reshape(shape).mean(axis=ax + 1)
    return a


@functools.lru_cache(maxsize=1)
def _volume_2mm(tpl: Template) -> Dict[str, np.ndarray]:
    return {
        k: _block_mean(getattr(tpl, k), (0, 1, 2)).astype(np.float32)
        for k in ("t1", "gm", "wm", "brain", "depth")
    }


# ---------------------------------------------------------------------------------- regions
def anatomy_regions(coords: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Region codes (1 cortex, 2 deep, 3 cerebellum) from MNI coordinates ``coords``
    (3, *S) in mm and the depth (*S) in mm below the brain mask's surface."""
    x, y, z = coords
    cerebellum = (y < -34) & (z < -12 - 0.35 * np.abs(x))
    box = (np.abs(x) <= 32) & (y >= -38) & (y <= 28) & (z >= -12) & (z <= 24)
    deep = box & (depth >= 20) & ~cerebellum
    out = np.ones(x.shape, np.uint8)
    out[deep] = 2
    out[cerebellum] = 3
    return out


def _t(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.int64))[None]


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    return dilate_labels(_t(mask), r)[0].numpy() > 0


def _erode(mask: np.ndarray, r: int) -> np.ndarray:
    return erode_labels(_t(mask), r)[0].numpy() > 0


#: The opening radius that tells thick from thin parts: a 5-pixel box (10 mm) in a
#: slice, a 3-voxel cube (6 mm in every direction) in a volume.
THICK_RADIUS = {2: 2, 3: 1}


def thick_region(label: np.ndarray, radius: int) -> np.ndarray:
    """Within one pixel of the foreground that survives an opening by a box of
    ``2 * radius + 1`` pixels."""
    core = _dilate(_erode(label, radius), radius) & (label > 0)
    return _dilate(core, 1)


# ---------------------------------------------------------------------------------- cases
@dataclass
class AnatomyCase:
    id: str
    image: np.ndarray  # (1, *S) float32
    label: np.ndarray  # (*S) int64: grey matter
    gm: np.ndarray  # (*S) float32: grey-matter probability
    wm: np.ndarray  # (*S) float32: white-matter probability
    brain: np.ndarray  # (*S) bool
    regions: np.ndarray  # (*S) uint8: 1 cortex, 2 deep, 3 cerebellum
    depth: np.ndarray  # (*S) float32: mm below the brain mask's surface
    thick: np.ndarray  # (*S) bool: the thick-structure region
    affine: np.ndarray  # (4, 4): voxel -> MNI mm (3D; 2D: of the slab's plane)
    effects: Dict[str, object] = field(default_factory=dict)


def _window(a: np.ndarray, starts: Sequence[int], size: int) -> np.ndarray:
    """``a[starts : starts + size]`` on every axis, zero outside ``a``."""
    out = np.zeros((size,) * a.ndim, a.dtype)
    src, dst = [], []
    for s, n in zip(starts, a.shape):
        lo, hi = max(s, 0), min(s + size, n)
        src.append(slice(lo, max(hi, lo)))
        dst.append(slice(lo - s, lo - s + max(hi - lo, 0)))
    out[tuple(dst)] = a[tuple(src)]
    return out


def _smooth_random(rng: np.random.Generator, shape: Tuple[int, ...], points: int) -> np.ndarray:
    """A smooth random field with zero mean and unit standard deviation."""
    coarse = rng.standard_normal((points,) * len(shape))
    f = ndimage.zoom(coarse, [s / points for s in shape], order=3, mode="nearest")
    f = f[tuple(slice(0, s) for s in shape)]
    return (f - f.mean()) / (f.std() + 1e-8)


def scanner_effects(
    t1: np.ndarray, brain: np.ndarray, rng: np.random.Generator
) -> Tuple[np.ndarray, Dict[str, object]]:
    """``t1`` (*S) with one case's scanner effects (drawn from ``rng``) and what was drawn."""
    fx: Dict[str, object] = {}
    img = np.clip(t1, 0, None).astype(np.float64)
    fx["gamma"] = float(rng.uniform(0.6, 1.6))
    img = img ** fx["gamma"]
    fx["bias"] = float(rng.uniform(0.05, 0.35))
    img = img * np.exp(fx["bias"] * _smooth_random(rng, img.shape, 4))
    fx["blur_px"] = float(rng.uniform(0.0, 1.0))
    if fx["blur_px"] > 0.05:
        img = ndimage.gaussian_filter(img, fx["blur_px"])
    fx["thick_slices"] = None
    if rng.random() < 0.5:  # a lower resolution along one axis, as thick slices give
        axis = int(rng.integers(img.ndim))
        factor = float(rng.uniform(1.5, 2.5))
        small = list(img.shape)
        small[axis] = max(2, int(round(img.shape[axis] / factor)))
        low = ndimage.zoom(img, [a / b for a, b in zip(small, img.shape)], order=1)
        img = ndimage.zoom(low, [a / b for a, b in zip(img.shape, low.shape)], order=1)
        fx["thick_slices"] = {"axis": axis, "factor": factor}
    fx["noise"] = float(rng.uniform(0.01, 0.06))
    fx["rician"] = bool(rng.random() < 0.5)
    scale = float(np.percentile(img[brain], 99)) if brain.any() else 1.0
    n1 = rng.standard_normal(img.shape) * fx["noise"] * scale
    if fx["rician"]:
        n2 = rng.standard_normal(img.shape) * fx["noise"] * scale
        img = np.sqrt((img + n1) ** 2 + n2**2)
    else:
        img = img + n1
    return img.astype(np.float32), fx


def _make_case(
    case_id: str,
    seed: int,
    fields: Dict[str, np.ndarray],
    affine: np.ndarray,
    dims: int,
) -> AnatomyCase:
    rng = np.random.default_rng(derive_seed(seed, f"anatomy/{dims}d/{case_id}"))
    brain = fields["brain"] > 0.5
    gm = np.clip(fields["gm"], 0, 1).astype(np.float32)
    label = (gm > GM_THRESHOLD).astype(np.int64)
    grids = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in gm.shape], indexing="ij")
    # voxel (i, j[, k]) -> MNI mm; a 2D case's affine has a zero third column (see _slab)
    coords = np.einsum("ij,j...->i...", affine[:3, :dims], np.stack(grids))
    coords += affine[:3, 3].reshape(3, *([1] * dims))
    image, fx = scanner_effects(fields["t1"], brain, rng)
    return AnatomyCase(
        id=case_id,
        image=image[None],
        label=label,
        gm=gm,
        wm=np.clip(fields["wm"], 0, 1).astype(np.float32),
        brain=brain,
        regions=anatomy_regions(coords, fields["depth"]),
        depth=fields["depth"].astype(np.float32),
        thick=thick_region(label, THICK_RADIUS[dims]),
        affine=affine,
        effects=fx,
    )


def _axes(orientation: str) -> Tuple[int, Tuple[int, int]]:
    a = ORIENTATIONS.index(orientation)
    return a, tuple(i for i in range(3) if i != a)


@functools.lru_cache(maxsize=8)
def _plane_centre(tpl: Template, orientation: str) -> Tuple[int, int]:
    """The brain's bounding-box centre in the 2 mm grid of the orientation's plane."""
    a, (b, c) = _axes(orientation)
    out = []
    for ax in (b, c):
        other = tuple(i for i in range(3) if i != ax)
        idx = np.flatnonzero(tpl.brain.any(axis=other))
        out.append(int(round((idx.min() + idx.max() + 1) / 4.0)))
    return out[0], out[1]


def _slab(
    tpl: Template, orientation: str, pos: int, size: int
) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
    """The 2 mm slab at 1 mm plane ``pos``: fields (size, size) and its affine (i, j, _, 1)."""
    a, (b, c) = _axes(orientation)
    cb, cc = _plane_centre(tpl, orientation)
    starts = (cb - size // 2, cc - size // 2)
    fields = {}
    for k in ("t1", "gm", "wm", "brain", "depth"):
        v = getattr(tpl, k)
        plane = v[(slice(None),) * a + (slice(pos, pos + 2),)].mean(axis=a)
        fields[k] = _window(_block_mean(plane, (0, 1)), starts, size)
    affine = np.zeros((4, 4))
    affine[b, 0] = VOXEL_MM
    affine[c, 1] = VOXEL_MM
    origin = np.asarray(tpl.origin, dtype=np.float64)
    affine[:3, 3] = origin + 0.5  # the centre of a 2 x 2 block / of the 2-plane slab
    affine[b, 3] += VOXEL_MM * starts[0]
    affine[c, 3] += VOXEL_MM * starts[1]
    affine[a, 3] += pos
    affine[3, 3] = 1.0
    return fields, affine


def _crop(
    tpl: Template, start: Sequence[int], size: int
) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
    vol = _volume_2mm(tpl)
    fields = {k: _window(v, start, size) for k, v in vol.items()}
    affine = np.diag([VOXEL_MM, VOXEL_MM, VOXEL_MM, 1.0])
    affine[:3, 3] = np.asarray(tpl.origin) + 0.5 + VOXEL_MM * np.asarray(start)
    return fields, affine


# ---------------------------------------------------------------------------------- layout
def _check_int(name: str, value, lo: int) -> int:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok and isinstance(value, float) and value.is_integer():
        ok = True
    if not ok or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def _check_fractions(fractions) -> Tuple[float, float, float]:
    fr = tuple(float(f) for f in fractions)
    if len(fr) != 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise ValueError(
            "fractions must be three non-negative numbers (train, val, test) summing to 1, "
            f"got {fractions!r}"
        )
    return fr


def _slice_plan(
    tpl: Template,
    seed: int,
    block_mm: int,
    gap_mm: int,
    fractions: Tuple[float, float, float],
    orientations: Sequence[str],
    min_gm_mm2: float = 400.0,
) -> Dict[str, List[Tuple[str, int]]]:
    """Every usable (orientation, 1 mm position) per split, by blocks of neighbouring planes."""
    gm = tpl.gm > GM_THRESHOLD
    plan: Dict[str, List[Tuple[str, int]]] = {"train": [], "val": [], "test": []}
    rng = np.random.default_rng(derive_seed(seed, "anatomy/2d/blocks"))
    for o in orientations:
        a, _ = _axes(o)
        area = gm.sum(axis=tuple(i for i in range(3) if i != a))
        ok = np.flatnonzero(area >= min_gm_mm2)
        lo, hi = int(ok.min()), int(ok.max())
        blocks = []
        start = lo
        while start + 1 <= hi:  # a block holds the slabs [p, p + 2) with p in [start, end - 1)
            end = min(start + block_mm, hi + 1)
            positions = [p for p in range(start, end - 1) if area[p] >= min_gm_mm2]
            if positions:
                blocks.append(positions)
            start += block_mm + gap_mm
        n = len(blocks)
        n_val = int(round(fractions[1] * n))
        n_test = int(round(fractions[2] * n))
        perm = rng.permutation(n)
        for rank, bi in enumerate(perm):
            split = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
            plan[split].extend((o, p) for p in blocks[bi])
    return plan


def _pick(items: Sequence, k: int) -> List:
    """``k`` items spread evenly over ``items`` (in order)."""
    if k >= len(items):
        return list(items)
    if k <= 0:
        return []
    idx = np.unique(np.round(np.linspace(0, len(items) - 1, k)).astype(int))
    return [items[i] for i in idx]


def _split_counts(n: int, fractions) -> Dict[str, int]:
    n_val = int(round(fractions[1] * n))
    n_test = int(round(fractions[2] * n))
    return {"train": n - n_val - n_test, "val": n_val, "test": n_test}


def _crop_plan(
    tpl: Template, seed: int, num_cases: int, size: int, gap_mm: int, fractions
) -> Dict[str, List[Tuple[int, int, int]]]:
    """Crop corners (2 mm grid) per split, in disjoint regions at least ``gap_mm`` apart."""
    vol = _volume_2mm(tpl)
    shape = vol["gm"].shape
    origin = np.asarray(tpl.origin) + 0.5
    mid_x = int(round((0.0 - origin[0]) / VOXEL_MM))  # MNI x = 0
    cut_y = int(round((-18.0 - origin[1]) / VOXEL_MM))  # MNI y = -18: front / back
    half = int(np.ceil(gap_mm / VOXEL_MM / 2))
    rng = np.random.default_rng(derive_seed(seed, "anatomy/3d/crops"))
    train_low = bool(rng.random() < 0.5)  # the training hemisphere: low x or high x
    xs = {"low": (0, mid_x - half), "high": (mid_x + half, shape[0])}
    train_x = xs["low" if train_low else "high"]
    other_x = xs["high" if train_low else "low"]
    regions = {
        "train": (train_x, (0, shape[1])),
        "val": (other_x, (cut_y + half, shape[1])),  # front
        "test": (other_x, (0, cut_y - half)),  # back
    }
    gm = vol["gm"] > GM_THRESHOLD
    counts = _split_counts(num_cases, fractions)
    plan: Dict[str, List[Tuple[int, int, int]]] = {}
    largest = min(min(x1 - x0, y1 - y0) for (x0, x1), (y0, y1) in regions.values())
    for split, ((x0, x1), (y0, y1)) in regions.items():
        ranges = [(x0, x1 - size), (y0, y1 - size), (0, shape[2] - size)]
        if any(hi < lo for lo, hi in ranges):
            raise ValueError(
                f"size={size} does not fit the {split} region of the 2 mm volume "
                f"(x {x0}..{x1}, y {y0}..{y1}, z 0..{shape[2]}); use a size <= {largest}"
            )
        # a crop holds at least 5% grey matter; its corner lies in the region's range
        corners: List[Tuple[int, int, int]] = []
        tries = 0
        while len(corners) < counts[split]:
            tries += 1
            if tries > 10000:
                raise RuntimeError(f"cannot place {counts[split]} {split} crops of size {size}")
            c = tuple(int(rng.integers(lo, hi + 1)) for lo, hi in ranges)
            sl = tuple(slice(s, s + size) for s in c)
            if gm[sl].mean() >= 0.05 and c not in corners:
                corners.append(c)
        plan[split] = corners
    return plan


def anatomy_split(
    seed: int = 0,
    dims: int = 2,
    num_cases: Optional[int] = None,
    size: Optional[int] = None,
    block_mm: int = 12,
    gap_mm: int = 4,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    orientations: Sequence[str] = ORIENTATIONS,
) -> Dict[str, List[str]]:
    """The case ids of each split (see the module's notes on splits); cheap (no images)."""
    return {
        k: [c[0] for c in v]
        for k, v in _plan(
            seed, dims, num_cases, size, block_mm, gap_mm, fractions, orientations
        ).items()
    }


def _defaults(dims: int, num_cases, size) -> Tuple[int, int]:
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims!r}")
    num = 300 if dims == 2 else 60
    num = _check_int("num_cases", num if num_cases is None else num_cases, 5)
    sz = _check_int("size", (96 if dims == 2 else 32) if size is None else size, 16)
    return num, sz


def _plan(seed, dims, num_cases, size, block_mm, gap_mm, fractions, orientations):
    """{split: [(case id, orientation or None, position or corner)]}."""
    num, sz = _defaults(dims, num_cases, size)
    fr = _check_fractions(fractions)
    block_mm = _check_int("block_mm", block_mm, 3)
    gap_mm = _check_int("gap_mm", gap_mm, 0)
    tpl = load_template()
    out: Dict[str, List[Tuple[str, Optional[str], object]]] = {}
    if dims == 3:
        for split, corners in _crop_plan(tpl, seed, num, sz, gap_mm, fr).items():
            out[split] = [(f"crop-{split}-{i:03d}", None, c) for i, c in enumerate(corners)]
        return out
    orients = list(orientations)
    bad = [o for o in orients if o not in ORIENTATIONS]
    if bad or not orients:
        raise ValueError(
            f"orientations must be a non-empty subset of {list(ORIENTATIONS)}, got {orientations!r}"
        )
    plan = _slice_plan(tpl, seed, block_mm, gap_mm, fr, orients)
    available = sum(len(v) for v in plan.values())
    if num > available:
        raise ValueError(
            f"num_cases={num} is more than the {available} slices available with "
            f"block_mm={block_mm}, gap_mm={gap_mm} and orientations {orients}"
        )
    counts = _split_counts(num, fr)
    for split, items in plan.items():
        if counts[split] > len(items):
            raise ValueError(
                f"num_cases={num} asks for {counts[split]} {split} slices, only {len(items)} "
                f"are available; lower num_cases or change block_mm / gap_mm"
            )
        chosen = _pick(items, counts[split])
        out[split] = [(f"{o}-{p:03d}", o, p) for o, p in chosen]
    return out


def anatomy_case(case_id: str, seed: int = 0, size: Optional[int] = None) -> AnatomyCase:
    """One 2D case by its id, ``"<orientation>-<1 mm position>"`` (e.g. ``"axial-072"``),
    whether or not a split holds it. (3D crops are placed by the split: use
    :func:`anatomy_cases`.)"""
    orientation, _, pos = case_id.rpartition("-")
    if orientation not in ORIENTATIONS or not pos.isdigit():
        raise ValueError(
            f"case_id must be '<orientation>-<position>' with orientation in "
            f"{list(ORIENTATIONS)}, got {case_id!r}"
        )
    _, sz = _defaults(2, None, size)
    tpl = load_template()
    last = tpl.gm.shape[ORIENTATIONS.index(orientation)] - 2
    if int(pos) > last:
        raise ValueError(f"case_id {case_id!r}: the {orientation} position must be 0..{last}")
    fields, affine = _slab(tpl, orientation, int(pos), sz)
    return _make_case(case_id, seed, fields, affine, 2)


def anatomy_cases(
    seed: int = 0,
    dims: int = 2,
    num_cases: Optional[int] = None,
    size: Optional[int] = None,
    block_mm: int = 12,
    gap_mm: int = 4,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    orientations: Sequence[str] = ORIENTATIONS,
):
    """Yield ``(split, AnatomyCase)`` for every case, split by split (train, val, test)."""
    _, sz = _defaults(dims, num_cases, size)
    plan = _plan(seed, dims, num_cases, size, block_mm, gap_mm, fractions, orientations)
    tpl = load_template()
    for split in ("train", "val", "test"):
        for cid, orientation, where in plan[split]:
            if dims == 2:
                fields, affine = _slab(tpl, orientation, where, sz)
            else:
                fields, affine = _crop(tpl, where, sz)
            yield split, _make_case(cid, seed, fields, affine, dims)


# ---------------------------------------------------------------------------------- readers
def anatomy_panel_names(panel: str) -> List[str]:
    """The readers of ``panel``, in routing-channel order."""
    if panel not in READERS:
        raise ValueError(f"panel must be one of {list(ANATOMY_PANELS)}, got {panel!r}")
    return list(READERS[panel])


def case_regions(panel: str, case: AnatomyCase) -> np.ndarray:
    """(*S) uint8: the panel's region code of every pixel (:data:`REGION_CODES`)."""
    if panel == "regions":
        return case.regions.copy()
    if panel == "depth":
        out = np.where(case.depth >= INNER_MM, 2, 1).astype(np.uint8)
        out[case.regions == 3] = 3
        return out
    if panel == "thickness":
        return np.where(case.thick, 2, 1).astype(np.uint8)
    raise ValueError(f"panel must be one of {list(ANATOMY_PANELS)}, got {panel!r}")


def anatomy_panel_labels(panel: str, case: AnatomyCase) -> np.ndarray:
    """(E, *S) int64: every reader's grey matter on ``case``: the truth inside the
    reader's competence region, its own structured error outside it."""
    names = anatomy_panel_names(panel)
    y = case.label > 0
    gm, brain = case.gm, case.brain
    out = []
    if panel == "regions":
        cortex, deep, cbl = (case.regions == k for k in (1, 2, 3))
        tissue = (gm + case.wm > 0.5) & brain  # the cerebellum drawn solid, its white matter too
        drawn = {
            "cortex reader": np.where(deep, False, y),  # cortical grey matter only
            "deep-nuclei reader": np.where(cortex, y & (gm >= 0.7), y),
            "cerebellum reader": np.where(cortex, _dilate(y, 1) & brain, y),
        }
        drawn["cortex reader"] = np.where(cbl, tissue, drawn["cortex reader"])
        drawn["deep-nuclei reader"] = np.where(cbl, _erode(y, 1), drawn["deep-nuclei reader"])
        drawn["cerebellum reader"] = np.where(deep, y & (gm >= 0.8), drawn["cerebellum reader"])
    elif panel == "depth":
        outer, inner, cbl = (case_regions(panel, case) == k for k in (1, 2, 3))
        tissue = (gm + case.wm > 0.5) & brain
        wide, tight, strict = _dilate(y, 1) & brain, _erode(y, 1), y & (gm >= 0.7)
        drawn = {
            "outer-cortex reader": np.select([inner, cbl], [y & (gm >= 0.75), tissue], y),
            "inner-cortex reader": np.select([outer, cbl], [wide, tight], y),
            "cerebellum reader": np.select([outer, inner], [strict, wide], y),
        }
    else:
        thick = case.thick
        drawn = {
            "thin-structure reader": np.where(thick, _dilate(y, 1) & brain, y),
            "thick-structure reader": np.where(thick, y, _erode(y, 1)),
            "generous boundary reader": (gm > 0.3) & brain,
            "strict boundary reader": gm > 0.7,
        }
    for n in names:
        out.append(drawn[n].astype(np.int64))
    return np.stack(out)


# ---------------------------------------------------------------------------------- summary
def region_dice(
    labels: np.ndarray, readers: np.ndarray, regions: np.ndarray, codes: Dict[str, int]
) -> Dict[str, Dict[str, Optional[float]]]:
    """Each reader's Dice inside each region, pooled over the pixels of all cases.

    ``labels`` (N, *S), ``readers`` (N, E, *S), ``regions`` (N, *S); None where the
    region holds no foreground, neither true nor drawn.
    """
    out: Dict[str, Dict[str, Optional[float]]] = {}
    y = labels.astype(bool)
    for name, code in codes.items():
        inside = regions == code
        row = {}
        for j in range(readers.shape[1]):
            p = readers[:, j].astype(bool) & inside
            t = y & inside
            tot = int(p.sum() + t.sum())
            row[str(j)] = None if tot == 0 else float(2 * (p & t).sum() / tot)
        out[name] = row
    return out


def _save(path_stem: Path, arr: np.ndarray, affine: np.ndarray, dims: int) -> None:
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    if dims == 2:
        np.save(str(path_stem) + ".npy", np.ascontiguousarray(arr))
        return
    import nibabel as nib

    img = nib.Nifti1Image(np.ascontiguousarray(arr), affine)
    img.header.set_xyzt_units("mm")
    img.set_data_dtype(arr.dtype)
    nib.save(img, str(path_stem) + ".nii.gz")


def write_anatomy_benchmark(
    root,
    panel: str = "regions",
    seed: int = 0,
    dims: int = 2,
    num_cases: Optional[int] = None,
    size: Optional[int] = None,
    block_mm: int = 12,
    gap_mm: int = 4,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    orientations: Sequence[str] = ORIENTATIONS,
) -> Dict[str, object]:
    """Write ``panel``'s data set under ``root`` in the ``multirater`` layout; return its summary.

    ``images/<id>``, ``labels/<id>`` (grey matter), ``raters/<reader>/<id>`` and
    ``regions/<id>`` (the panel's region codes) as ``.npy`` (2D) or ``.nii.gz`` with
    2 mm voxels in MNI coordinates (3D); ``split.json``; ``benchmark.json``: the
    keys of :func:`~deferredseg.data.benchmark.write_benchmark` (``expert_dice``,
    ``best_expert``, ``best_expert_dice``, ``oracle_dice`` on the test split, ...)
    plus ``best_expert_name``, ``region_codes``, ``region_dice`` ({region: {reader:
    Dice}}, pooled over the test split's pixels) and what made the data.
    Defaults: 300 slices of 96 x 96 (2D), 60 crops of 32^3 (3D).
    """
    names = anatomy_panel_names(panel)
    num, sz = _defaults(dims, num_cases, size)
    root = Path(root)
    split: Dict[str, List[str]] = {"train": [], "val": [], "test": []}
    test_labels, test_readers, test_regions = [], [], []
    for s, case in anatomy_cases(seed, dims, num, sz, block_mm, gap_mm, fractions, orientations):
        split[s].append(case.id)
        lab = anatomy_panel_labels(panel, case)
        reg = case_regions(panel, case)
        _save(root / "images" / case.id, case.image[0], case.affine, dims)
        _save(root / "labels" / case.id, case.label.astype(np.uint8), case.affine, dims)
        _save(root / "regions" / case.id, reg, case.affine, dims)
        for name, e in zip(names, lab):
            _save(root / "raters" / name / case.id, e.astype(np.uint8), case.affine, dims)
        if s == "test":
            test_labels.append(case.label)
            test_readers.append(lab)
            test_regions.append(reg)
    split = {k: sorted(v) for k, v in split.items()}
    (root / "split.json").write_text(json.dumps(split, indent=1))
    labels, readers, regions = (np.stack(v) for v in (test_labels, test_readers, test_regions))
    stats = oracle_and_best_expert(labels, readers)
    per_region = region_dice(labels, readers, regions, REGION_CODES[panel])
    summary: Dict[str, object] = {
        "panel": panel,
        "cases": sum(len(v) for v in split.values()),
        "layout": "multirater",
        "experts": names,
        "split_sizes": {k: len(v) for k, v in split.items()},
        **stats,
        "best_expert_name": names[int(stats["best_expert"])],
        "region_codes": REGION_CODES[panel],
        "region_dice": {
            r: {names[int(j)]: d for j, d in row.items()} for r, row in per_region.items()
        },
        "source": "ICBM 2009c MNI152 template and tissue maps (nilearn 0.14.1), 2 mm",
        "target": f"grey matter: probability > {GM_THRESHOLD}",
        "dims": dims,
        "size": sz,
        "seed": seed,
        "block_mm": block_mm,
        "gap_mm": gap_mm,
        "orientations": list(orientations) if dims == 2 else None,
    }
    (root / "benchmark.json").write_text(json.dumps(summary, indent=1))
    return summary
