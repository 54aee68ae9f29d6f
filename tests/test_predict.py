"""`deferredseg predict`: formats, sliding windows, bad files, reruns; review tasks; merge."""

import json

import numpy as np
import pytest
import torch

from deferredseg.data.files import load_input, read_like
from deferredseg.predict import Predictor, infer_logits
from deferredseg.review.db import ReviewDB
from deferredseg.review.intake import predict
from deferredseg.review.merge import fuse, merge
from deferredseg.review.tasks import extract_tasks
from deferredseg.train.config import TrainConfig
from deferredseg.train.loop import train


def _train(out, **kw):
    cfg = TrainConfig(
        out=str(out),
        epochs=1,
        num_images=8,
        features=4,
        batch_size=4,
        backend="reference",
        progress=False,
        device="cpu",
        head_epochs=1,  # the heads as the tests need them: the budget sets the deferral
        **kw,
    )
    train(cfg)
    return out / "best.pt"


@pytest.fixture(scope="module")
def ck2d(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("train2d"), image_size=32)


@pytest.fixture(scope="module")
def ck3d(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("train3d"), image_size=16, spatial_dims=3)


def _synthetic(size, seed):
    from monai.data import create_test_image_2d, create_test_image_3d

    rs = np.random.RandomState(seed)
    if len(size) == 2:
        return create_test_image_2d(*size, num_objs=4, rad_max=6, rad_min=2, random_state=rs)
    return create_test_image_3d(*size, num_objs=3, rad_max=5, rad_min=2, random_state=rs)


# ----------------------------------------------------------------------------- tasks


def test_tasks_are_regions_per_expert_with_min_size_and_merge_distance():
    a = np.full((12, 12), -1, dtype=np.int8)
    a[1:3, 1:3] = 0  # 4 pixels, expert 0
    a[1:3, 5:7] = 0  # 4 pixels, 2 columns away from the first
    a[8, 8] = 0  # a single speck
    a[8:11, 1:4] = 1  # 9 pixels, expert 1
    regions, tasks, dropped = extract_tasks(a, 2, min_size=2, merge_distance=0)
    assert [(t.expert, t.area) for t in tasks] == [(0, 4), (0, 4), (1, 9)]
    assert dropped == 1 and regions[8, 8] == 0
    assert tasks[2].bbox == ((8, 11), (1, 4))
    # within merge distance 1 (after dilation the two squares touch) they become one task
    regions, tasks, dropped = extract_tasks(a, 2, min_size=2, merge_distance=1)
    assert [(t.expert, t.area) for t in tasks] == [(0, 8), (1, 9)]
    assert tasks[0].bbox == ((1, 3), (1, 7))
    # a region holds only its expert's deferred pixels, never the dilation
    assert set(np.unique(a[regions == tasks[0].region])) == {0}
    assert (regions > 0).sum() == 17
    with pytest.raises(ValueError, match="assignment values"):
        extract_tasks(np.array([[3]]), 2)
    with pytest.raises(ValueError, match="min_size"):
        extract_tasks(a, 2, min_size=0)


# ----------------------------------------------------------------------------- predict


