"""Every fused backend against the reference: the checks that the contract of
docs/objective.md (sections 3, 5, 6 and 7) asks of any implementation.

Each test runs once per entry of ``_backends.BACKENDS`` (the C++ CPU kernels, the
C++ CUDA kernels, those CUDA kernels emulated on the CPU, and Triton), and its id
starts with the backend's name: ``test_option_matrix[cpu-K3-softmax-l1-...]``. A
new backend gets the whole suite by adding one entry there. An entry that cannot
run here is skipped with its reason (``cuda`` without a GPU); a capability an entry
lacks (``Backend.lacks``) skips the checks that need it, with the reason.

The sizes of the parametrized checks come from the entry's ``Plan`` (the option
matrix for one K only and smaller shapes for the Triton interpreter, larger ones
for the emulation so that its grid-stride loops take several steps); the checks
themselves, their tolerances and their inputs (tests/_inputs.py) are the same for
every backend. What only makes sense for one backend (instruction-set variants and
the gradient cache of the CPU kernels, streams and int64 offsets on a GPU, the
interpreter's small blocks, ...) stays in that backend's own test file.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from _backends import (
    BACKENDS,
    LAYOUTS,
    assert_close_to_max,
    assert_matches,
    check_results,
    float_params,
    int_params,
    layouts,
    load,
    run,
    unchecked_loss,
)
from _inputs import TERMS, iter_shapes, make_inputs, option_id, option_matrix

from deferredseg_kernels import available_backends, make_options

# --------------------------------------------------------------------------- parametrization


def plan(field):
    """The test takes ``case``, one per item of the backend's plan ``field``."""

    def mark(fn):
        fn.plan_field = field
        return fn

    return mark


def needs(*capabilities):
    """Skip the test, with the entry's reason, on a backend that lacks a capability."""

    def mark(fn):
        fn.capabilities = capabilities
        return fn

    return mark


def _label_id(dtype, ignore_index):
    return f"{str(dtype).replace('torch.', '')}-{ignore_index}"


def _cases(p, field):
    """(id, case) of a plan field."""
    if field == "matrix":
        return [
            (f"{c.name}-{option_id(o)}", (c, i, o))
            for c in p.matrix
            for i, o in enumerate(option_matrix(c.E))
        ]
    if field == "shapes":
        return [
            (f"{s}-K{K}-E{E}", (s, K, E, dict(p.shape_opts)))
            for s in list(iter_shapes()) + list(p.shape_extra)
            for K, E in p.shape_KE
        ]
    if field == "labels":
        return [
            (f"{_label_id(d, i)}-{'singleton' if one else 'plain'}", (d, i, one, p.label_spatial))
            for d, i in p.label_cases
            for one in (False, True)
        ]
    if field == "low_precision":
        return [
            (f"{c.name}-{str(d).replace('torch.', '')}", (c, d))
            for c in p.low_precision
            for d in (torch.bfloat16, torch.float16)
        ]
    return [(c.name, c) for c in getattr(p, field)]


def pytest_generate_tests(metafunc):
    if "backend" not in metafunc.fixturenames:
        return
    field = getattr(metafunc.function, "plan_field", None)
    params = []
    # DS_TEST_BACKENDS=cpu,triton runs only those entries (the older stacks of the support
    # matrix test the kernel layer they ship: the CPU and Triton kernels).
    only = [b for b in os.environ.get("DS_TEST_BACKENDS", "").split(",") if b]
    unknown = sorted(set(only) - {spec.name for spec in BACKENDS})
    if unknown:
        raise pytest.UsageError(
            f"DS_TEST_BACKENDS names unknown backends {unknown}; "
            f"expected some of {[spec.name for spec in BACKENDS]}"
        )
    for spec in BACKENDS:
        marks = []
        why = spec.unavailable()
        if only and spec.name not in only:
            why = f"{spec.name}: not in DS_TEST_BACKENDS={','.join(only)}"
        if spec.name == "cuda":
            # `pytest -m gpu` on a GPU machine runs the C++ CUDA entries (benchmarks/gpu_check.sh);
            # Triton's entries run there in their own, longer step.
            marks.append(pytest.mark.gpu)
        if why is not None:
            marks.append(pytest.mark.skipif(True, reason=why))
        for cap in getattr(metafunc.function, "capabilities", ()):
            if spec.lacking(cap) is not None:
                marks.append(pytest.mark.skip(reason=f"{spec.name}: {spec.lacking(cap)}"))
        if field is None:
            params.append(pytest.param(spec.name, id=spec.name, marks=marks))
        else:
            params += [
                pytest.param(spec.name, case, id=f"{spec.name}-{cid}", marks=marks)
                for cid, case in _cases(spec.plan, field)
            ]
    names = "backend" if field is None else ("backend", "case")
    metafunc.parametrize(names, params, indirect=["backend"])


