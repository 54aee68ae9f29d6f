"""``deferredseg merge``: the final mask of every image, and a report of the review.

The final mask takes the model's labels where the model kept a pixel, and
where it deferred one, the answer of the expert whose region holds it: an
``edited`` answer's labels on the region's pixels; ``accepted`` and
``rejected`` answers keep the model's labels (accepted: the expert confirmed
them; rejected: the expert declined, and the model's answer stands). Pixels of
unanswered regions, and deferred pixels in regions too small to be sent,
fall back to the model; the report lists them. The latest answer of a task
counts; earlier ones stay in the database as its history.

Writers of one folder (the server after each answer, ``deferredseg merge``, a
second server) merge under :func:`~deferredseg.review.db.folder_lock`, each
from one consistent snapshot of the database, and record the newest answer
each ``final/`` file holds; :func:`remerge_stale` brings every image whose
answers are newer than its ``final/`` file up to date (a server killed between
recording an answer and merging it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np

from ..data.files import read_like, write_like
from ..fileio import atomic_write_bytes
from .db import ReviewDB, folder_lock

__all__ = ["merge", "merge_image", "remerge_stale", "fuse", "build_report"]


def fuse(model: np.ndarray, regions: np.ndarray, answers: List[Dict[str, Any]]) -> np.ndarray:
    """The final labels: ``model`` with each edited region's pixels replaced.

    ``answers``: dicts with ``region`` (value in ``regions``), ``bbox``
    (``[[start, stop], ...]``), ``action`` and, for ``edited``, ``mask`` (the
    bbox crop).
    """
    final = np.array(model, copy=True)
    for a in answers:
        if a["action"] != "edited":
            continue
        crop = tuple(slice(int(s), int(e)) for s, e in a["bbox"])
        sel = regions[crop] == int(a["region"])
        view = final[crop]
        view[sel] = np.asarray(a["mask"])[sel].astype(final.dtype)
    return final


def merge_image(db: ReviewDB, image_id: str) -> Dict[str, Any]:
    """Write ``final/<id>`` for one image; returns its unanswered task ids."""
    row = db.image(image_id)
    if row is None:
        raise KeyError(f"no image {image_id!r} in {db.out}")
    out = db.out
    with folder_lock(out):
        model, meta = read_like(out / "model" / f"{image_id}{row['ext']}")
        regions = np.load(out / "regions" / f"{image_id}.npy", allow_pickle=False)
        rows, unanswered, newest = db.image_answers(image_id)
        answers = [
            {
                "region": r["region"],
                "bbox": json.loads(r["bbox"]),
                "action": r["action"],
                "mask": db.load_answer_mask(r),
            }
            for r in rows
        ]
        final = fuse(np.asarray(model).astype(np.uint8), regions, answers)
        write_like(out / "final" / image_id, final, meta)
        if newest:
            db.set_merged(image_id, newest)
    return {"image": image_id, "unanswered_tasks": unanswered}


def remerge_stale(db: ReviewDB) -> List[str]:
    """Merge every image with an answer newer than its ``final/`` file; returns their ids."""
    ids = db.unmerged_images()
    for image_id in ids:
        merge_image(db, image_id)
    return ids


def build_report(db: ReviewDB) -> Dict[str, Any]:
    """Per image: deferred share, answered share, experts; per expert: tasks done, time spent."""
    c = db.conn()
    latest = "(SELECT a.action FROM answers a WHERE a.task_id=t.id ORDER BY a.id DESC LIMIT 1)"
    images = []
    for r in c.execute(
        f"SELECT i.id, i.total_pixels, i.deferred_pixels, i.dropped_pixels, "
        f"COUNT(t.id) AS tasks, "
        f"COALESCE(SUM(CASE WHEN {latest} IN ('accepted', 'edited') THEN t.area END), 0) AS "
        "answered, "
        f"COALESCE(SUM(CASE WHEN {latest} = 'rejected' THEN t.area END), 0) AS rejected, "
        f"GROUP_CONCAT(CASE WHEN {latest} IS NULL THEN t.id END) AS unanswered "
        f"FROM images i LEFT JOIN tasks t ON t.image_id=i.id GROUP BY i.id ORDER BY i.id"
    ):
        deferred = int(r["deferred_pixels"])
        experts = [
            e["name"]
            for e in c.execute(
                "SELECT DISTINCT e.name FROM tasks t JOIN experts e ON e.id=t.expert_id "
                "WHERE t.image_id=? ORDER BY e.id",
                (r["id"],),
            )
        ]
        unanswered = sorted(int(v) for v in r["unanswered"].split(",")) if r["unanswered"] else []
        images.append(
            {
                "image": r["id"],
                "pixels": int(r["total_pixels"]),
                "deferred_share": deferred / max(int(r["total_pixels"]), 1),
                "answered_share": (int(r["answered"]) / deferred) if deferred else None,
                "rejected_share": (int(r["rejected"]) / deferred) if deferred else None,
                "dropped_pixels": int(r["dropped_pixels"]),
                "dropped_share": (int(r["dropped_pixels"]) / deferred) if deferred else None,
                "tasks": int(r["tasks"]),
                "experts": experts,
                "unanswered_tasks": unanswered,
                "complete": not unanswered,
            }
        )
    experts = []
    for r in c.execute(
        f"SELECT e.name, COUNT(t.id) AS tasks, "
        f"SUM({latest} IS NOT NULL) AS done, SUM({latest} = 'accepted') AS accepted, "
        f"SUM({latest} = 'edited') AS edited, SUM({latest} = 'rejected') AS rejected, "
        f"(SELECT COALESCE(SUM(a.seconds), 0) FROM answers a WHERE a.expert_id=e.id) AS seconds "
        f"FROM experts e LEFT JOIN tasks t ON t.expert_id=e.id GROUP BY e.id ORDER BY e.id"
    ):
        experts.append(
            {
                "expert": r["name"],
                "tasks": int(r["tasks"]),
                "done": int(r["done"] or 0),
                "accepted": int(r["accepted"] or 0),
                "edited": int(r["edited"] or 0),
                "rejected": int(r["rejected"] or 0),
                "seconds": float(r["seconds"] or 0.0),
            }
        )
    return {"images": images, "experts": experts}


def _report_markdown(rep: Dict[str, Any]) -> str:
    def pct(v: Optional[float]) -> str:
        return "-" if v is None else f"{v:.1%}"

    lines = [
        "# Review report",
        "",
        "## Images",
        "",
        "Shares of the deferred pixels: answered (accepted or edited), rejected, and in regions "
        "too small to send (the model's labels stand there).",
        "",
        "| image | deferred | answered | rejected | too small | experts | unanswered tasks |",
        "|---|---|---|---|---|---|---|",
    ]
    for i in rep["images"]:
        lines.append(
            f"| {i['image']} | {pct(i['deferred_share'])} | {pct(i['answered_share'])} | "
            f"{pct(i['rejected_share'])} | {pct(i['dropped_share'])} | "
            f"{', '.join(i['experts']) or '-'} | "
            f"{', '.join(map(str, i['unanswered_tasks'])) or '-'} |"
        )
    lines += [
        "",
        "## Experts",
        "",
        "| expert | tasks | done | accepted | edited | rejected | time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in rep["experts"]:
        lines.append(
            f"| {e['expert']} | {e['tasks']} | {e['done']} | {e['accepted']} | {e['edited']} | "
            f"{e['rejected']} | {e['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def write_report(db: ReviewDB) -> Dict[str, Any]:
    rep = build_report(db)
    with folder_lock(db.out):
        _write_report_files(db, rep)
    return rep


def _write_report_files(db: ReviewDB, rep: Dict[str, Any]) -> None:
    atomic_write_bytes(db.out / "report.json", json.dumps(rep, indent=2).encode())
    atomic_write_bytes(db.out / "report.md", _report_markdown(rep).encode())


def merge(out: Union[str, Path], db: Optional[ReviewDB] = None) -> Dict[str, Any]:
    """Merge every image of ``out``; write ``final/`` and ``report.json`` / ``report.md``."""
    db = db or ReviewDB(out, create=False)
    for image_id in db.image_ids():
        merge_image(db, image_id)
    return write_report(db)
