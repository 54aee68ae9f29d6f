"""A synthetic benchmark on which deferral can help: ambiguous images and four expert panels.

The MONAI test images (``layout="synthetic"``) are easy: a small network reaches
a Dice near 0.99 on them, so there is nothing left to defer. The images here are
made hard on purpose, the way clinical ones are: faint objects, blurred
boundaries, tiny objects, unlabelled look-alikes (faint elongated blobs that are
not the structure of interest) and spatially varying noise. A small UNet reaches
a Dice of about 0.8 to 0.9 on them.

Each case also records what every object is (small or large, faint or bright,
a look-alike), so that experts can be competent on different content. Four
panels of experts label the same images:

- ``A`` ("same-accuracy"): the released code's three per-pixel discrepancy
  experts of equal accuracy;
- ``B`` ("complementary"): the released code's five experts. As released, its
  fourth expert (fg 0.97, bg 0.99) is at least as accurate as every other one in
  every region, so a router can do no better than always choosing it;
- ``C`` ("content"): three readers, each competent on different content, so no
  single expert is best everywhere and the right choice is visible in the image:
  a small-lesion reader (right on small objects; misses faint large ones, draws
  bright large ones too tight, marks look-alikes), a large-lesion reader (right
  on large objects and look-alikes; misses small ones) and a contrast reader
  (right on faint objects and look-alikes; draws bright ones too wide);
- ``D`` ("structured"): the five structured experts of
  :func:`deferredseg.experts.structured_experts` (over- and under-segmenting,
  wobbly, sloppy on half the image, missing small components); none of them is
  perfect on these images.

:func:`write_benchmark` writes a panel's data set in the ``multirater`` layout
(``images/``, ``raters/<name>/``, ``labels/`` and a 60/20/20 ``split.json``) or
in the ``medsam-npy`` layout (``imgs/``, ``gts/``); numpy, scipy and torch only,
no downloads, seeded and reproducible.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from scipy import ndimage

from ..experts import make_experts
from ..experts.simulated import derive_seed
from .splits import split_ids

__all__ = [
    "PANELS",
    "AmbiguousCase",
    "ambiguous_case",
    "panel_labels",
    "panel_names",
    "write_benchmark",
    "oracle_and_best_expert",
]

PANELS = ("A", "B", "C", "D")
PANEL_NAMES = {"A": "same-accuracy", "B": "complementary", "C": "content", "D": "structured"}

# object kinds
SMALL, LARGE = 0, 1


@dataclass
class AmbiguousCase:
    id: str
    image: np.ndarray  # (1, *S) float32
    label: np.ndarray  # (*S) int64, 0 / 1
    objects: np.ndarray  # (*S) int32: 0 background, i > 0 the i-th object (true or look-alike)
    size_class: np.ndarray  # per object i - 1: SMALL or LARGE
    faint: np.ndarray  # per object: bool
    lookalike: np.ndarray  # per object: bool (not part of the label)


def _smooth_field(rng: np.random.Generator, shape: Tuple[int, ...], sigma: float) -> np.ndarray:
    """Smooth noise scaled to [0, 1]."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    lo, hi = f.min(), f.max()
    return (f - lo) / (hi - lo + 1e-12)


