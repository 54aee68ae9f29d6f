"""The drop-in loss modules against the functional objective."""

import pytest
import torch
from _inputs import make_inputs
from torch.nn.modules.loss import _Loss

from deferredseg.losses import (
    DeferredSegLoss,
    LoadBalancingLoss,
    SpatialCoherenceLoss,
    SurrogateCollaborationLoss,
)
from deferredseg_kernels import deferredseg_loss, split_logits


def terms_of(logits, target, experts, K, E, **kw):
    return deferredseg_loss(
        logits, target, experts, K, E, backend="reference", return_terms=True, **kw
    )[1]


def test_all_modules_are_monai_style_losses():
    for cls in (
        DeferredSegLoss,
        SurrogateCollaborationLoss,
        SpatialCoherenceLoss,
        LoadBalancingLoss,
    ):
        assert issubclass(cls, _Loss)


@pytest.mark.parametrize("K,E", [(1, 3), (3, 2)])
def test_deferredseg_loss_module_matches_function_and_keeps_terms(K, E):
    logits, target, experts = make_inputs(2, K, E, (6, 5))
    logits.requires_grad_(True)
    crit = DeferredSegLoss(K, E, backend="reference", lambda_coherence=0.3, surrogate="paper")
    loss = crit(logits, target, experts)
    want, terms = deferredseg_loss(
        logits,
        target,
        experts,
        K,
        E,
        backend="reference",
        lambda_coherence=0.3,
        surrogate="paper",
        return_terms=True,
    )
    assert torch.equal(loss, want)
    assert set(crit.last_terms) == set(terms)
    for k in terms:
        assert torch.equal(crit.last_terms[k], terms[k])
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert "num_classes" in repr(crit)


def test_deferredseg_loss_module_defaults_to_the_training_objective_and_has_the_paper_preset():
    K, E = 3, 2
    logits, target, experts = make_inputs(2, K, E, (6, 5))
    crit = DeferredSegLoss(K, E, backend="reference")  # the "default" preset
    want, terms = deferredseg_loss(
        logits,
        target,
        experts,
        K,
        E,
        backend="reference",
        surrogate="ova",
        gate_target="benefit",
        gate_mse=0.0,
        gate_sparsity=0.0,
        lambda_gate=0.3,
        preset="paper",
        return_terms=True,
    )
    assert torch.equal(crit(logits, target, experts), want)
    paper = DeferredSegLoss(K, E, backend="reference", preset="paper")
    paper(logits, target, experts)
    assert crit.last_terms["collab"] != paper.last_terms["collab"]
    assert crit.last_terms["gate"] != paper.last_terms["gate"]
    assert "surrogate='ova'" in repr(crit) and "gate_target='benefit'" in repr(crit)
    o = paper.options  # the paper's objective: the fields' own defaults
    assert (o.surrogate, o.gate_target, o.gate_mse, o.gate_sparsity, o.lambda_gate) == (
        "softmax",
        "router",
        0.5,
        0.1,
        1.0,
    )
    # the functional form has the same default, and an explicit option beats the preset
    assert deferredseg_loss(logits, target, experts, K, E, backend="reference") == crit(
        logits, target, experts
    )
    assert DeferredSegLoss(K, E, surrogate="softmax").options.surrogate == "softmax"
    with pytest.raises(ValueError, match="preset"):
        DeferredSegLoss(K, E, preset="faithful")


def test_deferredseg_loss_module_auto_backend_close_to_reference():
    K, E = 1, 3
    logits, target, experts = make_inputs(2, K, E, (8, 8))
    got = DeferredSegLoss(K, E)(logits, target, experts)
    want = DeferredSegLoss(K, E, backend="reference")(logits, target, experts)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("surrogate", ["softmax", "paper", "ova"])