@pytest.fixture
def backend(request):
    """The backend under test (an _backends.Ops), loaded on first use."""
    return load(request.param)


def _cpu_kernel():
    return load("cpu") if "cpu" in available_backends("loss") else None


# --------------------------------------------------------------------------- values and gradients


@plan("matrix")
def test_option_matrix(backend, case):
    c, idx, opts = case
    K, E = c.K, c.E
    g = torch.Generator().manual_seed(1000 + idx)
    logits, target, experts = make_inputs(2, K, E, c.spatial, generator=g, device=backend.device)
    extra = {}
    if c.extra.get("varied") and idx % 2:
        extra.update(
            class_weight=([0.3, 1.7, 1.1] * K)[: max(K, 2)],
            lambda_coherence=1.0,
            lambda_balance=1.0,
        )
    if c.extra.get("varied") and idx % 4 == 1:
        extra.update(
            gate_mse=1.3, gate_sparsity=0.25, lambda_seg=0.7, lambda_gate=1.9, paper_eps=1e-6
        )
    assert_matches(
        backend,
        logits,
        target,
        experts,
        K,
        E,
        grad_scale=float(torch.randn((), generator=g)),
        **opts,
        **extra,
    )


@plan("shapes")
def test_shapes(backend, case):
    spatial, K, E, opts = case
    logits, target, experts = make_inputs(2, K, E, spatial, device=backend.device)
    assert_matches(
        backend, logits, target, experts, K, E, grad_scale=float(torch.randn(())), **opts
    )


@plan("wide")
def test_wide_channels(backend, case):
    K, E = case.K, case.E
    logits, target, experts = make_inputs(
        case.extra["B"],
        K,
        E,
        case.spatial,
        scale=case.extra.get("scale", 2.0),
        device=backend.device,
    )
    for opts in case.extra["runs"]:
        if opts.get("class_weight") == "random":
            opts = dict(opts, class_weight=torch.rand(max(K, 2)).tolist())
        assert_matches(
            backend, logits, target, experts, K, E, rtol=case.extra.get("rtol", 1e-5), **opts
        )


@plan("ties")
def test_benefit_target_at_ties(backend, case):
    # Logits in {-1, 0, 1}: the router's experts tie often (jhat: the lowest index) and
    # so do experts and the model; the benefit target must pick the same expert as the
    # reference. (No router map: l1 / l2 coherence of tied D is not the point here.)
    K, E = case.K, case.E
    logits, target, experts = make_inputs(2, K, E, case.spatial, device=backend.device)
    logits = logits.round().clamp(-1, 1)
    for surrogate in ("softmax", "ova"):
        assert_matches(
            backend,
            logits,
            target,
            experts,
            K,
            E,
            grad_scale=0.8,
            gate_target="benefit",
            surrogate=surrogate,
            lambda_coherence=0.5,
            **case.opts,
        )


@pytest.mark.parametrize("K", [1, 3])
def test_extreme_logits_against_float64(backend, K):
    """exp / log / log1p over the whole float32 range: logits from tiny to beyond the
    exp underflow (|x| > 87) and huge; float32 kernel vs the float64 reference, at
    most twice the float32 reference's own error."""
    E = 3
    logits, target, experts = make_inputs(2, K, E, (16, 24), dtype=torch.float64)
    g = torch.Generator().manual_seed(7)
    mags = torch.tensor(
        [0.0, 1e-7, 1e-3, 0.5, 3.0, 20.0, 86.5, 87.5, 95.0, 1e4], dtype=torch.float64
    )
    pick = torch.randint(0, mags.numel(), logits.shape, generator=g)
    sign = torch.where(torch.rand(logits.shape, generator=g) < 0.5, -1.0, 1.0).double()
    logits = (mags[pick] * sign).float()
    dev = backend.device
    logits, target, experts = logits.to(dev), target.to(dev), experts.to(dev)
    loss, _, grad = run(backend, logits, target, experts, K, E)
    rloss, _, rgrad = run("reference", logits, target, experts, K, E)
    hloss, _, hgrad = run("reference", logits.double(), target, experts, K, E)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    err, ref_err = (loss.double() - hloss).abs(), (rloss.double() - hloss).abs()
    assert err <= 2 * ref_err + 1e-6 * hloss.abs(), (float(err), float(ref_err))
    gerr = (grad.double() - hgrad).abs().max()
    ref_gerr = (rgrad.double() - hgrad).abs().max()
    assert gerr <= 2 * ref_gerr + 1e-6 * hgrad.abs().max(), (float(gerr), float(ref_gerr))


