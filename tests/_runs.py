"""Tiny training runs for the command-line tests: the arguments (defined once here), the
command line in this process, and the runs that several tests read, trained once.

``TINY`` is the synthetic default layout at its smallest; ``FILES`` the same model and
schedule for a folder of files (``--layout multirater --data ...``). Both train the
routing heads of a two-stage run for one epoch: a test that is about stage 2's epochs
gives ``--head-epochs`` itself, after ``*TINY`` (the last occurrence of an option wins).

The session fixtures of conftest.py (``two_stage_run``, ``joint_reference``) call
``train_once``: a run trained once per test session, in a folder of its own, that the
tests only read (they evaluate into their own ``tmp_path``, or copy it before changing
anything).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "--num-images",
    "12",
    "--image-size",
    "24",
    "--features",
    "4",
    "--batch-size",
    "4",
    "--progress",
    "false",
    "--backend",
    "reference",
    "--head-epochs",
    "1",
]
# a folder of files: TINY without the synthetic data's own options, one epoch
FILES = [*TINY[4:], "--epochs", "1"]

# The loop itself (joint training, stage 1 of a two-stage run) for the resume tests:
# 8 training images in micro-batches of 2, two per step: 2 steps per epoch, 10 steps in
# all (--max-steps ends the run inside epoch 5). One thread: float sums in the
# convolutions depend on the thread count, and a resumed run must match bit for bit.
STEPS = [
    "--epochs",
    "6",
    "--max-steps",
    "10",
    "--seed",
    "3",
    "--batch-size",
    "2",
    "--grad-accum",
    "2",
    *TINY[:6],  # TINY without its batch size
    *TINY[8:],
    "--training",
    "joint",
]


def run_main(args, capsys):
    """main() in this process: (exit code, stdout, stderr)."""
    from deferredseg.cli import main

    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse: --help exits 0, bad arguments exit 2
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def weights(path):
    """The model's state dict in a checkpoint."""
    from deferredseg.train.checkpoint import load_checkpoint

    return load_checkpoint(path)["model"]


@contextlib.contextmanager
def one_thread():
    """torch on one thread (see STEPS), the previous count restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_once(out: Path, args) -> tuple[Path, str, str]:
    """``deferredseg train --out OUT ARGS`` in this process, outside any test's capture:
    (the run folder, stdout, stderr). Fails loudly: a fixture's run must train."""
    from deferredseg.cli import main

    out_text, err_text = io.StringIO(), io.StringIO()
    torch.manual_seed(0)  # as the autouse fixture leaves it for a test
    with contextlib.redirect_stdout(out_text), contextlib.redirect_stderr(err_text):
        code = main(["train", "--out", str(out), *map(str, args)])
    assert code == 0, out_text.getvalue() + err_text.getvalue()
    return out, out_text.getvalue(), err_text.getvalue()
