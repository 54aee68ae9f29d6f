"""The C++ CPU kernels of the fused objective (backend="cpu") against the reference.

Values and gradients over the option matrix, odd shapes, K and E from 1 to wide,
label dtypes, class weights, ignored pixels, low precision (flash-attention rule),
strided logits, determinism (also across thread counts and instruction sets),
NaN propagation, bad labels, gradcheck, opcheck and torch.compile.
"""

import gc
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from deferredseg_kernels import available_backends, deferredseg_loss, make_options
from deferredseg_kernels.ops import fused

from _inputs import TERMS, assert_results_close, iter_shapes, make_inputs, option_id, option_matrix

pytestmark = pytest.mark.skipif("cpu" not in available_backends("loss"),
                                reason="the C++ CPU kernels are not built")


def run(backend, logits, target, experts, K, E, grad_scale=None, **opts):
    """(loss, terms, grad of grad_scale * loss) of one backend on a fresh leaf copy."""
    x = logits.detach().clone().requires_grad_(True)
    loss, terms = deferredseg_loss(x, target, experts, K, E, backend=backend,
                                   return_terms=True, **opts)
    scale = 1.0 if grad_scale is None else grad_scale
    (loss * scale).backward()
    return loss.detach(), terms, x.grad


def assert_matches(logits, target, experts, K, E, rtol=1e-5, grad_scale=None, **opts):
    """Kernel vs reference (_inputs.assert_results_close); returns the kernel's results."""
    got = run("cpu", logits, target, experts, K, E, grad_scale, **opts)
    assert_results_close(got, run("reference", logits, target, experts, K, E, grad_scale, **opts),
                         rtol)
    return got


# --------------------------------------------------------------------------- values and gradients


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("opts", option_matrix(3), ids=option_id)
def test_option_matrix(opts, K):
    logits, target, experts = make_inputs(2, K, 3, (7, 13))
    assert_matches(logits, target, experts, K, 3, grad_scale=float(torch.randn(())), **opts)


@pytest.mark.parametrize("spatial", list(iter_shapes()), ids=str)
@pytest.mark.parametrize("K,E", [(1, 1), (3, 3), (1, 16), (12, 3)])
def test_shapes(spatial, K, E):
    logits, target, experts = make_inputs(2, K, E, spatial)
    assert_matches(logits, target, experts, K, E, grad_scale=float(torch.randn(())))


@pytest.mark.parametrize("K,E", [(2, 16), (12, 1)])
@pytest.mark.parametrize("opts", [option_matrix(16)[i] for i in (5, 10, 32, 37)], ids=option_id)
def test_wide_channels_3d(K, E, opts):
    logits, target, experts = make_inputs(1, K, E, (3, 9, 10))
    if "balance_low" in opts:  # option_matrix(16) sized them for E = 16
        n = E + 1
        opts = dict(opts, balance_low=[0.5 / n] * n, balance_high=[1.5 / n] * n)
    assert_matches(logits, target, experts, K, E, **opts)


def test_many_tiles_and_options():
    # More pixels than one tile, both coherence maps, 3D, and non-default weights.
    logits, target, experts = make_inputs(2, 3, 3, (6, 17, 21), ignore_frac=0.3)
    assert_matches(logits, target, experts, 3, 3, grad_scale=-0.7, lambda_seg=0.3,
                   lambda_collab=1.7, lambda_gate=0.9, lambda_coherence=0.8, lambda_balance=1.3,
                   gate_mse=0.2, gate_sparsity=0.05, paper_eps=1e-4, surrogate="paper")
    assert_matches(logits, target, experts, 3, 3, grad_scale=1.3, lambda_collab=0.6,
                   lambda_coherence=0.8, surrogate="ova", gate_target="benefit")


@pytest.mark.parametrize("K,E", [(1, 3), (3, 2), (2, 6)])
@pytest.mark.parametrize("maps", [(), ("gate",)], ids=["nomaps", "gatemap"])
def test_benefit_target_at_ties(K, E, maps):
    # Logits in {-1, 0, 1}: the router's experts tie often (jhat: the lowest index) and
    # so do experts and the model; the benefit target must pick the same expert as the
    # reference. (No router map: l1 / l2 coherence of tied D is not the point here.)
    logits, target, experts = make_inputs(2, K, E, (9, 31))
    logits = logits.round().clamp(-1, 1)
    for surrogate in ("softmax", "ova"):
        assert_matches(logits, target, experts, K, E, grad_scale=0.8, gate_target="benefit",
                       surrogate=surrogate, coherence_maps=maps, lambda_coherence=0.5)