def test_float64_matches_reference(backend):
    """float64 logits: float64 loss and gradient, within 1e-7 of the reference (the
    lambdas and eps may reach a kernel as float32 scalars)."""
    K, E = 2, 2
    logits, target, experts = make_inputs(
        2, K, E, (4, 5), dtype=torch.float64, device=backend.device
    )
    got = assert_matches(backend, logits, target, experts, K, E, rtol=1e-7, lambda_coherence=1.0)
    assert got[0].dtype == torch.float64 and got[2].dtype == torch.float64


# ---------------------------------------------------------------------- labels, weights, ignored


def _make_labelled(K, E, spatial, label_dtype, ignore_index, device):
    if ignore_index < 2**31:
        return make_inputs(
            2, K, E, spatial, label_dtype=label_dtype, ignore_index=ignore_index, device=device
        )
    # an ignore_index that needs 64 bits
    logits, target, experts = make_inputs(2, K, E, spatial, ignore_index=-7, device=device)
    target = torch.where(target == -7, torch.full_like(target, ignore_index), target)
    experts = torch.where(experts == -7, torch.full_like(experts, ignore_index), experts)
    return logits, target.to(label_dtype), experts.to(label_dtype)


@plan("labels")
def test_label_dtypes(backend, case):
    """Plain targets; (B, 1, *S) targets with class weights; all pixels ignored."""
    label_dtype, ignore_index, singleton, spatial = case
    K, E = 3, 2
    logits, target, experts = _make_labelled(
        K, E, spatial, label_dtype, ignore_index, backend.device
    )
    opts = dict(ignore_index=ignore_index)
    if singleton:
        target = target.unsqueeze(1)
        opts.update(class_weight=[0.3, 1.0, 2.0])
    assert_matches(backend, logits, target, experts, K, E, **opts)
    none = torch.full_like(target, ignore_index)
    loss, terms, grad = assert_matches(
        backend, logits, none, experts, K, E, ignore_index=ignore_index
    )
    assert loss.item() == 0.0 and torch.all(grad == 0)


def test_mixed_label_dtypes(backend):
    logits, target, experts = make_inputs(1, 2, 2, (5, 7), ignore_index=255, device=backend.device)
    assert_matches(
        backend, logits, target.to(torch.uint8), experts.to(torch.int32), 2, 2, ignore_index=255
    )


@pytest.mark.parametrize("K", [1, 4])
def test_class_weight(backend, K):
    logits, target, experts = make_inputs(2, K, 2, (9, 8), device=backend.device)
    w = torch.rand(max(K, 2)) * 2
    assert_matches(backend, logits, target, experts, K, 2, class_weight=w.to(backend.device))


@pytest.mark.parametrize("present", ["classes01", "class0"])
def test_class_weight_zero_mass(backend, present):
    # The weights of every class present are 0: SEG is 0, not 0/0, and sends no gradient.
    if present == "classes01":
        logits, target, experts = make_inputs(1, 3, 2, (5, 6), device=backend.device)
        target = torch.where(target == 2, torch.ones_like(target), target)
        weights = [0.0, 0.0, 1.0]
    else:
        logits, target, experts = make_inputs(2, 3, 2, (4, 4), device=backend.device)
        target = torch.where(target >= 0, torch.zeros_like(target), target)
        weights = [0.0, 1.0, 1.0]
    loss, terms, grad = assert_matches(backend, logits, target, experts, 3, 2, class_weight=weights)
    assert terms["seg"].item() == 0.0
    assert torch.all(grad[:, :3] == 0)


@pytest.mark.parametrize("K", [1, 3])
def test_all_ignored(backend, K):
    E = 3
    logits, target, experts = make_inputs(2, K, E, (6, 7), device=backend.device)
    target = torch.full_like(target, -100)
    weights = [1.0, 2.0, 3.0][: max(K, 2)]
    n = E + 1
    band = dict(balance="band", balance_low=[0.5 / n] * n, balance_high=[1.5 / n] * n)
    for opts in ({}, dict(class_weight=weights, **band)):
        loss, terms, grad = assert_matches(backend, logits, target, experts, K, E, **opts)
        assert loss.item() == 0.0
        assert all(float(terms[name].abs().sum()) == 0.0 for name in TERMS)
        assert torch.all(grad == 0)


