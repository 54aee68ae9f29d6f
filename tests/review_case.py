"""A small prediction folder for the review tests, made without a model.

One 40x40 image; the model's mask is a disk; expert "ana" has three square
regions, expert "ben" one. Written with the same functions ``predict`` uses.
"""

import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from deferredseg.data.files import InputMeta, file_fingerprint, write_like
from deferredseg.fileio import atomic_save_npy
from deferredseg.review.db import ReviewDB
from deferredseg.review.tasks import extract_tasks

ROOT = Path(__file__).resolve().parents[1]
SIDE = 40
ANA_BOXES = [(2, 10, 2, 10), (2, 10, 28, 36), (28, 36, 2, 10)]
BEN_BOX = (28, 36, 28, 36)


def _write_case(out, images, image_id, image, model, assignment, write_assignment, **task_options):
    """One image of a prediction folder as ``predict`` writes it: the source image, the
    model's mask (and the assignment, if asked), the review regions and the database rows."""
    source = images / f"{image_id}.npy"
    np.save(source, image)
    db = ReviewDB(out)
    db.ensure_experts(["ana", "ben"])
    db.set_meta({"num_classes": 1, "num_labels": 2, "spatial_dims": model.ndim, "in_channels": 1})
    meta = InputMeta(ext=".npy")
    write_like(out / "model" / image_id, model, meta)
    if write_assignment:
        coded = (assignment.astype(np.int16) + 1).astype(np.uint8)  # 0 the model, j + 1 expert j
        write_like(out / "assignment" / image_id, coded, meta)
    regions, tasks, dropped = extract_tasks(assignment, 2, **task_options)
    atomic_save_npy(out / "regions" / f"{image_id}.npy", regions)
    db.add_image(
        image_id,
        str(source.resolve()),
        ".npy",
        file_fingerprint(source),
        model.shape,
        model.size,
        int((assignment >= 0).sum()),
        dropped,
        tasks,
    )
    db.close()
    return out


def make_review_folder(root: Path) -> Path:
    images = Path(root) / "images"
    images.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:SIDE, :SIDE]
    rng = np.random.RandomState(0)
    image = (
        100.0
        + 80.0 * (((yy - 20) ** 2 + (xx - 20) ** 2) < 120)
        + 0.8 * xx
        + rng.normal(0, 6, (SIDE, SIDE))
    ).astype(np.float32)
    model = ((yy - 20) ** 2 + (xx - 20) ** 2 < 100).astype(np.uint8)
    model[4:8, 4:8] = 1  # something inside the first region, so the proposal shows
    assignment = np.full((SIDE, SIDE), -1, np.int8)
    for a, b, c, d in ANA_BOXES:
        assignment[a:b, c:d] = 0
    a, b, c, d = BEN_BOX
    assignment[a:b, c:d] = 1
    return _write_case(
        Path(root) / "out",
        images,
        "scan1",
        image,
        model,
        assignment,
        True,
        min_size=1,
        merge_distance=0,
    )


def make_review_folder_3d(root: Path) -> Path:
    """A 24x24x8 volume; ana has one region spanning slices 2-5, ben one."""
    images = Path(root) / "images3d"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(1)
    image = (100 + 50 * rng.rand(24, 24, 8)).astype(np.float32)
    model = np.zeros((24, 24, 8), np.uint8)
    model[6:10, 6:10, 3:5] = 1
    assignment = np.full((24, 24, 8), -1, np.int8)
    assignment[4:12, 4:12, 2:6] = 0
    assignment[16:20, 16:20, 1:3] = 1
    return _write_case(Path(root) / "out3d", images, "vol1", image, model, assignment, False)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url, token=None, host=None):
    headers = {"X-Review-Token": token} if token else {}
    if host:
        headers["Host"] = host
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def start_server(out, *extra):
    """`deferredseg serve OUT` on a free port; returns (process, base URL, links printed)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "deferredseg", "serve", str(out), "--port", str(port), *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    links, printed = {}, []
    for line in proc.stdout:
        printed.append(line)
        m = re.search(r"(expert (\w+)|overview): (http://\S+)", line)
        if m:
            links[m.group(2) or ""] = m.group(3)
        if line.strip().startswith("overview:"):
            break
    assert set(links) == {"ana", "ben", ""}, "".join(printed)
    base = f"http://127.0.0.1:{port}"
    for _ in range(400):
        try:
            if get(base + "/static/style.css")[0] == 200:
                break
        except OSError:
            pass
        time.sleep(0.05)
    return proc, base, links