@pytest.mark.parametrize("spatial", [(40, 300), (8, 32, 40)], ids=str)
def test_map_window_slides(spatial):
    # Volumes larger than a thread's map window (about 3 (2 ahead + 1) tiles, ahead =
    # ceil(prod(S[1:]) / 256)), so the window compacts while a thread walks its tiles.
    logits, target, experts = make_inputs(1, 1, 2, spatial, ignore_frac=0.2)
    assert_matches(logits, target, experts, 1, 2, lambda_coherence=1.0)
    assert_matches(logits, target, experts, 1, 2, lambda_coherence=1.0, coherence="l2",
                   coherence_maps=("gate",))


@pytest.mark.parametrize("spatial", [(20000,), (3, 9000), (5, 3, 700), (2, 130, 64), (2, 40, 300),
                                     (2, 10, 1024)],
                         ids=str)
def test_neighbour_masks_every_path(spatial):
    # The kernel takes a tile's neighbour masks along an axis from a table (period
    # S[d] * st[d] of at most 8192 pixels), as a row of ones or zeros (every pixel of
    # the tile has one coordinate along the axis) or computes them (any other tile):
    # these shapes have axes of each kind, with tiles that cut rows and slabs.
    # coherence="l2": which pairs count shows in its values and gradients just as with
    # "l1", without l1's kink (two neighbours whose D is equal to within a float32 ulp
    # give either sign; on (2, 40, 300) one such pair made the gradient differ).
    logits, target, experts = make_inputs(1, 1, 2, spatial, ignore_frac=0.2)
    assert_matches(logits, target, experts, 1, 2, lambda_coherence=1.0, coherence="l2")
    assert_matches(logits, target, experts, 1, 2, lambda_coherence=1.0, coherence="l2",
                   coherence_maps=("gate",))


@pytest.mark.parametrize("K", [1, 4])
def test_class_weight(K):
    logits, target, experts = make_inputs(2, K, 2, (9, 8))
    w = torch.rand(max(K, 2)) * 2
    assert_matches(logits, target, experts, K, 2, class_weight=w)


def test_class_weight_zero_mass():
    # The weights of every class present are 0: SEG is 0, not 0/0, and sends no gradient.
    logits, target, experts = make_inputs(1, 3, 2, (5, 6))
    target = torch.where(target == 2, torch.ones_like(target), target)  # classes 0, 1 only
    loss, terms, grad = assert_matches(logits, target, experts, 3, 2, class_weight=[0.0, 0.0, 1.0])
    assert terms["seg"].item() == 0.0
    assert torch.all(grad[:, :3] == 0)


@pytest.mark.parametrize("K", [1, 3])
def test_all_ignored(K):
    logits, target, experts = make_inputs(2, K, 3, (6, 7))
    target = torch.full_like(target, -100)
    loss, terms, grad = assert_matches(logits, target, experts, K, 3)
    assert loss.item() == 0.0
    assert all(float(terms[n].abs().sum()) == 0.0 for n in TERMS)
    assert torch.all(grad == 0)


@pytest.mark.parametrize("label_dtype,ignore_index", [(torch.uint8, 255), (torch.int32, -100),
                                                      (torch.int64, -1)])
@pytest.mark.parametrize("singleton_channel", [False, True])
def test_label_dtypes(label_dtype, ignore_index, singleton_channel):
    logits, target, experts = make_inputs(2, 3, 2, (6, 9), label_dtype=label_dtype,
                                          ignore_index=ignore_index)
    if singleton_channel:
        target = target.unsqueeze(1)
    assert_matches(logits, target, experts, 3, 2, ignore_index=ignore_index)


def test_mixed_label_dtypes():
    logits, target, experts = make_inputs(1, 2, 2, (5, 7), ignore_index=255)
    assert_matches(logits, target.to(torch.uint8), experts.to(torch.int32), 2, 2, ignore_index=255)


# --------------------------------------------------------------------------- low precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K", [1, 3])
def test_low_precision(dtype, K):
    """flash-attention rule: error vs float64 at most twice the reference's own error."""
    E = 3
    logits, target, experts = make_inputs(2, K, E, (9, 11), dtype=dtype)
    loss, _, grad = run("cpu", logits, target, experts, K, E)
    rloss, _, rgrad = run("reference", logits, target, experts, K, E)
    hloss, _, hgrad = run("reference", logits.double(), target, experts, K, E)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    err, ref_err = (loss.double() - hloss).abs(), (rloss.double() - hloss).abs()
    assert err <= 2 * ref_err + 1e-6 * hloss.abs(), (float(err), float(ref_err))
    gerr = (grad.double() - hgrad).abs().max()
    ref_gerr = (rgrad.double() - hgrad).abs().max()
    assert gerr <= 2 * ref_gerr + 1e-6 * hgrad.abs().max(), (float(gerr), float(ref_gerr))