@pytest.mark.parametrize(
    "label_dtype,ignore_index",
    [(torch.uint8, 255), (torch.int64, -100)],
    ids=["uint8-255", "int64--100"],
)
def test_heavily_ignored(backend, label_dtype, ignore_index):
    K, E = 3, 2
    logits, target, experts = make_inputs(
        2,
        K,
        E,
        (6, 5),
        ignore_frac=0.7,
        ignore_index=ignore_index,
        label_dtype=label_dtype,
        device=backend.device,
    )
    assert_matches(
        backend, logits, target, experts, K, E, ignore_index=ignore_index, class_weight=[1, 2, 3]
    )


# --------------------------------------------------------------------------- low precision


def _err(a, b):
    return float((a.double() - b.double()).abs().max())


@plan("low_precision")
def test_low_precision(backend, case):
    """flash-attention rule: the error against the float64 reference (on the same
    values) at most twice the reference's own error in that dtype, for the loss, the
    terms and the gradient; values are float32, the gradient in the logits' dtype."""
    c, dtype = case
    K, E = c.K, c.E
    logits, target, experts = make_inputs(2, K, E, c.spatial, dtype=dtype, device=backend.device)
    truth = run("reference", logits.double(), target, experts, K, E, **c.opts)
    ref = run("reference", logits, target, experts, K, E, **c.opts)
    got = run(backend, logits, target, experts, K, E, **c.opts)
    assert got[0].dtype == torch.float32 and got[2].dtype == dtype
    hloss = abs(float(truth[0]))
    err, ref_err = _err(got[0], truth[0]), _err(ref[0], truth[0])
    assert err <= 2 * ref_err + 1e-6 * hloss, (err, ref_err)
    # Both compute in float32; the floor is float32 rounding of the sums.
    assert err <= 2 * ref_err + 4e-7 * hloss + 1e-7, (err, ref_err)
    for name in TERMS:
        floor = 4e-7 * float(truth[1][name].abs().max()) + 1e-6
        assert (
            _err(got[1][name], truth[1][name]) <= 2 * _err(ref[1][name], truth[1][name]) + floor
        ), name
    gerr, ref_gerr = _err(got[2], truth[2]), _err(ref[2], truth[2])
    assert gerr <= 2 * ref_gerr + 1e-7 * float(truth[2].abs().max()), (gerr, ref_gerr)

    # A grad_output other than 1 rescales the stored gradient once, in float32: the
    # float32 product rounded once to the dtype (the gradient itself was rounded in the
    # forward pass, as the fused contract stores it in the logits' dtype).
    go = (torch.rand((), dtype=torch.float64) * 1.5 + 0.25).item()
    scaled = run(backend, logits, target, experts, K, E, go, **c.opts)
    expect = (got[2].float() * torch.tensor(go, dtype=torch.float32)).to(dtype)
    assert torch.equal(scaled[2], expect)


# --------------------------------------------------------------------------- layouts


_DENSE = ("channels_last", "permuted_batch", "transposed_spatial", "channels_last_3d")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_noncontiguous_logits(backend, layout):
    """Views of the logits are read in place (or copied), never written; the gradient
    has its own memory, in the logits' memory format when they are dense (and
    contiguous otherwise). The labels are views too: dense with permuted strides for
    every other layout, not dense for the rest."""
    K, E = 3, 2
    x = layouts(K, E, backend.spec.plan.layout_spatial, backend.device)[layout]
    B, S = x.shape[0], tuple(x.shape[2:])
    _, target, experts = make_inputs(B, K, E, S, device=backend.device)
    if LAYOUTS.index(layout) % 2 == 0:
        target = target.transpose(-1, -2).contiguous().transpose(-1, -2)
        experts = experts.transpose(0, 1).contiguous().transpose(0, 1)
    else:
        target = torch.stack([target, target], dim=-1)[..., 1]
        experts = torch.cat([experts, experts], 1)[:, E:]
        assert not target.is_contiguous() and not experts.is_contiguous()
    before = x.detach().clone()
    got = run(backend, x, target, experts, K, E)
    assert torch.equal(x, before)  # inputs untouched
    grad = got[2]
    assert grad.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    assert grad.stride() == torch.empty_like(x).stride()
    if layout in _DENSE:
        assert grad.stride() == x.stride(), "the gradient keeps the logits' memory format"
    else:
        assert grad.is_contiguous()
    want = run("reference", x.contiguous(), target.contiguous(), experts.contiguous(), K, E)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-7)
    check_results(got, want)


