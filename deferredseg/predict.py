"""``deferredseg predict``: segment a folder of new images, route their pixels, make review tasks.

For every image of a folder (PNG, ``.npy``, NIfTI; 2D or 3D; any size) the
trained model gives its packed logits, directly when the image has the
training size and by MONAI's ``sliding_window_inference`` otherwise; the
checkpoint's deferral policy decides who labels each pixel at its calibrated
threshold (or ``threshold=`` / ``budget=``); and the deferred pixels become
review tasks (:mod:`deferredseg.review.tasks`). Written to ``out``, in the
input's format (NIfTI keeps the affine and the header, so the spacing):

- ``model/<id>``: the model's labels;
- ``score/<id>``: the policy's deferral score (the gate's probability or the
  uncertainty, PNG: scaled to 0..255; the expected gain in mode "gain"; see
  :class:`~deferredseg.policy.DeferralPolicy`);
- ``assignment/<id>``: who labels each pixel, 0 for the model and j + 1 for expert j;
- ``regions/<id>.npy``: the review regions (0: none), read by the review server
  and by merge;
- ``review.db``: images, experts and tasks (:mod:`deferredseg.review.db`);
- ``manifest.jsonl``: one line per review task (image, expert, bounding box, area).

An image counts as done once its row is in the database, written after its
files; rerunning over the same ``out`` skips the done images. One unreadable
image is reported by name and skipped.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .data.files import InputMeta, load_input, write_like
from .data.io import split_name
from .fileio import atomic_save_npy, file_fingerprint
from .policy import DeferralPolicy
from .review.db import ReviewDB
from .review.tasks import extract_tasks

__all__ = ["predict", "PredictSummary", "infer_logits", "resolve_policy", "OUTPUT_KINDS"]

#: The per-image output folders (besides regions/ and final/).
OUTPUT_KINDS = ("model", "score", "assignment")


# ----------------------------------------------------------------------------- model


def infer_logits(
    model: torch.nn.Module,
    x: torch.Tensor,
    roi_size: Sequence[int],
    overlap: float = 0.25,
    sw_batch_size: int = 4,
    mode: str = "auto",
    amp: bool = False,
) -> torch.Tensor:
    """The model's raw output for ``x`` (B, C, *S), float32.

    ``mode="auto"``: a direct pass when ``S`` equals ``roi_size``, MONAI's
    ``sliding_window_inference`` (Gaussian blending) otherwise, which also pads an
    image smaller than the window; ``"direct"`` / ``"window"`` force one of them.
    """
    from monai.inferers import sliding_window_inference

    if mode not in ("auto", "direct", "window"):
        raise ValueError(f"mode must be 'auto', 'direct' or 'window', got {mode!r}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    roi = tuple(int(r) for r in roi_size)
    if len(roi) != x.ndim - 2:
        raise ValueError(f"window {roi} has {len(roi)} axes, the images {x.ndim - 2}")
    direct = mode == "direct" or (mode == "auto" and tuple(x.shape[2:]) == roi)
    with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        if direct:
            out = model(x)
        else:
            out = sliding_window_inference(
                x, roi, sw_batch_size, model, overlap=overlap, mode="gaussian", progress=False
            )
    if hasattr(out, "as_tensor"):
        out = out.as_tensor()
    return out.float()


def resolve_policy(
    ck: Dict[str, Any],
    cfg,
    threshold: Optional[float] = None,
    budget: Optional[float] = None,
    calibrate=None,
) -> Tuple[DeferralPolicy, str]:
    """``(policy, where its threshold came from)``: the checkpoint's policy with an explicit
    ``threshold``, or calibrated for ``budget`` by ``calibrate(policy, budget)`` (on the
    validation split), or as the checkpoint recorded it; a checkpoint without a calibrated
    policy (a run's ``last.pt``) is calibrated for its training budget."""
    from .train.methods import checkpoint_policy

    policy = checkpoint_policy(ck, cfg)
    if not policy.defers:
        if threshold is not None or budget is not None:
            raise ValueError(f"the {cfg.method} method never defers: no threshold or budget")
        return policy, f"{cfg.method} method (never defers)"
    if policy.mode == "router":
        if threshold is not None or budget is not None:
            raise ValueError(
                "this checkpoint routes by the router's argmax (mode 'router', its own rate): "
                "it takes no threshold or budget"
            )
        return policy, "the router's argmax"
    if threshold is not None:
        return policy.with_threshold(threshold), "--threshold"
    if budget is None and policy.threshold is not None:
        return policy, "checkpoint"
    budget = policy.budget if budget is None else budget
    budget = cfg.budget if budget is None else budget
    if calibrate is None:
        raise ValueError("a budget needs the validation data of the checkpoint")
    return calibrate(policy, float(budget)), f"budget {budget:g} on the validation split"


# ----------------------------------------------------------------------------- predict


def describe_routing(routing: Dict[str, Any]) -> str:
    """A predict run's routing in a few words: the threshold (if any) and where it came from."""
    thr = routing.get("threshold")
    return f"threshold {thr:.4g} ({routing['source']})" if thr is not None else routing["source"]


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


def _list_images(folder: Path) -> List[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"images folder {folder} not found")
    files = [
        p
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.startswith(".") and split_name(p.name) is not None
    ]
    if not files:
        raise FileNotFoundError(
            f"images folder {folder} holds no .png, .npy, .nii or .nii.gz files"
        )
    return files


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
    from .train.builders import build_data
    from .train.evaluation import network_outputs
    from .train.methods import packed_logits
    from .train.runtime import load_trained, resolve_device

    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = resolve_device(device)
    model, cfg, ck = load_trained(checkpoint, dev)
    K, E = int(cfg.num_classes), int(ck["num_experts"])
    C, sd = int(ck["in_channels"]), int(cfg.spatial_dims)
    best_expert = int(ck.get("best_expert", 0))
    names = list(ck.get("expert_names") or [f"expert{j}" for j in range(E)])
    backend = backend or "auto"  # routing kernels for this machine, not the training one's
    train_size = list(cfg.spatial_size) if cfg.spatial_size else [cfg.image_size] * sd
    roi = [int(w) for w in (window or train_size)]
    if len(roi) != sd or min(roi) < 1:
        raise ValueError(f"window must be {sd} positive sizes, got {list(window or [])}")
    files = _list_images(Path(images))

    def calibrate(policy: DeferralPolicy, b: float) -> DeferralPolicy:
        if "bolt_on" in ck:  # deferral added to a network trained elsewhere: no data recorded
            from .bolt_on import NO_VALIDATION_DATA

            raise ValueError(f"budget={b:g}: {NO_VALIDATION_DATA}")
        from .train.datacheck import match_experts

        val_ds = match_experts(
            build_data(cfg, "val"), cfg, "val", ck.get("expert_names"), build_data
        )
        val = network_outputs(model, val_ds, cfg, E, best_expert, dev)
        return policy.calibrate(val, b)

    policy, source = resolve_policy(ck, cfg, threshold, budget, calibrate)
    routing = {
        "mode": policy.mode,
        "threshold": policy.threshold,
        "budget": policy.budget,
        "source": source,
        "policy": policy.to_dict(),
    }
    out = Path(out)
    db = ReviewDB(out)
    db.ensure_experts(names)
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
    amp = dev.type == "cuda"
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

    from monai.transforms import ScaleIntensity

    scale = ScaleIntensity(minv=0.0, maxv=1.0)  # as the training pipeline does
    try:
        for group in batches():
            x = torch.stack([torch.as_tensor(np.asarray(scale(g[2]))) for g in group]).to(dev)
            try:
                t0 = time.perf_counter()
                raw = infer_logits(model, x, roi, overlap, sw_batch_size, inference, amp)
                logits = packed_logits(cfg, raw, E, best_expert)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t1 = time.perf_counter()
                r = policy.route(logits, backend=backend)
                assignment = r.assignment.cpu().numpy()
                score = r.score.float().cpu().numpy()
                model_pred = r.model_pred.cpu().numpy()
                summary.seconds["network"] += t1 - t0
                summary.seconds["route"] += time.perf_counter() - t1
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
                        model_pred[b],
                        score[b],
                        assignment[b],
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
    _write_manifest(db, out)
    with open(out / "predict_summary.json", "w") as f:
        json.dump(summary.to_dict(), f, indent=2)
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


def _write_manifest(db: ReviewDB, out: Path) -> None:
    """manifest.jsonl: one line per review task, streamed from the database."""
    tmp = out / f".manifest.jsonl.tmp-{os.getpid()}"
    sources = {}
    with open(tmp, "w") as f:
        for t in db.iter_tasks():
            if t["image_id"] not in sources:
                row = db.image(t["image_id"])
                sources = {t["image_id"]: row["source"]}  # tasks come grouped by image
            f.write(
                json.dumps(
                    {
                        "task": t["id"],
                        "image": t["image_id"],
                        "source": sources[t["image_id"]],
                        "expert": t["expert"],
                        "bbox": json.loads(t["bbox"]),
                        "area": t["area"],
                    }
                )
                + "\n"
            )
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / "manifest.jsonl")
