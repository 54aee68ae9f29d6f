"""The C++ CUDA kernels (csrc/cuda) run on the CPU, through the emulation of
csrc/cuda/emulation.h, against the reference.

CI has no GPU, so tests/test_cuda_kernel.py skips there. This module compiles the
same .cu sources as plain C++ with ``-DDS_CUDA_EMULATION`` (every CUDA thread of a
block a fiber, blocks one after another, ``__syncthreads`` and warp shuffles as
barriers) and registers them as ``torch.ops.deferredseg_cuda_emu``, for CPU tensors.
That checks the kernels' indexing, grid-stride loops, block reductions and formulas
on every run. It cannot check what only a GPU has: the device math library, the
memory model, streams and speed (test_cuda_kernel.py on a GPU machine does).

The grid is capped at DS_CUDA_EMU_MAX_BLOCKS = 3 blocks of 256 threads here, so the
grid-stride loops take several steps on inputs of a few thousand pixels.
"""

from __future__ import annotations

import os

import pytest
import torch

from deferredseg_kernels import available_backends, deferredseg_loss, make_options, route
from deferredseg_kernels._checks import (check_expert_cost, check_inputs, route_threshold,
                                         threshold_logit)
from deferredseg_kernels.ops import fused
from deferredseg_kernels.reference import route_reference

from _inputs import assert_results_close, iter_shapes, make_inputs, option_id, option_matrix

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MAX_BLOCKS = 3


@pytest.fixture(scope="module")
def emu():
    """torch.ops.deferredseg_cuda_emu, built on first use (about 15 s; ninja keeps it)."""
    from torch.utils.cpp_extension import load

    build = os.path.join(ROOT, "build", f"cuda_emu-torch{torch.__version__}")
    os.makedirs(build, exist_ok=True)
    load(name="deferredseg_cuda_emu", sources=[os.path.join(HERE, "cuda_emu", "emu_ops.cpp")],
         extra_cflags=["-O2", "-DDS_CUDA_EMULATION", f"-DDS_CUDA_EMU_MAX_BLOCKS={MAX_BLOCKS}",
                       "-fvisibility=hidden"],
         build_directory=build, is_python_module=False, verbose=False)
    return torch.ops.deferredseg_cuda_emu


def emu_loss(ops, logits, target, experts, K, E, return_terms=False, **options):
    """The objective through the emulated CUDA kernels, driven as backend="cuda" drives
    the real ones (labels not checked eagerly: a bad target makes the loss NaN)."""
    opts = make_options(K, E, **options)
    target, experts = check_inputs(logits, target, experts, opts)
    return fused.fused_loss(ops.loss_stats, ops.loss_fused, logits, target, experts, opts,
                            return_terms, check_labels_eagerly=False)


def run(backend, logits, target, experts, K, E, grad_scale=1.0, **options):
    """(loss, terms, gradient) of a clone of ``logits``; backend: the emulated ops
    (``emu``), or a name for ``deferredseg_loss``."""
    x = logits.detach().clone().requires_grad_(True)
    if isinstance(backend, str):
        loss, terms = deferredseg_loss(x, target, experts, K, E, backend=backend, return_terms=True,
                                       **options)
    else:
        loss, terms = emu_loss(backend, x, target, experts, K, E, True, **options)
    (loss * grad_scale).backward()
    return loss.detach(), terms, x.grad


def assert_matches(ops, logits, target, experts, K, E, rtol=1e-5, grad_scale=1.0, **options):
    got = run(ops, logits, target, experts, K, E, grad_scale, **options)
    assert_results_close(got, run("reference", logits, target, experts, K, E, grad_scale, **options),
                         rtol)
    return got


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("opts", option_matrix(3), ids=option_id)
def test_option_matrix(emu, opts, K):
    # 2 x 23 x 29 = 1334 pixels: 3 blocks of 256 threads, two grid-stride steps each.
    logits, target, experts = make_inputs(2, K, 3, (23, 29))
    assert_matches(emu, logits, target, experts, K, 3, grad_scale=float(torch.randn(())), **opts)