@pytest.mark.parametrize("K", [1, 3])
def test_extreme_logits_against_float64(K):
    """The kernel's own exp / log / log1p polynomials over the whole float32 range.

    Logits from tiny to beyond the exp underflow (|x| > 87) and huge; float32 kernel
    vs the float64 reference, at most twice the float32 reference's own error.
    """
    E = 3
    logits, target, experts = make_inputs(2, K, E, (16, 24), dtype=torch.float64)
    g = torch.Generator().manual_seed(7)
    mags = torch.tensor([0.0, 1e-7, 1e-3, 0.5, 3.0, 20.0, 86.5, 87.5, 95.0, 1e4], dtype=torch.float64)
    pick = torch.randint(0, mags.numel(), logits.shape, generator=g)
    sign = torch.where(torch.rand(logits.shape, generator=g) < 0.5, -1.0, 1.0).double()
    logits = (mags[pick] * sign).float()
    loss, _, grad = run("cpu", logits, target, experts, K, E)
    rloss, _, rgrad = run("reference", logits, target, experts, K, E)
    hloss, _, hgrad = run("reference", logits.double(), target, experts, K, E)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    err, ref_err = (loss.double() - hloss).abs(), (rloss.double() - hloss).abs()
    assert err <= 2 * ref_err + 1e-6 * hloss.abs(), (float(err), float(ref_err))
    gerr = (grad.double() - hgrad).abs().max()
    ref_gerr = (rgrad.double() - hgrad).abs().max()
    assert gerr <= 2 * ref_gerr + 1e-6 * hgrad.abs().max(), (float(gerr), float(ref_gerr))


# --------------------------------------------------------------------------- layouts


def _layouts():
    K, E = 3, 2
    C = K + E + 2
    base = torch.randn(3, C + 4, 7, 9, dtype=torch.float64) * 2

    def slice_():  # channel slice of a bigger tensor (non-dense)
        return base[:2, 2:2 + C].float()[:, :]

    def channels_last():
        return base[:2, :C].float().contiguous(memory_format=torch.channels_last)

    def permuted_batch():
        return base[:2, :C].float().transpose(0, 1).contiguous().transpose(0, 1)

    def transposed_spatial():  # dense, but the spatial dims cannot be flattened as a view
        return base[:2, :C].float().transpose(2, 3).contiguous().transpose(2, 3)

    def strided_pixels():  # every other pixel along the last axis
        return torch.randn(2, C, 7, 18)[..., ::2]

    return {f.__name__: f for f in (slice_, channels_last, permuted_batch, transposed_spatial,
                                    strided_pixels)}


@pytest.mark.parametrize("layout", list(_layouts()))
def test_noncontiguous_logits(layout):
    K, E = 3, 2
    x = _layouts()[layout]()
    B, S = x.shape[0], tuple(x.shape[2:])
    _, target, experts = make_inputs(B, K, E, S)
    target = target.transpose(-1, -2).contiguous().transpose(-1, -2)  # strided labels too
    experts = experts[..., :].transpose(0, 1).contiguous().transpose(0, 1)
    xin = x.detach().clone()  # (clone keeps the layout)
    before = x.detach().clone()
    leaf = x.detach().requires_grad_(True)
    loss = deferredseg_loss(leaf, target, experts, K, E, backend="cpu")
    loss.backward()
    assert torch.equal(leaf.detach(), before)  # inputs untouched
    grad = leaf.grad
    assert grad.untyped_storage().data_ptr() != leaf.untyped_storage().data_ptr()
    assert grad.stride() == torch.empty_like(leaf).stride()  # the logits' memory format
    ref = xin.contiguous().requires_grad_(True)
    rloss = deferredseg_loss(ref, target.contiguous(), experts.contiguous(), K, E,
                             backend="reference")
    rloss.backward()
    torch.testing.assert_close(loss, rloss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, ref.grad, rtol=1e-5, atol=1e-5 * float(ref.grad.abs().max()))


# --------------------------------------------------------------------------- determinism


def _kernel_run(logits, target, experts, K, E, **opts):
    loss, terms, grad = run("cpu", logits, target, experts, K, E, **opts)
    return loss, torch.stack([terms[n] for n in TERMS[:-1]]), grad