# --------------------------------------------------------------------------- determinism


def test_deterministic(backend):
    """Two runs give the same bits; a backend other than the C++ CPU kernels agrees with
    them (value and gradient within 1e-5)."""
    K, E = 1, 3
    logits, target, experts = make_inputs(
        2, K, E, backend.spec.plan.determinism_spatial, device=backend.device
    )
    cpu = _cpu_kernel()
    for opts in (dict(), dict(surrogate="ova", gate_target="benefit")):
        a = run(backend, logits, target, experts, K, E, **opts)
        b = run(backend, logits, target, experts, K, E, **opts)
        assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
        assert all(torch.equal(a[1][name], b[1][name]) for name in TERMS)
        if backend.name == "cpu":
            continue
        if cpu is None:
            pytest.skip("the C++ CPU kernels are not built: nothing to compare with")
        c = run(cpu, logits.cpu(), target.cpu(), experts.cpu(), K, E, **opts)
        torch.testing.assert_close(a[0].cpu(), c[0], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(a[2].cpu(), c[2], rtol=1e-5, atol=1e-5 * float(c[2].abs().max()))


# --------------------------------------------------------------------------- NaN, bad labels


def test_nan_and_inf_propagate(backend):
    K, E = 3, 2
    logits, target, experts = make_inputs(1, K, E, (4, 5), ignore_frac=0.0, device=backend.device)
    target[0, 1, 2] = 1
    for channel in (0, K, K + E + 1):  # a segmentation, a routing and the gate logit
        x = logits.clone()
        x[0, channel, 1, 2] = float("nan")
        assert torch.isnan(run(backend, x, target, experts, K, E)[0]), channel
        assert torch.isnan(run("reference", x, target, experts, K, E)[0])
    x = logits.clone()
    x[0, 0, 1, 2] = float("inf")  # not the target's class
    assert torch.isnan(run(backend, x, target, experts, K, E)[0])
    assert torch.isnan(run("reference", x, target, experts, K, E)[0])


def test_nan_in_ignored_pixel_does_not_leak(backend):
    # An ignored pixel's logits take no part in the loss, NaN or not. (The reference's
    # gradient there is NaN: autograd through torch.where multiplies 0 by NaN; the
    # kernels give 0, the gradient of a term the pixel is not in.)
    K, E = 1, 2
    logits, target, experts = make_inputs(1, K, E, (4, 5), ignore_frac=0.0, device=backend.device)
    target[0, 1, 2] = -100
    x = logits.clone()
    x[0, :, 1, 2] = float("nan")
    loss, terms, grad = run(backend, x, target, experts, K, E)
    rloss, rterms, _ = run("reference", x, target, experts, K, E)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, rloss, rtol=1e-5, atol=1e-7)
    assert torch.isfinite(grad).all() and torch.all(grad[0, :, 1, 2] == 0)


def test_bad_labels(backend):
    """docs/objective.md section 6: labels out of range raise where they are checked
    eagerly (the CPU), with the reference's message; elsewhere a bad target makes the
    loss NaN, never an out-of-bounds read."""
    K, E = 3, 2
    logits, target, experts = make_inputs(2, K, E, (5, 6), device=backend.device)
    bad_t = target.clone()
    bad_t[0, 1, 2] = 7
    bad_t[1, 0, 0] = -3
    bad_e = experts.clone()
    bad_e[0, 1, 3, 3] = 9
    bad_e[1, 0, 2, 3] = -3
    if backend.spec.checks_labels_eagerly:
        with pytest.raises(ValueError, match="target"):
            backend.loss(logits, bad_t, experts, K, E)
        with pytest.raises(ValueError, match="expert_labels"):
            backend.loss(logits, target, bad_e, K, E)
    else:
        assert torch.isnan(backend.loss(logits, bad_t, experts, K, E))
        huge = target.clone()
        huge[0, 0, :2] = torch.tensor([10**12, -7], device=backend.device)
        assert torch.isnan(backend.loss(logits, huge, experts, K, E))


