"""One review folder, several writers: the server, `merge`, `predict`, a second server, and a
server killed between recording an answer and merging it (issue 22)."""

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from review_case import make_review_folder

from deferredseg.review.db import ReviewDB, folder_lock
from deferredseg.review.merge import fuse, merge, merge_image
from deferredseg.review.server import create_app

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def folder(tmp_path):
    return make_review_folder(tmp_path)


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _expected_final(db, image_id="scan1"):
    model = np.load(db.out / "model" / f"{image_id}.npy")
    regions = np.load(db.out / "regions" / f"{image_id}.npy")
    answers = []
    for t in db.tasks_of_image(image_id):
        a = db.latest_answer(t["id"])
        if a is not None:
            answers.append(
                {
                    "region": t["region"],
                    "bbox": json.loads(t["bbox"]),
                    "action": a["action"],
                    "mask": db.load_answer_mask(a),
                }
            )
    return fuse(model, regions, answers)


def test_opening_a_folder_removes_only_the_temporaries_of_writers_that_are_gone(folder):
    live = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    dead = _dead_pid()
    try:
        (folder / "answers" / "1").mkdir(parents=True)
        (folder / "final").mkdir()
        keep = [
            folder / "answers" / "1" / f".a.npy.tmp-{live.pid}-00aa",  # a server writing now
            folder / "final" / f".scan1.npy.tmp-{os.getpid()}-00bb",  # this process
        ]
        gone = [
            folder / "answers" / "1" / f".b.npy.tmp-{dead}-00cc",
            folder / "final" / f".scan1.npy.tmp-{dead}-00dd",  # final/ too
            folder / f".report.json.tmp-{dead}-00ee",
            folder / "final" / ".scan1.npy.tmp-0a1b2c3d4e5f",  # an older name without a pid
        ]
        for p in keep + gone:
            p.write_bytes(b"partial")
        ReviewDB(folder, create=False)  # what `merge`, `predict` and `serve` do first
        assert [p.exists() for p in keep] == [True, True]
        assert [p.exists() for p in gone] == [False] * len(gone)
        merge(folder)  # the CLI merge, while the live writer still writes
        assert all(p.exists() for p in keep)
    finally:
        live.stdin.close()
        live.wait(timeout=20)


_HOLDER = textwrap.dedent("""
    import sys
    from deferredseg.review.db import folder_lock
    with folder_lock(sys.argv[1]):
        print("held", flush=True)
        sys.stdin.read()
""")


@pytest.mark.slow
def test_merge_waits_for_a_writer_of_another_process_holding_the_folder_lock(folder):
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    try:
        assert holder.stdout.readline().strip() == b"held"
        db = ReviewDB(folder)
        done = threading.Event()
        t = threading.Thread(target=lambda: (merge_image(db, "scan1"), done.set()))
        t.start()
        time.sleep(1.0)
        assert not done.is_set() and not (folder / "final" / "scan1.npy").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=20)
    t.join(timeout=30)
    assert done.is_set() and (folder / "final" / "scan1.npy").exists()
    # and two threads of one process exclude each other as well
    with folder_lock(folder):
        done.clear()
        t = threading.Thread(target=lambda: (merge_image(db, "scan1"), done.set()))
        t.start()
        time.sleep(0.5)
        assert not done.is_set()
    t.join(timeout=30)
    assert done.is_set()


def test_the_server_merges_at_start_up_every_image_with_newer_answers(folder):
    db = ReviewDB(folder)
    tasks = [t["id"] for t in db.iter_tasks() if t["expert"] == "ana"]
    bbox = json.loads(db.task(tasks[0])["bbox"])
    shape = tuple(b - a for a, b in bbox)
    db.add_answer(tasks[1], 0, "rejected")
    merge_image(db, "scan1")  # final/ up to date with the first answer
    before = np.load(folder / "final" / "scan1.npy")
    # the server recorded an edit, then died before merging it
    db.add_answer(tasks[0], 0, "edited", np.ones(shape, np.uint8))
    os.utime(folder / "final" / "scan1.npy")  # even with a final/ file written after the answer
    assert np.array_equal(np.load(folder / "final" / "scan1.npy"), before)
    (folder / "final" / f".scan1.npy.tmp-{_dead_pid()}-0001").write_bytes(b"x")
    app = create_app(folder)
    assert app.state.remerged == ["scan1"]
    app.state.flush_report()  # the report follows (in the background otherwise)
    assert json.loads((folder / "report.json").read_text())["experts"][0]["done"] == 2
    final = np.load(folder / "final" / "scan1.npy")
    np.testing.assert_array_equal(final, _expected_final(db))
    assert not np.array_equal(final, before)
    assert not [p for p in (folder / "final").iterdir() if ".tmp-" in p.name]
    # nothing newer: nothing merged at the next start
    assert create_app(folder).state.remerged == []
