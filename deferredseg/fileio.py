"""Files written atomically, and what identifies a file's version.

Every writer here writes a temporary file in the target's folder, named
``.<name>.tmp-<pid>-<random>``, flushes and fsyncs it, renames it over the target and
fsyncs the folder: a process killed at any moment leaves the old file or the new one,
never a truncated one. A failed write removes its temporary file; the one a killed
writer leaves behind is recognised by its pid (:func:`remove_stale_temporaries`). A
written file has the permissions of any new file under the process umask
(group-readable with the usual 022 or 002).

Checkpoints (:mod:`deferredseg.train.checkpoint`), the review state
(:mod:`deferredseg.review.db`), the review manifest and report, and the outputs in the
input's format (:mod:`deferredseg.data.files`) are all written through this module.
This module imports neither torch nor any other module of the package.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
from pathlib import Path
from typing import IO, Any, Iterator, Union

import numpy as np

__all__ = [
    "TMP_MARK",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_save_npy",
    "atomic_save_torch",
    "remove_stale_temporaries",
    "file_fingerprint",
]

#: What marks a temporary file of this module: ``.<name>.tmp-<pid>-<random>``.
TMP_MARK = ".tmp-"

PathLike = Union[str, "os.PathLike[str]"]


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: PathLike, text: bool = False) -> Iterator[IO[Any]]:
    """A new file to write ``path`` through: binary (``text=False``) or UTF-8 text.

    The file is a temporary one in ``path``'s folder (created with the folder if
    needed); it replaces ``path`` when the ``with`` block ends without an exception,
    and is removed when one is raised (``path`` then keeps its old content).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the writer's pid in the name: only a writer that is gone leaves one to remove
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(6)}")
    try:
        with open(tmp, "x" if text else "xb", encoding="utf-8" if text else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_json(path: PathLike, value: Any, indent: int = 2) -> None:
    """Write ``value`` as JSON (``indent``) to ``path`` atomically."""
    with atomic_open(path, text=True) as f:
        json.dump(value, f, indent=indent)


def atomic_save_npy(path: PathLike, arr: np.ndarray) -> None:
    """Write ``arr`` as a ``.npy`` file (no pickled objects) to ``path`` atomically."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def atomic_save_torch(path: PathLike, obj: Any) -> None:
    """``torch.save(obj)`` to ``path`` atomically, streamed (no copy in memory)."""
    import torch  # only here: this module is imported by torch-free commands too

    with atomic_open(path) as f:
        torch.save(obj, f)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except (OSError, OverflowError, ValueError):
        return False
    return True


def remove_stale_temporaries(root: PathLike) -> int:
    """Delete the temporary files that writers which are gone left under ``root``; returns
    how many. A temporary file of a live process (another ``serve``, ``merge`` or ``predict``
    writing now) is kept: its name holds its writer's pid (older names without one count
    as stale)."""
    n = 0
    for p in Path(root).rglob(f".*{TMP_MARK}*"):
        owner = p.name.rsplit(TMP_MARK, 1)[1].split("-", 1)[0]
        # a pid has at most 7 digits (Linux's pid_max); an older name's random hex has 12
        if owner.isdigit() and len(owner) <= 7 and _pid_alive(int(owner)):
            continue
        try:
            if p.is_file():
                p.unlink()
                n += 1
        except FileNotFoundError:  # its writer renamed it meanwhile
            pass
    return n


def file_fingerprint(path: PathLike) -> str:
    """What identifies a version of the file ``path``: its size and modification time."""
    st = Path(path).stat()
    return f"{st.st_size}:{st.st_mtime_ns}"
