"""Experts: simulated discrepancy experts, structured experts, consensus (majority, STAPLE)."""

import pytest
import torch

from deferredseg.experts import (
    PROFILES,
    BoundaryShiftExpert,
    ChainExpert,
    DiscrepancyExpert,
    ExpertPanel,
    MissedComponentsExpert,
    RegionSkillExpert,
    SmoothBoundaryExpert,
    boundary_band,
    connected_components,
    consensus_target,
    dilate,
    erode,
    majority_vote,
    make_experts,
    simulated_experts,
    staple,
    structured_experts,
)


def disc_labels(shape, centres, radii, labels=None):
    """A (B, *S) label map of discs / balls (the same in every batch row)."""
    B, S = shape[0], shape[1:]
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in S], indexing="ij")
    y = torch.zeros(S, dtype=torch.int64)
    for i, (c, r) in enumerate(zip(centres, radii)):
        d2 = sum((g - ci) ** 2 for g, ci in zip(grids, c))
        y[d2 <= r * r] = 1 if labels is None else labels[i]
    return y.expand(B, *S).clone()


def binomial_consistent(k: int, n: int, p: float, alpha: float = 1e-6) -> bool:
    """Exact two-sided binomial test: is k successes in n trials consistent with p at level
    alpha?"""
    if p >= 1.0:
        return k == n
    if p <= 0.0:
        return k == 0
    dist = torch.distributions.Binomial(total_count=n, probs=torch.tensor(p, dtype=torch.float64))
    logpmf = dist.log_prob(torch.arange(n + 1, dtype=torch.float64))
    lower = torch.logsumexp(logpmf[: k + 1], 0).exp().item()
    upper = torch.logsumexp(logpmf[k:], 0).exp().item()
    return min(1.0, 2 * min(lower, upper)) > alpha


def test_binomial_bound_has_power():
    n = 20000
    assert binomial_consistent(int(0.9 * n), n, 0.9)
    assert not binomial_consistent(int(0.9 * n), n, 0.92)
    assert not binomial_consistent(int(0.9 * n), n, 0.88)
    assert binomial_consistent(n, n, 1.0) and not binomial_consistent(n - 1, n, 1.0)


@pytest.mark.parametrize("profile", ["same-accuracy", "complementary"])
def test_discrepancy_accuracy_per_region_matches_parameters(profile):
    radius = 3
    target = disc_labels((4, 96, 96), [(30, 30), (60, 65), (20, 75)], [14, 18, 6])
    panel = simulated_experts(profile, num_labels=2, edge_radius=radius, seed=1)
    assert panel.num_experts == len(PROFILES[profile])
    fg = target == 1
    edge = dilate(fg, radius) & ~fg
    far = ~fg & ~edge
    out = panel(target)
    assert out.shape == (4, panel.num_experts, 96, 96) and out.dtype == torch.int64
    for j, (fg_acc, bg_acc, boost) in enumerate(PROFILES[profile]):
        correct = out[:, j] == target
        for region, p in ((fg, fg_acc), (edge, min(bg_acc + boost, 1.0)), (far, bg_acc)):
            n, k = int(region.sum()), int(correct[region].sum())
            assert n > 3000
            assert binomial_consistent(k, n, p), (profile, j, p, k / n, n)


def test_discrepancy_edge_boost_is_capped_at_one():
    target = disc_labels((2, 64, 64), [(32, 32)], [12])
    expert = DiscrepancyExpert(0.9, 0.95, edge_boost=0.2, edge_radius=2)
    panel = ExpertPanel([expert], num_labels=2, seed=0)
    out = panel(target)[:, 0]
    edge = dilate(target == 1, 2) & (target == 0)
    assert expert.edge_acc == 1.0
    assert torch.equal(out[edge], target[edge])


def test_discrepancy_multiclass_wrong_labels_are_uniform_over_the_others():
    L = 4
    target = disc_labels(
        (4, 80, 80), [(20, 20), (55, 30), (40, 62)], [12, 14, 10], labels=[1, 2, 3]
    )
    expert = DiscrepancyExpert(0.6, 0.7, 0.0, edge_radius=1)
    out = ExpertPanel([expert], num_labels=L, seed=3)(target)[:, 0]
    assert out.min() >= 0 and out.max() < L
    fg = target != 0
    correct = out == target
    assert binomial_consistent(int(correct[fg].sum()), int(fg.sum()), 0.6)
    assert binomial_consistent(int(correct[~fg].sum()), int((~fg).sum()), 0.7)
    wrong = ~correct
    for c in range(
        L
    ):  # given the truth is c, a wrong label is each other label with probability 1/(L-1)
        sel = wrong & (target == c)
        n = int(sel.sum())
        for other in range(L):
            if other != c:
                assert binomial_consistent(int((out[sel] == other).sum()), n, 1.0 / (L - 1)), (
                    c,
                    other,
                )