@pytest.mark.parametrize("K", [1, 3])
def test_surrogate_collaboration_matches_collab_term(surrogate, K):
    E = 3
    logits, target, experts = make_inputs(2, K, E, (5, 7), dtype=torch.float64)
    z, r, _ = split_logits(logits, K, E)
    crit = SurrogateCollaborationLoss(E, surrogate=surrogate)
    got = crit(r, target, experts, z)
    want = terms_of(logits, target, experts, K, E, surrogate=surrogate)["collab"]
    torch.testing.assert_close(got, want)
    # model_prediction given as labels instead of logits
    pred = z.argmax(1) if K >= 2 else (z[:, 0] > 0).long()
    torch.testing.assert_close(crit(r, target, experts, pred), want)
    # reductions agree with each other; "none" is zero at ignored pixels
    none = SurrogateCollaborationLoss(E, surrogate=surrogate, reduction="none")(
        r, target, experts, z
    )
    total = SurrogateCollaborationLoss(E, surrogate=surrogate, reduction="sum")(
        r, target, experts, z
    )
    assert none.shape == target.shape
    assert (none[target == -100] == 0).all()
    torch.testing.assert_close(none.sum(), total)
    torch.testing.assert_close(total / (target != -100).sum(), want)


def test_surrogate_collaboration_none_reduction_gradient_is_per_pixel():
    E = 2
    logits, target, experts = make_inputs(1, 1, E, (4, 4), dtype=torch.float64)
    r = logits[:, 1 : 1 + E + 1].clone().requires_grad_(True)
    z = logits[:, :1]
    none = SurrogateCollaborationLoss(E, reduction="none")(r, target, experts, z)
    w = torch.rand_like(none)
    (g,) = torch.autograd.grad((none * w).sum(), r)
    # a pixel's loss depends only on its own routing logits
    for idx in [(0, 0), (1, 2), (3, 3)]:
        one = SurrogateCollaborationLoss(E, reduction="none")(r, target, experts, z)[(0,) + idx]
        (gp,) = torch.autograd.grad(one, r)
        torch.testing.assert_close(
            g[(0, slice(None)) + idx], w[(0,) + idx] * gp[(0, slice(None)) + idx]
        )
    ignored = target[0] == -100
    assert (g[0][:, ignored] == 0).all()


@pytest.mark.parametrize("coherence", ["l1", "l2"])
def test_spatial_coherence_matches_router_map_term(coherence):
    K, E = 2, 3
    logits, target, experts = make_inputs(2, K, E, (5, 7), dtype=torch.float64)
    _, r, _ = split_logits(logits, K, E)
    D = torch.softmax(r, dim=1)[:, :E].sum(1)
    want = terms_of(logits, target, experts, K, E, coherence=coherence, coherence_maps=("router",))[
        "coherence"
    ]
    crit = SpatialCoherenceLoss(spatial_dims=2, coherence=coherence)
    torch.testing.assert_close(crit(D, target), want)
    torch.testing.assert_close(crit(D.unsqueeze(1), target.unsqueeze(1)), want)
    assert crit(torch.full((2, 4, 4), 0.3)).item() == 0.0


def test_spatial_coherence_3d_map_is_not_mistaken_for_a_channel():
    M = torch.rand(2, 1, 4, 4)
    as_3d = SpatialCoherenceLoss(spatial_dims=3)(M)
    as_2d = SpatialCoherenceLoss(spatial_dims=2)(M)
    # 3D: the length-1 depth axis adds nothing, the other two the same as 2D
    torch.testing.assert_close(as_3d, as_2d)
    with pytest.raises(ValueError, match="prob_map"):
        SpatialCoherenceLoss(spatial_dims=3)(torch.rand(2, 4, 4))


@pytest.mark.parametrize("balance", ["cv2", "band"])
def test_load_balancing_matches_balance_term(balance):
    K, E = 1, 3
    logits, target, experts = make_inputs(2, K, E, (5, 7), dtype=torch.float64)
    _, r, _ = split_logits(logits, K, E)
    kw = dict(balance=balance, balance_low=[0.2] * 4, balance_high=[0.26] * 4)
    t = terms_of(logits, target, experts, K, E, **kw)
    crit = LoadBalancingLoss(E, **kw)
    torch.testing.assert_close(crit(r, target), t["balance"])
    torch.testing.assert_close(crit.last_pbar, t["pbar"])


