"""DeferredSeg datasets on MONAI: the ``synthetic``, ``multirater`` and ``medsam-npy`` layouts.

``build_dataset(layout, root, split, ...)`` returns a ``monai.data.Dataset`` (or
``CacheDataset``) whose items are dicts ``{"image": (C, *S) float32,
"target": (*S) int64, "expert_labels": (E, *S) int64, "id": str}``;
``build_dataloader`` batches them into (B, C, *S), (B, *S), (B, E, *S).
See docs/data.md for the folder layouts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from monai.data import CacheDataset, Dataset

from ..experts import ExpertPanel, make_experts
from ..experts.consensus import CONSENSUS_METHODS
from ..experts.simulated import derive_seed
from .io import SUPPORTED_EXTENSIONS, LabelMap, split_name
from .splits import select_split
from .transforms import FinalizeCased, LoadCased, MakeTargetd, ResizedSpacingd, SimulateExpertsd

__all__ = [
    "LAYOUTS",
    "DatasetInfo",
    "DeferredSegDataset",
    "DeferredSegCacheDataset",
    "build_dataset",
    "build_dataloader",
    "scan_multirater",
    "scan_medsam_npy",
    "synthetic_case",
]

LAYOUTS = ("synthetic", "multirater", "medsam-npy")


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset built by :func:`build_dataset` holds (``dataset.info``)."""

    layout: str
    split: str
    ids: Tuple[str, ...]
    num_classes: int
    num_labels: int
    num_experts: int
    expert_names: Tuple[str, ...]
    target: Union[str, int]
    spatial_dims: Optional[int] = None  # known up front for synthetic data
    in_channels: Optional[int] = None


# --------------------------------------------------------------------------------------------
# Folder scanning
# --------------------------------------------------------------------------------------------
def _list_folder(
    folder: Path, what: str, layout: str, extensions: Sequence[str] = SUPPORTED_EXTENSIONS
) -> Dict[str, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{what} folder {folder} not found (layout {layout!r}; see docs/data.md)"
        )
    files: Dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue  # hidden files (.DS_Store, ...)
        if p.is_dir():
            raise ValueError(
                f"unexpected folder {p} in the {what} folder; expected files <id>"
                f"{'|'.join(extensions)}"
            )
        parts = split_name(p.name)
        if parts is None or parts[1] not in extensions:
            raise ValueError(
                f"{p}: unsupported file in the {what} folder; expected <id> with extension "
                f"{' or '.join(extensions)}"
            )
        case_id = parts[0]
        if case_id in files:
            raise ValueError(f"{p} and {files[case_id]} have the same id {case_id!r}")
        files[case_id] = p
    if not files:
        raise FileNotFoundError(f"{what} folder {folder} holds no {' / '.join(extensions)} files")
    return files


def _match(
    ref: Dict[str, Path], ref_folder: Path, other: Dict[str, Path], other_folder: Path, what: str
) -> None:
    missing = sorted(set(ref) - set(other))
    if missing:
        raise ValueError(
            f"{what} folder {other_folder} has no file for {ref[missing[0]]} "
            f"(expected {other_folder / missing[0]}.<ext>); {len(missing)} unmatched in all: "
            f"{missing[:10]}"
        )
    extra = sorted(set(other) - set(ref))
    if extra:
        raise ValueError(
            f"{other[extra[0]]} matches no file in {ref_folder} (file names must be the same "
            f"apart from the extension); {len(extra)} unmatched in all: {extra[:10]}"
        )


def scan_multirater(
    root, raters: Optional[Sequence[str]] = None
) -> Tuple[List[Dict[str, Any]], List[str], bool]:
    """Cases of the ``multirater`` layout: ``images/<id>.<ext>``, ``raters/<rater>/<id>.<ext>``,
    optional ``labels/<id>.<ext>``.

    Returns (cases, rater names, has labels). Every rater folder must hold a file
    for every image and no other.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} not found")
    images = _list_folder(root / "images", "images", "multirater")
    rater_root = root / "raters"
    if not rater_root.is_dir():
        raise FileNotFoundError(
            f"raters folder {rater_root} not found (layout 'multirater' expects "
            "raters/<rater>/<id>.<ext>)"
        )
    names = sorted(
        p.name for p in rater_root.iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    if not names:
        raise FileNotFoundError(
            f"raters folder {rater_root} holds no rater folders raters/<rater>/"
        )
    if raters is not None:
        unknown = [r for r in raters if r not in names]
        if unknown:
            raise ValueError(f"raters {unknown} not found in {rater_root}; rater folders: {names}")
    per_rater = {}
    for name in names:
        files = _list_folder(rater_root / name, f"rater {name!r}", "multirater")
        _match(images, root / "images", files, rater_root / name, f"rater {name!r}")
        per_rater[name] = files
    labels = None
    if (root / "labels").exists():
        labels = _list_folder(root / "labels", "labels", "multirater")
        _match(images, root / "images", labels, root / "labels", "labels")
    cases = []
    for case_id in sorted(images):
        cases.append(
            {
                "id": case_id,
                "image": str(images[case_id]),
                "label": str(labels[case_id]) if labels is not None else None,
                "raters": [str(per_rater[n][case_id]) for n in names],
                "rater_names": list(names),
            }
        )
    return cases, names, labels is not None


def scan_medsam_npy(root) -> List[Dict[str, Any]]:
    """Cases of the ``medsam-npy`` layout: ``imgs/<id>.npy`` images and ``gts/<id>.npy`` labels."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} not found")
    imgs = _list_folder(root / "imgs", "imgs", "medsam-npy", (".npy",))
    gts = _list_folder(root / "gts", "gts", "medsam-npy", (".npy",))
    _match(imgs, root / "imgs", gts, root / "gts", "gts")
    return [{"id": i, "image": str(imgs[i]), "label": str(gts[i])} for i in sorted(imgs)]