def test_discrepancy_3d_and_1d():
    t3 = disc_labels((2, 24, 24, 24), [(12, 12, 12)], [6])
    out = simulated_experts("same-accuracy", seed=0)(t3)
    assert out.shape == (2, 3, 24, 24, 24)
    fg = t3 == 1
    assert binomial_consistent(int((out[:, 0] == t3)[fg].sum()), int(fg.sum()), 0.92)
    t1 = torch.zeros(3, 50, dtype=torch.int64)
    t1[:, 20:30] = 1
    assert simulated_experts("complementary")(t1).shape == (3, 5, 50)


def test_reproducible_by_seed_and_resampled_each_call():
    target = disc_labels((2, 48, 48), [(24, 24)], [10])
    a1, a2 = simulated_experts(seed=5), simulated_experts(seed=5)
    first, second = a1(target), a1(target)
    assert not torch.equal(first, second)  # resampled every call
    assert torch.equal(first, a2(target)) and torch.equal(
        second, a2(target)
    )  # same seed, same stream
    assert not torch.equal(first, simulated_experts(seed=6)(target))
    a1.reseed_stream(5)
    assert torch.equal(a1(target), first)
    s1, s2 = structured_experts(seed=2), structured_experts(seed=2)
    assert torch.equal(s1(target), s2(target))


def test_fixed_per_image_is_keyed_by_id_not_by_order_or_call():
    target = torch.stack(
        [
            disc_labels((1, 40, 40), [(20, 20)], [8])[0],
            disc_labels((1, 40, 40), [(15, 25)], [11])[0],
        ]
    )
    for panel in (
        simulated_experts("complementary", seed=4, resample=False),
        structured_experts(seed=4, resample=False),
    ):
        ab = panel(target, ids=["a", "b"])
        assert torch.equal(ab, panel(target, ids=["a", "b"]))  # the same at every epoch
        ba = panel(target.flip(0), ids=["b", "a"])
        assert torch.equal(ab, ba.flip(0))  # independent of the batch order
        assert torch.equal(ab[1:], panel(target[1:], ids=["b"]))  # and of the batch's other images
        assert not torch.equal(ab[:1], panel(target[:1], ids=["c"]))
        panel.reseed_stream(99)  # what a data-loader worker seed does: fixed labels do not move
        assert torch.equal(ab, panel(target, ids=["a", "b"]))
        with pytest.raises(ValueError, match="ids"):
            panel(target)


def test_panel_errors_and_ignore_index():
    target = disc_labels((1, 20, 20), [(10, 10)], [4])
    target[0, 0, :5] = -100
    out = simulated_experts()(target)
    assert (out[:, :, 0, :5] == -100).all() and (out[:, :, 1:] >= 0).all()
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        simulated_experts()(torch.full((1, 4, 4), 3))
    with pytest.raises(TypeError, match="integer"):
        simulated_experts()(torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="profile"):
        simulated_experts("nonsense")
    with pytest.raises(ValueError, match="fg_acc"):
        DiscrepancyExpert(1.5, 0.9)
    assert make_experts([(0.9, 0.9, 0.0)]).num_experts == 1
    assert make_experts("structured").num_experts == 5


# --- structured experts ---------------------------------------------------------------------


def _changed_only_near_boundaries(target, out, reach):
    changed = out != target
    near = boundary_band(target, reach)
    return bool(changed.any()) and not bool((changed & ~near).any())


@pytest.mark.parametrize("shape", [(2, 64, 64), (1, 20, 20, 20)])
def test_boundary_shift_changes_boundaries_not_far_pixels(shape):
    centres = [(32, 32), (20, 44)] if len(shape) == 3 else [(10, 10, 10)]
    radii = [12, 6] if len(shape) == 3 else [5]
    target = disc_labels(shape, centres, radii)
    g = torch.Generator().manual_seed(0)
    grown = BoundaryShiftExpert(2).sample(target, 2, g)
    shrunk = BoundaryShiftExpert(-2).sample(target, 2, g)
    assert torch.equal(grown == 1, dilate(target == 1, 2))
    assert torch.equal(shrunk == 1, erode(target == 1, 2))
    assert _changed_only_near_boundaries(target, grown, 2)
    assert _changed_only_near_boundaries(target, shrunk, 2)
    ranged = BoundaryShiftExpert((-3, 3)).sample(target, 2, g)
    assert not bool(((ranged != target) & ~boundary_band(target, 3)).any())