@pytest.mark.parametrize("spatial", [(64, 80), (8, 32, 40)], ids=str)
def test_deterministic_across_runs_and_threads(spatial):
    # Enough tiles that two threads split them (and, in 3D, the neighbour windows
    # of the coherence term cross the split).
    K, E = 1, 3
    logits, target, experts = make_inputs(2, K, E, spatial)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a = _kernel_run(logits, target, experts, K, E)
        b = _kernel_run(logits, target, experts, K, E)
        torch.set_num_threads(1)
        c = _kernel_run(logits, target, experts, K, E)
    finally:
        torch.set_num_threads(before)
    for u, v, w in zip(a, b, c):
        assert torch.equal(u, v) and torch.equal(u, w)


_ISA_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from _inputs import make_inputs
    from deferredseg_kernels import deferredseg_loss
    torch.manual_seed(0)
    worst = 0.0
    for K, E, S, kw in [(1, 3, (9, 10), dict()), (3, 2, (4, 5, 6), dict(surrogate="paper",
                        coherence="l2", balance="band", balance_low=[0.1] * 3,
                        balance_high=[0.5] * 3)), (1, 1, (33,), dict(surrogate="paper")),
                        (2, 4, (5, 7), dict(coherence_maps=("gate",))), (1, 5, (6, 6), dict()),
                        (3, 3, (6, 7), dict(surrogate="ova", gate_target="benefit")),
                        (1, 2, (5, 9), dict(surrogate="ova", coherence_maps=("router",))),
                        (2, 5, (4, 7), dict(surrogate="ova", gate_target="benefit",
                                            coherence_maps=()))]:
        for dtype in (torch.float32, torch.bfloat16):
            x, t, e = make_inputs(2, K, E, S, dtype=dtype)
            out = []
            for backend in ("cpu", "reference"):
                leaf = x.clone().requires_grad_(True)
                loss = deferredseg_loss(leaf, t, e, K, E, backend=backend, **kw)
                loss.backward()
                out.append((loss.double(), leaf.grad.double()))
            (l1, g1), (l2, g2) = out
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            worst = max(worst, float((l1 - l2).abs() / l2.abs()) / tol,
                        float((g1 - g2).abs().max() / g2.abs().max()) / tol)
    print("WORST", worst)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="x86-64 Linux variants only")
def test_every_instruction_set_variant():
    """The baseline and AVX2 builds of the kernels (picked by DEFERREDSEG_CPU_ISA) match too,
    and so does the generic any-E path (DEFERREDSEG_CPU_GENERIC=1) that E <= 4 skips."""
    tests = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(tests)
    script = _ISA_SCRIPT.format(tests=tests)
    procs = {}
    variants = {"base": dict(DEFERREDSEG_CPU_ISA="base"), "v3": dict(DEFERREDSEG_CPU_ISA="v3"),
                "generic": dict(DEFERREDSEG_CPU_GENERIC="1")}
    for isa, extra in variants.items():
        env = dict(os.environ, OMP_NUM_THREADS="1", **extra,
                   PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        procs[isa] = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=root,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for isa, p in procs.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, f"{isa}: {err[-2000:]}"
        worst = float(out.split("WORST")[1])
        assert worst <= 1.0, f"{isa}: error {worst} x tolerance"


# --------------------------------------------------------------------------- NaN, bad labels, edges


def test_nan_propagates():
    K, E = 3, 2
    logits, target, experts = make_inputs(1, K, E, (4, 5), ignore_frac=0.0)
    for channel in (0, K, K + E + 1):  # a segmentation, a routing and the gate logit
        x = logits.clone()
        x[0, channel, 1, 2] = float("nan")
        loss, _, grad = run("cpu", x, target, experts, K, E)
        assert torch.isnan(loss)
        rloss, _, _ = run("reference", x, target, experts, K, E)
        assert torch.isnan(rloss)
    x = logits.clone()
    x[0, 0, 1, 2] = float("inf")
    loss, _, _ = run("cpu", x, target, experts, K, E)
    rloss, _, _ = run("reference", x, target, experts, K, E)
    assert torch.isnan(loss) == torch.isnan(rloss) or torch.isinf(loss) == torch.isinf(rloss)


def test_nan_in_ignored_pixel_does_not_leak():
    # An ignored pixel's logits take no part in the loss, NaN or not. (The reference's
    # gradient there is NaN: autograd through torch.where multiplies 0 by NaN; the
    # kernel gives 0, the gradient of a term the pixel is not in.)
    K, E = 1, 2
    logits, target, experts = make_inputs(1, K, E, (4, 5), ignore_frac=0.0)
    target[0, 1, 2] = -100
    x = logits.clone()
    x[0, :, 1, 2] = float("nan")
    loss, terms, grad = run("cpu", x, target, experts, K, E)
    rloss, rterms, _ = run("reference", x, target, experts, K, E)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, rloss, rtol=1e-5, atol=1e-7)
    assert torch.isfinite(grad).all() and torch.all(grad[0, :, 1, 2] == 0)


