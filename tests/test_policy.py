"""The deferral policy: calibration at a budget (streaming), routing, expert choice, records."""

from __future__ import annotations

import json
import math

import pytest
import torch

from deferredseg import DeferralPolicy, channel_layout
from deferredseg.losses import DeferredSegLoss
from deferredseg.metrics import evaluate_policy, histogram_auroc, measure
from deferredseg.policy import RC_BUDGETS, ScoreHistogram, rc_area

K, E = 1, 3


def _batches(n=4, seed=0, size=24, ignore=True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        logits = torch.randn(3, K + E + 2, size, size, generator=g) * 3
        target = (torch.rand(3, size, size, generator=g) > 0.5).long()
        if ignore:
            target[:, :2] = -100
        experts = (torch.rand(3, E, size, size, generator=g) > 0.4).long()
        out.append((logits, target, experts))
    return out


def _rate(policy, data):
    deferred = valid = 0
    for logits, target, experts in data:
        out = policy.route(logits, experts)
        v = target != -100
        deferred += int(((out.assignment >= 0) & v).sum())
        valid += int(v.sum())
    return deferred / valid


def test_channel_layout_states_the_order():
    lay = channel_layout(2, 3)
    assert lay.channels == 7 and lay.segmentation == slice(0, 2)
    assert lay.experts == slice(2, 5) and lay.model == 5 and lay.gate == 6
    assert channel_layout(1, 3).describe() == (
        "6 channels: segmentation 0..0, experts 1..3, model 4, gate 5"
    )
    assert DeferredSegLoss(1, 3).out_channels == 6
    with pytest.raises(ValueError, match="num_experts"):
        channel_layout(1, 0)


@pytest.mark.parametrize("mode", ["gate", "uncertainty", "gain"])
@pytest.mark.parametrize("choice", ["heads", "best", "auto"])
def test_calibration_defers_the_budget(mode, choice):
    data = _batches()
    base = DeferralPolicy(K, E, mode=mode, expert_choice=choice, best_expert=1)
    for budget in (0.0, 0.05, 0.1, 0.2, 1.0):
        p = base.calibrate(data, budget)
        realised = _rate(p, data)
        assert abs(realised - budget) < 0.005, (mode, choice, budget, realised)
        assert p.calibration["rate"] == pytest.approx(realised, abs=1e-9)
        assert p.calibration["pixels"] == sum(int((t != -100).sum()) for _, t, _ in data)
    assert base.calibrate(data, 0.0).threshold == 1.0  # budget 0 never defers
    fresh = _batches(seed=9)  # on other data of the same kind the rate stays near the budget
    assert abs(_rate(base.calibrate(data, 0.1), fresh) - 0.1) < 0.02


def test_calibration_streams_one_pass_in_bounded_memory():
    gen = (b for b in _batches(n=6))  # a one-pass generator is enough without "auto"
    p = DeferralPolicy(K, E, expert_choice="heads").calibrate(gen, 0.1)
    assert abs(p.calibration["rate"] - 0.1) < 0.005
    # the state is one fixed-size histogram, whatever the data's size
    h = ScoreHistogram()
    h.add(torch.randn(10))
    h.add(torch.randn(100000))
    assert h.counts.numel() == ScoreHistogram.BINS and h.total == 100010
    with pytest.raises(TypeError, match="re-iterable"):
        DeferralPolicy(K, E).calibrate((b for b in _batches()), 0.1)  # "auto" needs two passes
    # a function returning a new pass works for "auto"
    p = DeferralPolicy(K, E).calibrate(lambda: iter(_batches()), 0.1)
    assert p.chosen in ("heads", "best") and p.best_expert is not None


def test_calibration_takes_plain_logits_and_dicts():
    data = _batches()
    plain = [lg for lg, _, _ in data]
    p = DeferralPolicy(K, E, expert_choice="heads").calibrate(plain, 0.1)
    n = sum(lg.shape[0] * lg.shape[2] * lg.shape[3] for lg in plain)
    assert p.calibration["pixels"] == n
    dicts = [{"logits": lg, "target": t} for lg, t, _ in data]
    q = DeferralPolicy(K, E, expert_choice="heads").calibrate(dicts, 0.1)
    assert q.calibration["pixels"] < n  # the ignored pixels are left out
    with pytest.raises(ValueError, match="'logits'"):
        DeferralPolicy(K, E, expert_choice="heads").calibrate([{"x": plain[0]}], 0.1)


def test_scores_and_routing_by_mode():
    torch.manual_seed(0)
    logits = torch.randn(2, K + E + 2, 5, 6) * 3
    experts = torch.randint(0, 2, (2, E, 5, 6))
    q = torch.sigmoid(logits[:, K : K + E + 1])
    cost = [0.0, 0.3, 0.1]
    gain = DeferralPolicy(K, E, mode="gain", expert_cost=cost, expert_choice="heads")
    g = gain.score(logits)
    expect = (q[:, :E] - torch.tensor(cost).view(1, E, 1, 1)).amax(1) - q[:, E]
    assert torch.allclose(g, expect, atol=1e-6)
    out = gain.with_threshold(0.0).route(logits, experts, backend="reference")
    assert torch.equal(out.assignment >= 0, g > 0)
    assert torch.allclose(out.score, g, atol=1e-6)  # the gain travels as the score
    chosen = (q[:, :E] - torch.tensor(cost).view(1, E, 1, 1)).argmax(1)
    assert torch.equal(out.assignment[g > 0].long(), chosen[g > 0])
    unc = DeferralPolicy(K, E, mode="uncertainty", expert_choice="heads", threshold=0.3)
    p = torch.sigmoid(logits[:, 0])
    u = unc.route(logits, experts, backend="reference")
    assert torch.equal(u.assignment >= 0, (1 - torch.maximum(p, 1 - p)) > 0.3)
    gate = DeferralPolicy(K, E, expert_choice="heads", threshold=0.5).route(logits, experts)
    assert torch.equal(gate.assignment >= 0, logits[:, -1] > 0)
    router = DeferralPolicy(K, E, mode="router", expert_choice="heads").route(logits, experts)
    assert torch.equal(router.assignment >= 0, logits[:, K : K + E + 1].argmax(1) < E)


def test_best_expert_choice_sends_every_deferred_pixel_to_it():
    logits, target, experts = _batches(n=1)[0]
    heads = DeferralPolicy(K, E, expert_choice="heads", threshold=0.4).route(logits, experts)
    best = DeferralPolicy(K, E, expert_choice="best", best_expert=2, threshold=0.4)
    out = best.route(logits, experts)
    assert torch.equal(out.assignment >= 0, heads.assignment >= 0)  # same pixels deferred
    assert set(out.assignment[out.assignment >= 0].tolist()) == {2}
    d = out.assignment >= 0
    assert torch.equal(out.final[d], experts[:, 2][d])
    assert torch.equal(out.final[~d], out.model_pred[~d])


def test_auto_choice_keeps_the_better_on_validation():
    """Expert 1 is always right and the heads prefer expert 0, always wrong: "auto"
    must choose the best single expert; with the roles swapped, the heads."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, K + E + 2, 16, 16, generator=g)
    target = (torch.rand(4, 16, 16, generator=g) > 0.5).long()
    experts = torch.stack([1 - target, target, 1 - target], 1)
    logits[:, K] = 5.0  # the heads' choice: expert 0
    data = [(logits, target, experts)]
    p = DeferralPolicy(K, E).calibrate(data, 0.2)
    assert p.best_expert == 1 and p.chosen == "best"
    assert p.calibration["system_dice"]["best"] > p.calibration["system_dice"]["heads"]
    experts2 = torch.stack([target, 1 - target, 1 - target], 1)
    p2 = DeferralPolicy(K, E, best_expert=1).calibrate([(logits, target, experts2)], 0.2)
    assert p2.chosen == "heads"
    # without expert labels there is nothing to compare: the heads' choice
    p3 = DeferralPolicy(K, E).calibrate([logits], 0.2)
    assert p3.chosen == "heads" and "no expert labels" in p3.calibration["expert_choice"]
    with pytest.raises(ValueError, match="decided by calibrate"):
        DeferralPolicy(K, E, threshold=0.5).route(logits)


def test_records_round_trip_through_json():
    p = DeferralPolicy(K, E, mode="gain", expert_cost=[0.0, 0.1, 0.2]).calibrate(_batches(), 0.1)
    record = json.loads(json.dumps(p.to_dict()))
    back = DeferralPolicy.from_dict(record)
    assert back == p and back.calibration == p.calibration
    logits, _, experts = _batches(n=1, seed=5)[0]
    assert torch.equal(back.route(logits, experts).assignment, p.route(logits, experts).assignment)
    with pytest.raises(ValueError, match="unknown policy field"):
        DeferralPolicy.from_dict({**record, "bogus": 1})
    with pytest.raises(ValueError, match="format"):
        DeferralPolicy.from_dict({**record, "format": 99})


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(budget=1.5), "budget must be in"),
        (dict(budget=-0.1), "budget must be in"),
        (dict(threshold=1.2), "threshold must be in"),
        (dict(mode="gain", threshold=float("nan")), "threshold must be finite"),
        (dict(expert_cost=[0.0, 0.1]), "expert_cost"),
        (dict(expert_cost=[0.0, float("inf"), 0.0]), "expert_cost"),
        (dict(mode="router", budget=0.1), "budget must be None in mode 'router'"),
        (dict(mode="router", threshold=0.5), "threshold must be None in mode 'router'"),
        (dict(mode="guess"), "mode"),
        (dict(expert_choice="best"), "best_expert"),
        (dict(best_expert=3), "best_expert"),
        (dict(expert_choice="heads", chosen="best"), "chosen must be None"),
        (dict(scores="probit"), "scores"),
    ],
)
def test_every_field_is_validated_by_name(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        DeferralPolicy(K, E, **kwargs)


def test_gain_thresholds_may_be_negative_and_bad_logits_are_named():
    p = DeferralPolicy(K, E, mode="gain", expert_choice="heads", threshold=-0.1)
    assert p.threshold == -0.1
    with pytest.raises(ValueError, match=r"logits must be \(B, 6, \*S\)"):
        p.route(torch.zeros(1, 5, 4, 4))
    with pytest.raises(ValueError, match="no threshold"):
        DeferralPolicy(K, E, expert_choice="heads").route(torch.zeros(1, 6, 4, 4))
    with pytest.raises(ValueError, match="no threshold to calibrate"):
        DeferralPolicy(K, E, mode="router").calibrate(_batches(), 0.1)


def test_for_loss_reads_the_surrogate_and_never_defers():
    assert DeferredSegLoss(1, 3).policy().scores == "sigmoid"
    assert DeferredSegLoss(1, 3, preset="paper").policy().scores == "softmax"
    assert DeferredSegLoss(1, 3, ignore_index=7).policy().ignore_index == 7
    never = DeferralPolicy.never(K, E)
    logits, _, experts = _batches(n=1)[0]
    assert not never.defers and (never.route(logits, experts).assignment < 0).all()


def test_histogram_auroc_matches_monai_and_rc_area_by_hand():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(4000, generator=g)
    y = torch.rand(4000, generator=g) < torch.sigmoid(2 * s)
    pos, neg = ScoreHistogram(), ScoreHistogram()
    pos.add(s[y])
    neg.add(s[~y])
    from monai.metrics import compute_roc_auc

    want = float(compute_roc_auc(s, y.long()))
    assert histogram_auroc(pos, neg) == pytest.approx(want, abs=1e-3)
    assert histogram_auroc(pos, ScoreHistogram()) is None
    assert rc_area([(0.0, 0.5), (0.5, 0.9), (1.0, 1.0)]) == pytest.approx(0.825)
    assert rc_area([(0.0, 0.7)]) == pytest.approx(0.7)  # one rate: its Dice
    assert math.isnan(rc_area([]))


def test_one_validation_at_the_budget_for_both_selections():
    data = lambda: iter(_batches())  # noqa: E731
    policy = DeferralPolicy(K, E, expert_choice="heads")
    cal, m = evaluate_policy(policy, data, 0.1, "budget-dice")
    assert abs(m["deferral_rate"] - 0.1) < 0.005 and m["selection_score"] == m["system_dice"]
    assert DeferralPolicy.from_dict(m["policy"]) == cal
    _, r = evaluate_policy(policy, data, 0.1, "rc-auc")
    rates = [c["deferral_rate"] for c in r["risk_coverage"]]
    assert [c["budget"] for c in r["risk_coverage"]] == list(RC_BUDGETS)
    assert all(abs(a - b) < 0.005 for a, b in zip(rates, RC_BUDGETS))
    assert r["selection_score"] == r["risk_coverage_auc"]
    never, n = evaluate_policy(DeferralPolicy.never(K, E), data, 0.1, "rc-auc")
    assert n["deferral_rate"] == 0 and n["selection_score"] == pytest.approx(n["system_dice"])
    with pytest.raises(ValueError, match="selection"):
        evaluate_policy(policy, data, 0.1, "best")
    metrics, examples = measure(cal, data, keep_examples=2)
    assert len(examples) == 2 and "score" in examples[0] and "defer_prob" not in examples[0]