def test_predict_png_rerun_skips_and_a_corrupt_file_is_reported(ck2d, tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        img, _ = _synthetic((32, 32), i)
        Image.fromarray((img * 255).astype(np.uint8)).save(images / f"case{i}.png")
    (images / "broken.png").write_bytes(b"not a png at all")
    out = tmp_path / "out"
    s = predict(ck2d, images, out, threshold=0.5, progress=False, min_size=1, merge_distance=0)
    assert sorted(s.done) == ["case0", "case1", "case2"]
    assert len(s.failed) == 1 and "broken.png" in s.failed[0][0]
    for i in range(3):
        for kind in ("model", "score", "assignment", "final"):
            if kind == "final":
                continue
            arr, meta = read_like(out / kind / f"case{i}.png")
            assert arr.shape == (32, 32) and meta.ext == ".png", kind
        assign = read_like(out / "assignment" / f"case{i}.png")[0]
        assert assign.max() <= 5  # 0: model, 1..5: experts
    db = ReviewDB(out)
    tasks = list(db.iter_tasks())
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == len(tasks) == s.tasks
    # every deferred pixel is in exactly one task (min_size=1): task areas add up
    deferred = sum(db.image(f"case{i}")["deferred_pixels"] for i in range(3))
    assert sum(t["area"] for t in tasks) == deferred
    mtime = (out / "model" / "case0.png").stat().st_mtime_ns
    # a rerun with other settings would no longer describe the tasks: refused, saying what
    with pytest.raises(ValueError, match=r"routing\.threshold: 0\.5 -> 0\.6; min_size: 1 -> 4"):
        predict(ck2d, images, out, threshold=0.6, progress=False, min_size=4, merge_distance=0)
    assert ReviewDB(out).get_meta("min_size") == 1
    s2 = predict(ck2d, images, out, threshold=0.5, progress=False, min_size=1, merge_distance=0)
    assert s2.done == [] and sorted(s2.skipped) == ["case0", "case1", "case2"]
    assert len(s2.failed) == 1
    assert (out / "model" / "case0.png").stat().st_mtime_ns == mtime
    assert len(list(db.iter_tasks())) == len(tasks)


def test_predict_cli_exit_code_says_there_were_failures(ck2d, tmp_path):
    from deferredseg.cli import main

    images = tmp_path / "images"
    images.mkdir()
    np.save(images / "good.npy", _synthetic((32, 32), 3)[0].astype(np.float32))
    (images / "bad.npy").write_bytes(b"\x93NUMPY garbage")
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(ck2d),
                "--images",
                str(images),
                "--out",
                str(tmp_path / "out"),
                "--no-progress",
                "--threshold",
                "0.5",
            ]
        )
        == 1
    )
    assert (tmp_path / "out" / "model" / "good.npy").is_file()
    assert main(["merge", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "final" / "good.npy").is_file()


def test_predict_nifti_3d_keeps_affine_and_spacing(ck3d, tmp_path):
    import nibabel as nib

    images = tmp_path / "images"
    images.mkdir()
    img, _ = _synthetic((16, 16, 16), 5)
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    affine[:3, 3] = [-10.0, 4.0, 7.5]
    nib.save(nib.Nifti1Image(img.astype(np.float32), affine), images / "vol.nii.gz")
    out = tmp_path / "out"
    s = predict(ck3d, images, out, budget=0.3, progress=False, min_size=1)
    assert s.done == ["vol"] and not s.failed
    assert s.routing["source"] == "budget 0.3 on the validation split"
    for kind in ("model", "score", "assignment"):
        f = nib.load(out / kind / "vol.nii.gz")
        assert f.shape == (16, 16, 16)
        np.testing.assert_allclose(f.affine, affine)
        np.testing.assert_allclose(f.header.get_zooms()[:3], (0.8, 0.9, 2.5))
    prob = np.asarray(nib.load(out / "score" / "vol.nii.gz").dataobj)
    assert prob.dtype == np.float32 and 0 <= prob.min() and prob.max() <= 1
    assert ReviewDB(out).image("vol")["deferred_pixels"] > 0  # a 30 % budget defers something
    merge(out)
    final = nib.load(out / "final" / "vol.nii.gz")
    np.testing.assert_allclose(final.affine, affine)
    # no answers yet: the final mask is the model's
    np.testing.assert_array_equal(
        np.asarray(final.dataobj), np.asarray(nib.load(out / "model" / "vol.nii.gz").dataobj)
    )
    # the review server serves 3D crops and takes a 3D edit; the merged NIfTI keeps the affine
    import base64

    from starlette.testclient import TestClient

    from deferredseg.review.server import create_app

    db = ReviewDB(out)
    task = next(iter(db.iter_tasks()))
    client = TestClient(create_app(out))
    meta = client.get(f"/api/experts/{task['expert']}/tasks/{task['id']}").json()
    shape = meta["crop_shape"]
    assert len(shape) == 3
    n = int(np.prod(shape))
    assert (
        len(client.get(f"/api/experts/{task['expert']}/tasks/{task['id']}/data").content) == 6 * n
    )
    r = client.post(
        f"/api/experts/{task['expert']}/tasks/{task['id']}/answer",
        json={
            "action": "edited",
            "mask": base64.b64encode(np.ones(n, np.uint8).tobytes()).decode(),
        },
    )
    assert r.status_code == 200, r.text
    final = nib.load(out / "final" / "vol.nii.gz")
    np.testing.assert_allclose(final.affine, affine)
    regions = np.load(out / "regions" / "vol.npy")
    assert np.all(np.asarray(final.dataobj)[regions == task["region"]] == 1)


def test_large_image_goes_through_sliding_windows(ck2d, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    np.save(images / "big.npy", _synthetic((80, 72), 7)[0].astype(np.float32))
    np.save(images / "same.npy", _synthetic((32, 32), 8)[0].astype(np.float32))
    out = tmp_path / "out"
    s = predict(ck2d, images, out, threshold=0.5, progress=True)  # with the progress bar
    assert sorted(s.done) == ["big", "same"]
    assert np.load(out / "model" / "big.npy").shape == (80, 72)
    assert np.load(out / "score" / "big.npy").shape == (80, 72)
    # where both apply (the image has the window's size) the window gives the direct pass
    out2 = tmp_path / "out2"
    predict(ck2d, images, out2, threshold=0.5, progress=False, inference="window", overlap=0.5)
    for kind in ("model", "assignment"):
        np.testing.assert_array_equal(
            np.load(out / kind / "same.npy"), np.load(out2 / kind / "same.npy")
        )
    np.testing.assert_allclose(
        np.load(out / "score" / "same.npy"),
        np.load(out2 / "score" / "same.npy"),
        atol=1e-5,
    )


def test_predictor_routes_a_batch_once_its_policy_is_chosen(ck2d):
    p = Predictor(ck2d, device="cpu")
    x = p.batch([_synthetic((32, 32), 3)[0][None].astype(np.float32)] * 2)
    assert tuple(x.shape) == (2, 1, 32, 32) and float(x.max()) <= 1.0
    with pytest.raises(ValueError, match="choose_policy"):
        p.route(x)
    routing = p.choose_policy()
    assert routing["source"] == "checkpoint" and routing["threshold"] == p.policy.threshold
    r = p.route(x)
    assert r.model_pred.shape == r.score.shape == r.assignment.shape == (2, 32, 32)
    assert r.assignment.min() >= -1 and r.assignment.max() < p.num_experts
    with pytest.raises(ValueError, match="window must be 2 positive sizes"):
        Predictor(ck2d, window=[32], device="cpu")


def test_sliding_window_equals_direct_pass_for_a_pointwise_model():
    torch.manual_seed(1)
    net = torch.nn.Conv2d(1, 9, kernel_size=1)
    x = torch.randn(2, 1, 70, 53)
    direct = infer_logits(net, x, (32, 32), mode="direct")
    window = infer_logits(net, x, (32, 32), overlap=0.5, mode="window")
    assert window.shape == direct.shape == (2, 9, 70, 53)
    torch.testing.assert_close(window, direct, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="overlap"):
        infer_logits(net, x, (32, 32), overlap=1.0)


def test_load_input_errors_name_the_file(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((2, 3, 4, 5), np.float32))
    with pytest.raises(ValueError, match=r"a\.npy.*2D images"):
        load_input(tmp_path / "a.npy", 1, 2)
    np.save(tmp_path / "b.npy", np.full((4, 4), np.nan, np.float32))
    with pytest.raises(ValueError, match=r"b\.npy contains NaN"):
        load_input(tmp_path / "b.npy", 1, 2)
    x, meta = load_input(_rgb_png(tmp_path), 1, 2)
    assert x.shape == (1, 6, 5) and meta.ext == ".png"


def _rgb_png(folder):
    from PIL import Image

    arr = np.zeros((6, 5, 3), np.uint8)
    arr[..., 0] = 90
    Image.fromarray(arr).save(folder / "rgb.png")
    return folder / "rgb.png"


# ----------------------------------------------------------------------------- merge


def test_merge_equals_a_hand_computed_fusion(tmp_path):
    """A 6x6 image, three tasks: one edited, one accepted, one unanswered."""
    from deferredseg.data.files import InputMeta, write_like
    from deferredseg.review.tasks import Task

    out = tmp_path / "out"
    db = ReviewDB(out)
    db.ensure_experts(["a", "b"])
    db.set_meta({"num_labels": 2, "spatial_dims": 2})
    model = np.array(
        [
            [0, 0, 1, 1, 0, 0],
            [0, 0, 1, 1, 0, 0],
            [0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 0, 0, 1, 1],
            [0, 0, 0, 0, 1, 1],
        ],
        np.uint8,
    )
    regions = np.zeros((6, 6), np.int32)
    regions[0:2, 0:2] = 1  # expert a, edited
    regions[3:5, 0:2] = 2  # expert b, accepted
    regions[4:6, 4:6] = 3  # expert a, unanswered
    regions[4, 4] = 0  # not part of the region although inside its bbox
    meta = InputMeta(ext=".npy")
    write_like(out / "model" / "img", model, meta)
    (out / "regions").mkdir()
    np.save(out / "regions" / "img.npy", regions)
    tasks = [
        Task(0, 1, ((0, 2), (0, 2)), 4),
        Task(1, 2, ((3, 5), (0, 2)), 4),
        Task(0, 3, ((4, 6), (4, 6)), 3),
    ]
    ids = db.add_image("img", str(tmp_path / "img.npy"), ".npy", "0:0", (6, 6), 36, 11, 0, tasks)
    edit = np.array([[1, 0], [1, 1]], np.uint8)
    db.add_answer(ids[0], 0, "edited", np.array([[0, 0], [0, 0]], np.uint8))
    db.add_answer(ids[0], 0, "edited", edit)  # an edit of an edit: the latest counts
    db.add_answer(ids[1], 1, "accepted")
    rep = merge(out, db)
    expected = model.copy()
    expected[0:2, 0:2] = edit
    np.testing.assert_array_equal(np.load(out / "final" / "img.npy"), expected)
    # the history is kept: two answers for the first task, the second pointing at the first
    hist = db.answers(ids[0])
    assert len(hist) == 2 and hist[1]["parent_id"] == hist[0]["id"]
    assert (out / hist[0]["mask"]).is_file() and (out / hist[1]["mask"]).is_file()
    img = rep["images"][0]
    assert img["deferred_share"] == pytest.approx(11 / 36)
    assert img["answered_share"] == pytest.approx(8 / 11)
    assert img["unanswered_tasks"] == [ids[2]] and img["experts"] == ["a", "b"]
    by = {e["expert"]: e for e in rep["experts"]}
    assert (by["a"]["tasks"], by["a"]["done"], by["a"]["edited"]) == (2, 1, 1)
    assert (by["b"]["tasks"], by["b"]["done"], by["b"]["accepted"]) == (1, 1, 1)
    assert (out / "report.md").read_text().count("|") > 10
    # the region's pixels only: (4, 4) lies in task 3's bbox but not in its region
    fused = fuse(
        model,
        regions,
        [
            {
                "region": 3,
                "bbox": [[4, 6], [4, 6]],
                "action": "edited",
                "mask": np.zeros((2, 2), np.uint8),
            }
        ],
    )
    assert fused[4, 4] == 1 and fused[5, 5] == 0 and fused[4, 5] == 0


def test_routing_comes_from_the_checkpoint_unless_overridden():
    from deferredseg.policy import DeferralPolicy
    from deferredseg.predict import resolve_policy

    cfg = TrainConfig()
    recorded = DeferralPolicy(1, 3, budget=0.1, threshold=0.7, chosen="best", best_expert=2)
    ck = {"policy": recorded.to_dict(), "num_experts": 3}
    p, source = resolve_policy(ck, cfg)
    assert p == recorded and source == "checkpoint"
    p, source = resolve_policy(ck, cfg, threshold=0.2)
    assert (p.threshold, p.budget, source) == (0.2, None, "--threshold")
    calls = []

    def calibrate(policy, budget):
        calls.append(budget)
        return policy.replace(budget=budget, threshold=budget / 2, chosen="heads")

    p, source = resolve_policy(ck, cfg, budget=0.3, calibrate=calibrate)
    assert (p.threshold, calls, source) == (0.15, [0.3], "budget 0.3 on the validation split")
    never, source = resolve_policy({"num_experts": 3}, TrainConfig(method="model-only"))
    assert not never.defers and "never defers" in source
    with pytest.raises(ValueError, match="never defers"):
        resolve_policy({"num_experts": 3}, TrainConfig(method="model-only"), threshold=0.5)
    # without a policy (a run's last.pt): calibrated for the training budget, in the mode,
    # scores and costs it was trained for
    gain = TrainConfig(route_mode="gain", surrogate="ova", expert_cost=[0.0, 0.1, 0.2])
    p, _ = resolve_policy({"num_experts": 3}, gain, calibrate=calibrate)
    assert (p.mode, p.scores, p.expert_cost, calls[-1]) == ("gain", "sigmoid", [0.0, 0.1, 0.2], 0.1)
    # the gain's threshold is any real number, a gate's lies in [0, 1]
    assert resolve_policy({"num_experts": 3}, gain, threshold=-0.1)[0].threshold == -0.1
    with pytest.raises(ValueError, match="threshold must be in"):
        resolve_policy(ck, cfg, threshold=1.5)
    l2d = TrainConfig(method="l2d-single", route_mode="gain")
    assert resolve_policy({"num_experts": 3}, l2d, threshold=0.5)[0].mode == "gate"
    # a record of earlier versions still routes as it did
    old = {"routing": {"threshold": 0.66, "mode": "gate", "budget": 0.1}, "num_experts": 3}
    p, source = resolve_policy(old, cfg)
    assert (p.threshold, p.chosen, source) == (0.66, "heads", "checkpoint")
    router = TrainConfig(route_mode="router")
    p, source = resolve_policy({"num_experts": 3}, router)
    assert p.mode == "router" and source == "the router's argmax"
    with pytest.raises(ValueError, match="no threshold or budget"):
        resolve_policy({"num_experts": 3}, router, budget=0.1)


def test_help_of_the_review_commands(capsys):
    from deferredseg.cli import main

    for cmd in ("predict", "serve", "merge", "review-demo"):
        with pytest.raises(SystemExit) as exc:
            main([cmd, "--help"])
        assert exc.value.code == 0
        assert f"usage: deferredseg {cmd}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:  # bad sizes are argparse errors
        main(["predict", "--checkpoint", "c", "--images", "i", "--out", "o", "--window", "0,4"])
    assert exc.value.code == 2 and "positive sizes" in capsys.readouterr().err


def test_predict_streams_a_batch_at_a_time(ck2d, tmp_path, monkeypatch):
    """At most batch_size images are held between reading and writing, whatever the folder's
    size."""
    import deferredseg.review.intake as P

    images = tmp_path / "images"
    images.mkdir()
    for i in range(7):
        np.save(images / f"i{i}.npy", _synthetic((32, 32), 20 + i)[0].astype(np.float32))
    np.save(images / "odd.npy", _synthetic((40, 32), 30)[0].astype(np.float32))  # another shape
    held, peak = [0], [0]
    load, finish = P.load_input, P._finish_image

    def counting_load(*a, **k):
        held[0] += 1
        peak[0] = max(peak[0], held[0])
        return load(*a, **k)

    def counting_finish(*a, **k):
        held[0] -= 1
        return finish(*a, **k)

    monkeypatch.setattr(P, "load_input", counting_load)
    monkeypatch.setattr(P, "_finish_image", counting_finish)
    s = predict(ck2d, images, tmp_path / "out", threshold=0.5, batch_size=3, progress=False)
    assert len(s.done) == 8 and held[0] == 0
    assert peak[0] <= 3 + 1  # a batch, plus the next image read to see that the batch is full
