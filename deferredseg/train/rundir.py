"""The run folder of a training: nothing a user trained is ever lost silently.

:func:`open_run` is called before any data is read or any step is taken. It

- picks a default folder ``runs/<date>-<time>`` when no ``--out`` is given;
- refuses an ``--out`` that is a file, cannot be created or written, or sits on a
  full disk (a trial write), before training starts;
- takes a lock (``<out>/.lock``, holding the owner's pid and host): a second
  training into the same folder fails at once and names the first; a lock whose
  process is gone (same host) is stale and taken over with a note;
- refuses an ``--out`` that already holds a run (a checkpoint: ``last.pt``,
  ``best.pt``, or stage 1's ``base/last.pt``, ``base/best.pt``) unless ``--resume``
  continues it or ``--overwrite`` moves it aside to ``<out>.old`` (one previous run
  is kept: the one already there is deleted); an attempt that failed before its
  first checkpoint left only a log, kept as ``log.failed.jsonl``, and the folder is
  reused;
- writes the run's settings to ``config.json`` (``--resume`` of a two-stage run
  stopped in stage 1 reads them; the command line takes every setting of a resumed
  run from the run, and only the options given count as changes);
- on ``--resume``, compares the stored configuration with the new one: settings
  that cannot change (model, experts, data layout and shape) are always
  refused; others are refused with the list of differences unless
  ``--resume-with-changes``; run-only settings (``epochs``, ``max_steps``,
  ``device``, ``workers``, ...) may change freely. Which is which is declared with
  each setting (``option(resume=...)`` in ``train/config.py``).

While the run is open, SIGINT and SIGTERM set a flag instead of killing the
process; the training loop checks it after each optimiser step (and after each
epoch's checkpoint), writes ``last.pt`` at that step and raises
:class:`Interrupted`, which the command line reports in one line with exit code
130 (SIGINT) or 143 (SIGTERM). A second signal stops at once.
"""

from __future__ import annotations

import datetime as _dt
import errno
import functools
import json
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

CHECKPOINTS = ("last.pt", "best.pt", "base/last.pt", "base/best.pt")
LOCK_NAME = ".lock"
#: The settings of the run, written when it starts (``--resume`` of a run stopped before
#: its own ``last.pt`` reads them).
CONFIG_NAME = "config.json"

# What --resume does with each setting is declared with the setting (``option(resume=...)``
# in train/config.py); config.py imports torch, so the sets are read on first use, keeping
# this module light (the command line imports it before parsing).


@functools.lru_cache(maxsize=None)
def _resume_sets() -> Dict[str, frozenset]:
    from .config import resume_names

    return {
        # settings a resumed run may change without being asked: they say how long and
        # where to run, not what is trained
        "FREE_ON_RESUME": resume_names("free", "this-run"),
        # settings a resumed run can never change: the weights or the meaning of the
        # routing channels would no longer fit the checkpoint
        "FIXED_ON_RESUME": resume_names("fixed"),
    }


def __getattr__(name: str):
    if name in ("FREE_ON_RESUME", "FIXED_ON_RESUME"):  # rundir.FREE_ON_RESUME, read on first use
        return _resume_sets()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class RunDirError(ValueError):
    """A run folder that cannot be used as asked (reported as one line, exit 2)."""


class Interrupted(Exception):
    """Training stopped by SIGINT / SIGTERM after writing a resumable checkpoint."""

    def __init__(self, signum: int, epoch: int, step: int, out: Optional[Path]) -> None:
        self.signum, self.epoch, self.step, self.out = signum, epoch, step, out
        self.exit_code = 128 + int(signum)
        name = signal.Signals(signum).name
        where = (
            f"; continue with `deferredseg train --resume --out {out}`"
            if out is not None
            else " (no --out: nothing was saved)"
        )
        super().__init__(f"{name}: interrupted at epoch {epoch + 1}, step {step}{where}")


def default_run_dir(base: str = "runs") -> Path:
    """``runs/<date>-<time>``, a folder that does not exist yet (a suffix when needed)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(base) / stamp
    n = 1
    while path.exists():
        path = Path(base) / f"{stamp}-{n}"
        n += 1
    return path


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_lock(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _check_writable(out: Path) -> None:
    """Create ``out`` and write a small file in it; a clear error otherwise."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a folder; give a folder path")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(
            f"--out {out} cannot be created ({exc.strerror or exc}); "
            "choose a folder you can write to"
        ) from None
    probe = out / f".write-test-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        reason = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise RunDirError(
            f"--out {out} is not writable: {reason}; choose a folder you can write to"
        ) from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