@pytest.mark.parametrize(
    "make,words",
    [
        (lambda: DeferredSegLoss(0, 3), ["num_classes", ">= 1", "0"]),
        (lambda: DeferredSegLoss(1, 3, backend="gpu"), ["backend", "gpu"]),
        (lambda: DeferredSegLoss(1, 3, coherence="huber"), ["coherence", "huber"]),
        (lambda: DeferredSegLoss(1, 3, gate_target="oracle"), ["gate_target", "oracle", "benefit"]),
        (lambda: DeferredSegLoss(1, 3, foo=1), ["foo"]),
        (lambda: SurrogateCollaborationLoss(3, reduction="max"), ["reduction", "max"]),
        (lambda: SurrogateCollaborationLoss(3, surrogate="hinge"), ["surrogate", "hinge"]),
        (lambda: SpatialCoherenceLoss(spatial_dims=4), ["spatial_dims", "4"]),
        (lambda: LoadBalancingLoss(3, balance="band"), ["balance_low"]),
        (
            lambda: LoadBalancingLoss(3, balance="band", balance_low=[0] * 4, balance_high=[1] * 3),
            ["balance_high", "length 4", "length 3"],
        ),
    ],
)
def test_bad_arguments_fail_in_init(make, words):
    with pytest.raises((ValueError, TypeError)) as info:
        make()
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_bad_forward_inputs_name_the_argument():
    crit = SurrogateCollaborationLoss(2)
    r = torch.randn(1, 3, 4, 4)
    t = torch.zeros(1, 4, 4, dtype=torch.long)
    m = torch.zeros(1, 2, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="routing_logits"):
        crit(torch.randn(1, 4, 4, 4), t, m, t)
    with pytest.raises(ValueError, match="expert_labels"):
        crit(r, t, m[:, :1], t)
    with pytest.raises(TypeError, match="target"):
        crit(r, t.float(), m, t)
    with pytest.raises(ValueError, match="target"):
        crit(r, t[:, :3], m, t)
    with pytest.raises(ValueError, match="model_prediction"):
        crit(r, t, m, t[:, :2])
    with pytest.raises(TypeError, match="routing_logits"):
        LoadBalancingLoss(2)(r.long())


# --------------------------------------------------------------------------- reduction


def _loss_backends():
    from deferredseg_kernels import available_backends

    return [b for b in ("reference", "cpu", "cuda", "triton") if b in available_backends("loss")]


@pytest.mark.parametrize("backend", ["reference", "cpu", "cuda", "triton"])
@pytest.mark.parametrize("K,E", [(1, 3), (3, 2)])
def test_deferredseg_loss_reduction_is_the_objective_of_each_image_on_its_own(backend, K, E):
    if backend not in _loss_backends():
        pytest.skip(f"{backend} backend not available here")
    # the GPU backends on CUDA tensors (Triton on the CPU only in its interpreter)
    on_gpu = backend == "cuda" or (backend == "triton" and torch.cuda.is_available())
    device = "cuda" if on_gpu else "cpu"
    opts = dict(backend=backend, lambda_balance=0.5, lambda_coherence=0.3)
    logits, target, experts = make_inputs(3, K, E, (6, 5), device=device)
    w = torch.tensor([0.3, -1.2, 2.0], device=device)

    # the hand-made loop: the "mean" objective of a batch of one image, image by image
    single = DeferredSegLoss(K, E, **opts)
    want, want_grad, want_terms = [], torch.zeros_like(logits), []
    for b in range(3):
        x = logits[b : b + 1].clone().requires_grad_(True)
        value = single(x, target[b : b + 1], experts[b : b + 1])
        (g,) = torch.autograd.grad(value, x)
        want.append(value.detach())
        want_grad[b] = g[0]
        want_terms.append(single.last_terms)
    want = torch.stack(want)

    x = logits.clone().requires_grad_(True)
    crit = DeferredSegLoss(K, E, reduction="none", **opts)
    none = crit(x, target, experts)
    assert none.shape == (3,)
    torch.testing.assert_close(none.detach(), want)
    (g,) = torch.autograd.grad((none * w).sum(), x)
    torch.testing.assert_close(g, want_grad * w.view(3, 1, 1, 1))
    for k in want_terms[0]:  # last_terms: one row per image
        torch.testing.assert_close(crit.last_terms[k], torch.stack([t[k] for t in want_terms]))

    x = logits.clone().requires_grad_(True)
    total = DeferredSegLoss(K, E, reduction="sum", **opts)(x, target, experts)
    assert total.shape == ()
    torch.testing.assert_close(total.detach(), want.sum())
    (g,) = torch.autograd.grad(total, x)
    torch.testing.assert_close(g, want_grad)

    # "mean" is the batch's objective, unchanged; with the balance term it is not the
    # mean of the per-image objectives (the loads are the batch's, not each image's)
    mean = DeferredSegLoss(K, E, **opts)(logits, target, experts)
    assert torch.equal(mean, deferredseg_loss(logits, target, experts, K, E, **opts))
    assert DeferredSegLoss(K, E, **opts).reduction == "mean"
    assert not torch.allclose(mean, want.mean())


