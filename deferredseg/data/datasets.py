"""DeferredSeg datasets on MONAI, for every layout of :mod:`deferredseg.data.layouts`.

``build_dataset(layout, root, split, ...)`` returns a ``monai.data.Dataset`` (or
``CacheDataset``) whose items are dicts ``{"image": (C, *S) float32,
"target": (*S) int64, "expert_labels": (E, *S) int64, "id": str}``;
``build_dataloader`` batches them into (B, C, *S), (B, *S), (B, E, *S).
See docs/data.md for the folder layouts. The cases of a layout come from its record in
:mod:`deferredseg.data.layouts` (the folder scans are in :mod:`deferredseg.data.folders`,
the generated cases in :mod:`deferredseg.data.synthetic`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple, Union

from monai.data import CacheDataset, Dataset

from ..experts import ExpertPanel, make_experts
from ..experts.consensus import CONSENSUS_METHODS
from .folders import scan_medsam_npy, scan_multirater
from .io import LabelMap
from .layouts import LAYOUTS, get_layout
from .splits import select_split
from .synthetic import synthetic_case
from .synthetic import synthetic_cases as _synthetic_cases  # noqa: F401 (review/demo.py's import)
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
        layout: one of :data:`LAYOUTS`: ``"synthetic"`` (default, no files),
            ``"multirater"`` or ``"medsam-npy"`` (:mod:`deferredseg.data.layouts`).
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

    spec = get_layout(layout)
    if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    num_labels = max(int(num_classes), 2)
    expert_index: Optional[List[int]] = None
    panel: Optional[ExpertPanel] = None
    dims = in_ch = None

    if spec.files and root is None:
        raise ValueError(f"layout {layout!r} needs root, the dataset folder")
    if spec.raters:
        if experts is not None:
            raise ValueError(
                f"layout {layout!r} uses its raters as experts: choose them with raters=[...], "
                "not experts="
            )
    elif raters is not None:
        raise ValueError(
            f"raters= is for the multirater layout; layout {layout!r} simulates its experts "
            "(experts=...)"
        )
    found = spec.scan(root, raters=raters, num_images=num_images)
    cases, rater_names = found.cases, list(found.rater_names)
    if spec.raters:
        if raters is not None:
            expert_index = [rater_names.index(r) for r in raters]
        expert_names = tuple(raters) if raters is not None else tuple(rater_names)
    else:
        panel = make_experts(
            experts if experts is not None else spec.default_profile,
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
    target = _check_target(
        spec.default_target if target is None else target, layout, rater_names, found.has_label
    )

    ids = [c["id"] for c in cases]
    chosen = select_split(
        ids, split, split_file, split_fractions, seed if split_seed is None else split_seed
    )
    by_id = {c["id"]: c for c in cases}
    cases = [by_id[i] for i in chosen]
    if spec.generate is not None:
        dims, in_ch = int(spatial_dims), 1
        cases = spec.generate(
            chosen,
            seed=seed,
            spatial_dims=dims,
            image_size=image_size,
            num_labels=num_labels,
            num_objs=num_objs,
            rad_range=rad_range,
            noise_max=noise_max,
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
