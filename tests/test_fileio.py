"""deferredseg.fileio: the one atomic writer of checkpoints, review state, manifests and outputs."""

import json
import os
import stat

import numpy as np
import pytest
import torch

from deferredseg.fileio import (
    TMP_MARK,
    atomic_open,
    atomic_save_npy,
    atomic_save_torch,
    atomic_write_bytes,
    atomic_write_json,
    file_fingerprint,
    remove_stale_temporaries,
)


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_each_writer_replaces_the_file_and_leaves_no_temporary(tmp_path):
    atomic_write_bytes(tmp_path / "sub" / "a.bin", b"\x00\x01")  # the folder is created
    assert (tmp_path / "sub" / "a.bin").read_bytes() == b"\x00\x01"
    atomic_write_bytes(tmp_path / "sub" / "a.bin", b"new")
    assert (tmp_path / "sub" / "a.bin").read_bytes() == b"new"
    value = {"b": [1, 2.5, None], "a": "x"}
    atomic_write_json(tmp_path / "v.json", value)
    assert (tmp_path / "v.json").read_text() == json.dumps(value, indent=2)
    arr = np.arange(12, dtype=np.int16).reshape(3, 4)[:, ::2]  # not contiguous
    atomic_save_npy(tmp_path / "m.npy", arr)
    assert np.array_equal(np.load(tmp_path / "m.npy", allow_pickle=False), arr)
    atomic_save_torch(tmp_path / "t.pt", {"w": torch.ones(3)})
    assert torch.equal(torch.load(tmp_path / "t.pt", weights_only=True)["w"], torch.ones(3))
    assert _names(tmp_path) == ["m.npy", "sub", "t.pt", "v.json"]
    assert _names(tmp_path / "sub") == ["a.bin"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    path = tmp_path / "report.json"
    atomic_write_json(path, {"old": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"new": object()})  # not JSON: fails halfway through
    assert json.loads(path.read_text()) == {"old": 1}
    with pytest.raises(RuntimeError, match="stop"):
        with atomic_open(path, text=True) as f:
            f.write("partial")
            raise RuntimeError("stop")
    assert json.loads(path.read_text()) == {"old": 1}
    assert _names(tmp_path) == ["report.json"]


def test_the_temporary_names_its_writer_and_the_file_follows_the_umask(tmp_path):
    path = tmp_path / "c.pt"
    old = os.umask(0o027)
    try:
        with atomic_open(path) as f:
            (tmp,) = [p for p in tmp_path.iterdir() if p.name != "c.pt"]
            assert tmp.name.startswith(f".c.pt{TMP_MARK}{os.getpid()}-")
            assert remove_stale_temporaries(tmp_path) == 0  # this process is alive: kept
            f.write(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert _names(tmp_path) == ["c.pt"]


def test_file_fingerprint_changes_with_the_content(tmp_path):
    path = tmp_path / "a.npy"
    atomic_save_npy(path, np.zeros(3))
    first = file_fingerprint(path)
    assert first == file_fingerprint(str(path))
    atomic_save_npy(path, np.zeros(5))
    assert file_fingerprint(path) != first