def test_structured_experts_multiclass_only_touch_boundaries():
    target = disc_labels((2, 64, 64), [(20, 20), (44, 40), (50, 12)], [10, 12, 3], labels=[1, 2, 3])
    g = torch.Generator().manual_seed(1)
    for expert, reach in (
        (BoundaryShiftExpert(2), 2),
        (BoundaryShiftExpert(-2), 2),
        (SmoothBoundaryExpert(amplitude=2.5, scale=6), 3),
        (RegionSkillExpert(BoundaryShiftExpert(3), classes=[2]), 3),
    ):
        out = expert.sample(target, 4, g)
        assert out.min() >= 0 and out.max() < 4
        assert _changed_only_near_boundaries(target, out, reach), expert


@pytest.mark.parametrize("shape", [(2, 64, 64), (1, 24, 24, 24), (2, 80)])
def test_smooth_boundary_wobble_is_bounded_and_smooth(shape):
    nd = len(shape) - 1
    centre = tuple(s // 2 for s in shape[1:])
    target = disc_labels(shape, [centre], [min(shape[1:]) // 4])
    expert = SmoothBoundaryExpert(amplitude=3.0, scale=8)
    g = torch.Generator().manual_seed(2)
    disp = expert.displacement(target.shape, g, target.device)
    assert disp.shape == (shape[0], nd) + tuple(shape[1:]) and disp.abs().max() <= 3.0
    step = (disp.narrow(2, 1, shape[1] - 1) - disp.narrow(2, 0, shape[1] - 1)).abs().max()
    assert step <= 2 * 3.0 / 8 + 1e-5  # interpolated control points: bounded slope, smooth
    out = expert.sample(target, 2, g)
    assert _changed_only_near_boundaries(target, out, 3)


def test_region_skill_changes_only_its_region():
    target = disc_labels((2, 64, 64), [(32, 32)], [16])
    expert = RegionSkillExpert(BoundaryShiftExpert(3), half=(0, "high"))
    out = expert.sample(target, 2, torch.Generator().manual_seed(0))
    changed = out != target
    assert changed[:, 32:].any() and not changed[:, :32].any()
    with pytest.raises(ValueError, match="classes and/or half"):
        RegionSkillExpert(BoundaryShiftExpert(1))


def test_missed_components_drop_only_small_components():
    target = disc_labels(
        (2, 64, 64), [(20, 20), (50, 50), (10, 55), (55, 8)], [12, 2, 1, 2], labels=[1, 1, 2, 1]
    )
    sizes = {}
    comp = connected_components(target, 3)
    for v in comp[0].unique().tolist():
        if v:
            sizes[v] = int((comp[0] == v).sum())
    assert len(sizes) == 4 and max(sizes.values()) > 400 and sorted(sizes.values())[-2] <= 13
    all_missed = MissedComponentsExpert(max_size=20, miss_prob=1.0).sample(
        target, 3, torch.Generator()
    )
    big = comp == max(sizes, key=sizes.get)
    assert torch.equal(all_missed[big], target[big])
    assert (all_missed[~big] == 0).all()
    none_missed = MissedComponentsExpert(max_size=20, miss_prob=0.0).sample(
        target, 3, torch.Generator()
    )
    assert torch.equal(none_missed, target)
    some = MissedComponentsExpert(max_size=20, miss_prob=0.5).sample(
        target[:1].expand(64, -1, -1).clone(), 3, torch.Generator().manual_seed(0)
    )
    kept = [
        (some[:, comp[0] == v] != 0).all(dim=1).float().mean().item()
        for v in sizes
        if sizes[v] <= 20
    ]
    assert all(0.2 < k < 0.8 for k in kept)  # each small component missed about half of the time
    for v in sizes:  # a component is dropped whole or not at all
        sel = some[:, comp[0] == v]
        assert ((sel == 0).all(dim=1) | (sel != 0).all(dim=1)).all()


def test_connected_components_3d_and_chain():
    t = torch.zeros(1, 10, 10, 10, dtype=torch.int64)
    t[0, 1:4, 1:4, 1:4] = 1
    t[0, 6:9, 6:9, 6:9] = 1
    t[0, 4, 4, 4] = 1  # touches the first cube diagonally: 26-connected
    comp = connected_components(t, 2)
    assert len(comp.unique()) == 3
    chain = ChainExpert([BoundaryShiftExpert(1), MissedComponentsExpert(5, 1.0)])
    assert chain.sample(t, 2, torch.Generator()).shape == t.shape


# --- consensus --------------------------------------------------------------------------------


def test_majority_vote_ties_and_ignore():
    r = torch.tensor(
        [[[0, 1, 1, 2, -100]], [[1, 1, 0, 2, -100]], [[0, 2, 2, 1, -100]]]
    )  # (R=3, 1, 5)
    out = majority_vote(r, 3, rater_dim=0)
    assert out.tolist() == [[0, 1, 0, 2, -100]]  # a three-way tie goes to the lowest label
    tie = torch.tensor([[0, 1], [1, 0]])  # (R=2, S=2): ties go to the lowest label
    assert majority_vote(tie, 2, rater_dim=0).tolist() == [0, 0]
    batch = r.transpose(0, 1)  # (B=1, R=3, 5)
    assert torch.equal(majority_vote(batch, 3), out)


def test_staple_binary_recovers_rater_performance():
    truth = disc_labels((1, 128, 128), [(40, 40), (90, 80)], [25, 30])[0]
    accs = [(0.95, 0.97), (0.75, 0.80), (0.72, 0.78), (0.70, 0.82)]  # (sensitivity, specificity)
    g = torch.Generator().manual_seed(0)
    raters = []
    for sens, spec in accs:
        u = torch.rand(truth.shape, generator=g)
        keep = torch.where(truth == 1, u < sens, u < spec)
        raters.append(torch.where(keep, truth, 1 - truth))
    raters = torch.stack(raters)  # (R, H, W)
    fg = truth == 1
    emp_sens = [(r[fg] == 1).double().mean().item() for r in raters]
    emp_spec = [(r[~fg] == 0).double().mean().item() for r in raters]
    vote_acc = (majority_vote(raters, 2, rater_dim=0) == truth).float().mean()
    # Classic STAPLE (prior fixed at the vote frequencies) is biased by the raters' false
    # positives; re-estimating the prior recovers each rater's own sensitivity / specificity.
    for prior, tol in (("votes", 0.05), ("estimate", 0.01)):
        res = staple(raters, 2, rater_dim=0, prior=prior)
        for j in range(len(accs)):
            assert abs(res.confusion[j, 1, 1].item() - emp_sens[j]) < tol, (prior, j)
            assert abs(res.confusion[j, 0, 0].item() - emp_spec[j]) < tol, (prior, j)
        staple_acc = (res.labels == truth).float().mean()
        assert staple_acc > vote_acc and staple_acc > 0.95
    assert abs(res.prior[1].item() - fg.double().mean().item()) < 0.01
    assert torch.allclose(res.probs.sum(0), torch.ones(()).double())


def test_staple_multiclass_and_consensus_target():
    truth = disc_labels((2, 64, 64), [(20, 20), (44, 40)], [12, 14], labels=[1, 2])
    good = simulated_experts([(0.97, 0.97, 0.0)] * 2, num_labels=3, seed=0)(truth)
    bad = simulated_experts([(0.55, 0.6, 0.0)] * 3, num_labels=3, seed=1)(truth)
    raters = torch.cat([good, bad], dim=1)  # (B, 5, H, W): two good raters, three poor ones
    res = staple(raters, 3)
    assert res.labels.shape == truth.shape and res.confusion.shape == (2, 5, 3, 3)
    staple_acc = (res.labels == truth).float().mean()
    vote_acc = (majority_vote(raters, 3) == truth).float().mean()
    assert staple_acc > vote_acc and staple_acc > 0.97
    assert torch.equal(consensus_target(raters, "staple", 3), res.labels)
    assert torch.equal(consensus_target(raters, "majority", 3), majority_vote(raters, 3))
    names = ["g0", "g1", "b0", "b1", "b2"]
    assert torch.equal(consensus_target(raters, "b1", 3, rater_names=names), raters[:, 3])
    assert torch.equal(consensus_target(raters, 0, 3), raters[:, 0])
    with pytest.raises(ValueError, match="rater name"):
        consensus_target(raters, "nobody", 3, rater_names=names)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        consensus_target(raters, "majority", 2)
