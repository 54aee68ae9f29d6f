"""The review state of one prediction folder: an SQLite database and atomically written files.

``OUT/review.db`` (WAL mode, one connection per thread) holds the images, the
experts, the review tasks and every answer. Masks drawn by experts are ``.npy``
files under ``OUT/answers/``, each written to a temporary file and renamed into
place, and only then referenced by a row: a process killed at any moment leaves
either a complete file or none, and either a whole row or none. An answer is
never changed: answering a task again adds a row that points to the one before
(``parent_id``), so the history of edits stays.

The schema version is SQLite's ``user_version``; :data:`MIGRATIONS` brings an
older database up to :data:`SCHEMA_VERSION`, and a database written by a newer
version is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..fileio import atomic_save_npy, remove_stale_temporaries

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "SCHEMA_VERSION",
    "ACTIONS",
    "ReviewDB",
    "hash_token",
    "DB_NAME",
    "StaleAnswer",
    "folder_lock",
]

DB_NAME = "review.db"
SCHEMA_VERSION = 2
ACTIONS = ("accepted", "edited", "rejected")

MIGRATIONS: Dict[int, str] = {
    # version 0 (an empty file) -> 1
    1: """
    CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE experts(
        id INTEGER PRIMARY KEY,            -- the expert's index j in the model's routing
        name TEXT UNIQUE NOT NULL,
        token_hash TEXT);
    CREATE TABLE images(
        id TEXT PRIMARY KEY,
        source TEXT NOT NULL,              -- the input file
        ext TEXT NOT NULL,                 -- its format: .png, .npy, .nii, .nii.gz
        fingerprint TEXT NOT NULL,         -- size and mtime of the input when predicted
        shape TEXT NOT NULL,               -- spatial shape, JSON
        total_pixels INTEGER NOT NULL,
        deferred_pixels INTEGER NOT NULL,
        dropped_pixels INTEGER NOT NULL,   -- deferred, but in regions below the minimum size
        created REAL NOT NULL);
    CREATE TABLE tasks(
        id INTEGER PRIMARY KEY,
        image_id TEXT NOT NULL REFERENCES images(id),
        expert_id INTEGER NOT NULL REFERENCES experts(id),
        region INTEGER NOT NULL,           -- value of the region in the image's region map
        bbox TEXT NOT NULL,                -- [[start, stop], ...] per spatial axis, JSON
        area INTEGER NOT NULL,
        opened_at REAL,                    -- first time the expert opened it
        UNIQUE(image_id, region));
    CREATE INDEX tasks_by_expert ON tasks(expert_id, id);
    CREATE TABLE answers(
        id INTEGER PRIMARY KEY,
        task_id INTEGER NOT NULL REFERENCES tasks(id),
        expert_id INTEGER NOT NULL REFERENCES experts(id),
        action TEXT NOT NULL CHECK(action IN ('accepted', 'edited', 'rejected')),
        mask TEXT,                         -- file under answers/ for an edit, relative to OUT
        parent_id INTEGER REFERENCES answers(id),
        created REAL NOT NULL,
        seconds REAL);                     -- time from opening the task to this answer
    CREATE INDEX answers_by_task ON answers(task_id, id);
    """,
    # 1 -> 2: the latest opening of a task (the time of an answer counts from it, so that a
    # re-answer does not count from the first opening), and the newest answer each final/
    # file holds (the server re-merges, at start-up, every image with a newer one)
    2: """
    ALTER TABLE tasks ADD COLUMN last_opened REAL;
    CREATE TABLE merged(
        image_id TEXT PRIMARY KEY REFERENCES images(id),
        answer_id INTEGER NOT NULL);       -- the newest answer of the image in final/<id>
    """,
}


class StaleAnswer(Exception):
    """An answer based on a version of the task that is no longer its latest answer."""

    def __init__(self, task_id: int, current: Optional[Dict[str, Any]]):
        self.task_id, self.current = int(task_id), current
        super().__init__(
            f"task {task_id} was answered meanwhile"
            + ("" if current is None else f" ({current['action']}, answer {current['answer']})")
        )


_ANY = object()  # add_answer's base: no version check


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


LOCK_NAME = ".review.lock"


@contextlib.contextmanager
def folder_lock(out: Union[str, Path]) -> Iterator[None]:
    """Exclusive lock of a review folder's ``final/`` and report files, across threads and
    processes (``flock`` on ``OUT/.review.lock``; each call opens its own descriptor, so two
    threads of one process exclude each other too). Released when the holder exits or dies."""
    path = Path(out) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        else:  # pragma: no cover - no flock (Windows): one process at a time
            with _FALLBACK_LOCK:
                yield
    finally:
        os.close(fd)  # releases the flock


_FALLBACK_LOCK = threading.Lock()


def _settings_diff(old: Any, new: Any, key: str = "") -> List[str]:
    """``key: old -> new`` for each leaf that differs between two JSON values."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: List[str] = []
        for k in sorted(set(old) | set(new), key=str):
            sub = f"{key}.{k}" if key else str(k)
            out += _settings_diff(old.get(k, "(unset)"), new.get(k, "(unset)"), sub)
        return out
    return [] if old == new else [f"{key}: {json.dumps(old)} -> {json.dumps(new)}"]