def test_ops_count_bad_labels_and_never_read_out_of_bounds(backend):
    # Called directly (as under torch.compile, where labels are not checked eagerly):
    # huge or negative labels are counted in stats[E + 6] and never used as indices.
    K, E = 3, 2
    dev = backend.device
    logits, target, experts = make_inputs(1, K, E, (6, 7), device=dev)
    target[0, 0, :3] = torch.tensor([10**12, -5, 3], device=dev)
    experts[0, 0, 1, :2] = torch.tensor([-(10**12), 99], device=dev)
    w = torch.ones(3, device=dev)
    opts = make_options(K, E)
    stats = backend.stats_op(logits, target, experts, w, K, E, -100, True)
    assert stats[E + 6].item() == 5
    stats_t = backend.stats_op(logits, target, experts, w, K, E, -100, False)
    assert stats_t[E + 6].item() == 3
    terms, grad = backend.loss_op(
        logits,
        target,
        experts,
        w,
        stats,
        None,
        None,
        K,
        E,
        -100,
        float_params(opts, 1.0),
        int_params(opts),
        True,
    )
    assert torch.isfinite(terms).all() and torch.isfinite(grad).all()
    assert torch.isnan(unchecked_loss(backend, logits, target, experts, opts))


# --------------------------------------------------------------------------- the ops' contract


def test_stats_layout(backend):
    """The stats op's E + 7 float64 values (ops/fused.py): S_0..S_E, N_V, the weight
    mass, the neighbour pairs per axis, the count of bad labels."""
    K, E = 3, 2
    dev = backend.device
    logits, target, experts = make_inputs(2, K, E, backend.spec.plan.stats_spatial, device=dev)
    w = torch.tensor([0.5, 2.0, 1.5], device=dev)
    stats = backend.stats_op(logits, target, experts, w, K, E, -100, True)
    assert stats.dtype == torch.float64 and stats.shape == (E + 7,)
    valid = target != -100
    pi = torch.softmax(logits[:, K : K + E + 1].double(), 1)
    torch.testing.assert_close(
        stats[: E + 1], (pi * valid.unsqueeze(1)).sum((0, 2, 3)), rtol=1e-6, atol=1e-6
    )
    assert stats[E + 1].item() == valid.sum().item()
    torch.testing.assert_close(
        stats[E + 2], w.double()[target.clamp_min(0)][valid].sum(), rtol=1e-6, atol=0
    )
    pairs0 = (valid[:, 1:] & valid[:, :-1]).sum().item()
    pairs1 = (valid[:, :, 1:] & valid[:, :, :-1]).sum().item()
    assert stats[E + 3 :].tolist() == [pairs0, pairs1, 0.0, 0.0]
    cpu = _cpu_kernel()
    if backend.name == "cpu" or cpu is None:
        return
    experts[0, 1, 3, 4] = 7  # out of range: counted when checked
    for check in (False, True):
        stats = backend.stats_op(logits, target, experts, w, K, E, -100, check)
        want = cpu.stats_op(logits.cpu(), target.cpu(), experts.cpu(), w.cpu(), K, E, -100, check)
        torch.testing.assert_close(stats.cpu(), want, rtol=1e-6, atol=1e-6)
        assert stats[E + 6].item() == (1.0 if check else 0.0)