@pytest.mark.parametrize("spatial", list(iter_shapes()) + [(9, 40, 7)], ids=str)
# E + 1 <= 4 and <= 8 take the one-pass stats kernel (4 and 8 sums in registers), more
# experts the three-kernel path.
@pytest.mark.parametrize("K,E", [(1, 1), (3, 3), (2, 5), (1, 16), (12, 3)])
def test_shapes(emu, spatial, K, E):
    logits, target, experts = make_inputs(2, K, E, spatial)
    # l2: with l1 the derivative at two neighbours whose D agree to the last bit (D
    # saturated at 1 in float32) is a sign that rounding decides; see test_cpu_kernel.
    assert_matches(emu, logits, target, experts, K, E, grad_scale=-0.6, coherence="l2",
                   lambda_coherence=0.8)


@pytest.mark.parametrize("label_dtype,ignore_index", [(torch.uint8, 255), (torch.int32, -100),
                                                      (torch.int64, -1)])
def test_labels_weights_and_ignored(emu, label_dtype, ignore_index):
    logits, target, experts = make_inputs(2, 3, 2, (26, 19), label_dtype=label_dtype,
                                          ignore_index=ignore_index)
    assert_matches(emu, logits, target.unsqueeze(1), experts, 3, 2, ignore_index=ignore_index,
                   class_weight=[0.3, 1.0, 2.0])
    none = torch.full_like(target, ignore_index)
    loss, terms, grad = assert_matches(emu, logits, none, experts, 3, 2, ignore_index=ignore_index)
    assert loss.item() == 0.0 and torch.all(grad == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(emu, dtype):
    K, E = 3, 3
    logits, target, experts = make_inputs(2, K, E, (29, 31), dtype=dtype)
    loss, _, grad = run(emu, logits, target, experts, K, E)
    rloss, _, rgrad = run("reference", logits, target, experts, K, E)
    hloss, _, hgrad = run("reference", logits.double(), target, experts, K, E)
    assert grad.dtype == dtype
    err, ref_err = (loss.double() - hloss).abs(), (rloss.double() - hloss).abs()
    assert err <= 2 * ref_err + 1e-6 * hloss.abs()
    gerr, ref_gerr = (grad.double() - hgrad).abs().max(), (rgrad.double() - hgrad).abs().max()
    assert gerr <= 2 * ref_gerr + 1e-6 * hgrad.abs().max()


def test_noncontiguous_inputs_and_gradient_layout(emu):
    K, E = 3, 2
    C = K + E + 2
    base = torch.randn(2, C + 3, 21, 33)
    _, target, experts = make_inputs(2, K, E, (21, 33))
    experts_t = experts.transpose(2, 3).contiguous().transpose(2, 3)
    for x in (base[:, 1:1 + C], base[:, :C].contiguous(memory_format=torch.channels_last),
              base[:, :C].transpose(2, 3).contiguous().transpose(2, 3)):
        leaf = x.detach().requires_grad_(True)  # read in place (a clone of the slice is dense)
        loss, terms = emu_loss(emu, leaf, target, experts_t, K, E, True)
        loss.backward()
        assert leaf.grad.stride() == torch.empty_like(leaf).stride()
        assert_results_close((loss.detach(), terms, leaf.grad),
                             run("reference", x, target, experts_t, K, E))


def test_deterministic_and_matches_the_cpu_kernel(emu):
    K, E = 1, 3
    logits, target, experts = make_inputs(2, K, E, (8, 12, 10))
    for opts in (dict(), dict(surrogate="ova", gate_target="benefit")):
        a = run(emu, logits, target, experts, K, E, **opts)
        b = run(emu, logits, target, experts, K, E, **opts)
        assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
        if "cpu" not in available_backends("loss"):
            pytest.skip("the C++ CPU kernel is not built")
        c = run("cpu", logits, target, experts, K, E, **opts)
        torch.testing.assert_close(a[0], c[0], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(a[2], c[2], rtol=1e-5, atol=1e-5 * float(c[2].abs().max()))


def test_nan_logits_and_bad_targets_give_nan(emu):
    K, E = 3, 2
    logits, target, experts = make_inputs(1, K, E, (30, 31), ignore_frac=0.0)
    x = logits.clone()
    x[0, K, 1, 2] = float("nan")
    assert torch.isnan(emu_loss(emu, x, target, experts, K, E))
    # As on a GPU, labels are not range-checked eagerly: a bad target makes the loss NaN.
    bad = target.clone()
    bad[0, 0, :2] = torch.tensor([10 ** 12, -7])
    assert torch.isnan(emu_loss(emu, logits, bad, experts, K, E))


def test_stats_match_the_cpu_kernel(emu):
    from deferredseg_kernels._ext import EXT

    if EXT is None:
        pytest.skip("the C++ extension is not built")
    K, E = 3, 2
    logits, target, experts = make_inputs(2, K, E, (24, 26))
    experts[0, 1, 3, 4] = 7  # out of range: counted when checked
    w = torch.tensor([0.5, 2.0, 1.5])
    for check in (False, True):
        stats = emu.loss_stats(logits, target, experts, w, K, E, -100, check)
        cpu = torch.ops.deferredseg.loss_stats(logits, target, experts, w, K, E, -100, check)
        assert stats.shape == (E + 7,) and stats.dtype == torch.float64
        torch.testing.assert_close(stats, cpu, rtol=1e-6, atol=1e-6)
        assert stats[E + 6].item() == (1.0 if check else 0.0)


@pytest.mark.parametrize("opts", [dict(), dict(surrogate="ova", gate_target="benefit"),
                                  dict(surrogate="paper", gate_target="benefit")],
                         ids=["default", "ova-benefit", "paper-benefit"])
def test_gradcheck_float64(emu, opts):
    K, E = 3, 2
    g = torch.Generator().manual_seed(3)
    x = ((torch.randperm((K + E + 2) * 12, generator=g).double() + 0.5) / 7 - 3)
    x = x.reshape(1, K + E + 2, 3, 4).requires_grad_(True)
    _, target, experts = make_inputs(1, K, E, (3, 4), generator=g)

    def f(v):
        return emu_loss(emu, v, target, experts, K, E, coherence="l2", gate_mse=0.0,
                        lambda_coherence=0.7, **opts)

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("K,E", [(1, 3), (3, 2), (2, 9)])
def test_benefit_target_at_ties(emu, K, E):
    # Logits in {-1, 0, 1}: experts tie often in the router (jhat: the lowest index), and
    # experts with the model; 2 x 29 x 31 pixels take several grid-stride steps.
    logits, target, experts = make_inputs(2, K, E, (29, 31))
    logits = logits.round().clamp(-1, 1)
    for surrogate in ("softmax", "ova"):
        assert_matches(emu, logits, target, experts, K, E, grad_scale=0.8, gate_target="benefit",
                       surrogate=surrogate, coherence_maps=("gate",), lambda_coherence=0.5)


def test_empty_batch(emu):
    K, E = 1, 2
    logits = torch.zeros(0, K + E + 2, 3, 3)
    target = torch.zeros(0, 3, 3, dtype=torch.long)
    experts = torch.zeros(0, E, 3, 3, dtype=torch.long)
    loss, terms, grad = assert_matches(emu, logits, target, experts, K, E)
    assert loss.item() == 0.0 and grad.shape == logits.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mode", ["gate", "router"])
@pytest.mark.parametrize("K,E", [(1, 1), (3, 2), (5, 16)])
def test_route_matches_reference_bit_for_bit(emu, dtype, mode, K, E):
    from test_route import _assert_same_route, _near_threshold_logits

    for spatial in list(iter_shapes()) + [(40, 33)]:
        for threshold in (0.5, 0.3):
            logits, experts = _near_threshold_logits(K, E, spatial, dtype, threshold)
            thr = threshold_logit(threshold)
            want = route(logits, K, E, threshold, mode, experts, backend="reference")
            got = fused.route_with(emu.route, logits, K, E, thr, mode, experts)
            _assert_same_route(got, want)
            bare = fused.route_with(emu.route, logits, K, E, thr, mode, None)
            assert bare.final is None
            assert torch.equal(bare.assignment, want.assignment)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("scores", ["softmax", "sigmoid"])
@pytest.mark.parametrize("K,E", [(1, 1), (3, 2), (5, 16)])
def test_route_costs_scores_and_gain_match_reference(emu, dtype, scores, K, E):
    """Expert costs, sigmoid scores and the gain mode on the emulated CUDA kernel: the
    reference's bits except at near ties (see test_route.check_route_matrix)."""
    from test_route import check_route_matrix

    def run(logits, K, E, thr, mode, experts, cost, scores):
        return fused.route_with(emu.route, logits, K, E, route_threshold(thr, mode), mode,
                                experts, check_expert_cost(cost, E), scores)

    check_route_matrix(run, K, E, dtype, scores, shapes=((37,), (40, 33)))


def test_route_new_options_nan_and_inf(emu):
    from test_route import check_route_nan_and_inf

    def run(logits, K, E, thr, mode, experts, cost, scores):
        return fused.route_with(emu.route, logits, K, E, route_threshold(thr, mode), mode,
                                experts, check_expert_cost(cost, E), scores)

    check_route_nan_and_inf(run)


def test_route_label_dtypes_and_layouts(emu):
    K, E = 3, 3
    for label_dtype in (torch.uint8, torch.int32, torch.int64):
        logits, _, experts = make_inputs(2, K, E, (26, 27), label_dtype=label_dtype,
                                         ignore_frac=0, expert_ignore_frac=0)
        want = route_reference(logits, K, E, 0.0, "gate", experts)
        for x in (logits.contiguous(memory_format=torch.channels_last),
                  logits.transpose(2, 3).contiguous().transpose(2, 3)):
            got = fused.route_with(emu.route, x, K, E, 0.0, "gate",
                                   experts.transpose(2, 3).contiguous().transpose(2, 3))
            assert torch.equal(got.assignment, want.assignment)
            assert torch.equal(got.final, want.final)
            assert torch.equal(got.model_pred, want.model_pred)


def test_loss_op_matches_the_cpu_op_with_the_sync_stats_layout(emu):
    """loss_fused on a stats vector of E + 8 values (sync_balance: S and N_B summed over
    ranks), op against op: the emulated CUDA kernel against the C++ CPU kernel."""
    from deferredseg_kernels._ext import EXT

    if EXT is None:
        pytest.skip("the C++ extension is not built")
    K, E = 2, 3
    logits, target, experts = make_inputs(2, K, E, (25, 22))
    opts = make_options(K, E, lambda_balance=1.5, balance="band", balance_low=[0.2] * 4,
                        balance_high=[0.3] * 4)
    fp, ip = fused.float_params(opts, 2.0), fused.int_params(opts)
    low, high = torch.tensor(opts.balance_low), torch.tensor(opts.balance_high)
    stats = emu.loss_stats(logits, target, experts, None, K, E, -100, False)
    synced = torch.cat([3 * stats[:E + 1], stats[E + 1:], 3 * stats[E + 1:E + 2]])
    for st in (stats, synced):
        terms, grad = emu.loss_fused(logits, target, experts, None, st, low, high, K, E, -100,
                                     fp, ip, True)
        cterms, cgrad = torch.ops.deferredseg.loss_fused(logits, target, experts, None, st, low,
                                                         high, K, E, -100, fp, ip, True)
        torch.testing.assert_close(terms, cterms, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(grad, cgrad, rtol=1e-5, atol=1e-5 * float(cgrad.abs().max()))
        noterms, nograd = emu.loss_fused(logits, target, experts, None, st, low, high, K, E, -100,
                                         fp, ip, False)
        assert nograd.shape == (0,)
        torch.testing.assert_close(noterms, terms, rtol=0, atol=0)


def test_most_experts(emu):
    """E = 127: 129 routing channels, the largest grid of stats_pi (grid y = E + 1)."""
    K, E = 2, 127
    logits, target, experts = make_inputs(1, K, E, (9, 11), scale=1.0)
    assert_matches(emu, logits, target, experts, K, E, rtol=2e-5)


def test_offsets_beyond_int32(emu):
    """A batch stride of 2^31 elements: every offset is computed in int64 (a 4 GiB
    fp16 storage, of which only the pages the view touches are ever written)."""
    K, E = 1, 2
    C = K + E + 2
    storage = torch.empty(2 ** 31 + C * 64, dtype=torch.float16)
    x = storage.as_strided((2, C, 8, 8), (2 ** 31, 64, 8, 1))
    x.copy_(torch.randn(2, C, 8, 8))
    _, target, experts = make_inputs(2, K, E, (8, 8))
    leaf = x.detach().requires_grad_(True)  # no copy: the kernels read at offset 2^31
    loss = emu_loss(emu, leaf, target, experts, K, E)
    loss.backward()
    ref = x.detach().contiguous().requires_grad_(True)
    rloss = deferredseg_loss(ref, target, experts, K, E, backend="reference")
    rloss.backward()
    torch.testing.assert_close(loss, rloss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(leaf.grad.float(), ref.grad.float(), rtol=1e-2, atol=1e-3)
    del storage
