"""Runs that never lose work, evaluation that cannot pair the model with the wrong experts,
configuration errors that name the key, the data users have, and what a user sees.

Each test runs the command line on tiny data in a temporary folder and checks the exit
code and the key words of the message.
"""

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from _runs import FILES, ROOT, STEPS, TINY, one_thread, run_main, weights
from PIL import Image

from deferredseg.cli import main
from deferredseg.train.checkpoint import load_checkpoint


def write(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".png"):
        Image.fromarray(arr.astype(np.uint8)).save(path)
    elif path.name.endswith(".npy"):
        np.save(path, arr)
    else:
        nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))
    return path


def make_set(
    root: Path,
    n=12,
    shape=(24, 24),
    ext=".png",
    raters=("r1", "r2", "r3"),
    fg=255,
    labels=False,
    sizes=None,
):
    """``n`` cases of a multirater set; rater masks 0/``fg``; ``sizes``: a shape per case."""
    for i in range(n):
        s = sizes[i] if sizes else shape
        rs = np.random.RandomState(i)
        img = rs.rand(*s) * 200
        truth = np.zeros(s, np.uint8)
        truth[tuple(slice(2, 2 + k // 2) for k in s)] = 1
        write(
            root / "images" / f"c{i:02d}{ext}",
            img.astype(np.uint8 if ext == ".png" else np.float32),
        )
        for j, r in enumerate(raters):
            m = truth.copy()
            m[tuple(np.random.RandomState(100 * i + j).randint(0, k) for k in s)] ^= 1
            write(root / "raters" / r / f"c{i:02d}{ext}", m * fg)
        if labels:
            write(root / "labels" / f"c{i:02d}{ext}", truth * fg)
    return root


# ============================================================================ 1. nothing is lost


def test_reused_out_is_refused_and_overwrite_moves_the_old_run_aside(tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()  # what a finished run leaves (the policy looks at the checkpoints' names)
    for name in ("best.pt", "last.pt", "log.jsonl"):
        (out / name).write_bytes(f"the earlier run's {name}".encode())
    before = (out / "best.pt").read_bytes()
    code, _, err = run_main(["train", "--out", out, "--epochs", "1", "--lr", "0.01", *TINY], capsys)
    assert code == 2 and "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert (out / "best.pt").read_bytes() == before  # untouched
    code, _, err = run_main(["train", "--out", out, "--overwrite", "--epochs", "1", *TINY], capsys)
    assert code == 0 and "moved the previous run" in err
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("r.old")]
    assert len(aside) == 1 and (aside[0] / "best.pt").read_bytes() == before
    assert (out / "best.pt").is_file() and not (out / ".lock").exists()
    second = (out / "best.pt").read_bytes()
    code, _, err = run_main(["train", "--out", out, "--overwrite", "--epochs", "1", *TINY], capsys)
    assert code == 0 and "deleted the run kept before" in err, err
    aside = [p.name for p in tmp_path.iterdir() if p.name.startswith("r.old")]
    assert aside == ["r.old"] and (tmp_path / "r.old" / "best.pt").read_bytes() == second


def test_an_attempt_that_failed_before_its_first_checkpoint_leaves_a_reusable_out(tmp_path, capsys):
    out = tmp_path / "r"
    (out / "base").mkdir(parents=True)  # what a run that failed on its data left behind
    (out / "log.jsonl").write_text('{"event": "stage", "stage": 1}\n')
    (out / "base" / "log.jsonl").write_text('{"event": "stage", "stage": 1}\n')
    args = ["train", "--out", out, "--training", "joint", "--max-steps", "1", *TINY]
    code, _, err = run_main(args, capsys)
    assert code == 0 and "stopped before its first checkpoint" in err, err
    assert (out / "log.failed.jsonl").is_file() and (out / "last.pt").is_file()
    assert '"stage"' not in (out / "log.jsonl").read_text()


def test_a_second_training_into_a_locked_out_fails_naming_the_first(tmp_path, capsys):
    """The lock of a training in progress (its content as a training writes it: see
    test_sigterm_in_process_exits_143_after_writing_last_pt), held by a live process."""
    out = tmp_path / "r"
    out.mkdir()
    (out / "log.jsonl").write_text('{"event": "stage", "stage": 1}\n')
    first = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        lock = {"pid": first.pid, "host": socket.gethostname(), "started": "2026-01-01T00:00:00"}
        (out / ".lock").write_text(json.dumps({**lock, "command": "deferredseg train"}))
        code, _, err = run_main(["train", "--out", out, "--epochs", "1", *TINY], capsys)
        assert code == 2 and "in use by another training" in err and f"process {first.pid}" in err
        code, _, err = run_main(
            ["train", "--out", out, "--overwrite", "--epochs", "1", *TINY], capsys
        )
        assert code == 2 and f"process {first.pid}" in err  # --overwrite does not break a lock
    finally:
        first.kill()  # SIGKILL: no chance to remove its lock
        first.wait()
    assert (out / ".lock").exists()
    code, _, err = run_main(["train", "--out", out, "--overwrite", "--epochs", "1", *TINY], capsys)
    assert code == 0 and "stale lock" in err and f"process {first.pid}" in err
    assert not (out / ".lock").exists()


def test_no_out_writes_a_new_default_run_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(["train", "--epochs", "1", *TINY], capsys)
    assert code == 0 and "writing the run to runs" in err
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "best.pt").is_file()


def test_unwritable_out_is_found_before_training(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_main(["train", "--out", blocker, "--epochs", "1", *TINY], capsys)
    assert code == 2 and "is a file" in err
    code, _, err = run_main(["train", "--out", blocker / "sub", "--epochs", "1", *TINY], capsys)
    assert code == 2 and "cannot be created" in err
    assert "epoch 1/1" not in capsys.readouterr().out
    code, _, err = run_main(
        ["evaluate", "--checkpoint", tmp_path / "no.pt", "--out", blocker], capsys
    )
    assert code == 2 and "is a file" in err  # checked before the checkpoint is even read
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        code, _, err = run_main(["train", "--out", ro, "--epochs", "1", *TINY], capsys)
        assert code == 2 and "not writable" in err


def test_a_full_disk_is_found_before_training(tmp_path, capsys, monkeypatch):
    import errno

    from deferredseg.train import rundir

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rundir.os, "fsync", full)
    code, out, err = run_main(["train", "--out", tmp_path / "r", "--epochs", "1", *TINY], capsys)
    assert code == 2 and "not writable: the disk is full" in err and "epoch 1/1" not in out
    assert list((tmp_path / "r").iterdir()) == []  # no probe, no lock left behind


@pytest.mark.slow
def test_sigint_writes_a_resumable_checkpoint_and_resume_is_bitwise_identical(
    tmp_path, joint_reference
):
    with one_thread():  # the same thread count in and out of this process (see STEPS)
        _interrupt_and_resume(joint_reference, tmp_path / "part")


def _interrupted_training(out, args, log):
    """``deferredseg train --out OUT ARGS`` in a child process, Ctrl-C (SIGINT) once ``log``
    records its first step: (return code, stdout, stderr)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "deferredseg", "train", "--out", str(out), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and '"event": "step"' in log.read_text():
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out_text, err = proc.communicate(timeout=300)
    return proc.returncode, out_text, err


def _interrupt_and_resume(full, part):
    code, out, err = _interrupted_training(part, STEPS, part / "log.jsonl")
    assert code == 130, out + err
    lines = [line for line in err.splitlines() if not line.startswith("note:")]
    assert len(lines) == 1 and "interrupted at epoch" in lines[0], err
    assert f"deferredseg train --resume --out {part}" in lines[0] and "Traceback" not in err
    ck = load_checkpoint(part / "last.pt")
    assert 1 <= ck["global_step"] < 10
    assert not (part / ".lock").exists()
    assert main(["train", "--out", str(part), "--resume", *STEPS]) == 0
    a, b = weights(full / "last.pt"), weights(part / "last.pt")
    assert load_checkpoint(part / "last.pt")["global_step"] == 10
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_the_printed_resume_command_works_as_printed(tmp_path, capsys):
    """Ctrl-C in stage 1 of a two-stage run on non-default settings, then exactly the
    command the message prints: every setting comes from the run, none from the defaults.
    Both in this process (SIGINT from a thread once stage 1 logged a step); the test above
    sends it to a child process."""
    out = tmp_path / "intr"
    # two-stage, no step limit, 4 steps an epoch
    args = ["--epochs", "4", "--seed", "3", *TINY[:6], "--batch-size", "2", *TINY[8:]]
    log = out / "base" / "log.jsonl"

    def ctrl_c():
        deadline = time.time() + 300
        while not (log.exists() and '"event": "step"' in log.read_text()):
            if time.time() > deadline:
                return
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=ctrl_c, daemon=True).start()
    code, _, err = run_main(["train", "--out", out, *args], capsys)
    assert code == 130, err
    printed = err.split("continue with `", 1)[1].split("`", 1)[0]
    assert printed == f"deferredseg train --resume --out {out}", err
    words = printed.split()
    assert words[0] == "deferredseg"  # the console script: deferredseg.cli:main
    code, _, err = run_main(words[1:], capsys)
    assert code == 0, err
    ck = load_checkpoint(out / "best.pt")
    assert ck["config"]["image_size"] == 24 and ck["config"]["features"] == 4
    assert ck["config"]["epochs"] == 4 and ck["config"]["training"] == "two-stage"
    assert load_checkpoint(out / "base" / "last.pt")["epoch"] == 4


@pytest.mark.slow
def test_sigterm_in_process_exits_143_after_writing_last_pt(tmp_path, capsys):
    out = tmp_path / "r"
    seen = {}

    def shoot():
        while not ((out / "log.jsonl").exists() and "step" in (out / "log.jsonl").read_text()):
            time.sleep(0.01)
        seen["lock"] = json.loads((out / ".lock").read_text())  # the training's own lock
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=shoot, daemon=True).start()
    code, _, err = run_main(["train", "--out", out, *STEPS], capsys)
    assert code == 143 and "SIGTERM: interrupted at epoch" in err, err
    assert seen["lock"]["pid"] == os.getpid() and seen["lock"]["host"] == socket.gethostname()
    assert load_checkpoint(out / "last.pt")["global_step"] >= 1
    assert not (out / ".lock").exists()  # given back
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers given back


def test_resume_with_changed_settings_is_refused_with_the_differences(tmp_path, capsys):
    out = tmp_path / "r"
    assert (
        run_main(["train", "--out", out, "--epochs", "2", "--max-steps", "1", *TINY], capsys)[0]
        == 0
    )
    code, _, err = run_main(
        ["train", "--out", out, "--resume", "--epochs", "2", "--lr", "0.01", *TINY], capsys
    )
    assert code == 2 and "settings differ" in err and "lr: 0.003 -> 0.01" in err
    assert "--resume-with-changes" in err
    code, _, err = run_main(
        [
            "train",
            "--out",
            out,
            "--resume",
            "--epochs",
            "2",
            "--features",
            "8",
            "--resume-with-changes",
            *TINY[:4],
            *TINY[6:],
        ],
        capsys,
    )
    assert code == 2 and "cannot change" in err and "features: 4 -> 8" in err
    code, _, _ = run_main(
        [
            "train",
            "--out",
            out,
            "--resume",
            "--epochs",
            "2",
            "--lr",
            "0.01",
            "--resume-with-changes",
            *TINY,
        ],
        capsys,
    )
    assert code == 0
    assert load_checkpoint(out / "last.pt")["config"]["lr"] == 0.01


def test_resume_refuses_rater_folders_that_changed_under_the_same_path(tmp_path, capsys):
    data = make_set(tmp_path / "d", raters=("a", "b"))
    out = tmp_path / "r"
    args = [
        "train",
        "--layout",
        "multirater",
        "--data",
        data,
        "--out",
        out,
        *FILES[:-2],
        "--epochs",
        "2",
        "--max-steps",
        "1",
    ]
    assert run_main(args, capsys)[0] == 0
    (data / "raters" / "b").rename(data / "raters" / "c")
    code, _, err = run_main(args + ["--resume"], capsys)
    assert code == 2 and "['a', 'b']" in err and "['a', 'c']" in err and "cannot change" in err


def test_checkpoints_are_group_readable(tmp_path):
    from deferredseg.train.checkpoint import save_checkpoint

    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "c.pt", {"model": {}})
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "c.pt").stat().st_mode)
    assert mode == 0o644, oct(mode)


# ============================================================================ 2. experts


def test_evaluate_maps_raters_by_name_or_refuses_renamed_ones(tmp_path, capsys, monkeypatch):
    data = make_set(tmp_path / "data", raters=("b", "c"), labels=True)
    monkeypatch.chdir(tmp_path)  # a relative --data, stored absolute
    out = tmp_path / "r"
    assert (
        run_main(
            [
                "train",
                "--layout",
                "multirater",
                "--data",
                "data",
                "--target",
                "label",
                "--out",
                out,
                *FILES,
            ],
            capsys,
        )[0]
        == 0
    )
    ck = load_checkpoint(out / "best.pt")
    assert ck["config"]["data"] == str(data) and ck["data_root"] == str(data)
    assert ck["expert_names"] == ["b", "c"] and len(ck["label_fingerprint"]) == 16
    monkeypatch.chdir(ROOT)  # evaluate from another folder finds the data
    assert (
        run_main(
            [
                "evaluate",
                "--checkpoint",
                out / "best.pt",
                "--out",
                tmp_path / "e0",
                "--no-figures",
                "--split",
                "all",
            ],
            capsys,
        )[0]
        == 0
    )
    ref = json.loads((tmp_path / "e0" / "metrics.json").read_text())

    # an extra rater "a" sorts first: by position it would become channel 0; by name it is left out
    more = tmp_path / "more"
    shutil.copytree(data, more)
    shutil.copytree(more / "raters" / "c", more / "raters" / "a")
    for p in (more / "raters" / "a").iterdir():
        write(p, 255 - np.asarray(Image.open(p)))
    code, _, err = run_main(
        [
            "evaluate",
            "--checkpoint",
            out / "best.pt",
            "--out",
            tmp_path / "e1",
            "--no-figures",
            "--split",
            "all",
            "--data",
            more,
        ],
        capsys,
    )
    assert code == 0 and "mapped by name" in err
    m = json.loads((tmp_path / "e1" / "metrics.json").read_text())
    assert m["expert_names"] == ["b", "c"]
    for k in ("system_dice", "model_dice", "deferral_rate", "expert_share"):
        assert m[k] == ref[k], k

    renamed = tmp_path / "renamed"
    shutil.copytree(data, renamed)
    (renamed / "raters" / "c").rename(renamed / "raters" / "d")
    code, _, err = run_main(
        [
            "evaluate",
            "--checkpoint",
            out / "best.pt",
            "--out",
            tmp_path / "e2",
            "--no-figures",
            "--data",
            renamed,
        ],
        capsys,
    )
    assert code == 2 and "['b', 'c']" in err and "['b', 'd']" in err and "wrong experts" in err
    assert not (tmp_path / "e2" / "metrics.json").exists()


def test_empty_and_small_splits(tmp_path, capsys):
    small = make_set(tmp_path / "small", n=3)
    code, _, err = run_main(
        ["train", "--layout", "multirater", "--data", small, "--out", tmp_path / "r0", *FILES],
        capsys,
    )
    assert code == 2 and "too small to split" in err and "train 3, val 0, test 0" in err
    data = make_set(tmp_path / "data", n=12)
    code, _, err = run_main(
        ["train", "--layout", "multirater", "--data", data, "--out", tmp_path / "r", *FILES], capsys
    )
    assert code == 0 and "few cases in the val and test split" in err
    code, _, err = run_main(
        [
            "evaluate",
            "--checkpoint",
            tmp_path / "r" / "best.pt",
            "--out",
            tmp_path / "e",
            "--data",
            small,
            "--no-figures",
        ],
        capsys,
    )
    assert code == 2 and "test split" in err and "is empty" in err and "--split" in err
    assert not (tmp_path / "e" / "metrics.json").exists()


# ============================================================================ 3. configuration


@pytest.mark.parametrize(
    "text,words",
    [
        ("epochs: two\n", ["epochs", "an integer", "'two'"]),
        ("lr: fast\n", ["lr", "a number", "'fast'"]),
        ("batch_size: '2'\n", ["batch_size", "an integer", "'2'"]),
        ("epochs: 1.5\n", ["epochs", "an integer", "1.5"]),
        ("spatial_size: 64\n", ["spatial_size", "a list of integers", "64"]),
        ("resume: 'no'\n", ["resume", "true or false", "'no'"]),
        ("epochs: [1, 2\n", ["c.yaml:2:1", "YAML syntax error"]),
        ("epochs: 2\n  lr: 3\n", ["c.yaml:2:5", "YAML syntax error"]),
    ],
)
def test_config_file_errors_name_the_key(tmp_path, capsys, text, words):
    (tmp_path / "c.yaml").write_text(text)
    code, _, err = run_main(["train", "--config", tmp_path / "c.yaml"], capsys)
    assert code == 2 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)


@pytest.mark.parametrize(
    "text,option,words",
    [
        ("epochs: 0\n", ["--epochs", "2"], ["c.yaml", "epochs must be >= 1", "--epochs"]),
        ("lr: fast\n", ["--lr", "0.1"], ["c.yaml", "lr", "a number", "'fast'", "--lr"]),
    ],
)
def test_config_file_values_are_checked_even_when_overridden(tmp_path, capsys, text, option, words):
    (tmp_path / "c.yaml").write_text(text)
    code, _, err = run_main(
        ["train", "--config", tmp_path / "c.yaml", *option, "--out", tmp_path / "r"], capsys
    )
    assert code == 2 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    assert not (tmp_path / "r").exists()


def test_config_values_converted_where_unambiguous(tmp_path):
    from deferredseg.cli import build_parser, config_from_args

    (tmp_path / "c.yaml").write_text(
        "lr: 1e-3\nweight_decay: 0\nspatial_size: [32, 32]\nresume: no\ntarget: 1\n"
    )
    cfg = config_from_args(
        build_parser().parse_args(["train", "--config", str(tmp_path / "c.yaml")])
    )
    assert cfg.lr == 0.001 and isinstance(cfg.lr, float) and cfg.weight_decay == 0.0
    assert cfg.spatial_size == [32, 32] and cfg.resume is False and cfg.target == 1
    (tmp_path / "c.json").write_text('{"epochs": 3,\n "lr": }')
    with pytest.raises(ValueError, match=r"c.json:2:8: JSON syntax error"):
        config_from_args(build_parser().parse_args(["train", "--config", str(tmp_path / "c.json")]))


def test_every_key_is_documented_with_its_type(capsys):
    import dataclasses

    from deferredseg.cli import HELP
    from deferredseg.train.config import TrainConfig

    _, out, _ = run_main(["train", "--help"], capsys)
    doc = (ROOT / "docs" / "configuration.md").read_text()
    for f in dataclasses.fields(TrainConfig):
        assert f.name in HELP, f"{f.name} has no help text"
        assert f"[{f.name}:" in out.replace("\n", " ").replace("  ", " ") or f"[{f.name}:" in out, (
            f.name
        )
        assert f"`{f.name}`" in doc, f"{f.name} is not in docs/configuration.md"


# ============================================================================ 4. data


def test_3d_nifti_takes_spatial_dims_from_the_files(tmp_path, capsys):
    data = make_set(tmp_path / "vol", n=8, shape=(16, 16, 16), ext=".nii.gz", fg=1)
    out = tmp_path / "r"
    code, _, err = run_main(
        ["train", "--layout", "multirater", "--data", data, "--out", out, *FILES], capsys
    )
    assert code == 0 and "3D" in err
    assert load_checkpoint(out / "best.pt")["config"]["spatial_dims"] == 3


def test_hd95_in_millimetres_from_the_nifti_header_or_spacing(tmp_path, capsys):
    from deferredseg.data import build_dataset

    data = make_set(tmp_path / "vol", n=8, shape=(16, 16, 8), ext=".nii.gz", fg=1)
    for f in data.rglob("*.nii.gz"):  # spacing 0.8 x 0.8 x 2.0 mm in every header
        img = nib.load(str(f))
        arr = np.asarray(img.dataobj)
        out = nib.Nifti1Image(arr, np.diag([0.8, 0.8, 2.0, 1.0]))
        out.header.set_xyzt_units("mm")
        nib.save(out, str(f))
    batch = build_dataset("multirater", data, split="all")[0]
    assert batch["spacing"].tolist() == pytest.approx([0.8, 0.8, 2.0])
    resized = build_dataset("multirater", data, split="all", spatial_size=(8, 8, 8))[0]
    assert resized["spacing"].tolist() == pytest.approx([1.6, 1.6, 2.0])
    png = make_set(tmp_path / "png", n=4)
    assert torch.isnan(build_dataset("multirater", png, split="all")[0]["spacing"]).all()
    given = build_dataset("multirater", png, split="all", spacing=(0.5, 0.5))[0]
    assert given["spacing"].tolist() == [0.5, 0.5]
    # end to end: metrics.json and the table say mm
    out = tmp_path / "r"
    args = ["train", "--layout", "multirater", "--data", data, "--out", out, *FILES]
    assert run_main([*args, "--training", "joint", "--max-steps", "1"], capsys)[0] == 0
    code, stdout, err = run_main(
        [
            "evaluate",
            "--checkpoint",
            out / "best.pt",
            "--out",
            out / "e",
            "--no-figures",
            "--split",
            "all",
        ],
        capsys,
    )
    assert code == 0, err
    m = json.loads((out / "e" / "metrics.json").read_text())
    assert m["hd95_unit"] == "mm" and "HD95 (mm)" in stdout
    code, stdout, err = run_main(
        [
            "evaluate",
            "--checkpoint",
            out / "best.pt",
            "--out",
            out / "e2",
            "--no-figures",
            "--split",
            "all",
            "--spacing",
            "1,1",
        ],
        capsys,
    )
    assert code == 2 and "--spacing" in err and "3D" in err, err


def test_cases_of_different_sizes_and_mixed_dimensions(tmp_path, capsys):
    sizes = [(24, 24)] * 10 + [(28, 20), (20, 28)]
    data = make_set(tmp_path / "var", sizes=sizes)
    code, _, err = run_main(
        ["train", "--layout", "multirater", "--data", data, "--out", tmp_path / "r", *FILES], capsys
    )
    assert code == 2 and "differ in size" in err and "--spatial-size" in err
    # the sizes with their case counts, the odd cases named
    assert "24x24: 10 cases; 20x28: 1 case (c11); 28x20: 1 case (c10)" in err, err
    code, _, _ = run_main(
        [
            "train",
            "--layout",
            "multirater",
            "--data",
            data,
            "--out",
            tmp_path / "r",
            "--spatial-size",
            "24,24",
            *FILES,
        ],
        capsys,
    )
    assert code == 0
    mixed = make_set(tmp_path / "mixed", n=12, ext=".npy", fg=1)
    for f in mixed.rglob("c05.npy"):
        write(f, np.zeros((8, 24, 24), np.float32 if "images" in str(f) else np.uint8))
    code, _, err = run_main(
        ["train", "--layout", "multirater", "--data", mixed, "--out", tmp_path / "m", *FILES],
        capsys,
    )
    assert code == 2 and "different dimensions" in err and "2D (e.g." in err and "3D (e.g." in err


def test_label_map_option(tmp_path, capsys):
    data = make_set(tmp_path / "d128", fg=128)
    code, _, err = run_main(
        ["train", "--layout", "multirater", "--data", data, "--out", tmp_path / "r0", *FILES],
        capsys,
    )
    assert code == 2 and "[128]" in err and "--label-map" in err
    code, _, _ = run_main(
        [
            "train",
            "--layout",
            "multirater",
            "--data",
            data,
            "--out",
            tmp_path / "r1",
            "--label-map",
            "0:0,128:1",
            *FILES,
        ],
        capsys,
    )
    assert code == 0
    assert load_checkpoint(tmp_path / "r1" / "best.pt")["config"]["label_map"] == "0:0,128:1"
    code, _, err = run_main(
        [
            "train",
            "--layout",
            "multirater",
            "--data",
            data,
            "--out",
            tmp_path / "r2",
            "--label-map",
            "0=0",
            *FILES,
        ],
        capsys,
    )
    assert code == 2 and "--label-map" in err and "0:0,128:1" in err


def test_target_by_index_or_name(tmp_path, capsys):
    data = make_set(tmp_path / "d")
    from deferredseg.train.builders import build_data
    from deferredseg.train.config import TrainConfig

    by_index = build_data(TrainConfig(layout="multirater", data=str(data), target="1"), "train")
    by_name = build_data(TrainConfig(layout="multirater", data=str(data), target="r2"), "train")
    assert torch.equal(by_index[0]["target"], by_name[0]["target"])
    assert torch.equal(by_index[0]["target"], by_index[0]["expert_labels"][1])
    code, _, _ = run_main(
        [
            "train",
            "--layout",
            "multirater",
            "--data",
            data,
            "--target",
            "2",
            "--out",
            tmp_path / "r",
            *FILES,
        ],
        capsys,
    )
    assert code == 0


def test_a_bad_file_in_the_test_split_is_found_before_training(tmp_path, capsys):
    from deferredseg.data.splits import split_ids

    data = make_set(tmp_path / "d")
    test_id = split_ids([f"c{i:02d}" for i in range(12)], seed=0)["test"][0]
    (data / "raters" / "r2" / f"{test_id}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    t0 = time.perf_counter()
    code, out, err = run_main(
        ["train", "--layout", "multirater", "--data", data, "--out", tmp_path / "r", *FILES], capsys
    )
    assert code == 2 and f"{test_id}.png" in err and "test split" in err and "cannot read" in err
    assert "epoch 1/1" not in out and not (tmp_path / "r" / "log.jsonl").exists()
    assert time.perf_counter() - t0 < 30


def test_the_contents_of_every_split_are_checked_before_step_one(tmp_path, capsys):
    """A colour rater mask, masks with values that are no labels and an image with NaN, in
    any split: one error before training, grouped by kind, naming every file."""
    from deferredseg.data.splits import split_ids

    data = make_set(tmp_path / "d", n=12, ext=".png")
    parts = split_ids([f"c{i:02d}" for i in range(12)], seed=0)
    test_id, val_id = parts["test"][0], parts["val"][0]
    colour = np.zeros((24, 24, 3), np.uint8)
    colour[2:8, 2:8] = (255, 0, 0)
    write(data / "raters" / "r2" / f"{test_id}.png", colour)
    for i in range(3):  # values 7: not a label of a binary task
        write(data / "raters" / "r1" / f"{parts['train'][i]}.png", np.full((24, 24), 7))
    code, out, err = run_main(
        ["train", "--layout", "multirater", "--data", data, "--out", tmp_path / "r", *FILES], capsys
    )
    assert code == 2 and "epoch 1/1" not in out and not (tmp_path / "r" / "last.pt").exists()
    assert f"{test_id}.png (case '{test_id}', test split): 3 channels that differ" in err, err
    assert "colour masks whose channels differ" in err and "(1 file)" in err
    assert "mask values that are not labels" in err and "(3 files)" in err
    for i in range(3):
        assert f"r1/{parts['train'][i]}.png" in err
    # NaN in a NIfTI image of the validation split
    nii = make_set(tmp_path / "n", n=12, ext=".nii.gz", shape=(12, 12, 6), fg=1)
    img = np.random.rand(12, 12, 6).astype(np.float32)
    img[0, 0, 0] = np.nan
    write(nii / "images" / f"{val_id}.nii.gz", img)
    code, _, err = run_main(
        ["train", "--layout", "multirater", "--data", nii, "--out", tmp_path / "n", *FILES], capsys
    )
    assert code == 2 and "NaN or infinite" in err and f"{val_id}.nii.gz" in err, err
    assert "val split" in err


def test_every_offending_file_is_named_up_to_twenty_per_kind(tmp_path):
    from deferredseg.data.scan import scan_dataset

    data = make_set(tmp_path / "d", n=30, fg=255)
    for i in range(25):
        write(data / "raters" / "r3" / f"c{i:02d}.png", np.full((24, 24), 9))
    with pytest.raises(ValueError) as exc:
        scan_dataset("multirater", data, workers=2)
    msg = str(exc.value)
    assert "(25 files)" in msg and "... and 5 more" in msg
    assert sum(f"r3/c{i:02d}.png" in msg for i in range(25)) == 20


def test_label_maps_per_folder(tmp_path, capsys):
    """Raters saved as 0/128, labels as 0/255: one map for the raters' folder only."""
    data = make_set(tmp_path / "d", fg=128, labels=True)
    for f in (data / "labels").iterdir():
        write(f, (np.asarray(Image.open(f)) > 0).astype(np.uint8) * 255)
    args = ["train", "--layout", "multirater", "--data", data, "--target", "label", *FILES]
    code, _, err = run_main([*args, "--out", tmp_path / "a", "--label-map", "0:0,128:1"], capsys)
    assert code == 2 and "labels/c00.png" in err and "[255]" in err, err
    code, _, err = run_main(
        [*args, "--out", tmp_path / "b", "--label-map", "raters:0:0,128:1"], capsys
    )
    assert code == 0, err
    from deferredseg.train.builders import build_data
    from deferredseg.train.config import TrainConfig

    ds = build_data(
        TrainConfig(
            layout="multirater",
            data=str(data),
            target="label",
            label_map="raters:0:0,128:1;labels:binary",
        ),
        "train",
    )
    assert set(ds[0]["expert_labels"].unique().tolist()) == {0, 1}
    assert set(ds[0]["target"].unique().tolist()) == {0, 1}
    code, _, err = run_main([*args, "--out", tmp_path / "c", "--label-map", "rates:0:0"], capsys)
    assert code == 2 and "unknown folder 'rates'" in err and "raters" in err


# ============================================================================ 5. what a user sees


def test_one_line_per_epoch_and_summary_tables(tmp_path, capsys, two_stage_run):
    out, text, _ = two_stage_run  # --epochs 2 --head-epochs 3
    lines = text.splitlines()
    assert lines[0] == f"seed 0: training into {out}"
    one = next(i for i, x in enumerate(lines) if x.startswith("stage 1 of 2: the base"))
    two = next(i for i, x in enumerate(lines) if x.startswith("stage 2 of 2: the routing"))
    sib = next(i for i, x in enumerate(lines) if x.startswith("stage 1, sibling 1 of 2"))
    stage1 = [x for x in lines[one:sib] if x.startswith("epoch ")]
    siblings = [x for x in lines[sib:two] if x.startswith("epoch ")]
    assert [x.split(":")[0] for x in siblings] == ["epoch 1/2", "epoch 2/2"] * 2
    stage2 = [x for x in lines[two:] if x.startswith("epoch ")]
    assert [x.split(":")[0] for x in stage1] == ["epoch 1/2", "epoch 2/2"]
    assert [x.split(":")[0] for x in stage2] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    for x in stage1:  # the segmentation loss alone: no routing terms, no deferral
        assert "(seg " in x and "val model Dice" in x
        for word in ("collab", "gate", "balance", "coherence", "deferral", "system Dice"):
            assert word not in x, x
    for x in stage2:  # the heads: the routing terms, not the frozen segmentation loss
        assert "collab" in x and "(seg" not in x and "val system Dice" in x and "deferral" in x
    assert "| system (model + experts) |" in text and f"run folder: {out}" in text
    # one epoch numbering: the console, best.pt, log.jsonl and metrics.json agree
    best = next(x for x in lines if x.startswith("best validation epoch "))
    epoch = int(best.split()[3].split("/")[0])
    assert best.startswith(f"best validation epoch {epoch}/3 of stage 2") and "seed 0" in best
    ck = load_checkpoint(out / "best.pt")
    assert ck["epoch"] == ck["val"]["epoch"] == epoch
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if r["event"] == "epoch"] == [0, 1, 2, 3]
    base = [json.loads(x) for x in (out / "base" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in base if r["event"] == "epoch"] == [1, 2]
    code, text, _ = run_main(
        ["evaluate", "--checkpoint", out / "best.pt", "--out", tmp_path / "e", "--no-hd95"], capsys
    )
    assert code == 0 and "| model alone |" in text and "workload per expert" in text
    assert "examples.png" in text and "metrics.json" in text
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["selection"]["val"]["epoch"] == epoch
    assert isinstance(m["expert_share"], dict) and list(m["expert_share"]) == m["expert_names"]


def _spy_on_figures(monkeypatch) -> dict:
    """The figure and axes the next figure of deferredseg.train.figures makes (kept open)."""
    from deferredseg.train import figures

    seen = {}
    real = figures._plt

    def spy():
        plt = real()
        orig = plt.subplots

        def subplots(*a, **k):
            seen["fig"], seen["axes"] = orig(*a, **k)
            return seen["fig"], seen["axes"]

        monkeypatch.setattr(plt, "subplots", subplots)
        monkeypatch.setattr(plt, "close", lambda fig: None)
        return plt

    monkeypatch.setattr(figures, "_plt", spy)
    return seen


def test_example_figure_names_cases_slices_experts_and_the_reference(tmp_path, monkeypatch):
    from deferredseg.train import figures

    seen = _spy_on_figures(monkeypatch)
    S = (6, 8, 8)
    ex = {
        "id": "vol_7",
        "image": torch.rand(1, *S),
        "target": torch.zeros(S, dtype=torch.long),
        "assignment": torch.randint(-1, 2, S, dtype=torch.int8),
        "final": torch.zeros(S, dtype=torch.long),
        "model_pred": torch.zeros(S, dtype=torch.long),
        "score": torch.rand(S),
    }
    paths = figures.save_examples(
        [ex], tmp_path / "ex.png", 1, ["alice", "bob"], figures.reference_name("staple")
    )
    assert paths[0].is_file()
    axes = seen["axes"]
    assert axes[0][1].get_title() == "STAPLE consensus"
    assert axes[0][0].get_ylabel() == "vol_7\nslice 3 of 6"
    legend = seen["fig"].legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["model", "alice", "bob"]


# ============================================================================ 6. the docs


def test_every_measured_number_in_the_docs_names_the_script_that_produced_it():
    """A section of README.md or docs/*.md that quotes a measured value (a number with
    four decimals, such as a Dice) names the script in benchmarks/ that produced it."""
    import re

    bad = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for section in re.split(r"\n(?=#{2,3} )", doc.read_text()):
            numbers = re.findall(r"(?<![\d.])\d\.\d{4}(?!\d)", section)
            if numbers and "benchmarks/" not in section:
                bad.append(f"{doc.name}: {section.splitlines()[0]!r} quotes {numbers[:3]}")
    assert not bad, "\n".join(bad)


def test_training_curves_have_a_row_per_stage_with_integer_epochs(tmp_path, monkeypatch):
    """Two-stage training: the base segmentor's log and the heads' log, one row each, the
    validation plotted against whole epochs."""
    import json as _json

    from deferredseg.train import figures

    def write(path, epochs):
        with open(path, "w") as f:
            for e in epochs:
                f.write(_json.dumps({"event": "step", "step": e + 1, "loss": 1.0 / (e + 1)}) + "\n")
                rec = {"event": "epoch", "epoch": e, "val_system_dice": 0.5 + 0.01 * e}
                f.write(_json.dumps(rec) + "\n")

    (tmp_path / "base").mkdir()
    write(tmp_path / "base" / "log.jsonl", [1, 2, 3])
    write(tmp_path / "log.jsonl", [0, 1, 2])
    seen = _spy_on_figures(monkeypatch)
    logs = [("stage 1", tmp_path / "base" / "log.jsonl"), ("stage 2", tmp_path / "log.jsonl")]
    paths = figures.plot_training_curves(logs, tmp_path / "curves.png")
    assert paths[0].is_file()
    axes = seen["axes"]
    assert axes.shape == (2, 2)
    assert axes[0][1].get_title() == "stage 1: validation"
    assert axes[1][1].get_title() == "stage 2: validation"
    ticks = [t for t in axes[1][1].get_xticks() if 0 <= t <= 2]
    assert ticks and all(float(t).is_integer() for t in ticks)  # no 0.5 epochs