def _ellipsoid(
    shape: Tuple[int, ...], center: np.ndarray, axes: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """A randomly rotated ellipse (2D) or ellipsoid (3D) mask."""
    d = len(shape)
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    coords = np.stack([g - c for g, c in zip(grids, center)], axis=-1)  # (*S, d)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))  # a random rotation
    local = coords @ q
    return ((local / axes) ** 2).sum(-1) <= 1.0


def ambiguous_case(
    case_id: str, seed: int = 0, spatial_dims: int = 2, size: int = 64
) -> AmbiguousCase:
    """One hard case, seeded by ``(seed, case_id)``.

    Objects (sizes relative to a 64-pixel image): 1-2 large ones (radius 5-10),
    2-4 small ones (radius 1.5-2.5), 40% of them faint (contrast 0.10-0.20
    against 0.45-0.70), each with its own boundary blur (sigma 0.6-1.8); 1-2
    look-alikes (faint, elongated, unlabelled); a textured background and noise
    whose level varies smoothly over the image (sigma 0.04-0.20).
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    if int(size) != size or size < 16:
        raise ValueError(f"size must be an integer >= 16, got {size!r}")
    rng = np.random.default_rng(derive_seed(seed, f"ambiguous/{case_id}"))
    shape = (int(size),) * spatial_dims
    scale = size / 64.0
    image = 0.2 + 0.15 * _smooth_field(rng, shape, 6 * scale)
    objects = np.zeros(shape, np.int32)
    kinds: List[Tuple[int, bool, bool]] = []
    specs = (
        [(LARGE, False)] * int(rng.integers(1, 3))
        + [(SMALL, False)] * int(rng.integers(2, 5))
        + [(SMALL, True)] * int(rng.integers(1, 3))
    )
    for size_class, lookalike in specs:
        if lookalike:
            r = rng.uniform(2.0, 3.0) * scale
            axes = np.full(spatial_dims, r)
            axes[0] *= rng.uniform(2.5, 3.5)  # elongated: the cue that tells it from a lesion
            faint = True
        else:
            r = (rng.uniform(5, 10) if size_class == LARGE else rng.uniform(1.5, 2.5)) * scale
            axes = r * rng.uniform(0.75, 1.25, spatial_dims)
            faint = bool(rng.random() < 0.4)
        margin = float(axes.max()) + 1
        center = rng.uniform(margin, np.array(shape) - 1 - margin)
        mask = _ellipsoid(shape, center, axes, rng) & (objects == 0)
        if not mask.any():
            continue
        kinds.append((size_class, faint, lookalike))
        objects[mask] = len(kinds)
        contrast = rng.uniform(0.10, 0.20) if faint else rng.uniform(0.45, 0.70)
        blur = rng.uniform(0.6, 1.8) * scale
        image += contrast * ndimage.gaussian_filter(mask.astype(np.float64), blur)
    sigma = 0.04 + 0.16 * _smooth_field(rng, shape, 10 * scale)
    image += sigma * rng.standard_normal(shape)
    arr = np.asarray(kinds, dtype=np.int64).reshape(-1, 3)
    size_class, faint, lookalike = arr[:, 0], arr[:, 1].astype(bool), arr[:, 2].astype(bool)
    true_ids = np.flatnonzero(~lookalike) + 1
    label = np.isin(objects, true_ids).astype(np.int64)
    return AmbiguousCase(
        case_id, image.astype(np.float32)[None], label, objects, size_class, faint, lookalike
    )


# ------------------------------------------------------------------------------- expert panels
def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    return ndimage.binary_dilation(mask, iterations=r) if r > 0 else mask


def _erode(mask: np.ndarray, r: int) -> np.ndarray:
    return ndimage.binary_erosion(mask, iterations=r) if r > 0 else mask


def _content_reader(case: AmbiguousCase, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Panel C: the labels of one reader, object by object."""
    out = np.zeros_like(case.label)
    for i in range(len(case.size_class)):
        m = case.objects == i + 1
        small, faint, look = (
            case.size_class[i] == SMALL,
            bool(case.faint[i]),
            bool(case.lookalike[i]),
        )
        if kind == "small-lesion reader":
            if look:
                drawn = m  # marks look-alikes as lesions
            elif small:
                drawn = m
            elif faint:
                drawn = np.zeros_like(m)  # misses faint large objects
            else:
                drawn = _erode(m, 2)  # too tight on bright large objects
        elif kind == "large-lesion reader":
            drawn = np.zeros_like(m) if (look or small) else m  # misses small objects
        else:  # "contrast reader"
            if look:
                drawn = np.zeros_like(m)
            elif faint:
                drawn = m
            else:
                drawn = _dilate(m, 2)  # too wide on bright objects
        # everyone's own slip: a 1-pixel wobble on a random fifth of the objects it draws
        if drawn.any() and rng.random() < 0.2:
            drawn = _dilate(drawn, 1) if rng.random() < 0.5 else _erode(drawn, 1)
        out[drawn] = 1
    return out


CONTENT_READERS = ("small-lesion reader", "large-lesion reader", "contrast reader")


def panel_names(panel: str) -> List[str]:
    """The experts' names of a panel, in routing-channel order."""
    if panel == "C":
        return list(CONTENT_READERS)
    if panel not in PANELS:
        raise ValueError(f"panel must be one of {list(PANELS)}, got {panel!r}")
    spec = {"A": "same-accuracy", "B": "complementary", "D": "structured"}[panel]
    return list(make_experts(spec, num_labels=2, seed=0).names)


def panel_labels(panel: str, case: AmbiguousCase, seed: int = 0) -> np.ndarray:
    """(E, *S) int64: every expert's labels of ``case`` (fixed per (seed, case, panel))."""
    if panel not in PANELS:
        raise ValueError(f"panel must be one of {list(PANELS)}, got {panel!r}")
    if panel == "C":
        rng = np.random.default_rng(derive_seed(seed, f"panelC/{case.id}"))
        return np.stack([_content_reader(case, k, rng) for k in CONTENT_READERS])
    spec = {"A": "same-accuracy", "B": "complementary", "D": "structured"}[panel]
    experts = make_experts(
        spec, num_labels=2, seed=derive_seed(seed, f"panel{panel}"), resample=False
    )
    target = torch.from_numpy(case.label)[None]
    return experts(target, ids=[case.id])[0].numpy().astype(np.int64)


def oracle_and_best_expert(labels: np.ndarray, experts: np.ndarray) -> Dict[str, object]:
    """Per-expert Dice, the best single expert and the per-pixel oracle's Dice.

    ``labels`` (N, *S), ``experts`` (N, E, *S), binary. The oracle labels a pixel
    correctly whenever at least one expert does. Dice is averaged over images
    with foreground.
    """

    def dice(pred, true):
        inter = (pred & true).reshape(len(true), -1).sum(1)
        tot = pred.reshape(len(true), -1).sum(1) + true.reshape(len(true), -1).sum(1)
        has = true.reshape(len(true), -1).any(1)
        return float(np.mean(2 * inter[has] / np.maximum(tot[has], 1)))

    y = labels.astype(bool)
    per = [dice(experts[:, j].astype(bool), y) for j in range(experts.shape[1])]
    right = experts == labels[:, None]
    oracle = np.where(right.any(1), labels, experts[:, 0]).astype(bool)
    return {
        "expert_dice": per,
        "best_expert": int(np.argmax(per)),
        "best_expert_dice": max(per),
        "oracle_dice": dice(oracle, y),
    }


def write_benchmark(
    root,
    panel: str = "C",
    num_cases: int = 250,
    spatial_dims: int = 2,
    size: int = 64,
    seed: int = 0,
    layout: str = "multirater",
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
) -> Dict[str, object]:
    """Write ``num_cases`` cases of ``panel`` under ``root``; return a summary.

    ``layout="multirater"``: ``images/<id>.npy``, ``raters/<expert>/<id>.npy``,
    ``labels/<id>.npy`` and ``split.json`` (60/20/20 by default, seeded);
    ``layout="medsam-npy"``: ``imgs/<id>.npy`` and ``gts/<id>.npy`` (simulated
    experts are then chosen at training time). The images do not depend on the
    panel: every panel of one seed labels the same images.
    """
    if layout not in ("multirater", "medsam-npy"):
        raise ValueError(f"layout must be 'multirater' or 'medsam-npy', got {layout!r}")
    if int(num_cases) != num_cases or num_cases < 5:
        raise ValueError(f"num_cases must be an integer >= 5, got {num_cases!r}")
    root = Path(root)
    ids = [f"case{i:04d}" for i in range(int(num_cases))]
    names = panel_names(panel) if layout == "multirater" else []
    all_labels, all_experts = [], []
    for cid in ids:
        case = ambiguous_case(cid, seed, spatial_dims, size)
        if layout == "multirater":
            (root / "images").mkdir(parents=True, exist_ok=True)
            (root / "labels").mkdir(parents=True, exist_ok=True)
            np.save(root / "images" / f"{cid}.npy", case.image[0])
            np.save(root / "labels" / f"{cid}.npy", case.label.astype(np.uint8))
            lab = panel_labels(panel, case, seed)
            for name, e in zip(names, lab):
                (root / "raters" / name).mkdir(parents=True, exist_ok=True)
                np.save(root / "raters" / name / f"{cid}.npy", e.astype(np.uint8))
            all_labels.append(case.label)
            all_experts.append(lab)
        else:
            (root / "imgs").mkdir(parents=True, exist_ok=True)
            (root / "gts").mkdir(parents=True, exist_ok=True)
            np.save(root / "imgs" / f"{cid}.npy", case.image[0])
            np.save(root / "gts" / f"{cid}.npy", case.label.astype(np.uint8))
    split = split_ids(ids, tuple(fractions), seed=seed)
    (root / "split.json").write_text(json.dumps(split, indent=1))
    summary: Dict[str, object] = {
        "panel": panel,
        "cases": len(ids),
        "layout": layout,
        "experts": names,
        "split_sizes": {k: len(v) for k, v in split.items()},
    }
    if all_experts:
        test = set(split["test"])
        idx = [i for i, c in enumerate(ids) if c in test]
        summary.update(
            oracle_and_best_expert(
                np.stack([all_labels[i] for i in idx]), np.stack([all_experts[i] for i in idx])
            )
        )
    (root / "benchmark.json").write_text(json.dumps(summary, indent=1))
    return summary
