"""DeferredSeg data on MONAI: multi-rater folders, the MedSAM npy layout, synthetic data.

``build_dataset(layout, root, split, ...)`` -> a ``monai.data.Dataset`` of dicts
``{"image": (C, *S) float32, "target": (*S) int64, "expert_labels": (E, *S) int64, "id": str}``;
``build_dataloader(dataset, batch_size)`` batches them. Layouts (docs/data.md):

- ``"synthetic"`` (default, no files): MONAI's ``create_test_image_2d`` / ``_3d``
  with simulated or structured experts;
- ``"multirater"``: ``images/<id>.<ext>``, ``raters/<rater>/<id>.<ext>``, optional
  ``labels/<id>.<ext>`` (png, npy, nii / nii.gz; 2D and 3D);
- ``"medsam-npy"``: ``imgs/<id>.npy``, ``gts/<id>.npy`` with simulated experts.
"""

from .datasets import (
    LAYOUTS,
    DatasetInfo,
    DeferredSegCacheDataset,
    DeferredSegDataset,
    build_dataloader,
    build_dataset,
    scan_medsam_npy,
    scan_multirater,
    synthetic_case,
)
from .io import (
    SUPPORTED_EXTENSIONS,
    convert_labels,
    read_array,
    read_image,
    read_label,
    to_channel_first,
)
from .splits import SPLITS, load_split_file, select_split, split_ids
from .transforms import FinalizeCased, LoadCased, MakeTargetd, SimulateExpertsd

__all__ = [
    "LAYOUTS",
    "DatasetInfo",
    "DeferredSegDataset",
    "DeferredSegCacheDataset",
    "build_dataloader",
    "build_dataset",
    "scan_medsam_npy",
    "scan_multirater",
    "synthetic_case",
    "SUPPORTED_EXTENSIONS",
    "convert_labels",
    "read_array",
    "read_image",
    "read_label",
    "to_channel_first",
    "SPLITS",
    "load_split_file",
    "select_split",
    "split_ids",
    "FinalizeCased",
    "LoadCased",
    "MakeTargetd",
    "SimulateExpertsd",
]
