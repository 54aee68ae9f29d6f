"""``deferredseg predict``: segment a folder of new images, route their pixels, make review tasks.

For every image of a folder (PNG, ``.npy``, NIfTI; 2D or 3D; any size) the
trained model gives its packed logits, directly when the image has the
training size and by MONAI's ``sliding_window_inference`` otherwise; the
checkpoint's deferral policy decides who labels each pixel at its calibrated
threshold (or ``threshold=`` / ``budget=``) (:class:`deferredseg.predict.Predictor`);
and the deferred pixels become review tasks (:mod:`deferredseg.review.tasks`).
Written to ``out``, in the input's format (NIfTI keeps the affine and the header, so
the spacing):

- ``model/<id>``: the model's labels;
- ``score/<id>``: the policy's deferral score (the gate's probability or the
  uncertainty, PNG: scaled to 0..255; the expected gain in mode "gain"; see
  :class:`~deferredseg.policy.DeferralPolicy`);
- ``assignment/<id>``: who labels each pixel, 0 for the model and j + 1 for expert j;
- ``regions/<id>.npy``: the review regions (0: none), read by the review server
  and by merge;
- ``review.db``: images, experts and tasks (:mod:`deferredseg.review.db`);
- ``manifest.jsonl``: one line per review task (image, expert, bounding box, area;
  :mod:`deferredseg.review.manifest`).

An image counts as done once its row is in the database, written after its
files; rerunning over the same ``out`` skips the done images. One unreadable
image is reported by name and skipped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..data.files import InputMeta, load_input, write_like
from ..data.io import split_name
from ..fileio import atomic_save_npy, atomic_write_json, file_fingerprint
from ..predict import Predictor, list_images
from .db import ReviewDB
from .manifest import write_manifest
from .tasks import extract_tasks

__all__ = ["predict", "PredictSummary", "OUTPUT_KINDS"]

#: The per-image output folders (besides regions/ and final/).
OUTPUT_KINDS = ("model", "score", "assignment")


@dataclass
class PredictSummary:
    out: str
    done: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    failed: List[Tuple[str, str]] = field(default_factory=list)  # (file, error)
    tasks: int = 0
    routing: Dict[str, Any] = field(default_factory=dict)
    seconds: Dict[str, float] = field(
        default_factory=lambda: {
            "load": 0.0,
            "network": 0.0,
            "route": 0.0,
            "tasks": 0.0,
            "write": 0.0,
        }
    )

    def to_dict(self) -> Dict[str, Any]:
        return {
            "out": self.out,
            "done": len(self.done),
            "skipped": len(self.skipped),
            "failed": [{"file": f, "error": e} for f, e in self.failed],
            "tasks": self.tasks,
            "routing": self.routing,
            "seconds": self.seconds,
        }


def predict(
    checkpoint: Union[str, Path],
    images: Union[str, Path],
    out: Union[str, Path],
    threshold: Optional[float] = None,
    budget: Optional[float] = None,
    window: Optional[Sequence[int]] = None,
    overlap: float = 0.25,
    sw_batch_size: int = 4,
    batch_size: int = 4,
    min_size: int = 4,
    merge_distance: int = 2,
    device: str = "auto",
    backend: Optional[str] = None,
    progress: bool = True,
    inference: str = "auto",
) -> PredictSummary:
    """Predict every image of the folder ``images`` into ``out`` (see the module docstring).

    ``window``: the sliding window (default: the training image size); ``overlap``
    of neighbouring windows; ``batch_size`` images of one shape per forward pass;
    ``min_size`` / ``merge_distance``: see :func:`~deferredseg.review.tasks.extract_tasks`.
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    predictor = Predictor(checkpoint, window, overlap, sw_batch_size, device, backend, inference)
    K, E = predictor.num_classes, predictor.num_experts
    C, sd = predictor.in_channels, predictor.spatial_dims
    files = list_images(Path(images))
    routing = predictor.choose_policy(threshold, budget)
    out = Path(out)
    db = ReviewDB(out)
    db.ensure_experts(predictor.expert_names)
    db.record_settings(  # a rerun with other settings is refused: key: old -> new
        {
            "checkpoint": str(Path(checkpoint).resolve()),
            "num_classes": K,
            "num_labels": max(K, 2),
            "spatial_dims": sd,
            "in_channels": C,
            "routing": routing,
            "min_size": int(min_size),
            "merge_distance": int(merge_distance),
        }
    )
    summary = PredictSummary(out=str(out), routing=routing)
    seen: Dict[str, Path] = {}

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(files), desc="predict", unit="image", dynamic_ncols=True)

    def pending_inputs() -> Iterator[Tuple[str, Path, np.ndarray, InputMeta]]:
        for p in files:
            if bar is not None:
                bar.update(1)  # read (or skipped); its batch follows
            image_id = split_name(p.name)[0]
            if image_id in seen:
                summary.failed.append((str(p), f"same id {image_id!r} as {seen[image_id]}"))
                continue
            seen[image_id] = p
            row = db.image(image_id)
            if row is not None:
                if row["fingerprint"] == file_fingerprint(p) and row["source"] == str(p.resolve()):
                    summary.skipped.append(image_id)
                else:
                    summary.failed.append(
                        (
                            str(p),
                            f"changed since it was predicted into {out} "
                            f"(from {row['source']}); predict it into a new folder",
                        )
                    )
                continue
            t0 = time.perf_counter()
            try:
                x, meta = load_input(p, C, sd)
            except Exception as err:  # one bad file must not stop the folder
                summary.failed.append((str(p), str(err)))
                continue
            finally:
                summary.seconds["load"] += time.perf_counter() - t0
            yield image_id, p, x, meta

    def batches() -> Iterator[List[Tuple[str, Path, np.ndarray, InputMeta]]]:
        group: List[Tuple[str, Path, np.ndarray, InputMeta]] = []
        for item in pending_inputs():
            if group and (item[2].shape != group[0][2].shape or len(group) >= batch_size):
                yield group
                group = []
            group.append(item)
        if group:
            yield group

    try:
        for group in batches():
            x = predictor.batch([g[2] for g in group])
            try:
                routed = predictor.route(x)
                summary.seconds["network"] += routed.network_seconds
                summary.seconds["route"] += routed.route_seconds
            except Exception as err:
                for image_id, p, _, _ in group:
                    summary.failed.append(
                        (str(p), f"inference failed: {type(err).__name__}: {err}")
                    )
                continue
            for b, (image_id, p, xi, meta) in enumerate(group):
                try:
                    _finish_image(
                        db,
                        out,
                        image_id,
                        p,
                        meta,
                        routed.model_pred[b],
                        routed.score[b],
                        routed.assignment[b],
                        E,
                        min_size,
                        merge_distance,
                        summary,
                    )
                except Exception as err:
                    summary.failed.append((str(p), f"{type(err).__name__}: {err}"))
    finally:
        if bar is not None:
            bar.close()
    write_manifest(db)
    atomic_write_json(out / "predict_summary.json", summary.to_dict())
    return summary