def check_output_folder(out) -> Path:
    """``evaluate``'s check of its ``--out`` before anything is computed."""
    out = Path(out)
    _check_writable(out)
    return out


def _holds_run(out: Path) -> List[str]:
    """The checkpoints in ``out`` (a two-stage run's stage 1 too): what a new run would lose."""
    return [n for n in CHECKPOINTS if (out / n).exists()]


def _failed_attempt(out: Path) -> List[Path]:
    """The logs of a run that stopped before its first checkpoint (a retry may reuse out)."""
    return [p for p in (out / "log.jsonl", out / "base" / "log.jsonl") if p.is_file()]


def config_differences(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """``key: old -> new`` for every setting that differs (run-only settings left out)."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        if key in _resume_sets()["FREE_ON_RESUME"]:
            continue
        a, b = old.get(key), new.get(key)
        if a != b:
            diffs.append(key)
    return diffs


def _stored_config(last: Path) -> Dict[str, Any]:
    from .checkpoint import load_checkpoint

    return dict(load_checkpoint(last, map_location="cpu").get("config", {}))


def stored_run_config(out: Path) -> Dict[str, Any]:
    """The settings the run in ``out`` was started with, for ``--resume``: those of its
    ``last.pt``, or (a two-stage run stopped in stage 1, whose only checkpoint is the base
    segmentor's) those ``open_run`` wrote to ``config.json``."""
    last, saved = out / "last.pt", out / CONFIG_NAME
    if last.is_file():
        return _stored_config(last)
    if saved.is_file() and (out / "base" / "last.pt").is_file():
        try:
            return dict(json.loads(saved.read_text()))
        except (OSError, ValueError) as exc:
            raise RunDirError(f"--resume: cannot read {saved} ({exc})") from None
    raise RunDirError(
        f"--resume: no checkpoint {last} to continue from; train without --resume to "
        "start a new run"
    )


@dataclass
class RunDir:
    """An open run folder (``path`` None: a run that writes nothing)."""

    path: Optional[Path]
    is_main: bool = True
    notes: List[str] = field(default_factory=list)
    interrupted: Optional[int] = None  # the signal number, once one arrived
    _lock: Optional[Path] = None
    _old_handlers: Dict[int, Any] = field(default_factory=dict)

    # -- signals
    def _handler(self, signum, frame):  # noqa: ARG002
        if self.interrupted is not None:  # a second signal: stop now
            self.restore_signals()
            raise KeyboardInterrupt
        self.interrupted = signum

    def install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old_handlers[s] = signal.signal(s, self._handler)

    def restore_signals(self) -> None:
        for s, h in self._old_handlers.items():
            signal.signal(s, h)
        self._old_handlers.clear()

    def _any_rank_interrupted(self) -> bool:
        """Whether this process, or under torchrun any rank, got a signal (all ranks agree,
        so that they stop after the same step)."""
        flag = self.interrupted is not None
        import torch
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dev = (
                torch.device("cuda", torch.cuda.current_device())
                if dist.get_backend() == "nccl"
                else torch.device("cpu")
            )
            t = torch.tensor([1.0 if flag else 0.0], device=dev)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            return bool(t.item())
        return flag

    def check_interrupt(self, save, epoch: int, step: int) -> None:
        """Called by the loop at a step boundary (on every rank): ``save()`` then raise
        :class:`Interrupted` if a signal came."""
        if not self._any_rank_interrupted():
            return
        save()
        raise Interrupted(self.interrupted or signal.SIGTERM, epoch, step, self.path)

    # -- lock
    def _take_lock(self) -> None:
        assert self.path is not None
        lock = self.path / LOCK_NAME
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": _dt.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
        }
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = _read_lock(lock)
                pid, host = int(other.get("pid", -1) or -1), other.get("host", "?")
                if host == me["host"] and not _pid_alive(pid):
                    self.notes.append(
                        f"removed a stale lock of process {pid} on {host} "
                        f"(started {other.get('started', '?')})"
                    )
                    lock.unlink(missing_ok=True)
                    continue
                raise RunDirError(
                    f"--out {self.path} is in use by another training: process {pid} on host "
                    f"{host} (started {other.get('started', '?')}, lock file {lock}); wait for it "
                    f"to finish, or choose another --out (if that process is gone, delete the "
                    f"lock file)"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._lock = lock
            return
        raise RunDirError(f"--out {self.path}: cannot take the lock {lock}")

    def close(self) -> None:
        self.restore_signals()
        if self._lock is not None:
            try:
                if _read_lock(self._lock).get("pid") == os.getpid():
                    self._lock.unlink()
            except OSError:
                pass
            self._lock = None


def open_run(cfg, is_main: bool = True) -> RunDir:
    """Check and lock ``cfg.out`` for a training (see the module's docstring).

    ``cfg.out`` None leaves the run without a folder (the command line picks a
    default folder before calling the loop, so only library callers get this).
    """
    if cfg.out is None:
        run = RunDir(None, is_main)
        run.install_signals()
        return run
    out = Path(cfg.out)
    run = RunDir(out, is_main)
    resume = bool(getattr(cfg, "resume", False))
    overwrite = bool(getattr(cfg, "overwrite", False))
    if resume and overwrite:
        raise RunDirError(
            "--resume continues the run in --out and --overwrite moves it aside; give one of them"
        )
    if is_main:
        _check_writable(out)
        run._take_lock()
    try:
        existing = _holds_run(out)
        if resume:
            last, compare = out / "last.pt", cfg
            base_last = out / "base" / "last.pt"
            if (
                not last.exists()
                and getattr(cfg, "training", "joint") == "two-stage"
                and base_last.exists()
            ):
                # a two-stage run stopped in stage 1: its checkpoint is the base segmentor's
                from .two_stage import base_config

                last, compare = base_last, base_config(cfg)
            if not last.exists():
                raise RunDirError(
                    f"--resume: no checkpoint {last} to continue from; train "
                    "without --resume to start a new run"
                )
            _check_resume(compare, _stored_config(last), last)
        elif not existing and is_main and _failed_attempt(out):
            # an attempt that failed before its first checkpoint (bad data, say): nothing to
            # lose but its log, kept next to the new one
            for log in _failed_attempt(out):
                os.replace(log, log.with_name("log.failed.jsonl"))
            run.notes.append(
                f"{out} holds the log of an attempt that stopped before its first checkpoint: "
                "starting again (its log is kept as log.failed.jsonl)"
            )
        elif existing:
            if not overwrite:
                raise RunDirError(
                    f"--out {out} already holds a run ({', '.join(existing)}); give --resume "
                    f"to continue it, --overwrite to start again (the old run is moved aside, "
                    f"not deleted), or another --out"
                )
            if is_main:
                aside, dropped = _move_aside(out)
                if dropped:
                    run.notes.append(f"deleted the run kept before in {aside}")
                run.notes.append(f"moved the previous run in {out} to {aside}")
        if is_main:
            with open(out / CONFIG_NAME, "w") as f:
                json.dump(cfg.to_dict(), f, indent=1, default=str)
        run.install_signals()  # every rank: they stop together after the same step
    except BaseException:
        run.close()
        raise
    return run


def _move_aside(out: Path):
    """Move the run in ``out`` to ``<out>.old`` (one previous run is kept: an older one
    there is deleted); returns (that folder, whether an older run was deleted)."""
    import shutil

    aside = out.parent / f"{out.name}.old"
    dropped = aside.exists()
    if dropped:
        if aside.is_dir() and not aside.is_symlink():
            shutil.rmtree(aside)
        else:
            aside.unlink()
    aside.mkdir()
    for p in out.iterdir():
        if p.name != LOCK_NAME:
            os.replace(p, aside / p.name)
    return aside, dropped


def _check_resume(cfg, stored: Dict[str, Any], last: Path) -> None:
    new = cfg.to_dict()
    diffs = config_differences(stored, new)
    if not diffs:
        return
    lines = [f"  {k}: {stored.get(k)!r} -> {new.get(k)!r}" for k in diffs]
    fixed = [k for k in diffs if k in _resume_sets()["FIXED_ON_RESUME"]]
    if fixed:
        raise RunDirError(
            f"--resume: {last} was trained with other settings that cannot change in a resumed "
            f"run ({', '.join(fixed)}):\n"
            + "\n".join(lines)
            + "\nstart a new run with another --out (or --overwrite) instead"
        )
    if not getattr(cfg, "resume_with_changes", False):
        raise RunDirError(
            f"--resume: the settings differ from those {last} was trained with:\n"
            + "\n".join(lines)
            + "\ngive --resume-with-changes if you mean to continue with them"
        )
