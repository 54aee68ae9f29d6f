"""MONAI dictionary transforms of the DeferredSeg data pipeline.

A case dict moves through these keys:

- after loading: ``image`` (C, *S) float32, ``label`` (1, *S) int64 (the reference
  label: ground truth, a labels/ file, a MedSAM gt; may be absent), ``raters``
  (R, *S) int64 (may be absent), ``id`` (str);
- after :class:`SimulateExpertsd`: ``raters`` holds the simulated experts' labels;
- after :class:`MakeTargetd`: ``target`` (1, *S) and ``expert_labels`` (E, *S);
- after :class:`FinalizeCased`: plain tensors ``image`` (C, *S) float32,
  ``target`` (*S) int64, ``expert_labels`` (E, *S) int64, and ``id``.

Spatial transforms (resizing, augmentation) go between loading and
:class:`FinalizeCased`; give labels ``mode="nearest"``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Hashable, List, Optional, Sequence, Union

import numpy as np
import torch
from monai.transforms import MapTransform, Randomizable

from ..experts import ExpertPanel, consensus_target
from .io import LabelMap, read_image, read_label, to_channel_first, voxel_spacing

__all__ = ["LoadCased", "SimulateExpertsd", "MakeTargetd", "FinalizeCased", "TARGETS"]

#: Targets besides a rater name or index.
TARGETS = ("majority", "staple", "label")


def _as_long_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        x = x.as_tensor() if hasattr(x, "as_tensor") else x
        return x.long()
    return torch.as_tensor(np.asarray(x)).long()


class LoadCased(MapTransform):
    """Reads a case whose ``image``, ``label`` and ``raters`` are file paths, and checks it.

    Values that are already arrays are taken as they are (after the same checks).
    Errors name the files: an unreadable file, an image whose shape does not fit
    the labels, labels whose shapes differ, label values out of range.
    """

    def __init__(
        self,
        num_labels: int,
        label_map: LabelMap = None,
        ignore_index: int = -100,
        spacing: Optional[Sequence[float]] = None,
    ):
        super().__init__(keys=["image"], allow_missing_keys=True)
        self.num_labels = int(num_labels)
        self.label_map = label_map
        self.ignore_index = int(ignore_index)
        self.spacing = None if spacing is None else [float(v) for v in spacing]

    def _spacing(self, ndim: int, mask_path) -> np.ndarray:
        """The voxel size in mm: ``spacing`` when given, else the first mask's header
        (NaN where unknown: PNG, ``.npy``)."""
        if self.spacing is not None:
            if len(self.spacing) != ndim:
                raise ValueError(
                    f"spacing (--spacing) {self.spacing} has {len(self.spacing)} entries, "
                    f"but the masks are {ndim}D; give one size per axis"
                )
            return np.asarray(self.spacing, dtype=np.float64)
        found = voxel_spacing(mask_path, ndim) if isinstance(mask_path, (str, Path)) else None
        return np.full(ndim, np.nan) if found is None else found

    def _label(self, value, what: str):
        if isinstance(value, (np.ndarray, torch.Tensor)):
            return np.asarray(value).astype(np.int64), what
        from .scan import label_map_for  # a per-folder map: the labels' or the raters'

        folder = "labels" if what == "label" else "raters"
        return read_label(
            value,
            self.num_labels,
            label_map_for(self.label_map, folder),
            self.ignore_index,
            what=what,
        ), f"{what} {value}"

    def __call__(self, data: Dict[Hashable, Any]) -> Dict[Hashable, Any]:
        d = dict(data)
        labels: List[np.ndarray] = []
        sources: List[str] = []
        if d.get("label") is not None:
            arr, src = self._label(d["label"], "label")
            labels.append(arr)
            sources.append(src)
        rater_paths = d.get("raters") or []
        rater_names = d.get("rater_names") or [str(i) for i in range(len(rater_paths))]
        raters = []
        for name, p in zip(rater_names, rater_paths):
            arr, src = self._label(p, f"rater {name!r} label")
            raters.append(arr)
            labels.append(arr)
            sources.append(src)
        if not labels:
            raise ValueError(f"case {d.get('id')!r} has neither a label nor rater labels")
        ref, ref_src = labels[0], sources[0]
        for arr, src in zip(labels[1:], sources[1:]):
            if arr.shape != ref.shape:
                raise ValueError(
                    f"shape mismatch: {src} has shape {arr.shape} but {ref_src} has shape "
                    f"{ref.shape}"
                )
        first_mask = d.get("label") if d.get("label") is not None else (rater_paths or [None])[0]
        d["spacing"] = self._spacing(ref.ndim, first_mask)
        d["spacing_shape"] = np.asarray(ref.shape, dtype=np.float64)
        image = d["image"]
        img_src = "image"
        if not isinstance(image, (np.ndarray, torch.Tensor)):
            img_src = f"image {image}"
            image = read_image(image)
        image = to_channel_first(np.asarray(image, dtype=np.float32), ref.shape, img_src, ref_src)
        d["image"] = np.ascontiguousarray(image)
        if d.get("label") is not None:
            d["label"] = labels[0][None]
        else:
            d.pop("label", None)
        if raters:
            d["raters"] = np.stack(raters)
        else:
            d.pop("raters", None)
        return d


class SimulateExpertsd(Randomizable, MapTransform):
    """Simulated experts from the reference ``label``: ``raters`` = panel(label).

    The panel is an :class:`~deferredseg.experts.ExpertPanel`: fixed per image
    (keyed by the case ``id``) or resampled at every call. MONAI's data loader
    seeds it per worker through :meth:`set_random_state` (the resampling stream
    only: fixed-per-image labels do not depend on it).
    """

    def __init__(self, panel: ExpertPanel):
        MapTransform.__init__(self, keys=["label"])
        self.panel = panel

    def set_random_state(
        self, seed: Optional[int] = None, state: Optional[np.random.RandomState] = None
    ):
        super().set_random_state(seed, state)
        self.panel.reseed_stream(
            int(seed) if seed is not None else int(self.R.randint(0, 2**31 - 1))
        )
        return self

    def randomize(self, data: Any = None) -> None:  # the panel draws its own randomness
        return None

    def __call__(self, data: Dict[Hashable, Any]) -> Dict[Hashable, Any]:
        d = dict(data)
        if d.get("label") is None:
            raise ValueError(f"case {d.get('id')!r}: simulated experts need a reference label")
        label = _as_long_tensor(d["label"])  # (1, *S)
        d["raters"] = self.panel(label, ids=[d.get("id")])[0]
        return d


class MakeTargetd(MapTransform):
    """The training target and the experts of a case.

    ``target``: ``"label"`` (the reference label), ``"majority"``, ``"staple"``,
    a rater name or a rater index. ``experts``: the indices of the raters that
    act as experts (default all).
    """

    def __init__(
        self,
        target: Union[str, int],
        num_labels: int,
        rater_names: Sequence[str] = (),
        experts: Optional[Sequence[int]] = None,
        ignore_index: int = -100,
    ):
        super().__init__(keys=["raters"], allow_missing_keys=True)
        self.target = target
        self.num_labels = int(num_labels)
        self.rater_names = list(rater_names)
        self.experts = list(experts) if experts is not None else None
        self.ignore_index = int(ignore_index)

    def __call__(self, data: Dict[Hashable, Any]) -> Dict[Hashable, Any]:
        d = dict(data)
        if d.get("raters") is None:
            raise ValueError(f"case {d.get('id')!r} has no expert labels")
        raters = _as_long_tensor(d["raters"])  # (R, *S)
        if self.target == "label":
            if d.get("label") is None:
                raise ValueError(
                    f"case {d.get('id')!r}: target='label' but the case has no reference label"
                )
            target = _as_long_tensor(d["label"])
        else:
            target = consensus_target(
                raters,
                self.target,
                self.num_labels,
                rater_names=self.rater_names,
                rater_dim=0,
                ignore_index=self.ignore_index,
            ).unsqueeze(0)
        d["target"] = target
        d["expert_labels"] = raters if self.experts is None else raters[self.experts]
        return d


class FinalizeCased(MapTransform):
    """Plain tensors for batching: image float32 (C, *S), target int64 (*S), expert_labels
    int64 (E, *S)."""

    def __init__(self, keep: Sequence[str] = ("id",)):
        super().__init__(keys=["image", "target", "expert_labels"])
        self.keep = tuple(keep)

    def __call__(self, data: Dict[Hashable, Any]) -> Dict[Hashable, Any]:
        image = data["image"]
        if hasattr(image, "as_tensor"):  # a MONAI MetaTensor
            image = image.as_tensor()
        if not isinstance(image, torch.Tensor):
            image = torch.as_tensor(np.asarray(image))
        target = _as_long_tensor(data["target"])  # (1, *S)
        out = {
            "image": image.to(torch.float32).contiguous(),
            "target": target.reshape(target.shape[1:]).contiguous(),
            "expert_labels": _as_long_tensor(data["expert_labels"]).contiguous(),
        }
        ndim = out["target"].dim()
        spacing = data.get("spacing")
        out["spacing"] = torch.as_tensor(
            np.full(ndim, np.nan) if spacing is None else np.asarray(spacing), dtype=torch.float64
        )  # mm per voxel of this (possibly resized) case; NaN: unknown (HD95 in voxels)
        for k in self.keep:
            if k in data:
                out[k] = data[k]
        return out


class ResizedSpacingd(MapTransform):
    """The voxel spacing after a resize to ``size``: the same physical extent over the new
    number of voxels."""

    def __init__(self, size: Sequence[int]):
        super().__init__(keys=["spacing"], allow_missing_keys=True)
        self.size = np.asarray([float(v) for v in size])

    def __call__(self, data: Dict[Hashable, Any]) -> Dict[Hashable, Any]:
        d = dict(data)
        if d.get("spacing") is not None and d.get("spacing_shape") is not None:
            d["spacing"] = np.asarray(d["spacing"]) * np.asarray(d["spacing_shape"]) / self.size
        return d