def test_bad_labels_raise():
    K, E = 2, 2
    logits, target, experts = make_inputs(1, K, E, (4, 5))
    bad = target.clone()
    bad[0, 0, 0] = 7
    with pytest.raises(ValueError, match="target"):
        deferredseg_loss(logits, bad, experts, K, E, backend="cpu")
    bad_e = experts.clone()
    bad_e[0, 1, 2, 3] = -3
    with pytest.raises(ValueError, match="expert_labels"):
        deferredseg_loss(logits, target, bad_e, K, E, backend="cpu")


def test_loss_op_checks_expert_labels_when_asked():
    # iparams[5] = 1: the loss pass (which reads the expert labels anyway) raises on one
    # out of range; without it (torch.compile, direct calls) it computes as before.
    K, E = 2, 3
    logits, target, experts = make_inputs(1, K, E, (5, 6))
    opts = make_options(K, E)
    stats = torch.ops.deferredseg.loss_stats(logits, target, experts, None, K, E, -100, False)
    stats = torch.cat([stats, stats[E + 1:E + 2]])
    args = (logits, target, experts, None, stats, None, None, K, E, -100,
            fused.float_params(opts, 1.0))
    bad = experts.clone()
    bad[0, 2, 4, 5] = 2  # K' = 2 labels
    with pytest.raises(ValueError, match=r"expert_labels must hold labels in \[0, 2\)"):
        torch.ops.deferredseg.loss_fused(*args[:2], bad, *args[3:], fused.int_params(opts) + [1], True)
    terms, grad = torch.ops.deferredseg.loss_fused(*args[:2], bad, *args[3:], fused.int_params(opts), True)
    assert torch.isfinite(terms).all() and torch.isfinite(grad).all()
    torch.ops.deferredseg.loss_fused(*args, fused.int_params(opts) + [1], True)  # good labels pass
    with pytest.raises(RuntimeError, match="iparams must have 5 or 6 values"):
        torch.ops.deferredseg.loss_fused(*args, fused.int_params(opts) + [1, 0], True)
    # Through the public call the message names the values, as the reference's does.
    with pytest.raises(ValueError, match=r"expert_labels .* got value\(s\) \[2\]"):
        deferredseg_loss(logits, target, bad, K, E, backend="cpu")


def test_large_gradient_streamed():
    # A gradient of >= 4 MiB is written with non-temporal stores; odd sizes make the
    # rows start unaligned, so the aligned body and both unaligned ends are used.
    K, E = 1, 3
    logits, target, experts = make_inputs(1, K, E, (509, 419))
    assert logits.numel() * 4 >= 4 << 20
    assert_matches(logits, target, experts, K, E, grad_scale=0.7)


def test_gradient_buffer_reused_only_when_free():
    # Large gradients come from one cached buffer, reused only when nothing of the
    # caller's still refers to its storage (a tensor, a view or the storage itself).
    from deferredseg_kernels import empty_cache

    K, E = 1, 3
    logits, target, experts = make_inputs(1, K, E, (430, 430))
    assert logits.numel() * 4 >= 4 << 20
    empty_cache()

    def grad_of(x):
        leaf = x.detach().clone().requires_grad_(True)
        deferredseg_loss(leaf, target, experts, K, E, backend="cpu").backward()
        return leaf.grad

    expected = grad_of(logits).clone()
    for kind in ("tensor", "view", "storage"):
        g1 = grad_of(logits)
        ptr = g1.data_ptr()
        held = {"tensor": lambda: g1, "view": lambda: g1[0, 2],
                "storage": lambda: g1.untyped_storage()}[kind]()
        del g1
        gc.collect()
        g2 = grad_of(logits * 0.5)  # must not be written into what is held
        assert g2.data_ptr() != ptr, kind
        if kind == "storage":
            held = torch.empty(0).set_(held).view(expected.shape)
        assert torch.equal(held, expected[0, 2] if kind == "view" else expected), kind
        last = g2.data_ptr()
        del g2, held
        gc.collect()
        g3 = grad_of(logits)  # nothing holds the cached buffer: reused
        assert g3.data_ptr() == last, kind
        torch.testing.assert_close(g3, expected, rtol=0, atol=0)
        del g3
    assert empty_cache() == logits.numel() * 4
    assert empty_cache() == 0


