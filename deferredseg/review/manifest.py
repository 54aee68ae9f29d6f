"""``manifest.jsonl`` of a prediction folder: one line per review task, for tools outside
the review server (image, its source file, expert, bounding box, area).

Written by ``deferredseg predict`` after its images, streamed from the review database
(:class:`~deferredseg.review.db.ReviewDB`) and replaced atomically
(:func:`deferredseg.fileio.atomic_open`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

from ..fileio import atomic_open
from .db import ReviewDB

__all__ = ["MANIFEST_NAME", "write_manifest"]

MANIFEST_NAME = "manifest.jsonl"


def write_manifest(db: ReviewDB) -> Path:
    """Write ``db.out / manifest.jsonl``, one JSON line per task of ``db``; returns its path."""
    path = db.out / MANIFEST_NAME
    sources: Dict[str, str] = {}
    with atomic_open(path, text=True) as f:
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
    return path
