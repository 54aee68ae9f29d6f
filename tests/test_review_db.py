"""The review database: concurrent answers, a writer killed mid-write, reopening, tokens."""

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from deferredseg.review.db import SCHEMA_VERSION, ReviewDB
from deferredseg.review.tasks import Task

ROOT = Path(__file__).resolve().parents[1]


def _make(out, per_expert, side=4):
    db = ReviewDB(out)
    db.ensure_experts(["ana", "ben"])
    tasks = [
        Task(j, 1 + j * per_expert + k, ((0, side), (0, side)), side * side)
        for j in range(2)
        for k in range(per_expert)
    ]
    ids = db.add_image(
        "img", "/nowhere/img.npy", ".npy", "0:0", (side, side), side * side, side * side, 0, tasks
    )
    return db, ids


def test_wal_mode_schema_version_and_reopen_shows_the_same_state(tmp_path):
    db, ids = _make(tmp_path, 3)
    assert db.conn().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.schema_version == SCHEMA_VERSION
    db.add_answer(ids[0], 0, "edited", np.ones((4, 4), np.uint8))
    db.add_answer(ids[1], 0, "rejected")
    before = db.overview()
    db.close()
    again = ReviewDB(tmp_path, create=False)
    assert again.overview() == before
    assert [a["action"] for a in again.answers(ids[0])] == ["edited"]
    np.testing.assert_array_equal(
        again.load_answer_mask(again.latest_answer(ids[0])), np.ones((4, 4))
    )
    assert again.next_task(0) == ids[2]
    # a database from a newer deferredseg is refused with a clear message
    c = sqlite3.connect(tmp_path / "review.db")
    c.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    c.close()
    again.close()
    with pytest.raises(ValueError, match="newer than this deferredseg"):
        ReviewDB(tmp_path)
    with pytest.raises(FileNotFoundError, match="no review database"):
        ReviewDB(tmp_path / "empty", create=False)


def test_answers_check_owner_and_action(tmp_path):
    db, ids = _make(tmp_path, 1)
    with pytest.raises(PermissionError):
        db.add_answer(ids[0], 1, "accepted")  # task of expert 0, answered as expert 1
    with pytest.raises(ValueError, match="action"):
        db.add_answer(ids[0], 0, "maybe")
    with pytest.raises(ValueError, match="needs a mask"):
        db.add_answer(ids[0], 0, "edited")
    assert db.answers(ids[0]) == []


def test_tokens_are_stored_hashed_and_checked_per_expert(tmp_path):
    db, _ = _make(tmp_path, 1)
    toks = db.issue_tokens()
    assert set(toks) == {"ana", "ben", ""}
    stored = {r["name"]: r["token_hash"] for r in db.experts()}
    assert toks["ana"] not in stored.values() and len(stored["ana"]) == 64
    assert db.check_token("ana", toks["ana"]) and not db.check_token("ben", toks["ana"])
    assert db.check_token(None, toks[""]) and not db.check_token(None, toks["ana"])
    assert not db.check_token("ana", "") and not db.check_token("nobody", toks["ana"])
    assert db.issue_tokens() == {}  # issued once; only --new-tokens replaces them
    assert set(db.issue_tokens(replace=True)) == {"ana", "ben", ""}
    assert not db.check_token("ana", toks["ana"])


def test_two_experts_answering_at_once_lose_nothing(tmp_path):
    n = 60
    db, ids = _make(tmp_path, n)
    errors = []

    def work(expert):
        try:
            for k, tid in enumerate(ids[expert * n : (expert + 1) * n]):
                if k % 3 == 0:
                    db.add_answer(tid, expert, "edited", np.full((4, 4), tid % 2, np.uint8))
                else:
                    db.add_answer(tid, expert, "accepted" if k % 3 == 1 else "rejected")
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(j,)) for j in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    ov = db.overview()
    assert [(e["done"], e["left"]) for e in ov["experts"]] == [(n, 0), (n, 0)]
    for tid in ids:
        (a,) = db.answers(tid)
        if a["action"] == "edited":
            np.testing.assert_array_equal(db.load_answer_mask(a), np.full((4, 4), tid % 2))