# --------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------
def synthetic_case(
    case_id: str,
    seed: int,
    spatial_dims: int,
    image_size: Sequence[int],
    num_labels: int,
    num_objs: int,
    rad_min: int,
    rad_max: int,
    noise_max: float,
) -> Dict[str, Any]:
    """One synthetic case from MONAI's ``create_test_image_2d`` / ``_3d``, seeded by (seed, id)."""
    from monai.data import create_test_image_2d, create_test_image_3d

    rs = np.random.RandomState(derive_seed(seed, case_id) % (2**32))
    kw = dict(
        num_objs=num_objs,
        rad_max=rad_max,
        rad_min=rad_min,
        noise_max=noise_max,
        num_seg_classes=num_labels - 1,
        random_state=rs,
    )
    if spatial_dims == 2:
        image, label = create_test_image_2d(image_size[0], image_size[1], **kw)
    else:
        image, label = create_test_image_3d(image_size[0], image_size[1], image_size[2], **kw)
    return {"id": case_id, "image": image.astype(np.float32)[None], "label": label.astype(np.int64)}


def _synthetic_cases(
    ids: Sequence[str],
    seed: int,
    spatial_dims: int,
    image_size,
    num_labels: int,
    num_objs: int,
    rad_range,
    noise_max: float,
) -> List[Dict[str, Any]]:
    if spatial_dims not in (2, 3):
        raise ValueError(f"synthetic data has spatial_dims 2 or 3, got {spatial_dims!r}")
    size = (
        (int(image_size),) * spatial_dims
        if np.isscalar(image_size)
        else tuple(int(s) for s in image_size)
    )
    if len(size) != spatial_dims:
        raise ValueError(f"image_size {image_size!r} does not have {spatial_dims} entries")
    if rad_range is None:
        rad_max = max(2, min(size) // 5)
        rad_min = max(1, rad_max // 3)
    else:
        rad_min, rad_max = (int(v) for v in rad_range)
    if not 1 <= rad_min < rad_max or 2 * rad_max >= min(size):
        raise ValueError(
            f"rad_range ({rad_min}, {rad_max}) must satisfy 1 <= min < max < image size / 2 "
            f"(image size {size})"
        )
    return [
        synthetic_case(
            i, seed, spatial_dims, size, num_labels, num_objs, rad_min, rad_max, noise_max
        )
        for i in ids
    ]


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------
def _data_error(err: BaseException) -> Optional[BaseException]:
    """The data error (ValueError, FileNotFoundError, TypeError) behind MONAI's
    ``RuntimeError("applying transform ...")`` wrappers, if any."""
    seen = err
    while (
        isinstance(seen, RuntimeError)
        and str(seen).startswith("applying transform")
        and seen.__cause__ is not None
    ):
        seen = seen.__cause__
    return (
        seen
        if seen is not err and isinstance(seen, (ValueError, FileNotFoundError, TypeError))
        else None
    )


class _ClearErrors:
    """Re-raise a data error that a MONAI transform wrapper hid in a RuntimeError as itself,
    so that the user sees "cannot read image /path/x.png: ..." and not "applying transform"."""

    def _transform(self, index: int):
        try:
            return super()._transform(index)
        except RuntimeError as err:
            inner = _data_error(err)
            if inner is None:
                raise
            raise inner.with_traceback(inner.__traceback__) from None


class DeferredSegDataset(_ClearErrors, Dataset):
    """A ``monai.data.Dataset`` of DeferredSeg cases (``info`` says what it holds)."""


class DeferredSegCacheDataset(_ClearErrors, CacheDataset):
    """A ``monai.data.CacheDataset`` of DeferredSeg cases (``info`` says what it holds)."""


def _check_target(target, layout: str, rater_names: Sequence[str], has_label: bool):
    if target == "labels":
        target = "label"
    if isinstance(target, str) and target not in rater_names and target.lstrip("-").isdigit():
        target = int(target)  # "--target 1": a rater index (a rater named "1" wins)
    if isinstance(target, bool) or not isinstance(target, (str, int)):
        raise TypeError(f"target must be a string or a rater index, got {target!r}")
    if (
        isinstance(target, str)
        and target not in CONSENSUS_METHODS
        and target != "label"
        and target not in rater_names
    ):
        raise ValueError(
            f"target must be 'label', 'majority', 'staple', a rater name {list(rater_names)} "
            f"or a rater index, got {target!r}"
        )
    if target == "label" and not has_label:
        raise ValueError(
            f"target='label' needs reference labels, which the {layout!r} data at hand lack "
            "(the multirater layout reads them from labels/<id>.<ext>)"
        )
    if isinstance(target, int) and not -len(rater_names) <= target < len(rater_names):
        raise ValueError(f"target rater index {target} out of range for {len(rater_names)} raters")
    return target


def build_dataset(
    layout: str = "synthetic",
    root=None,
    split: str = "train",
    *,
    num_classes: int = 1,
    target: Union[str, int, None] = None,
    experts: Any = None,
    raters: Optional[Sequence[str]] = None,
    resample_experts: bool = False,
    seed: int = 0,
    split_seed: Optional[int] = None,
    split_file=None,
    split_fractions: Tuple[float, float, float] = (0.7, 0.15, 0.15),
    label_map: LabelMap = None,
    ignore_index: int = -100,
    spatial_size: Optional[Sequence[int]] = None,
    spacing: Optional[Sequence[float]] = None,
    intensity: Optional[str] = "minmax",
    transforms: Optional[Sequence[Any]] = None,
    cache: bool = False,
    num_images: int = 24,
    spatial_dims: int = 2,
    image_size: Union[int, Sequence[int]] = 64,
    num_objs: int = 4,
    rad_range: Optional[Tuple[int, int]] = None,
    noise_max: float = 0.2,
):
    """A DeferredSeg dataset (``monai.data.Dataset``; ``CacheDataset`` with ``cache=True``).

    Args:
        layout: ``"synthetic"`` (default, no files), ``"multirater"`` or ``"medsam-npy"``.
        root: the dataset folder (the file layouts; unused by ``synthetic``).
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"``.
        num_classes: K (1: binary); labels take values in [0, max(K, 2)).
        target: the training target: ``"label"`` (the reference label: synthetic
            ground truth, a MedSAM gt, a multirater labels/ file), ``"majority"``,
            ``"staple"``, a rater name or index. Default: ``"majority"`` for
            ``multirater``, ``"label"`` otherwise.
        experts: the simulated experts of ``synthetic`` and ``medsam-npy`` (anything
            :func:`deferredseg.experts.make_experts` takes: ``"same-accuracy"``
            (medsam-npy default), ``"complementary"``, ``"structured"`` (synthetic
            default), triples, expert models, a panel).
        raters: ``multirater`` only: the rater folders that act as experts, in this
            order (default all, sorted). The consensus targets use every rater.
        resample_experts: simulated experts drawn anew at every access (True) or
            fixed per image (False, default).
        seed: seeds the split, the synthetic images and the simulated experts.
        split_seed: seeds the split instead of ``seed`` (one split for runs of several
            seeds).
        split_file: a JSON file ``{"train": [ids], "val": [...], "test": [...]}``
            instead of the seeded rule; ``split_fractions`` set the rule.
        label_map: how mask files encode labels: None (0/255 masks read as 0/1),
            ``"binary"`` (non-zero is foreground) or a {raw value: label} dict.
        spatial_size: resize every case to this size (images linearly, labels nearest).
        spacing: the voxel size in mm along each axis, for every case (default: from the
            NIfTI header of each case's masks; unknown for PNG and ``.npy``). Batches
            carry it as ``spacing`` (B, D), scaled by a resize; NaN where unknown.
        intensity: ``"minmax"`` scales each image to [0, 1]; None leaves it.
        transforms: extra MONAI dict transforms applied before batching, on keys
            ``image`` (C, *S), ``target`` (1, *S), ``expert_labels`` (E, *S).
        cache: cache the deterministic part of the pipeline (``CacheDataset``).
        num_images, spatial_dims, image_size, num_objs, rad_range, noise_max: the
            synthetic data (``num_images`` cases before splitting).

    Returns:
        The dataset, with ``dataset.info`` a :class:`DatasetInfo`.
    """
    from monai.transforms import Compose, Resized, ScaleIntensityd

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    num_labels = max(int(num_classes), 2)
    rater_names: List[str] = []
    expert_index: Optional[List[int]] = None
    panel: Optional[ExpertPanel] = None
    dims = in_ch = None

    if layout == "multirater":
        if root is None:
            raise ValueError("layout 'multirater' needs root, the dataset folder")
        if experts is not None:
            raise ValueError(
                "layout 'multirater' uses its raters as experts: choose them with raters=[...], "
                "not experts="
            )
        cases, rater_names, has_label = scan_multirater(root, raters)
        if raters is not None:
            expert_index = [rater_names.index(r) for r in raters]
        target = _check_target(
            "majority" if target is None else target, layout, rater_names, has_label
        )
        expert_names = tuple(raters) if raters is not None else tuple(rater_names)
    else:
        if raters is not None:
            raise ValueError(
                f"raters= is for the multirater layout; layout {layout!r} simulates its experts "
                "(experts=...)"
            )
        spec = (
            experts
            if experts is not None
            else ("structured" if layout == "synthetic" else "same-accuracy")
        )
        panel = make_experts(
            spec,
            num_labels=num_labels,
            seed=seed,
            resample=resample_experts,
            ignore_index=ignore_index,
        )
        if panel.num_labels != num_labels:
            raise ValueError(
                f"the expert panel has num_labels={panel.num_labels}, the data {num_labels}"
            )
        rater_names = list(panel.names)
        expert_names = tuple(rater_names)
        target = _check_target("label" if target is None else target, layout, rater_names, True)
        if layout == "medsam-npy":
            if root is None:
                raise ValueError(
                    "layout 'medsam-npy' needs root, the folder holding imgs/ and gts/"
                )
            cases = scan_medsam_npy(root)
        else:
            cases = [{"id": f"case_{i:04d}"} for i in range(int(num_images))]
            dims, in_ch = int(spatial_dims), 1

    ids = [c["id"] for c in cases]
    chosen = select_split(
        ids, split, split_file, split_fractions, seed if split_seed is None else split_seed
    )
    by_id = {c["id"]: c for c in cases}
    cases = [by_id[i] for i in chosen]
    if layout == "synthetic":
        cases = _synthetic_cases(
            chosen, seed, dims, image_size, num_labels, num_objs, rad_range, noise_max
        )

    steps: List[Any] = [LoadCased(num_labels, label_map, ignore_index, spacing)]
    if spatial_size is not None:
        size = tuple(int(s) for s in spatial_size)
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}.get(len(size), "bilinear")
        steps += [
            Resized(keys=["image"], spatial_size=size, mode=mode),
            Resized(
                keys=["label", "raters"], spatial_size=size, mode="nearest", allow_missing_keys=True
            ),
            ResizedSpacingd(size),
        ]
    if panel is not None:
        steps.append(SimulateExpertsd(panel))
    steps.append(MakeTargetd(target, num_labels, rater_names, expert_index, ignore_index))
    if intensity == "minmax":
        steps.append(ScaleIntensityd(keys=["image"], minv=0.0, maxv=1.0))
    elif intensity is not None:
        raise ValueError(f"intensity must be 'minmax' or None, got {intensity!r}")
    steps += list(transforms or [])
    steps.append(FinalizeCased())
    pipeline = Compose(steps)
    if cache:
        try:
            ds = DeferredSegCacheDataset(
                cases, pipeline, cache_rate=1.0, num_workers=0, progress=False
            )
        except RuntimeError as err:
            inner = _data_error(err)
            if inner is None:
                raise
            raise inner.with_traceback(inner.__traceback__) from None
    else:
        ds = DeferredSegDataset(cases, pipeline)
    ds.info = DatasetInfo(
        layout=layout,
        split=split,
        ids=tuple(chosen),
        num_classes=int(num_classes),
        num_labels=num_labels,
        num_experts=len(expert_names),
        expert_names=expert_names,
        target=target,
        spatial_dims=dims,
        in_channels=in_ch,
    )
    return ds


def build_dataloader(
    dataset, batch_size: int = 2, shuffle: Optional[bool] = None, num_workers: int = 0, **kwargs
):
    """A ``monai.data.DataLoader`` over ``dataset``; shuffles the training split by default.

    Batches are dicts: ``image`` (B, C, *S) float32, ``target`` (B, *S) int64,
    ``expert_labels`` (B, E, *S) int64, ``id`` (list of str).
    """
    from monai.data import DataLoader

    if shuffle is None:
        shuffle = getattr(getattr(dataset, "info", None), "split", None) == "train"
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, **kwargs
    )
