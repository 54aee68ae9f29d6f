"""Data layouts (synthetic, multirater, medsam-npy), splits, and clear errors for bad data."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from deferredseg.data import build_dataloader, build_dataset, split_ids
from deferredseg.experts import majority_vote, staple


def write(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name
    if name.endswith(".png"):
        Image.fromarray(arr.astype(np.uint8)).save(path)
    elif name.endswith(".npy"):
        np.save(path, arr)
    elif name.endswith(".nii.gz"):
        nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))
    else:
        raise AssertionError(name)
    return path


def blob(shape, seed, value=1):
    """A random box of label ``value`` in a zero array of ``shape``."""
    rs = np.random.RandomState(seed)
    m = np.zeros(shape, np.uint8)
    sl = tuple(
        slice(int(a), int(a) + int(b))
        for a, b in zip(
            rs.randint(1, [s // 3 for s in shape]), rs.randint(2, [s // 2 for s in shape])
        )
    )
    m[sl] = value
    return m


def make_multirater(
    root: Path, ext: str, shape, n=4, raters=("r1", "r2", "r3"), labels=False, channels=None, fg=1
):
    for i in range(n):
        cid = f"case{i}"
        img = np.random.RandomState(i).rand(*shape) * 200
        if channels:
            img = np.stack([img] * channels, axis=-1)
        write(
            root / "images" / f"{cid}{ext}", img.astype(np.uint8 if ext == ".png" else np.float32)
        )
        truth = blob(shape, i)
        for j, r in enumerate(raters):
            m = truth.copy()
            m[tuple(np.random.RandomState(100 * i + j).randint(0, s) for s in shape)] ^= (
                1  # one disagreement
            )
            write(root / "raters" / r / f"{cid}{ext}", m * fg)
        if labels:
            write(root / "labels" / f"{cid}{ext}", truth * fg)
    return root


def one_batch(ds, batch_size=2):
    return next(iter(build_dataloader(ds, batch_size=batch_size, shuffle=False)))


def check_batch(b, B, C, S, E, num_labels):
    assert b["image"].shape == (B, C) + tuple(S) and b["image"].dtype == torch.float32
    assert b["target"].shape == (B,) + tuple(S) and b["target"].dtype == torch.int64
    assert b["expert_labels"].shape == (B, E) + tuple(S) and b["expert_labels"].dtype == torch.int64
    assert type(b["image"]) is torch.Tensor  # plain tensors, not MONAI MetaTensors
    assert 0 <= int(b["target"].min()) and int(b["target"].max()) < num_labels
    assert 0 <= int(b["expert_labels"].min()) and int(b["expert_labels"].max()) < num_labels
    assert 0.0 <= float(b["image"].min()) and float(b["image"].max()) <= 1.0


# --- synthetic ---------------------------------------------------------------------------------


def test_synthetic_default_2d_and_3d():
    ds = build_dataset(num_images=6, image_size=32)  # the default layout: no files needed
    assert (
        ds.info.layout == "synthetic" and ds.info.num_experts == 5 and len(ds) == len(ds.info.ids)
    )
    check_batch(one_batch(ds), 2, 1, (32, 32), 5, 2)
    ds3 = build_dataset(
        "synthetic",
        split="all",
        num_classes=3,
        spatial_dims=3,
        image_size=(16, 18, 20),
        num_images=2,
        experts="complementary",
        target="staple",
    )
    b = one_batch(ds3)
    check_batch(b, 2, 1, (16, 18, 20), 5, 3)
    assert torch.equal(b["target"], staple(b["expert_labels"], 3).labels)


def test_synthetic_is_reproducible_and_experts_fixed_or_resampled():
    a = one_batch(build_dataset(num_images=6, image_size=32, seed=3, split="all"))
    b = one_batch(build_dataset(num_images=6, image_size=32, seed=3, split="all"))
    c = one_batch(build_dataset(num_images=6, image_size=32, seed=4, split="all"))
    for k in ("image", "target", "expert_labels"):
        assert torch.equal(a[k], b[k])
    assert not torch.equal(a["image"], c["image"])
    fixed = build_dataset(num_images=4, image_size=32, split="all", experts="same-accuracy")
    assert torch.equal(fixed[0]["expert_labels"], fixed[0]["expert_labels"])  # fixed per image
    resampled = build_dataset(
        num_images=4, image_size=32, split="all", experts="same-accuracy", resample_experts=True
    )
    first, second = resampled[0]["expert_labels"], resampled[0]["expert_labels"]
    assert not torch.equal(first, second)  # new expert labels at every access
    assert torch.equal(resampled[0]["target"], fixed[0]["target"])


def test_workers_cache_and_pickling():
    import pickle

    fixed = build_dataset(num_images=4, image_size=32, split="all", experts="same-accuracy")
    serial = [b["expert_labels"] for b in build_dataloader(fixed, batch_size=2, shuffle=False)]
    workers = [
        b["expert_labels"]
        for b in build_dataloader(fixed, batch_size=2, shuffle=False, num_workers=2)
    ]
    assert all(
        torch.equal(a, b) for a, b in zip(serial, workers)
    )  # fixed experts do not depend on workers
    cached = build_dataset(
        num_images=4, image_size=32, split="all", experts="same-accuracy", cache=True
    )
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            serial,
            (b["expert_labels"] for b in build_dataloader(cached, batch_size=2, shuffle=False)),
        )
    )
    assert (
        len(pickle.loads(pickle.dumps(fixed))) == 4
    )  # spawn-started workers need a picklable dataset


# --- multirater ---------------------------------------------------------------------------------


def test_multirater_png_2d_binary_0_255(tmp_path):
    root = make_multirater(tmp_path / "ds", ".png", (20, 24), channels=3, fg=255)
    ds = build_dataset("multirater", root, split="all")
    assert ds.info.expert_names == ("r1", "r2", "r3") and ds.info.target == "majority"
    b = one_batch(ds, 4)
    check_batch(b, 4, 3, (20, 24), 3, 2)
    assert set(b["expert_labels"].unique().tolist()) == {0, 1}  # 0/255 masks read as 0/1
    assert torch.equal(b["target"], majority_vote(b["expert_labels"], 2))
    raw = np.asarray(Image.open(root / "raters" / "r2" / f"{b['id'][1]}.png"))
    assert np.array_equal(
        b["expert_labels"][1, 1].numpy(), raw // 255
    )  # PNG orientation kept (H, W)
    one = build_dataset("multirater", root, split="all", target="r2", raters=["r3", "r1"])
    b1 = one_batch(one, 4)
    assert one.info.expert_names == ("r3", "r1")
    assert torch.equal(b1["target"], b["expert_labels"][:, 1])
    assert torch.equal(b1["expert_labels"], b["expert_labels"][:, [2, 0]])
    st = one_batch(build_dataset("multirater", root, split="all", target="staple"), 4)
    assert torch.equal(st["target"], staple(b["expert_labels"], 2).labels)


@pytest.mark.parametrize("ext", [".npy", ".nii.gz"])
def test_multirater_3d_with_labels(tmp_path, ext):
    root = make_multirater(tmp_path / "ds", ext, (10, 12, 8), n=3, raters=("a", "b"), labels=True)
    ds = build_dataset("multirater", root, split="all", target="label")
    b = one_batch(ds, 3)
    check_batch(b, 3, 1, (10, 12, 8), 2, 2)
    truth = np.stack([blob((10, 12, 8), i) for i in range(3)])
    assert np.array_equal(b["target"].numpy(), truth)
    resized = one_batch(build_dataset("multirater", root, split="all", spatial_size=(8, 8, 8)), 3)
    check_batch(resized, 3, 1, (8, 8, 8), 2, 2)


def test_multirater_nifti_2d_and_mixed_extensions(tmp_path):
    root = make_multirater(tmp_path / "ds", ".nii.gz", (16, 14), n=2)
    (root / "raters" / "r1" / "case0.nii.gz").unlink()
    write(root / "raters" / "r1" / "case0.npy", blob((16, 14), 0))
    check_batch(one_batch(build_dataset("multirater", root, split="all")), 2, 1, (16, 14), 3, 2)


def test_label_map_encodings(tmp_path):
    root = tmp_path / "ds"
    for i in range(2):
        write(root / "images" / f"c{i}.png", np.full((8, 8), 40 * i, np.uint8))
        m = np.zeros((8, 8), np.uint8)
        m[2:5, 2:5], m[5:7, 5:7] = 128, 255
        for r in ("x", "y"):
            write(root / "raters" / r / f"c{i}.png", m)
    ds = build_dataset(
        "multirater", root, split="all", num_classes=3, label_map={0: 0, 128: 1, 255: 2}
    )
    b = one_batch(ds)
    assert b["target"][0, 3, 3] == 1 and b["target"][0, 6, 6] == 2 and b["target"][0, 0, 0] == 0
    binary = one_batch(build_dataset("multirater", root, split="all", label_map="binary"))
    assert binary["target"][0, 3, 3] == 1 and binary["target"][0, 6, 6] == 1
    with pytest.raises(ValueError, match=r"c0\.png.*out of range"):
        build_dataset("multirater", root, split="all", num_classes=2)[0]  # 128 is no binary label
    with pytest.raises(ValueError, match=r"c0\.png.*not in label_map"):
        build_dataset("multirater", root, split="all", num_classes=3, label_map={0: 0, 255: 1})[0]


# --- medsam-npy ----------------------------------------------------------------------------------


def test_medsam_npy_layout(tmp_path):
    root = tmp_path / "medsam"
    for i in range(5):
        write(
            root / "imgs" / f"CT_{i}.npy",
            np.random.RandomState(i).rand(24, 24, 3).astype(np.float32),
        )
        gt = blob((24, 24), i, value=1 + i % 3)  # organ ids as in MedSAM's gts
        write(root / "gts" / f"CT_{i}.npy", gt)
    ds = build_dataset("medsam-npy", root, split="all", num_classes=4)
    assert ds.info.expert_names == ("same-accuracy-0", "same-accuracy-1", "same-accuracy-2")
    check_batch(one_batch(ds, 5), 5, 3, (24, 24), 3, 4)
    binary = build_dataset(
        "medsam-npy", root, split="train", label_map="binary", experts="complementary", seed=1
    )
    b = one_batch(binary)
    check_batch(b, 2, 3, (24, 24), 5, 2)
    assert len(binary) == 3  # 5 cases: 3 train, 1 val, 1 test
    img = np.load(root / "imgs" / f"{b['id'][0]}.npy")
    assert np.allclose(
        b["image"][0].numpy(),
        np.moveaxis((img - img.min()) / (img.max() - img.min()), -1, 0),
        atol=1e-6,
    )


# --- splits ---------------------------------------------------------------------------------------


def test_seeded_split_and_split_file(tmp_path):
    ids = [f"id{i:02d}" for i in range(20)]
    s = split_ids(ids, (0.6, 0.2, 0.2), seed=7)
    assert [len(s[k]) for k in ("train", "val", "test")] == [12, 4, 4]
    assert sorted(s["train"] + s["val"] + s["test"]) == ids
    assert s == split_ids(
        list(reversed(ids)), (0.6, 0.2, 0.2), seed=7
    )  # listing order does not matter
    assert s != split_ids(ids, (0.6, 0.2, 0.2), seed=8)
    parts = {
        k: build_dataset(num_images=10, image_size=32, split=k).info.ids
        for k in ("train", "val", "test")
    }
    assert sum(len(v) for v in parts.values()) == 10 and not set(parts["train"]) & set(
        parts["test"]
    )
    f = tmp_path / "split.json"
    f.write_text(
        json.dumps({"train": ["case_0001", "case_0003"], "validation": ["case_0000"], "test": []})
    )
    assert build_dataset(num_images=5, image_size=32, split="train", split_file=f).info.ids == (
        "case_0001",
        "case_0003",
    )
    assert build_dataset(num_images=5, image_size=32, split="val", split_file=f).info.ids == (
        "case_0000",
    )
    f.write_text(json.dumps({"train": ["case_0001", "nope"]}))
    with pytest.raises(ValueError, match=r"split\.json.*'nope'"):
        build_dataset(num_images=5, image_size=32, split_file=f)
    f.write_text("{not json")
    with pytest.raises(ValueError, match=r"split\.json.*JSON"):
        build_dataset(num_images=5, image_size=32, split_file=f)
    with pytest.raises(FileNotFoundError, match="absent.json"):
        build_dataset(num_images=5, image_size=32, split_file=tmp_path / "absent.json")


# --- bad data -----------------------------------------------------------------------------------


def _multirater(tmp_path, ext=".npy", **kw):
    return make_multirater(tmp_path / "ds", ext, (8, 8), n=2, **kw)


def test_error_missing_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_dataset("multirater", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/images"):
        build_dataset("multirater", tmp_path / "empty")
    root = _multirater(tmp_path)
    for r in ("r1", "r2", "r3"):
        for p in (root / "raters" / r).iterdir():
            p.unlink()
        (root / "raters" / r).rmdir()
    with pytest.raises(FileNotFoundError, match=r"ds/raters"):
        build_dataset("multirater", root)
    (tmp_path / "m" / "imgs").mkdir(parents=True)
    write(tmp_path / "m" / "imgs" / "a.npy", np.zeros((4, 4)))
    with pytest.raises(FileNotFoundError, match=r"m/gts"):
        build_dataset("medsam-npy", tmp_path / "m")


def test_error_unmatched_file_names(tmp_path):
    root = _multirater(tmp_path)
    (root / "raters" / "r2" / "case1.npy").unlink()
    with pytest.raises(ValueError, match=r"raters/r2/case1"):
        build_dataset("multirater", root)
    write(root / "raters" / "r2" / "case1.npy", blob((8, 8), 1))
    write(root / "raters" / "r3" / "stray.npy", blob((8, 8), 1))
    with pytest.raises(ValueError, match=r"raters/r3/stray\.npy matches no file"):
        build_dataset("multirater", root)
    (root / "raters" / "r3" / "stray.npy").unlink()
    (root / "raters" / "r3" / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.txt: unsupported"):
        build_dataset("multirater", root)
    (root / "raters" / "r3" / "notes.txt").unlink()
    write(root / "labels" / "case0.npy", blob((8, 8), 0))
    with pytest.raises(ValueError, match=r"labels.*case1"):
        build_dataset("multirater", root)
    m = tmp_path / "medsam"
    write(m / "imgs" / "a.npy", np.zeros((4, 4)))
    write(m / "gts" / "b.npy", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"gts.*a"):
        build_dataset("medsam-npy", m)


def test_error_unreadable_files(tmp_path):
    root = _multirater(tmp_path, ext=".png")
    bad = root / "raters" / "r1" / "case0.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(
        ValueError, match=r"cannot read rater 'r1' label .*raters/r1/case0\.png.*PNG"
    ):
        build_dataset("multirater", root, split="all")[0]
    root2 = _multirater(tmp_path / "two")
    pickled = root2 / "images" / "case0.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"images/case0\.npy.*without pickling"):
        build_dataset("multirater", root2, split="all")[0]
    root3 = _multirater(tmp_path / "three", ext=".nii.gz")
    (root3 / "images" / "case1.nii.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(ValueError, match=r"images/case1\.nii\.gz"):
        build_dataset("multirater", root3, split="all")[1]
    with pytest.raises(ValueError, match=r"images/case1\.nii\.gz"):  # read while caching
        build_dataset("multirater", root3, split="all", cache=True)


def test_error_shape_mismatches(tmp_path):
    root = _multirater(tmp_path)
    write(root / "raters" / "r3" / "case1.npy", np.zeros((8, 9), np.uint8))
    with pytest.raises(
        ValueError, match=r"shape mismatch: rater 'r3' label .*raters/r3/case1\.npy.*\(8, 9\)"
    ):
        build_dataset("multirater", root, split="all")[1]
    root2 = _multirater(tmp_path / "two")
    write(root2 / "images" / "case0.npy", np.zeros((7, 8), np.float32))
    with pytest.raises(ValueError, match=r"shape mismatch: image .*images/case0\.npy.*\(7, 8\)"):
        build_dataset("multirater", root2, split="all")[0]


def test_error_label_values(tmp_path):
    root = _multirater(tmp_path)
    m = blob((8, 8), 0)
    m[0, 0] = 3
    write(root / "raters" / "r1" / "case0.npy", m)
    with pytest.raises(ValueError, match=r"raters/r1/case0\.npy: label values \[3\] out of range"):
        build_dataset("multirater", root, split="all")[0]
    write(root / "raters" / "r1" / "case0.npy", np.full((8, 8), 0.5, np.float32))
    with pytest.raises(ValueError, match=r"raters/r1/case0\.npy: label values must be integers"):
        build_dataset("multirater", root, split="all")[0]
    m = tmp_path / "medsam"
    write(m / "imgs" / "a.npy", np.zeros((6, 6, 3), np.float32))
    write(m / "gts" / "a.npy", np.full((6, 6), 7, np.uint8))
    with pytest.raises(ValueError, match=r"gts/a\.npy: label values \[7\] out of range"):
        build_dataset("medsam-npy", m, split="all")[0]


def test_error_arguments(tmp_path):
    with pytest.raises(ValueError, match="layout"):
        build_dataset("folders")
    with pytest.raises(ValueError, match="needs root"):
        build_dataset("multirater")
    root = _multirater(tmp_path)
    with pytest.raises(ValueError, match="target"):
        build_dataset("multirater", root, target="nobody")
    with pytest.raises(ValueError, match="labels"):
        build_dataset("multirater", root, target="label")
    with pytest.raises(ValueError, match=r"raters \['zz'\]"):
        build_dataset("multirater", root, raters=["zz"])
    with pytest.raises(ValueError, match="raters="):
        build_dataset("multirater", root, experts="structured")


def test_the_public_names_resolve_and_the_layout_registry_needs_no_monai():
    """deferredseg.data imports its names on first use: each resolves (the old homes in
    data.datasets too), and the layout registry, read by the command line, loads
    without MONAI or torch."""
    import subprocess
    import sys

    import deferredseg.data as data
    from deferredseg.data import datasets, folders, synthetic

    for name in data.__all__:
        assert getattr(data, name) is not None, name
    assert datasets.scan_multirater is folders.scan_multirater
    assert datasets.synthetic_case is synthetic.synthetic_case
    assert datasets.LAYOUTS is data.LAYOUTS
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        data.nothing  # noqa: B018
    code = (
        "import sys\n"
        "from deferredseg.data.layouts import LAYOUTS\n"
        "print(LAYOUTS, 'monai' in sys.modules, 'torch' in sys.modules)\n"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("False False"), proc.stdout