def test_sync_stats_layout(backend):
    """A stats vector of E + 8 values (sync_balance): pbar over N_B, the means over N_V;
    another backend's loss op gives what the C++ CPU one does on it."""
    K, E = 2, 3
    dev = backend.device
    logits, target, experts = make_inputs(2, K, E, backend.spec.plan.sync_spatial, device=dev)
    opts = make_options(K, E, lambda_balance=1.0)
    fp, ip = float_params(opts, 1.0), int_params(opts)
    stats = backend.stats_op(logits, target, experts, None, K, E, -100, False)
    # As if a second rank had the same pixels again: sums and N_B doubled.
    synced = torch.cat([2 * stats[: E + 1], stats[E + 1 :], 2 * stats[E + 1 : E + 2]])
    terms, _ = backend.loss_op(
        logits, target, experts, None, stats, None, None, K, E, -100, fp, ip, True
    )
    terms2, _ = backend.loss_op(
        logits, target, experts, None, synced, None, None, K, E, -100, fp, ip, True
    )
    torch.testing.assert_close(terms2, terms)  # pbar unchanged, every mean per rank
    # The balance gradient of each pixel halves (pbar = S / N_B with N_B doubled).
    opts_b = make_options(
        K,
        E,
        lambda_seg=0.0,
        lambda_collab=0.0,
        lambda_gate=0.0,
        lambda_coherence=0.0,
        lambda_balance=1.0,
    )
    fb, ib = float_params(opts_b, 1.0), int_params(opts_b)
    _, gb = backend.loss_op(
        logits, target, experts, None, stats, None, None, K, E, -100, fb, ib, True
    )
    _, gb2 = backend.loss_op(
        logits, target, experts, None, synced, None, None, K, E, -100, fb, ib, True
    )
    torch.testing.assert_close(gb2, gb / 2)

    opts = make_options(
        K, E, lambda_balance=1.5, balance="band", balance_low=[0.2] * 4, balance_high=[0.3] * 4
    )
    fp, ip = float_params(opts, 2.0), int_params(opts)
    low = torch.tensor(opts.balance_low, device=dev)
    high = torch.tensor(opts.balance_high, device=dev)
    synced = torch.cat([3 * stats[: E + 1], stats[E + 1 :], 3 * stats[E + 1 : E + 2]])
    cpu = _cpu_kernel()
    for st in (stats, synced):
        terms, grad = backend.loss_op(
            logits, target, experts, None, st, low, high, K, E, -100, fp, ip, True
        )
        noterms, nograd = backend.loss_op(
            logits, target, experts, None, st, low, high, K, E, -100, fp, ip, False
        )
        assert nograd.shape == (0,)
        torch.testing.assert_close(noterms, terms, rtol=0, atol=0)
        if backend.name == "cpu" or cpu is None:
            continue
        cterms, cgrad = cpu.loss_op(
            logits.cpu(),
            target.cpu(),
            experts.cpu(),
            None,
            st.cpu(),
            low.cpu(),
            high.cpu(),
            K,
            E,
            -100,
            fp,
            ip,
            True,
        )
        torch.testing.assert_close(terms.cpu(), cterms, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(
            grad.cpu(), cgrad, rtol=1e-5, atol=1e-5 * float(cgrad.abs().max())
        )


def test_sync_balance_single_process_group(backend, tmp_path):
    import torch.distributed as dist

    K, E = 2, 2
    logits, target, experts = make_inputs(2, K, E, (4, 5), device=backend.device)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        assert_matches(
            backend, logits, target, experts, K, E, sync_balance=True, lambda_balance=1.0
        )
    finally:
        dist.destroy_process_group()


def test_balance_grad_scale(backend):
    """fparams["balance_grad_scale"] (contract.FLOAT_FIELDS) scales only the balance gradient
    (DDP sync), never the value."""
    K, E = 2, 3
    logits, target, experts = make_inputs(2, K, E, (5, 5), device=backend.device)
    opts = make_options(
        K,
        E,
        lambda_seg=0.0,
        lambda_collab=0.0,
        lambda_gate=0.0,
        lambda_coherence=0.0,
        lambda_balance=1.0,
    )
    stats = backend.stats_op(logits, target, experts, None, K, E, -100, False)
    out = [
        backend.loss_op(
            logits,
            target,
            experts,
            None,
            stats,
            None,
            None,
            K,
            E,
            -100,
            float_params(opts, s),
            int_params(opts),
            True,
        )
        for s in (1.0, 2.5)
    ]
    assert torch.equal(out[0][0], out[1][0])
    torch.testing.assert_close(out[1][1], 2.5 * out[0][1])
    assert_close_to_max(out[1][1], 2.5 * out[0][1], "scaled balance gradient")
    assert float(out[0][1].abs().max()) > 0


@pytest.mark.parametrize("K", [1, 3])
def test_no_grad(backend, K):
    """Without autograd the loss is the same; the loss op without compute_grad returns
    the same terms and an empty gradient."""
    E = 2
    logits, target, experts = make_inputs(2, K, E, (5, 6), device=backend.device)
    with torch.no_grad():
        a = backend.loss(logits, target, experts, K, E)
    b = backend.loss(logits.clone().requires_grad_(True), target, experts, K, E)
    assert torch.equal(a, b.detach())
    opts = make_options(K, E)
    stats = backend.stats_op(logits, target, experts, None, K, E, -100, False)
    terms, grad = backend.loss_op(
        logits,
        target,
        experts,
        None,
        stats,
        None,
        None,
        K,
        E,
        -100,
        float_params(opts, 1.0),
        int_params(opts),
        False,
    )
    assert grad.numel() == 0 and torch.equal(terms[0], a)


@pytest.mark.parametrize("K,E", [(1, 2), (2, 1)])
def test_empty_batch(backend, K, E):
    logits, target, experts = make_inputs(0, K, E, (3, 4), device=backend.device)
    loss, terms, grad = assert_matches(backend, logits, target, experts, K, E)
    assert loss.item() == 0.0 and grad.shape == logits.shape
    opts = make_options(K, E)
    stats = backend.stats_op(logits, target, experts, None, K, E, -100, True)
    assert torch.all(stats == 0)
    terms, grad = backend.loss_op(
        logits,
        target,
        experts,
        None,
        stats,
        None,
        None,
        K,
        E,
        -100,
        float_params(opts, 1.0),
        int_params(opts),
        True,
    )
    assert torch.all(terms == 0) and grad.shape == logits.shape


# --------------------------------------------------------------------------- autograd machinery


@plan("gradcheck")
def test_gradcheck_float64(backend, case):
    K, E = case.K, case.E
    g = torch.Generator().manual_seed(3)
    C, P = K + E + 2, math.prod(case.spatial)
    # Well separated logits (no argmax tie or z = 0 within the finite-difference step).
    x = (torch.randperm(C * P, generator=g).double() + 0.5) / 7 - 3
    x = x.reshape(1, C, *case.spatial).to(backend.device).requires_grad_(True)
    _, target, experts = make_inputs(1, K, E, case.spatial, generator=g, device=backend.device)
    target.view(-1)[0] = -100

    # gate_mse = 0: the gate term uses stopgrad(D), which finite differences cannot see.
    def f(v):
        return backend.loss(v, target, experts, K, E, **case.opts)

    assert torch.autograd.gradcheck(
        f,
        (x,),
        eps=1e-6,
        atol=case.extra.get("atol", 1e-6),
        rtol=case.extra.get("rtol", 1e-5),
        fast_mode=case.extra.get("fast_mode", False),
    )


@needs("opcheck")
def test_opcheck(backend):
    K, E = 3, 2
    dev = backend.device
    logits, target, experts = make_inputs(2, K, E, (4, 5), device=dev)
    w = torch.tensor([1.0, 2.0, 0.5], device=dev)
    low, high = torch.full((E + 1,), 0.1, device=dev), torch.full((E + 1,), 0.5, device=dev)
    torch.library.opcheck(backend.stats_op, (logits, target, experts, w, K, E, -100, True))
    torch.library.opcheck(backend.stats_op, (logits, target, experts, None, K, E, -100, False))
    stats = backend.stats_op(logits, target, experts, w, K, E, -100, False)
    band = make_options(
        K,
        E,
        surrogate="paper",
        coherence="l2",
        balance="band",
        balance_low=[0.1] * 3,
        balance_high=[0.5] * 3,
    )
    ova = make_options(K, E, surrogate="ova", gate_target="benefit")
    for opts, lo, hi, compute_grad in (
        (make_options(K, E), None, None, True),
        (band, low, high, True),
        (band, low, high, False),
        (ova, None, None, True),
    ):
        x = logits.clone().requires_grad_(compute_grad)
        torch.library.opcheck(
            backend.loss_op,
            (
                x,
                target,
                experts,
                w,
                stats,
                lo,
                hi,
                K,
                E,
                -100,
                float_params(opts, 1.0),
                int_params(opts),
                compute_grad,
            ),
        )


@needs("compile")
@pytest.mark.parametrize(
    "K,E,spatial,scale,opts",
    [
        (1, 3, (6, 7), 1.5, dict(coherence="l2")),
        (3, 2, (5, 6), 2.0, dict()),
    ],
    ids=["binary-l2", "multiclass"],
)
def test_torch_compile_fullgraph(backend, K, E, spatial, scale, opts):
    """No graph break; the same values as eager, the same gradient to within 1e-6."""
    logits, target, experts = make_inputs(2, K, E, spatial, device=backend.device)

    def f(x):
        loss, terms = backend.loss(x, target, experts, K, E, True, **opts)
        return loss * scale, terms["coherence"]

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    out = []
    for fn in (compiled, f):
        x = logits.clone().requires_grad_(True)
        y, coh = fn(x)
        (grad,) = torch.autograd.grad(y, x)
        out.append((y.detach(), coh, grad))
    (y1, c1, g1), (y2, c2, g2) = out
    assert torch.equal(y1, y2) and torch.equal(c1, c2)
    torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-9)
    assert_close_to_max(g1, g2, "compiled grad", rtol=1e-6)
