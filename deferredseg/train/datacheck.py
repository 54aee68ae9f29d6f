"""Checks of the data against the configuration (before training) and the checkpoint
(before evaluation).

- :func:`check_training_data`: every file of every split, headers and contents
  (:func:`deferredseg.data.scan.scan_dataset`: values, channels, sizes, NaN; a bad
  file in any split is found before step 1), the spatial dimensions taken from
  the files, the label map parsed, a dataset too small to split refused and small validation or test
  splits warned about.
- :func:`checkpoint_record`: what a checkpoint records about its data: the
  experts by name, the data folder as an absolute path, a fingerprint of the
  label layout.
- :func:`pair_experts`: the rater names an evaluation must use so that routing
  channel ``e`` means the same expert as in training: the same names in the same
  order, mapped by name when the data hold them all, refused otherwise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..data.layouts import FILE_LAYOUTS, get_layout


def _note(text: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # once under torchrun
        print(f"note: {text}", file=sys.stderr)


def _scan_threads(cfg) -> Optional[int]:
    """Threads of the file scan: the CPUs (at most 8), one per rank under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return max((os.cpu_count() or 1) // world, 1) if world > 1 else None


def _check_spacing(cfg, scan) -> None:
    """``--spacing`` gives one voxel size per axis of the data."""
    dims = scan.spatial_dims if scan is not None and scan.spatial_dims else cfg.spatial_dims
    if cfg.spacing is not None and len(cfg.spacing) != dims:
        raise ValueError(
            f"spacing (--spacing) {list(cfg.spacing)} has {len(cfg.spacing)} entries, but the "
            f"data are {dims}D; give one voxel size (mm) per axis"
        )


def _ids(cfg, scan) -> List[str]:
    if scan is not None:
        return scan.ids
    return [f"case_{i:04d}" for i in range(int(cfg.num_images))]


def check_training_data(cfg):
    """``cfg`` with ``spatial_dims`` from the files; raises ValueError on bad data."""
    from ..data.scan import FEW_CASES, parse_label_map, scan_dataset, split_sizes

    label_map = parse_label_map(cfg.label_map)  # a malformed --label-map is reported now
    scan = None
    if cfg.layout in FILE_LAYOUTS:
        # every file of every split, contents too: a bad mask in the test split is found now,
        # not by evaluate after training
        scan = scan_dataset(
            cfg.layout,
            cfg.data,
            spatial_size=cfg.spatial_size,
            split_file=cfg.split_file,
            seed=cfg.data_split_seed,
            num_labels=cfg.num_classes,
            label_map=label_map,
            workers=_scan_threads(cfg),
        )
        if scan.spatial_dims is not None and scan.spatial_dims != cfg.spatial_dims:
            _note(
                f"the files of {cfg.data} are {scan.spatial_dims}D: spatial_dims = "
                f"{scan.spatial_dims}"
            )
            cfg = dataclasses.replace(cfg, spatial_dims=scan.spatial_dims)
    _check_spacing(cfg, scan)
    ids = _ids(cfg, scan)
    sizes = split_sizes(ids, cfg.split_file, cfg.data_split_seed)
    counts = ", ".join(f"{k} {v}" for k, v in sizes.items())
    if sizes["train"] == 0 or sizes["val"] == 0:
        raise ValueError(
            f"the dataset is too small to split: {len(ids)} cases give {counts}; "
            f"training needs at least one training and one validation case (add "
            f"cases, or give --split-file)"
        )
    if sizes["test"] == 0:
        _note(
            f"the test split is empty ({counts}); evaluate with --split val or all, or "
            f"give --split-file"
        )
    few = [n for n in ("val", "test") if 0 < sizes[n] < FEW_CASES]
    if few:
        _note(
            f"few cases in the {' and '.join(few)} split ({counts}): fewer than {FEW_CASES} "
            f"give noisy metrics"
        )
    return cfg


def check_evaluation_data(cfg, split: str) -> None:
    """The split is not empty and its files are readable; dims fit the model."""
    from ..data.scan import parse_label_map, scan_dataset, split_sizes

    scan = None
    if cfg.layout in FILE_LAYOUTS:
        scan = scan_dataset(
            cfg.layout,
            cfg.data,
            spatial_size=cfg.spatial_size,
            split_file=cfg.split_file,
            seed=cfg.data_split_seed,
            splits=[split],
            num_labels=cfg.num_classes,
            label_map=parse_label_map(cfg.label_map),
            workers=_scan_threads(cfg),
        )
        if scan.spatial_dims is not None and scan.spatial_dims != cfg.spatial_dims:
            raise ValueError(
                f"the model was trained on {cfg.spatial_dims}D data, the files of "
                f"{cfg.data} are {scan.spatial_dims}D"
            )
    _check_spacing(cfg, scan)
    if split == "all":
        return
    ids = _ids(cfg, scan)
    sizes = split_sizes(ids, cfg.split_file, cfg.data_split_seed)
    if sizes[split] == 0:
        counts = ", ".join(f"{k} {v}" for k, v in sizes.items())
        raise ValueError(
            f"the {split} split of {cfg.data or 'the synthetic data'} is empty "
            f"({len(ids)} cases: {counts}); evaluate with --split val or --split all, "
            f"or give --split-file"
        )


def label_fingerprint(cfg, expert_names: Sequence[str]) -> str:
    """A short hash of what the label channels mean: classes, target, label map, experts."""
    layout = {
        "num_classes": cfg.num_classes,
        "target": cfg.target,
        "label_map": cfg.label_map,
        "layout": cfg.layout,
        "spatial_dims": cfg.spatial_dims,
        "experts": list(expert_names),
    }
    return hashlib.sha256(json.dumps(layout, sort_keys=True, default=str).encode()).hexdigest()[:16]


def checkpoint_record(cfg, expert_names: Sequence[str]) -> Dict[str, Any]:
    """Extra checkpoint keys: the data folder (absolute) and the label-layout fingerprint."""
    return {
        "data_root": str(Path(cfg.data).resolve()) if cfg.data else None,
        "label_fingerprint": label_fingerprint(cfg, expert_names),
    }


def pair_experts(
    trained: Optional[Sequence[str]], found: Sequence[str], data: Optional[str]
) -> Optional[List[str]]:
    """None when ``found`` are the ``trained`` experts in order; else the rater names to
    select (by name) so that they are; ValueError when some are missing."""
    if not trained:
        return None
    trained, found = list(trained), list(found)
    if trained == found:
        return None
    missing = [n for n in trained if n not in found]
    if missing:
        raise ValueError(
            f"the checkpoint was trained with experts {trained}, but {data} has "
            f"raters {found} ({missing} missing): routing channels would go to the "
            f"wrong experts; evaluate on data with the same rater folders"
        )
    _note(f"experts mapped by name: the checkpoint's {trained} (the data hold {found})")
    return trained


def match_experts(ds, cfg, split: str, trained: Optional[Sequence[str]], build):
    """``ds``, or the same split rebuilt with the trained raters by name (see
    :func:`pair_experts`)."""
    if not trained or list(ds.info.expert_names) == list(trained):
        return ds
    by_raters = get_layout(cfg.layout).raters  # experts chosen by rater name
    if by_raters:
        available = get_layout(cfg.layout).scan(cfg.data).rater_names
    else:
        available = list(ds.info.expert_names)
    raters = pair_experts(trained, available, cfg.data)
    if not by_raters:
        raise ValueError(
            f"the checkpoint was trained with experts {list(trained)}, the data "
            f"give {list(ds.info.expert_names)}"
        )
    return build(cfg, split, raters=raters)