def _finish_image(
    db: ReviewDB,
    out: Path,
    image_id: str,
    path: Path,
    meta: InputMeta,
    model_pred: np.ndarray,
    score: np.ndarray,
    assignment: np.ndarray,
    num_experts: int,
    min_size: int,
    merge_distance: int,
    summary: PredictSummary,
) -> None:
    t0 = time.perf_counter()
    regions, tasks, dropped = extract_tasks(assignment, num_experts, min_size, merge_distance)
    t1 = time.perf_counter()
    write_like(out / "model" / image_id, model_pred.astype(np.uint8), meta)
    write_like(out / "score" / image_id, score.astype(np.float32), meta)
    write_like(
        out / "assignment" / image_id, (assignment.astype(np.int16) + 1).astype(np.uint8), meta
    )
    atomic_save_npy(out / "regions" / f"{image_id}.npy", regions)
    deferred = int((assignment >= 0).sum())
    db.add_image(
        image_id,
        str(path.resolve()),
        meta.ext,
        file_fingerprint(path),
        assignment.shape,
        assignment.size,
        deferred,
        dropped,
        tasks,
    )
    summary.seconds["tasks"] += t1 - t0
    summary.seconds["write"] += time.perf_counter() - t1
    summary.done.append(image_id)
    summary.tasks += len(tasks)