def test_op_never_reads_out_of_bounds_on_bad_labels():
    # Called directly (as under torch.compile, where labels are not checked eagerly):
    # huge or negative labels are counted in stats[E + 6] and never used as indices.
    K, E = 3, 2
    logits, target, experts = make_inputs(1, K, E, (6, 7))
    target[0, 0, :3] = torch.tensor([10 ** 12, -5, 3])
    experts[0, 0, 1, :2] = torch.tensor([-(10 ** 12), 99])
    w = torch.ones(3)
    opts = make_options(K, E)
    stats = torch.ops.deferredseg.loss_stats(logits, target, experts, w, K, E, -100, True)
    assert stats[E + 6].item() == 5
    stats_t = torch.ops.deferredseg.loss_stats(logits, target, experts, w, K, E, -100, False)
    assert stats_t[E + 6].item() == 3
    terms, grad = torch.ops.deferredseg.loss_fused(
        logits, target, experts, w, stats, None, None, K, E, -100,
        fused.float_params(opts, 1.0), fused.int_params(opts), True)
    assert torch.isfinite(terms).all() and torch.isfinite(grad).all()
    loss = fused.fused_loss(torch.ops.deferredseg.loss_stats, torch.ops.deferredseg.loss_fused,
                            logits, target, experts, opts, False, check_labels_eagerly=False)
    assert torch.isnan(loss)


def test_stats_layout():
    K, E = 3, 2
    logits, target, experts = make_inputs(2, K, E, (4, 6))
    w = torch.tensor([0.5, 2.0, 1.5])
    stats = torch.ops.deferredseg.loss_stats(logits, target, experts, w, K, E, -100, True)
    assert stats.dtype == torch.float64 and stats.shape == (E + 7,)
    valid = target != -100
    pi = torch.softmax(logits[:, K:K + E + 1].double(), 1)
    torch.testing.assert_close(stats[:E + 1], (pi * valid.unsqueeze(1)).sum((0, 2, 3)),
                               rtol=1e-6, atol=1e-6)
    assert stats[E + 1].item() == valid.sum().item()
    torch.testing.assert_close(stats[E + 2], w.double()[target.clamp_min(0)][valid].sum(),
                               rtol=1e-6, atol=0)
    pairs0 = (valid[:, 1:] & valid[:, :-1]).sum().item()
    pairs1 = (valid[:, :, 1:] & valid[:, :, :-1]).sum().item()
    assert stats[E + 3:].tolist() == [pairs0, pairs1, 0.0, 0.0]


@pytest.mark.parametrize("spatial", [(1000,), (37, 29), (9, 70, 13), (5, 3, 300)], ids=str)
@pytest.mark.parametrize("E", [3, 6])  # the unrolled path (rows read in place) and the generic one
def test_stats_over_many_tiles(spatial, E):
    """Sums and neighbour pairs of the stats op over tiles that cut rows and slabs."""
    K = 1
    logits, target, experts = make_inputs(2, K, E, spatial)
    stats = torch.ops.deferredseg.loss_stats(logits, target, experts, None, K, E, -100, False)
    valid = target != -100
    pi = torch.softmax(logits[:, K:K + E + 1].double(), 1)
    valid_c = valid.unsqueeze(1)
    torch.testing.assert_close(stats[:E + 1], (pi * valid_c).sum([0] + list(range(2, pi.dim()))),
                               rtol=1e-5, atol=1e-5)
    assert stats[E + 1].item() == valid.sum().item() == stats[E + 2].item()
    pairs = []
    for d in range(3):
        if d < len(spatial):
            a = valid.narrow(d + 1, 1, spatial[d] - 1)
            b = valid.narrow(d + 1, 0, spatial[d] - 1)
            pairs.append(float((a & b).sum()))
        else:
            pairs.append(0.0)
    assert stats[E + 3:E + 6].tolist() == pairs
    assert stats[E + 6].item() == 0


def test_sync_layout_stats_with_global_count():
    """A stats vector of E + 8 values (sync_balance): pbar over N_B, the means over N_V."""
    K, E = 2, 3
    logits, target, experts = make_inputs(2, K, E, (5, 6))
    opts = make_options(K, E, lambda_balance=1.0)
    fp, ip = fused.float_params(opts, 1.0), fused.int_params(opts)
    stats = torch.ops.deferredseg.loss_stats(logits, target, experts, None, K, E, -100, False)
    # As if a second rank had the same pixels again: sums and N_B doubled.
    synced = torch.cat([2 * stats[:E + 1], stats[E + 1:], 2 * stats[E + 1:E + 2]])
    terms, grad = torch.ops.deferredseg.loss_fused(logits, target, experts, None, stats, None,
                                                   None, K, E, -100, fp, ip, True)
    terms2, grad2 = torch.ops.deferredseg.loss_fused(logits, target, experts, None, synced,
                                                     None, None, K, E, -100, fp, ip, True)
    torch.testing.assert_close(terms2, terms)  # pbar unchanged, every mean per rank
    # The balance gradient of each pixel halves (pbar = S / N_B with N_B doubled).
    opts_b = make_options(K, E, lambda_seg=0.0, lambda_collab=0.0, lambda_gate=0.0,
                          lambda_coherence=0.0, lambda_balance=1.0)
    fb, ib = fused.float_params(opts_b, 1.0), fused.int_params(opts_b)
    _, gb = torch.ops.deferredseg.loss_fused(logits, target, experts, None, stats, None, None,
                                             K, E, -100, fb, ib, True)
    _, gb2 = torch.ops.deferredseg.loss_fused(logits, target, experts, None, synced, None, None,
                                              K, E, -100, fb, ib, True)
    torch.testing.assert_close(gb2, gb / 2)