_WRITER = textwrap.dedent("""
    import sys, numpy as np
    from deferredseg.review.db import ReviewDB
    db = ReviewDB(sys.argv[1], create=False)
    expert = int(sys.argv[2])
    ids = [int(v) for v in sys.argv[3].split(",")]
    print("ready", flush=True)
    i = 0
    while True:  # answer the tasks over and over (edits of edits) until killed
        tid = ids[i % len(ids)]
        db.add_answer(tid, expert, "edited", np.full((256, 256), tid % 200, np.uint8))
        i += 1
""")


@pytest.mark.slow
def test_two_processes_and_a_writer_killed_mid_write_leave_no_partial_state(tmp_path):
    n = 8
    db, ids = _make(tmp_path, n, side=256)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _WRITER,
                str(tmp_path),
                str(j),
                ",".join(map(str, ids[j * n : (j + 1) * n])),
            ],
            stdout=subprocess.PIPE,
            env=env,
            cwd=ROOT,
        )
        for j in (0, 1)
    ]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == b"ready"
        deadline = time.time() + 60
        while time.time() < deadline:  # both have written a fair number of answers
            done = db.conn().execute("SELECT COUNT(*) FROM answers GROUP BY expert_id").fetchall()
            if len(done) == 2 and min(r[0] for r in done) >= 20:
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            p.send_signal(signal.SIGKILL)
            p.wait()
    db.close()
    db = ReviewDB(tmp_path, create=False)  # after the "restart"
    c = db.conn()
    assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = c.execute("SELECT * FROM answers ORDER BY id").fetchall()
    assert len(rows) >= 40
    per_task = {}
    for a in rows:
        assert a["action"] == "edited" and a["mask"] and a["created"] > 0
        mask = db.load_answer_mask(a)  # every referenced file is complete
        assert mask.shape == (256, 256) and np.all(mask == a["task_id"] % 200)
        # the history chain: each answer points at the task's previous one
        assert a["parent_id"] == per_task.get(a["task_id"])
        per_task[a["task_id"]] = a["id"]
    # no temporary file survives the reopening, and nothing was renamed half-written
    leftovers = [p for p in (tmp_path / "answers").rglob("*") if p.is_file() and ".tmp-" in p.name]
    assert leftovers == []
    for p in (tmp_path / "answers").rglob("*.npy"):
        assert np.load(p).shape == (256, 256)


def test_settings_of_a_folder_with_tasks_are_kept_and_a_change_is_named(tmp_path):
    db = ReviewDB(tmp_path)
    first = {"routing": {"mode": "gate", "threshold": 0.5, "costs": [1, 2]}, "min_size": 4}
    db.record_settings(first)
    db.record_settings({**first, "min_size": 8})  # no images yet: the settings may change
    assert db.get_meta("min_size") == 8
    db, _ = _make(tmp_path, 1)  # now the folder holds tasks
    db.record_settings({**first, "min_size": 8})  # the same settings: fine
    changed = {"routing": {"mode": "gate", "threshold": 0.7, "costs": [1, 3]}, "min_size": 8}
    with pytest.raises(ValueError) as err:
        db.record_settings({**changed, "merge_distance": 1})
    msg = str(err.value)
    assert "routing.threshold: 0.5 -> 0.7" in msg and "routing.costs: [1, 2] -> [1, 3]" in msg
    assert 'merge_distance: "(unset)" -> 1' in msg and "min_size" not in msg
    assert db.get_meta("routing")["threshold"] == 0.5


def test_a_version_1_database_is_migrated_and_old_temporary_names_are_removed(tmp_path):
    from deferredseg.review.db import MIGRATIONS

    c = sqlite3.connect(tmp_path / "review.db")
    c.executescript(MIGRATIONS[1] + "; PRAGMA user_version=1;")
    c.close()
    (tmp_path / "answers").mkdir()
    old = tmp_path / "answers" / ".m.npy.tmp-123456789012"  # the random hex of older names
    old.write_bytes(b"x")
    db = ReviewDB(tmp_path, create=False)
    assert db.schema_version == SCHEMA_VERSION == 2
    cols = [r[1] for r in db.conn().execute("PRAGMA table_info(tasks)")]
    assert "last_opened" in cols and db.unmerged_images() == []
    assert not old.exists()
