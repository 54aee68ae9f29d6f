"""Review tasks: the deferred pixels of one image as connected regions per expert.

A pixel the router defers to expert j belongs to one of j's regions. Regions are
the connected components of j's deferred pixels after a dilation by
``merge_distance`` (so pixels at most that far apart share a task); a region
keeps only j's own deferred pixels, never the dilation. Regions smaller than
``min_size`` pixels are not sent to anyone: the model's labels stand there, and
:func:`extract_tasks` reports how many pixels were dropped that way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import numpy as np
from scipy import ndimage

__all__ = ["Task", "extract_tasks"]


@dataclass(frozen=True)
class Task:
    """One region of one image for one expert.

    ``region``: the value of the region's pixels in the image's region map
    (1, 2, ...); ``bbox``: ``(start, stop)`` per spatial axis (stop exclusive);
    ``area``: pixels (voxels) of the region.
    """

    expert: int
    region: int
    bbox: Tuple[Tuple[int, int], ...]
    area: int

    @property
    def crop(self) -> Tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in self.bbox)


def extract_tasks(
    assignment: np.ndarray, num_experts: int, min_size: int = 1, merge_distance: int = 0
) -> Tuple[np.ndarray, List[Task], int]:
    """Regions of an assignment map ``(*S)`` (-1: the model, j: expert j).

    Returns ``(regions, tasks, dropped)``: ``regions`` int32 ``(*S)`` with 0 where
    no task covers the pixel and ``task.region`` on each task's pixels; the tasks
    ordered by expert, then by position; ``dropped`` the number of deferred
    pixels left out because their region had fewer than ``min_size`` pixels.
    """
    a = np.asarray(assignment)
    if a.ndim < 1:
        raise ValueError(f"assignment must have at least one spatial axis, got shape {a.shape}")
    if int(min_size) < 1:
        raise ValueError(f"min_size must be >= 1, got {min_size}")
    if int(merge_distance) < 0:
        raise ValueError(f"merge_distance must be >= 0, got {merge_distance}")
    bad = (a < -1) | (a >= num_experts)
    if bad.any():
        raise ValueError(
            f"assignment values must be -1 (the model) or an expert in [0, {num_experts}), "
            f"found {np.unique(a[bad])[:5].tolist()}"
        )
    regions = np.zeros(a.shape, dtype=np.int32)
    tasks: List[Task] = []
    dropped = 0
    structure = ndimage.generate_binary_structure(a.ndim, a.ndim)  # 8- / 26-connectivity
    next_region = 1
    for j in range(num_experts):
        mine = a == j
        if not mine.any():
            continue
        grown = mine
        if merge_distance > 0:
            grown = ndimage.binary_dilation(
                mine, structure=structure, iterations=int(merge_distance)
            )
        comp, n = ndimage.label(grown, structure=structure)
        comp = np.where(mine, comp, 0)
        areas = np.bincount(comp.ravel(), minlength=n + 1)
        boxes = ndimage.find_objects(comp, max_label=n)
        for c in range(1, n + 1):
            area = int(areas[c])
            if area == 0:
                continue
            if area < min_size:
                dropped += area
                continue
            box = boxes[c - 1]
            sel = comp[box] == c
            regions[box][sel] = next_region
            tasks.append(
                Task(
                    expert=j,
                    region=next_region,
                    bbox=tuple((int(s.start), int(s.stop)) for s in box),
                    area=area,
                )
            )
            next_region += 1
    return regions, tasks, dropped