_SYNC_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    sys.path.insert(0, {tests!r})
    from _inputs import make_inputs
    from deferredseg_kernels import deferredseg_loss
    rank = int(sys.argv[1])
    dist.init_process_group("gloo", init_method="file://" + {store!r}, rank=rank, world_size=2)
    torch.manual_seed(0)
    K, E = 2, 3
    x, t, e = make_inputs(4, K, E, (5, 6), ignore_frac=0.3)
    # Unequal shares of valid pixels, so that per-rank and global counts differ.
    t[0] = -100
    sl = slice(2 * rank, 2 * rank + 2)
    worst = 0.0
    for kw in (dict(), dict(balance="band", balance_low=[0.2] * 4, balance_high=[0.3] * 4)):
        out = []
        for backend in ("cpu", "reference"):
            leaf = x[sl].clone().requires_grad_(True)
            loss, terms = deferredseg_loss(leaf, t[sl], e[sl], K, E, backend=backend,
                                           sync_balance=True, lambda_balance=2.0,
                                           return_terms=True, **kw)
            loss.backward()
            out.append((loss.detach().double(), terms["pbar"].double(), leaf.grad.double()))
        (l1, p1, g1), (l2, p2, g2) = out
        worst = max(worst, float((l1 - l2).abs() / l2.abs()), float((p1 - p2).abs().max()),
                    float((g1 - g2).abs().max() / g2.abs().max()))
    print("WORST", worst)
    dist.barrier()  # both ranks done with the group before either tears it down
    dist.destroy_process_group()
