"""Two-stage training, routing at a budget, and the hard benchmark's data and panels."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from deferredseg.data import build_dataset
from deferredseg.data.benchmark import (
    PANELS,
    ambiguous_case,
    oracle_and_best_expert,
    panel_labels,
    panel_names,
    write_benchmark,
)
from deferredseg.train.checkpoint import load_checkpoint
from deferredseg.train.config import TrainConfig
from deferredseg.train.evaluation import evaluate
from deferredseg.train.loop import train


# ------------------------------------------------------------------------------ the benchmark data
@pytest.mark.parametrize("dims,size", [(2, 32), (3, 16)])
def test_ambiguous_cases_are_seeded_and_hold_every_kind_of_object(dims, size):
    a = ambiguous_case("c1", seed=3, spatial_dims=dims, size=size)
    b = ambiguous_case("c1", seed=3, spatial_dims=dims, size=size)
    c = ambiguous_case("c1", seed=4, spatial_dims=dims, size=size)
    assert a.image.shape == (1,) + (size,) * dims and a.image.dtype == np.float32
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert not np.array_equal(a.image, c.image)
    assert set(np.unique(a.label)) <= {0, 1} and a.label.any()
    # look-alikes are objects but never part of the label
    for i, look in enumerate(a.lookalike):
        inside = a.objects == i + 1
        assert (a.label[inside] == (0 if look else 1)).all()
    assert a.lookalike.any() and (a.size_class == 0).any()


def test_panels_have_their_experts_and_panel_c_has_no_best_expert_everywhere():
    cases = [ambiguous_case(f"c{i}", seed=0, size=48) for i in range(12)]
    for p in PANELS:
        lab = panel_labels(p, cases[0], seed=0)
        assert lab.shape == (len(panel_names(p)),) + cases[0].label.shape
        assert np.array_equal(lab, panel_labels(p, cases[0], seed=0))  # fixed per image
    y = np.stack([c.label for c in cases])
    ex = np.stack([panel_labels("C", c, seed=0) for c in cases])
    right = ex == y[:, None]
    for j in range(ex.shape[1]):
        others = [k for k in range(ex.shape[1]) if k != j]
        # somewhere expert j is wrong and another one is right: no expert is best everywhere
        assert (~right[:, j] & right[:, others].any(1)).any()
    info = oracle_and_best_expert(y, ex)
    assert info["oracle_dice"] > info["best_expert_dice"]
    # panel D: none of the structured experts is perfect on these images
    exd = np.stack([panel_labels("D", c, seed=0) for c in cases])
    assert all((exd[:, j] != y).any() for j in range(exd.shape[1]))


def test_oracle_and_best_expert_by_hand():
    y = np.array([[[1, 1, 0, 0]]])  # one image (1 x 4)
    ex = np.array([[[[1, 0, 0, 0]], [[1, 1, 1, 0]]]])  # expert 0 misses a pixel, expert 1 adds one
    info = oracle_and_best_expert(y, ex)
    assert info["expert_dice"] == pytest.approx([2 * 1 / 3, 2 * 2 / 5])
    assert info["best_expert"] == 1 and info["oracle_dice"] == pytest.approx(1.0)


def test_write_benchmark_layouts_are_readable(tmp_path):
    s = write_benchmark(tmp_path / "c", "C", num_cases=10, size=24, seed=1)
    assert s["split_sizes"] == {"train": 6, "val": 2, "test": 2}
    split = json.loads((tmp_path / "c" / "split.json").read_text())
    ds = build_dataset(
        "multirater",
        tmp_path / "c",
        "test",
        target="label",
        split_file=tmp_path / "c" / "split.json",
    )
    item = ds[0]
    assert item["expert_labels"].shape[0] == 3 and item["id"] in split["test"]
    write_benchmark(tmp_path / "m", "A", num_cases=5, size=24, seed=1, layout="medsam-npy")
    assert len(list((tmp_path / "m" / "imgs").glob("*.npy"))) == 5
    with pytest.raises(ValueError, match="panel must be one of"):
        write_benchmark(tmp_path / "x", "Z", num_cases=5)


# ------------------------------------------------------------------------------ two-stage training
@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench") / "C"
    write_benchmark(root, "C", num_cases=15, size=24, seed=0)
    return root


def _cfg(bench, out, **kw):
    base = dict(
        layout="multirater",
        data=str(bench),
        target="label",
        split_file=str(bench / "split.json"),
        features=4,
        head_channels=4,
        epochs=1,
        head_epochs=2,
        batch_size=4,
        progress=False,
        backend="reference",
        out=str(out),
    )
    base.update(kw)
    return TrainConfig(**base)


def test_two_stage_keeps_the_base_and_defers_the_budget(bench, tmp_path):
    res = train(_cfg(bench, tmp_path / "run"))
    base = load_checkpoint(tmp_path / "run" / "base" / "best.pt")
    ck = load_checkpoint(tmp_path / "run" / "best.pt")
    # the second stage never touches the backbone or the segmentation head
    for k, v in base["model"].items():
        if k.startswith(("backbone.", "seg_head.")):
            assert torch.equal(ck["model"][k], v), k
    assert ck["policy"]["budget"] == 0.1 and ck["policy"]["scores"] == "sigmoid"
    assert 0.0 < ck["policy"]["threshold"] < 1.0  # not pinned at an end
    assert abs(ck["policy"]["calibration"]["rate"] - 0.1) < 0.005  # on validation
    assert ck["policy"]["chosen"] in ("heads", "best")
    assert res["selection"] == "budget-dice" and res["best_val_deferral_rate"] == pytest.approx(
        0.1, abs=0.03
    )
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "best" and r.get("val_deferral_rate") is not None for r in log)
    m = evaluate(tmp_path / "run" / "best.pt", figures=False, with_hd95=False, matched=True)
    # defaults: evaluated at the training budget, never deferring every pixel
    assert m["budget"] == 0.1 and 0.02 < m["deferral_rate"] < 0.3
    assert m["matched_deferral_rate"] == pytest.approx(0.1, abs=0.02)
    assert (
        m["auroc_model_wrong_score"] is not None and m["auroc_model_wrong_uncertainty"] is not None
    )
    assert m["selection"]["by"] == "budget-dice" and m["route_mode"] == "gate"
    # the risk-coverage curve: the same policy at the test split's score quantiles, dense at
    # the budgets in use (no straight jump from a few percent to everything)
    from deferredseg.train.evaluation import CURVE_BUDGETS

    curve = m["risk_coverage"]
    assert [c["budget"] for c in curve] == list(CURVE_BUDGETS)
    assert all(abs(c["deferral_rate"] - c["budget"]) < 0.02 for c in curve)


def test_base_checkpoint_skips_stage_one_and_l2d_runs_on_it(bench, tmp_path):
    train(_cfg(bench, tmp_path / "base", method="model-only"))
    train(
        _cfg(
            bench,
            tmp_path / "l2d",
            method="l2d-single",
            base_checkpoint=str(tmp_path / "base" / "best.pt"),
        )
    )
    assert not (tmp_path / "l2d" / "base").exists()
    m = evaluate(tmp_path / "l2d" / "best.pt", figures=False, with_hd95=False)
    assert 0.0 < m["deferral_rate"] < 0.5
    with pytest.raises(FileNotFoundError, match="base_checkpoint"):
        _cfg(bench, tmp_path / "x", base_checkpoint=str(tmp_path / "missing.pt")).validate()


def test_router_mode_reports_its_own_rate_and_joint_selects_at_the_budget(bench, tmp_path):
    train(
        _cfg(bench, tmp_path / "rel", surrogate="paper", gate_target="router", route_mode="router")
    )
    m = evaluate(tmp_path / "rel" / "best.pt", figures=False, with_hd95=False)
    assert m["budget"] is None and m["route_mode"] == "router"
    assert m["deferral_rate"] is not None and m["system_dice"] is not None
    train(_cfg(bench, tmp_path / "joint", training="joint", epochs=2))
    log = [json.loads(line) for line in (tmp_path / "joint" / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in log if r.get("event") == "epoch"]
    assert epochs and all(r["val_deferral_rate"] < 0.3 for r in epochs)
    assert all(0.0 <= r["val_threshold"] <= 1.0 for r in epochs)
    assert not math.isnan(epochs[-1]["val_system_dice"])


def test_stage_two_selection_routes_single_expert_methods_as_evaluation_does():
    """Stage 2 picks its epoch with the policy evaluation will use: a single-expert method
    routes through its packed gate whatever ``route_mode`` says."""
    from deferredseg.metrics import evaluate_policy
    from deferredseg.train.methods import policy_for, route_mode

    g = torch.Generator().manual_seed(0)
    K, E = 1, 1
    logits = torch.randn(2, K + E + 2, 16, 16, generator=g)
    target = torch.randint(0, 2, (2, 16, 16), generator=g)
    experts = torch.randint(0, 2, (2, E, 16, 16), generator=g)
    data = lambda: iter([(logits, target, experts)])  # noqa: E731
    l2d = TrainConfig(method="l2d-single", route_mode="gain")
    assert route_mode(l2d) == "gate" and policy_for(l2d, E, 0).mode == "gate"
    got = evaluate_policy(policy_for(l2d, E, 0), data, 0.2)[1]
    want = evaluate_policy(policy_for(TrainConfig(method="l2d-single"), E, 0), data, 0.2)[1]
    assert got["system_dice"] == want["system_dice"] and got["threshold"] == want["threshold"]
    # a method that learns routing keeps its own mode (the gain's threshold differs)
    ds = evaluate_policy(policy_for(TrainConfig(route_mode="gain"), E, 0), data, 0.2)[1]
    assert ds["route_mode"] == "gain" and ds["threshold"] != want["threshold"]