def test_deferredseg_loss_reduction_on_an_empty_batch_and_bad_input():
    crit = DeferredSegLoss(1, 2, backend="reference", reduction="none")
    logits, target, experts = make_inputs(2, 1, 2, (4, 4))
    none = crit(logits[:0], target[:0], experts[:0])
    assert none.shape == (0,) and none.dtype == torch.float32
    summed = DeferredSegLoss(1, 2, backend="reference", reduction="sum")
    assert summed(logits[:0], target[:0], experts[:0]).item() == 0.0
    # the batch is checked as a whole, before any image is evaluated
    with pytest.raises(ValueError, match="target"):
        crit(logits, target[:1], experts)
    with pytest.raises(TypeError, match="target"):
        crit(logits, target.float(), experts)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_term_losses_reduce_per_image_like_a_loop(reduction):
    K, E = 1, 3
    logits, target, experts = make_inputs(3, K, E, (5, 7), dtype=torch.float64)
    _, r, _ = split_logits(logits, K, E)
    D = torch.softmax(r, dim=1)[:, :E].sum(1)
    kw = dict(balance="band", balance_low=[0.2] * 4, balance_high=[0.26] * 4)
    for make, args in (
        (lambda **k: SpatialCoherenceLoss(spatial_dims=2, coherence="l2", **k), (D, target)),
        (lambda **k: LoadBalancingLoss(E, **kw, **k), (r, target)),
        (lambda **k: LoadBalancingLoss(E, **k), (r, target)),
    ):
        one = make()
        want = torch.stack([one(*(a[b : b + 1] for a in args)) for b in range(3)])
        crit = make(reduction=reduction)
        got = crit(*args)
        torch.testing.assert_close(got, want if reduction == "none" else want.sum())
        torch.testing.assert_close(make()(*args), one(*args))  # "mean": the batch's value
    crit = LoadBalancingLoss(E, reduction="none")
    crit(r, target)
    assert crit.last_pbar.shape == (3, E + 1)
    single = LoadBalancingLoss(E)
    single(r[1:2], target[1:2])
    torch.testing.assert_close(crit.last_pbar[1], single.last_pbar)


@pytest.mark.parametrize(
    "make",
    [
        lambda r: DeferredSegLoss(1, 3, reduction=r),
        lambda r: SurrogateCollaborationLoss(3, reduction=r),
        lambda r: SpatialCoherenceLoss(reduction=r),
        lambda r: LoadBalancingLoss(3, reduction=r),
    ],
)
def test_bad_reduction_names_the_argument_the_choices_and_the_value(make):
    with pytest.raises(ValueError) as info:
        make("batchmean")
    for w in ("reduction", "'mean'", "'sum'", "'none'", "'batchmean'"):
        assert w in str(info.value), (w, str(info.value))


def test_per_image_reduction_refuses_sync_balance():
    for make in (
        lambda: DeferredSegLoss(1, 3, reduction="none", sync_balance=True),
        lambda: LoadBalancingLoss(3, reduction="sum", sync_balance=True),
    ):
        with pytest.raises(ValueError, match="reduction must be 'mean' when sync_balance"):
            make()