""")


def test_sync_balance_two_processes(tmp_path):
    """sync_balance over a real 2-rank gloo group: the kernel matches the reference on every rank."""
    tests = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(tests)
    script = _SYNC_SCRIPT.format(tests=tests, store=str(tmp_path / "store"))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r)], env=env, cwd=root,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    for r, p in enumerate(procs):
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, f"rank {r}: {err[-2000:]}"
        assert float(out.split("WORST")[1]) < 1e-5, f"rank {r}: {out}"


def test_balance_grad_scale():
    K, E = 2, 3
    logits, target, experts = make_inputs(2, K, E, (5, 5))
    opts = make_options(K, E, lambda_seg=0.0, lambda_collab=0.0, lambda_gate=0.0,
                        lambda_coherence=0.0, lambda_balance=1.0)
    stats = torch.ops.deferredseg.loss_stats(logits, target, experts, None, K, E, -100, False)
    out = [torch.ops.deferredseg.loss_fused(logits, target, experts, None, stats, None, None, K,
                                            E, -100, fused.float_params(opts, s),
                                            fused.int_params(opts), True) for s in (1.0, 2.5)]
    assert torch.equal(out[0][0], out[1][0])
    torch.testing.assert_close(out[1][1], 2.5 * out[0][1])
    assert float(out[0][1].abs().max()) > 0


def test_no_grad_and_empty():
    K, E = 1, 2
    logits, target, experts = make_inputs(2, K, E, (5, 6))
    with torch.no_grad():
        a = deferredseg_loss(logits, target, experts, K, E, backend="cpu")
    b = deferredseg_loss(logits.clone().requires_grad_(True), target, experts, K, E, backend="cpu")
    assert torch.equal(a, b.detach())
    opts = make_options(K, E)
    x0 = torch.zeros(0, K + E + 2, 4, 5)
    t0 = torch.zeros(0, 4, 5, dtype=torch.long)
    e0 = torch.zeros(0, E, 4, 5, dtype=torch.long)
    stats = torch.ops.deferredseg.loss_stats(x0, t0, e0, None, K, E, -100, True)
    assert torch.all(stats == 0)
    terms, grad = torch.ops.deferredseg.loss_fused(x0, t0, e0, None, stats, None, None, K, E, -100,
                                                   fused.float_params(opts, 1.0),
                                                   fused.int_params(opts), True)
    assert torch.all(terms == 0) and grad.shape == x0.shape


# --------------------------------------------------------------------------- autograd machinery


@pytest.mark.parametrize("K,opts", [
    (1, dict(coherence="l2")),
    (3, dict(coherence="l2", surrogate="paper", balance="band", balance_low=[0.2, 0.1, 0.3],
             balance_high=[0.3, 0.5, 0.6], class_weight=[0.5, 1.0, 2.0])),
    (1, dict(coherence="l2", surrogate="ova", gate_target="benefit")),
    (3, dict(coherence="l2", surrogate="ova", coherence_maps=("router",), gate_target="benefit",
             class_weight=[0.5, 1.0, 2.0])),
], ids=["binary", "multiclass-paper-band", "binary-ova-benefit", "multiclass-ova-benefit"])
def test_gradcheck_float64(K, opts):
    E = 2
    g = torch.Generator().manual_seed(3)
    # Well separated logits (no argmax tie or z = 0 within the finite-difference step).
    x = ((torch.randperm(1 * (K + E + 2) * 3 * 4, generator=g).double() + 0.5) / 7 - 3)
    x = x.reshape(1, K + E + 2, 3, 4).requires_grad_(True)
    _, target, experts = make_inputs(1, K, E, (3, 4), generator=g)
    target[0, 0, 0] = -100

    # gate_mse = 0: the gate term uses stopgrad(D), which finite differences cannot see.
    def f(v):
        return deferredseg_loss(v, target, experts, K, E, backend="cpu", lambda_coherence=0.7,
                                lambda_balance=0.9, gate_mse=0.0, **opts)

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_opcheck():
    K, E = 2, 3
    logits, target, experts = make_inputs(2, K, E, (4, 5))
    w = torch.tensor([1.0, 2.0])
    opts = make_options(K, E, class_weight=[1.0, 2.0], balance="band", balance_low=[0.1] * 4,
                        balance_high=[0.4] * 4)
    torch.library.opcheck(torch.ops.deferredseg.loss_stats.default,
                          (logits, target, experts, w, K, E, -100, True))
    stats = torch.ops.deferredseg.loss_stats(logits, target, experts, w, K, E, -100, False)
    low, high = torch.full((E + 1,), 0.1), torch.full((E + 1,), 0.4)
    ova = make_options(K, E, class_weight=[1.0, 2.0], surrogate="ova", gate_target="benefit")
    for compute_grad, o in ((True, opts), (False, opts), (True, ova)):
        x = logits.clone().requires_grad_(compute_grad)
        torch.library.opcheck(torch.ops.deferredseg.loss_fused.default,
                              (x, target, experts, w, stats, low, high, K, E, -100,
                               fused.float_params(o, 1.0), fused.int_params(o),
                               compute_grad))


def test_loss_op_rejects_unknown_option_codes():
    K, E = 2, 3
    logits, target, experts = make_inputs(1, K, E, (4, 5))
    opts = make_options(K, E)
    stats = torch.ops.deferredseg.loss_stats(logits, target, experts, None, K, E, -100, False)
    args = (logits, target, experts, None, stats, None, None, K, E, -100,
            fused.float_params(opts, 1.0))
    ip = fused.int_params(opts)
    for index, code, words in ((0, 3, "surrogate code 3"), (4, 2, "gate_target code 2")):
        bad = list(ip)
        bad[index] = code
        with pytest.raises(RuntimeError, match=words):
            torch.ops.deferredseg.loss_fused(*args, bad, True)


def test_opcheck_with_the_cached_gradient_buffer():
    # A gradient of >= 4 MiB comes from the kernel's reused buffer; the op's contract
    # (schema, fake kernel, autograd, repeated calls under AOT dispatch) still holds.
    K, E = 1, 3
    logits, target, experts = make_inputs(1, K, E, (430, 430))
    opts = make_options(K, E)
    stats = torch.ops.deferredseg.loss_stats(logits, target, experts, None, K, E, -100, False)
    x = logits.clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.deferredseg.loss_fused.default,
                          (x, target, experts, None, torch.cat([stats, stats[E + 1:E + 2]]), None,
                           None, K, E, -100, fused.float_params(opts, 1.0), fused.int_params(opts),
                           True))


def test_torch_compile_fullgraph():
    K, E = 1, 3
    logits, target, experts = make_inputs(2, K, E, (6, 7))

    def f(x):
        return deferredseg_loss(x, target, experts, K, E, backend="cpu", coherence="l2") * 1.5

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True)
    out = []
    for fn in (f, cf):
        x = logits.clone().requires_grad_(True)
        y = fn(x)
        y.backward()
        out.append((y.detach(), x.grad))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-6, atol=0)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-6, atol=1e-9)
