"""DeferredSeg data on MONAI: multi-rater folders, the MedSAM npy layout, synthetic data.

``build_dataset(layout, root, split, ...)`` -> a ``monai.data.Dataset`` of dicts
``{"image": (C, *S) float32, "target": (*S) int64, "expert_labels": (E, *S) int64, "id": str}``;
``build_dataloader(dataset, batch_size)`` batches them. Layouts (docs/data.md):

- ``"synthetic"`` (default, no files): MONAI's ``create_test_image_2d`` / ``_3d``
  with simulated or structured experts;
- ``"multirater"``: ``images/<id>.<ext>``, ``raters/<rater>/<id>.<ext>``, optional
  ``labels/<id>.<ext>`` (png, npy, nii / nii.gz; 2D and 3D);
- ``"medsam-npy"``: ``imgs/<id>.npy``, ``gts/<id>.npy`` with simulated experts.

A layout is one record of :mod:`deferredseg.data.layouts`. The names below are
imported on first use, so that ``deferredseg.data.layouts`` (read by the command
line's option list) does not import MONAI.
"""

from __future__ import annotations

import importlib
from typing import Any

#: The public names and the submodule that defines each.
_WHERE = {
    "LAYOUTS": "layouts",
    "DatasetInfo": "datasets",
    "DeferredSegDataset": "datasets",
    "DeferredSegCacheDataset": "datasets",
    "build_dataloader": "datasets",
    "build_dataset": "datasets",
    "scan_medsam_npy": "folders",
    "scan_multirater": "folders",
    "synthetic_case": "synthetic",
    "SUPPORTED_EXTENSIONS": "io",
    "convert_labels": "io",
    "read_array": "io",
    "read_image": "io",
    "read_label": "io",
    "to_channel_first": "io",
    "SPLITS": "splits",
    "load_split_file": "splits",
    "select_split": "splits",
    "split_ids": "splits",
    "FinalizeCased": "transforms",
    "LoadCased": "transforms",
    "MakeTargetd": "transforms",
    "SimulateExpertsd": "transforms",
}

__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_WHERE))