class ReviewDB:
    """The database of a prediction folder ``out`` (created on first use)."""

    def __init__(self, out: Union[str, Path], create: bool = True, timeout: float = 30.0):
        self.out = Path(out)
        self.path = self.out / DB_NAME
        if not self.path.exists() and not create:
            raise FileNotFoundError(
                f"{self.out} holds no review database ({DB_NAME}); "
                f"run `deferredseg predict --out {self.out}` first"
            )
        self.out.mkdir(parents=True, exist_ok=True)
        self.timeout = float(timeout)
        self._local = threading.local()
        self._migrate()
        # what killed writers left, anywhere in the folder (final/ too); live writers' stay
        remove_stale_temporaries(self.out)

    # ------------------------------------------------------------------ connections
    def conn(self) -> sqlite3.Connection:
        c = getattr(self._local, "conn", None)
        if c is None:
            c = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
            c.row_factory = sqlite3.Row
            c.execute("PRAGMA journal_mode=WAL")
            c.execute("PRAGMA synchronous=FULL")
            c.execute("PRAGMA foreign_keys=ON")
            c.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
            self._local.conn = c
        return c

    def close(self) -> None:
        c = getattr(self._local, "conn", None)
        if c is not None:
            c.close()
            self._local.conn = None

    class _Tx:
        def __init__(self, conn: sqlite3.Connection):
            self.c = conn

        def __enter__(self) -> sqlite3.Connection:
            self.c.execute("BEGIN IMMEDIATE")
            return self.c

        def __exit__(self, kind, exc, tb) -> None:
            self.c.execute("COMMIT" if kind is None else "ROLLBACK")

    def tx(self) -> "_Tx":
        """A write transaction (``BEGIN IMMEDIATE``): all of it is committed, or none."""
        return self._Tx(self.conn())

    def _migrate(self) -> None:
        c = self.conn()
        with self.tx():
            version = c.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ValueError(
                    f"{self.path} has schema version {version}, newer than this "
                    f"deferredseg understands ({SCHEMA_VERSION}); upgrade deferredseg"
                )
            for v in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[v].split(";"):
                    if statement.strip():
                        c.execute(statement)
                c.execute(f"PRAGMA user_version={v}")

    @property
    def schema_version(self) -> int:
        return int(self.conn().execute("PRAGMA user_version").fetchone()[0])

    # ------------------------------------------------------------------ meta and experts
    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self.conn().execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return default if row is None else json.loads(row["value"])

    def set_meta(self, values: Dict[str, Any]) -> None:
        with self.tx() as c:
            for k, v in values.items():
                c.execute(
                    "INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE "
                    "SET value=excluded.value",
                    (k, json.dumps(v)),
                )

    def record_settings(self, settings: Dict[str, Any]) -> None:
        """Store the settings that make the folder's tasks (``predict``'s record); a folder that
        already holds images keeps its own: other settings are refused with each change as
        ``key: old -> new`` (compared generically, whatever the record holds)."""
        if self.image_ids():
            changes: List[str] = []
            for k, v in settings.items():
                old = self.get_meta(k, "(unset)")
                changes += _settings_diff(old, json.loads(json.dumps(v)), k)
            if changes:
                raise ValueError(
                    f"{self.out} holds tasks made with other settings; predict into a new "
                    f"folder, or rerun with the folder's settings: " + "; ".join(changes)
                )
        self.set_meta(settings)

    def ensure_experts(self, names: Sequence[str]) -> None:
        """Register experts 0..E-1 by name; a folder keeps the experts it was created with."""
        with self.tx() as c:
            have = [r["name"] for r in c.execute("SELECT name FROM experts ORDER BY id")]
            if have and have != list(names):
                raise ValueError(
                    f"{self.out} was predicted with experts {have}, this model has "
                    f"{list(names)}; use another --out"
                )
            if not have:
                c.executemany("INSERT INTO experts(id, name) VALUES(?, ?)", list(enumerate(names)))

    def experts(self) -> List[sqlite3.Row]:
        return (
            self.conn().execute("SELECT id, name, token_hash FROM experts ORDER BY id").fetchall()
        )

    def expert_by_name(self, name: str) -> Optional[sqlite3.Row]:
        return (
            self.conn()
            .execute("SELECT id, name, token_hash FROM experts WHERE name=?", (name,))
            .fetchone()
        )

    def issue_tokens(self, replace: bool = False) -> Dict[str, str]:
        """New random tokens for the experts without one (all with ``replace``) and for the
        overview (key ``""``). Only their hashes are stored: the returned tokens are the
        only copy."""
        out: Dict[str, str] = {}
        with self.tx() as c:
            for r in c.execute("SELECT id, name, token_hash FROM experts ORDER BY id").fetchall():
                if r["token_hash"] is None or replace:
                    tok = secrets.token_urlsafe(24)
                    c.execute(
                        "UPDATE experts SET token_hash=? WHERE id=?", (hash_token(tok), r["id"])
                    )
                    out[r["name"]] = tok
            row = c.execute("SELECT value FROM meta WHERE key='overview_token_hash'").fetchone()
            if row is None or replace:
                tok = secrets.token_urlsafe(24)
                c.execute(
                    "INSERT INTO meta(key, value) VALUES('overview_token_hash', ?) ON "
                    "CONFLICT(key) "
                    "DO UPDATE SET value=excluded.value",
                    (json.dumps(hash_token(tok)),),
                )
                out[""] = tok
        return out

    def has_tokens(self) -> bool:
        return (
            all(r["token_hash"] for r in self.experts())
            and self.get_meta("overview_token_hash") is not None
        )

    def check_token(self, expert: Optional[str], token: Optional[str]) -> bool:
        """Whether ``token`` is ``expert``'s (``expert=None``: the overview's)."""
        if not token:
            return False
        if expert is None:
            stored = self.get_meta("overview_token_hash")
        else:
            row = self.expert_by_name(expert)
            stored = row["token_hash"] if row is not None else None
        # the same work for an unknown expert as for a wrong token: names cannot be timed out
        same = hmac.compare_digest(stored or "0" * 64, hash_token(token))
        return bool(stored) and same

    # ------------------------------------------------------------------ images and tasks
    def image(self, image_id: str) -> Optional[sqlite3.Row]:
        return self.conn().execute("SELECT * FROM images WHERE id=?", (image_id,)).fetchone()

    def image_ids(self) -> List[str]:
        return [r["id"] for r in self.conn().execute("SELECT id FROM images ORDER BY id")]

    def add_image(
        self,
        image_id: str,
        source: str,
        ext: str,
        fingerprint: str,
        shape: Sequence[int],
        total: int,
        deferred: int,
        dropped: int,
        tasks: Sequence[Any],
    ) -> List[int]:
        """The image and its tasks in one transaction; returns the task ids."""
        ids = []
        with self.tx() as c:
            c.execute(
                "INSERT INTO images(id, source, ext, fingerprint, shape, total_pixels, "
                "deferred_pixels, dropped_pixels, created) VALUES(?,?,?,?,?,?,?,?,?)",
                (
                    image_id,
                    source,
                    ext,
                    fingerprint,
                    json.dumps(list(shape)),
                    int(total),
                    int(deferred),
                    int(dropped),
                    time.time(),
                ),
            )
            for t in tasks:
                cur = c.execute(
                    "INSERT INTO tasks(image_id, expert_id, region, bbox, area) VALUES(?,?,?,?,?)",
                    (
                        image_id,
                        int(t.expert),
                        int(t.region),
                        json.dumps([list(b) for b in t.bbox]),
                        int(t.area),
                    ),
                )
                ids.append(int(cur.lastrowid))
        return ids

    def task(self, task_id: int) -> Optional[sqlite3.Row]:
        return (
            self.conn()
            .execute(
                "SELECT t.*, e.name AS expert FROM tasks t JOIN experts e ON e.id=t.expert_id "
                "WHERE t.id=?",
                (int(task_id),),
            )
            .fetchone()
        )

    def tasks_of_image(self, image_id: str) -> List[sqlite3.Row]:
        return (
            self.conn()
            .execute(
                "SELECT t.*, e.name AS expert FROM tasks t JOIN experts e ON e.id=t.expert_id "
                "WHERE t.image_id=? ORDER BY t.id",
                (image_id,),
            )
            .fetchall()
        )

    def iter_tasks(self) -> Iterator[sqlite3.Row]:
        yield from self.conn().execute(
            "SELECT t.*, e.name AS expert FROM tasks t JOIN experts e ON e.id=t.expert_id ORDER "
            "BY t.id"
        )

    def next_task(self, expert_id: int, after: int = 0) -> Optional[int]:
        """The first unanswered task of the expert (with an id above ``after`` if there is one)."""
        q = (
            "SELECT id FROM tasks t WHERE expert_id=? AND id>? AND NOT EXISTS "
            "(SELECT 1 FROM answers a WHERE a.task_id=t.id) ORDER BY id LIMIT 1"
        )
        row = self.conn().execute(q, (expert_id, after)).fetchone()
        if row is None and after:
            row = self.conn().execute(q, (expert_id, 0)).fetchone()
        return None if row is None else int(row["id"])

    def queue_counts(self, expert_id: int) -> Dict[str, int]:
        row = (
            self.conn()
            .execute(
                "SELECT COUNT(*) AS total, SUM(EXISTS(SELECT 1 FROM answers a WHERE "
                "a.task_id=t.id)) "
                "AS done FROM tasks t WHERE expert_id=?",
                (expert_id,),
            )
            .fetchone()
        )
        total, done = int(row["total"]), int(row["done"] or 0)
        return {"total": total, "done": done, "left": total - done}

    def mark_opened(self, task_id: int) -> None:
        """The expert opened the task (again): its next answer's time counts from now."""
        now = time.time()
        with self.tx() as c:
            c.execute(
                "UPDATE tasks SET opened_at=COALESCE(opened_at, ?), last_opened=? WHERE id=?",
                (now, now, int(task_id)),
            )

    # ------------------------------------------------------------------ answers
    def latest_answer(self, task_id: int) -> Optional[sqlite3.Row]:
        return (
            self.conn()
            .execute(
                "SELECT * FROM answers WHERE task_id=? ORDER BY id DESC LIMIT 1", (int(task_id),)
            )
            .fetchone()
        )

    def answers(self, task_id: int) -> List[sqlite3.Row]:
        return (
            self.conn()
            .execute("SELECT * FROM answers WHERE task_id=? ORDER BY id", (int(task_id),))
            .fetchall()
        )

    def add_answer(
        self,
        task_id: int,
        expert_id: int,
        action: str,
        mask: Optional[np.ndarray] = None,
        base: Any = _ANY,
    ) -> int:
        """Record an answer; an ``edited`` answer's mask (the task's bbox crop) is written first,
        atomically, then referenced. Returns the answer id.

        ``base``: the id of the task's latest answer the expert saw (None: none yet); when
        given and the task has another latest answer now, nothing is recorded and
        :class:`StaleAnswer` says which (two tabs, or two people, on one task)."""
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {list(ACTIONS)}, got {action!r}")
        if (action == "edited") != (mask is not None):
            raise ValueError("an 'edited' answer needs a mask, and only an edited one has one")
        rel = None
        if mask is not None:
            stamp = time.strftime("%Y%m%dT%H%M%S")
            rel = f"answers/{int(task_id)}/{stamp}-{secrets.token_hex(4)}.npy"
            atomic_save_npy(self.out / rel, np.asarray(mask, dtype=np.uint8))
        with self.tx() as c:
            t = c.execute(
                "SELECT expert_id, opened_at, last_opened FROM tasks WHERE id=?", (int(task_id),)
            ).fetchone()
            if t is None:
                raise KeyError(f"no task {task_id}")
            if int(t["expert_id"]) != int(expert_id):
                raise PermissionError(f"task {task_id} is not expert {expert_id}'s")
            prev = c.execute(
                "SELECT id, action, created FROM answers WHERE task_id=? ORDER BY id DESC LIMIT 1",
                (int(task_id),),
            ).fetchone()
            if base is not _ANY and (None if prev is None else int(prev["id"])) != base:
                if rel is not None:
                    (self.out / rel).unlink(missing_ok=True)
                raise StaleAnswer(
                    task_id,
                    None if prev is None else {"answer": int(prev["id"]), "action": prev["action"]},
                )
            now = time.time()
            # the work on this answer: from the latest opening, if it came after the previous
            # answer (a re-answer does not count the time since the first opening)
            opened = t["last_opened"] if t["last_opened"] is not None else t["opened_at"]
            if opened is not None and prev is not None and float(opened) <= float(prev["created"]):
                opened = None
            seconds = None if opened is None else max(now - float(opened), 0.0)
            cur = c.execute(
                "INSERT INTO answers(task_id, expert_id, action, mask, parent_id, created, "
                "seconds) VALUES(?,?,?,?,?,?,?)",
                (
                    int(task_id),
                    int(expert_id),
                    action,
                    rel,
                    None if prev is None else int(prev["id"]),
                    now,
                    seconds,
                ),
            )
            return int(cur.lastrowid)

    def image_answers(self, image_id: str) -> Tuple[List[Dict[str, Any]], List[int], int]:
        """One consistent snapshot of an image's tasks: ``(answered, unanswered task ids,
        newest answer id of the image or 0)``; ``answered``: the task row's ``region``,
        ``bbox`` and its latest answer's ``action`` and ``mask`` file."""
        c = self.conn()
        c.execute("BEGIN")  # a read transaction: answers committed meanwhile are not half seen
        try:
            rows = c.execute(
                "SELECT t.id, t.region, t.bbox, a.id AS answer, a.action, a.mask FROM tasks t "
                "LEFT JOIN answers a ON a.id=(SELECT MAX(b.id) FROM answers b WHERE "
                "b.task_id=t.id) WHERE t.image_id=? ORDER BY t.id",
                (image_id,),
            ).fetchall()
        finally:
            c.execute("COMMIT")
        answered = [r for r in rows if r["answer"] is not None]
        unanswered = [int(r["id"]) for r in rows if r["answer"] is None]
        newest = max((int(r["answer"]) for r in answered), default=0)
        return answered, unanswered, newest

    def set_merged(self, image_id: str, answer_id: int) -> None:
        with self.tx() as c:
            c.execute(
                "INSERT INTO merged(image_id, answer_id) VALUES(?, ?) ON CONFLICT(image_id) "
                "DO UPDATE SET answer_id=MAX(answer_id, excluded.answer_id)",
                (image_id, int(answer_id)),
            )

    def unmerged_images(self) -> List[str]:
        """Images with an answer newer than the newest one their ``final/`` file holds."""
        return [
            r["image_id"]
            for r in self.conn().execute(
                "SELECT t.image_id, MAX(a.id) AS newest FROM answers a JOIN tasks t ON "
                "t.id=a.task_id LEFT JOIN merged m ON m.image_id=t.image_id "
                "GROUP BY t.image_id HAVING newest > COALESCE(MAX(m.answer_id), 0) "
                "ORDER BY t.image_id"
            )
        ]

    def load_answer_mask(self, answer: sqlite3.Row) -> Optional[np.ndarray]:
        if answer["mask"] is None:
            return None
        return np.load(self.out / answer["mask"], allow_pickle=False)

    # ------------------------------------------------------------------ summaries
    def overview(self) -> Dict[str, Any]:
        c = self.conn()
        experts = []
        for r in c.execute(
            "SELECT e.id, e.name, COUNT(t.id) AS total, "
            "SUM(EXISTS(SELECT 1 FROM answers a WHERE a.task_id=t.id)) AS done, "
            "COALESCE(SUM(t.area), 0) AS pixels "
            "FROM experts e LEFT JOIN tasks t ON t.expert_id=e.id GROUP BY e.id ORDER BY e.id"
        ):
            total, done = int(r["total"]), int(r["done"] or 0)
            experts.append(
                {
                    "name": r["name"],
                    "total": total,
                    "done": done,
                    "left": total - done,
                    "pixels": int(r["pixels"]),
                }
            )
        complete = [
            r["id"]
            for r in c.execute(
                "SELECT i.id FROM images i WHERE NOT EXISTS (SELECT 1 FROM tasks t WHERE "
                "t.image_id=i.id "
                "AND NOT EXISTS (SELECT 1 FROM answers a WHERE a.task_id=t.id)) ORDER BY i.id"
            )
        ]
        n_images = int(c.execute("SELECT COUNT(*) FROM images").fetchone()[0])
        return {"experts": experts, "images": n_images, "complete_images": complete}
