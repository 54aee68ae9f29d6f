"""The real-anatomy benchmark (deferredseg.data.anatomy): seeded cases, splits that keep
neighbours apart, readers right inside their competence and wrong outside it, and the
written data set loading through the multirater layout in 2D and 3D."""

import json
import sys

import numpy as np
import pytest
import torch

from deferredseg.data import anatomy as A
from deferredseg.data import build_dataset

# one slab per region of interest: cortex only, thalamus and putamen, cerebellum
IDS = ("axial-130", "coronal-125", "coronal-074", "sagittal-118")


@pytest.fixture(scope="module")
def cases():
    return [A.anatomy_case(i) for i in IDS]


def test_cases_are_seeded_and_typed(cases):
    c = cases[0]
    again = A.anatomy_case(IDS[0])
    assert np.array_equal(c.image, again.image) and c.effects == again.effects
    other = A.anatomy_case(IDS[0], seed=1)
    assert not np.array_equal(c.image, other.image)  # new scanner effects ...
    assert np.array_equal(c.label, other.label)  # ... of the same anatomy
    assert c.image.shape == (1, 96, 96) and c.image.dtype == np.float32
    assert c.label.shape == (96, 96) and c.label.dtype == np.int64
    assert set(np.unique(c.label)) == {0, 1}
    assert np.isfinite(c.image).all()
    assert np.array_equal(c.label, (c.gm > 0.5).astype(np.int64))
    for k in ("gamma", "bias", "blur_px", "thick_slices", "noise", "rician"):
        assert k in c.effects


def test_regions_are_where_the_anatomy_is(cases):
    present = {cid: set(np.unique(c.regions[c.label > 0]).tolist()) for cid, c in zip(IDS, cases)}
    assert present["axial-130"] == {1}  # z = 58.5 mm: cortex only
    assert 2 in present["coronal-125"] or 2 in present["sagittal-118"]  # deep nuclei
    assert 3 in present["coronal-074"]  # cerebellum at y = -59.5 mm
    depth = {
        cid: set(np.unique(A.case_regions("depth", c)[c.label > 0]).tolist())
        for cid, c in zip(IDS, cases)
    }
    assert depth["coronal-125"] == {1, 2}  # outer and inner grey matter
    assert depth["coronal-074"] == {1, 2, 3}


def test_split_blocks_are_disjoint_with_a_gap():
    split = A.anatomy_split(seed=0, dims=2, num_cases=60, block_mm=12, gap_mm=4)
    assert [len(split[s]) for s in ("train", "val", "test")] == [36, 12, 12]
    where = {}
    for s, ids in split.items():
        for cid in ids:
            o, _, p = cid.rpartition("-")
            where[(o, int(p))] = s
    for (o, p), s in where.items():
        for (o2, q), s2 in where.items():
            if o == o2 and s != s2:
                # slab p covers planes [p, p + 2): at least 4 unused planes between splits
                assert abs(p - q) >= 2 + 4, (o, p, q)
    assert A.anatomy_split(seed=0, dims=2, num_cases=60) == split  # seeded
    assert A.anatomy_split(seed=1, dims=2, num_cases=60) != split


def test_3d_cases_are_seeded_and_typed():
    first = list(A.anatomy_cases(seed=0, dims=3, num_cases=5, size=16))
    again = list(A.anatomy_cases(seed=0, dims=3, num_cases=5, size=16))
    assert [s for s, _ in first] == ["train", "train", "train", "val", "test"]
    for (_, a), (_, b) in zip(first, again):
        assert a.id == b.id and np.array_equal(a.image, b.image)
        assert a.image.shape == (1, 16, 16, 16) and a.image.dtype == np.float32
        assert a.label.shape == (16, 16, 16) and a.label.dtype == np.int64
        assert a.label.mean() >= 0.05  # every crop holds grey matter
        assert np.allclose(np.diag(a.affine)[:3], 2.0)  # 2 mm voxels
    other = list(A.anatomy_cases(seed=1, dims=3, num_cases=5, size=16))
    assert [c.id for _, c in other] == [c.id for _, c in first]
    assert not np.array_equal(other[0][1].image, first[0][1].image)


def test_3d_crops_of_different_splits_lie_apart():
    plan = A._plan(0, 3, 15, 24, 12, 4, (0.6, 0.2, 0.2), A.ORIENTATIONS)
    boxes = {s: [np.asarray(c) for _, _, c in v] for s, v in plan.items()}
    assert [len(boxes[s]) for s in ("train", "val", "test")] == [9, 3, 3]
    for s, bs in boxes.items():
        for s2, bs2 in boxes.items():
            if s == s2:
                continue
            for a in bs:
                for b in bs2:
                    # separated along some axis by at least 2 voxels (4 mm)
                    gap = np.maximum(b - (a + 24), a - (b + 24)).max()
                    assert gap >= 2, (s, s2, a, b)


