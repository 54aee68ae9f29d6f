"""Metric functions against values worked out by hand."""

import math

import pytest
import torch

from deferredseg.metrics import DeferralEvaluator, count_components, per_image_scores
from deferredseg.policy import DeferralPolicy, rc_area


def test_dice_iou_sensitivity_by_hand():
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, :2, :2] = 1  # 4 foreground pixels
    pred = torch.zeros(1, 4, 4, dtype=torch.long)
    pred[0, :2, :3] = 1  # 6 predicted, 4 of them right
    s = per_image_scores(pred, target, 2)
    assert s["dice"][0] == pytest.approx(2 * 4 / (6 + 4))
    assert s["iou"][0] == pytest.approx(4 / 6)
    assert s["sensitivity"][0] == pytest.approx(1.0)
    assert s["hd95"][0] == pytest.approx(1.0)  # the extra column is one pixel away


def test_hd95_of_two_points_and_empty_prediction():
    target = torch.zeros(2, 9, 9, dtype=torch.long)
    pred = torch.zeros(2, 9, 9, dtype=torch.long)
    target[:, 1, 1] = 1
    pred[0, 4, 5] = 1  # distance sqrt(3^2 + 4^2) = 5
    s = per_image_scores(pred, target, 2)
    assert s["hd95"][0] == pytest.approx(5.0)
    assert math.isnan(s["hd95"][1])  # nothing predicted: undefined, not a number
    assert s["dice"][1] == 0.0


def test_hd95_in_millimetres_from_the_voxel_spacing():
    """One voxel off along the third axis: 2 mm at a spacing of 0.8 x 0.8 x 2.0 mm, 1 pixel
    without a spacing (MONAI's metric with its spacing argument)."""
    target = torch.zeros(1, 8, 8, 8, dtype=torch.long)
    target[0, 2:5, 2:5, 2:5] = 1
    pred = torch.zeros_like(target)
    pred[0, 2:5, 2:5, 3:6] = 1
    spacing = torch.tensor([[0.8, 0.8, 2.0]], dtype=torch.float64)
    assert per_image_scores(pred, target, 2, spacing=spacing)["hd95"][0] == pytest.approx(2.0)
    assert per_image_scores(pred, target, 2)["hd95"][0] == pytest.approx(1.0)
    nan = torch.full((1, 3), float("nan"), dtype=torch.float64)
    assert per_image_scores(pred, target, 2, spacing=nan)["hd95"][0] == pytest.approx(1.0)


def test_multiclass_averages_foreground_classes_and_skips_absent_ones():
    target = torch.tensor([[[1, 1, 2, 0]]])
    pred = torch.tensor([[[1, 0, 2, 2]]])
    s = per_image_scores(pred, target, 4, with_hd95=False)
    # class 1: 2*1/(1+2) = 2/3; class 2: 2*1/(2+1) = 2/3; class 3 absent from target: skipped
    assert s["dice"][0] == pytest.approx(2 / 3)


def test_ignored_pixels_and_regions_are_left_out():
    target = torch.tensor([[[1, 1, -100, 0]]])
    pred = torch.tensor([[[1, 0, 1, 1]]])
    assert per_image_scores(pred, target, 2, with_hd95=False)["dice"][0] == pytest.approx(2 / 4)
    region = torch.tensor([[[True, False, True, False]]])
    assert per_image_scores(pred, target, 2, region, with_hd95=False)["dice"][0] == 1.0


def test_count_components():
    m = torch.zeros(2, 6, 6, dtype=torch.bool)
    m[0, 0, 0] = m[0, 0, 1] = True
    m[0, 3:5, 3:5] = True
    m[0, 5, 0] = True
    m[1, 2, 2] = m[1, 3, 3] = True  # diagonal neighbours are separate (face connectivity)
    assert count_components(m) == [3, 2]
    assert count_components(torch.zeros(1, 3, 3, 3, dtype=torch.bool)) == [0]


def test_risk_coverage_area_by_hand():
    curve = [(0.0, 0.6), (0.5, 0.8), (1.0, 1.0)]
    assert rc_area(curve) == pytest.approx(0.8)
    assert rc_area(curve[:1]) == pytest.approx(0.6)  # one rate: its Dice


def test_deferral_evaluator_by_hand():
    K, E = 1, 2
    # 4 pixels in a row: gate defers pixels 2 and 3, to experts 1 and 0.
    logits = torch.zeros(1, K + E + 2, 1, 4)
    logits[0, 0] = torch.tensor([[3.0, -3.0, 3.0, 3.0]])  # model predicts 1, 0, 1, 1
    logits[0, K] = torch.tensor([[0.0, 0.0, 0.0, 2.0]])
    logits[0, K + 1] = torch.tensor([[0.0, 0.0, 2.0, 0.0]])
    logits[0, K + E + 1] = torch.tensor([[-5.0, -5.0, 5.0, 5.0]])
    target = torch.tensor([[[1, 0, 0, 0]]])
    experts = torch.tensor([[[[1, 0, 1, 0]], [[1, 0, 0, 1]]]])  # both right where they get work
    policy = DeferralPolicy(K, E, scores="softmax", expert_choice="heads", threshold=0.5)
    sweep = [policy.with_threshold(t) for t in (0.0, 0.5, 1.0)]
    ev = DeferralEvaluator(policy, with_hd95=False, sweep=sweep)
    ev.update(logits, target, experts)
    r = ev.result()
    assert r["deferral_rate"] == 0.5
    assert r["expert_share"] == [0.5, 0.5]
    assert r["deferral_components_per_image"] == 1.0
    assert r["model_dice"] == pytest.approx(2 * 1 / (3 + 1))
    assert r["system_dice"] == 1.0
    rates = [p["deferral_rate"] for p in r["risk_coverage"]]
    assert rates == [1.0, 0.5, 0.0]
    assert r["images"] == 1