def test_each_reader_is_right_inside_its_competence_and_wrong_outside(cases):
    regions = A.anatomy_panel_labels
    wrong_outside = {}
    for c in cases:
        lab = regions("regions", c)
        assert lab.shape == (3, 96, 96) and lab.dtype == np.int64
        for j, code in enumerate((1, 2, 3)):  # cortex, deep, cerebellum
            inside = c.regions == code
            assert np.array_equal(lab[j][inside], c.label[inside])
            wrong_outside[j] = wrong_outside.get(j, 0) + int((lab[j] != c.label)[~inside].sum())
        dp = regions("depth", c)
        codes = A.case_regions("depth", c)
        assert set(np.unique(codes)) <= {1, 2, 3}
        assert np.array_equal(codes == 3, c.regions == 3)  # one cerebellum for both panels
        for j, code in enumerate((1, 2, 3)):  # outer, inner, cerebellum
            inside = codes == code
            assert np.array_equal(dp[j][inside], c.label[inside])
            key = 20 + j
            wrong_outside[key] = wrong_outside.get(key, 0) + int((dp[j] != c.label)[~inside].sum())
        th = regions("thickness", c)
        assert th.shape == (4, 96, 96)
        assert np.array_equal(th[0][~c.thick], c.label[~c.thick])  # thin-structure reader
        assert np.array_equal(th[1][c.thick], c.label[c.thick])  # thick-structure reader
        pure = (c.gm <= 0.3) | (c.gm > 0.7)
        assert np.array_equal(th[2][pure], c.label[pure])  # the boundary readers
        assert np.array_equal(th[3][pure], c.label[pure])
        for j in range(4):
            wrong_outside[10 + j] = wrong_outside.get(10 + j, 0) + int((th[j] != c.label).sum())
    assert all(v > 0 for v in wrong_outside.values()), wrong_outside


@pytest.mark.parametrize("panel", A.ANATOMY_PANELS)
def test_no_reader_is_best_everywhere(cases, panel):
    labels = np.stack([c.label for c in cases])
    readers = np.stack([A.anatomy_panel_labels(panel, c) for c in cases])
    regions = np.stack([A.case_regions(panel, c) for c in cases])
    table = A.region_dice(labels, readers, regions, A.REGION_CODES[panel])
    for j in range(readers.shape[1]):
        if panel == "thickness" and j >= 2:
            continue  # the boundary readers are right where the tissue is pure (tested above)
        beaten = [r for r, row in table.items() if row[str(j)] < max(v for v in row.values() if v)]
        assert beaten, (panel, j, table)


@pytest.mark.parametrize("dims", [2, 3])
def test_written_benchmark_loads_through_the_multirater_layout(tmp_path, dims):
    root = tmp_path / f"d{dims}"
    size = 48 if dims == 2 else 16
    summary = A.write_anatomy_benchmark(root, "regions", seed=0, dims=dims, num_cases=10, size=size)
    assert summary["split_sizes"] == {"train": 6, "val": 2, "test": 2}
    assert summary["experts"] == A.anatomy_panel_names("regions")
    on_disk = json.loads((root / "benchmark.json").read_text())
    for key in ("expert_dice", "best_expert", "best_expert_dice", "oracle_dice", "region_dice"):
        assert key in on_disk
    assert on_disk["oracle_dice"] >= on_disk["best_expert_dice"]
    split = json.loads((root / "split.json").read_text())
    ds = build_dataset(
        "multirater", root, split="test", split_file=root / "split.json", target="label"
    )
    assert sorted(ds.info.ids) == split["test"]
    item = ds[0]
    S = (size,) * dims
    assert tuple(item["image"].shape) == (1, *S) and item["image"].dtype == torch.float32
    assert tuple(item["target"].shape) == S
    assert tuple(item["expert_labels"].shape) == (3, *S)
    ext = ".npy" if dims == 2 else ".nii.gz"
    assert (root / "regions" / f"{split['test'][0]}{ext}").is_file()
    if dims == 3:
        assert item["spacing"].tolist() == pytest.approx([2.0, 2.0, 2.0])


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="panel must be one of"):
        A.anatomy_panel_names("lobes")
    with pytest.raises(ValueError, match="dims must be 2 or 3"):
        A.anatomy_split(dims=4)
    with pytest.raises(ValueError, match="num_cases=100000 is more than"):
        A.anatomy_split(num_cases=100000)
    with pytest.raises(ValueError, match="orientations must be"):
        A.anatomy_split(orientations=("oblique",))
    with pytest.raises(ValueError, match="num_cases must be an integer >= 5, got 'many'"):
        A.anatomy_split(num_cases="many")
    with pytest.raises(ValueError, match="size=60 does not fit .* use a size <= 48"):
        A.anatomy_split(dims=3, size=60)
    with pytest.raises(ValueError, match="case_id must be"):
        A.anatomy_case("axial")
    with pytest.raises(ValueError, match="the axial position must be 0..186"):
        A.anatomy_case("axial-999")


def test_a_missing_nilearn_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "nilearn", None)  # `import nilearn` now raises ImportError
    with pytest.raises(ImportError, match=r"deferredseg\[anatomy\]"):
        A.load_template()
