"""The C++ CUDA kernels of the fused objective (backend="cuda") against the reference.

The build check runs everywhere a CUDA build of torch is installed; the kernel
checks need a GPU (``requires_cuda``) and skip cleanly without one.
"""

import pytest
import torch

from deferredseg_kernels import available_backends, deferredseg_loss, make_options
from deferredseg_kernels._ext import EXT
from deferredseg_kernels.ops import fused

from _inputs import assert_results_close, iter_shapes, make_inputs, option_id, option_matrix
from conftest import requires_cuda

needs_backend = pytest.mark.skipif("cuda" not in available_backends("loss"),
                                   reason="the C++ CUDA kernels cannot run here (no GPU or "
                                          "not built with CUDA)")


def test_cuda_build_contains_the_loss_kernels():
    if EXT is None:
        pytest.skip("the C++ extension is not built")
    if torch.version.cuda is None or not EXT.with_cuda:
        pytest.skip("torch or the extension was built without CUDA")
    for op in ("deferredseg::loss_stats", "deferredseg::loss_fused", "deferredseg::route"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"), op


def _inputs(B, K, E, spatial, **kw):
    logits, target, experts = make_inputs(B, K, E, spatial, **kw)
    return logits.cuda(), target.cuda(), experts.cuda()


def run(backend, logits, target, experts, K, E, grad_scale=1.0, **opts):
    x = logits.detach().clone().requires_grad_(True)
    loss, terms = deferredseg_loss(x, target, experts, K, E, backend=backend,
                                   return_terms=True, **opts)
    (loss * grad_scale).backward()
    return loss.detach(), terms, x.grad


def assert_matches(logits, target, experts, K, E, rtol=1e-5, grad_scale=1.0, **opts):
    got = run("cuda", logits, target, experts, K, E, grad_scale, **opts)
    assert_results_close(got, run("reference", logits, target, experts, K, E, grad_scale, **opts),
                         rtol)
    return got


@requires_cuda
@needs_backend
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("opts", option_matrix(3), ids=option_id)
def test_option_matrix(opts, K):
    logits, target, experts = _inputs(2, K, 3, (7, 13))
    assert_matches(logits, target, experts, K, 3, grad_scale=float(torch.randn(())), **opts)


@requires_cuda
@needs_backend
@pytest.mark.parametrize("K,E", [(1, 3), (3, 2), (2, 9)])
def test_benefit_target_at_ties(K, E):
    # Logits in {-1, 0, 1}: experts tie often in the router (jhat: the lowest index).
    logits, target, experts = _inputs(2, K, E, (29, 31))
    logits = logits.round().clamp(-1, 1)
    for surrogate in ("softmax", "ova"):
        assert_matches(logits, target, experts, K, E, grad_scale=0.8, gate_target="benefit",
                       surrogate=surrogate, coherence_maps=("gate",), lambda_coherence=0.5)


@requires_cuda
@needs_backend
@pytest.mark.parametrize("spatial", list(iter_shapes()), ids=str)
@pytest.mark.parametrize("K,E", [(1, 1), (3, 3), (1, 16), (12, 3)])
def test_shapes(spatial, K, E):
    logits, target, experts = _inputs(2, K, E, spatial)
    assert_matches(logits, target, experts, K, E, grad_scale=-0.6)


@requires_cuda
@needs_backend
@pytest.mark.parametrize("label_dtype,ignore_index", [(torch.uint8, 255), (torch.int32, -100),
                                                      (torch.int64, -1)])
def test_labels_weights_and_ignored(label_dtype, ignore_index):
    logits, target, experts = _inputs(2, 3, 2, (6, 9), label_dtype=label_dtype,
                                      ignore_index=ignore_index)
    assert_matches(logits, target.unsqueeze(1), experts, 3, 2, ignore_index=ignore_index,
                   class_weight=[0.3, 1.0, 2.0])
    none = torch.full_like(target, ignore_index)
    loss, terms, grad = assert_matches(logits, none, experts, 3, 2, ignore_index=ignore_index)
    assert loss.item() == 0.0 and torch.all(grad == 0)


@requires_cuda
@needs_backend
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    K, E = 3, 3
    logits, target, experts = _inputs(2, K, E, (9, 11), dtype=dtype)
    loss, _, grad = run("cuda", logits, target, experts, K, E)
    rloss, _, rgrad = run("reference", logits, target, experts, K, E)
    hloss, _, hgrad = run("reference", logits.double(), target, experts, K, E)
    err, ref_err = (loss.double() - hloss).abs(), (rloss.double() - hloss).abs()
    assert err <= 2 * ref_err + 1e-6 * hloss.abs()
    gerr, ref_gerr = (grad.double() - hgrad).abs().max(), (rgrad.double() - hgrad).abs().max()
    assert gerr <= 2 * ref_gerr + 1e-6 * hgrad.abs().max()


@requires_cuda
@needs_backend
def test_noncontiguous_and_no_alias():
    K, E = 3, 2
    C = K + E + 2
    base = torch.randn(2, C + 3, 7, 9, device="cuda")
    _, target, experts = _inputs(2, K, E, (7, 9))
    for x in (base[:, 1:1 + C], base[:, :C].contiguous(memory_format=torch.channels_last),
              base[:, :C].transpose(2, 3).contiguous().transpose(2, 3)):
        leaf = x.detach().requires_grad_(True)
        loss = deferredseg_loss(leaf, target, experts, K, E, backend="cuda")
        loss.backward()
        assert leaf.grad.untyped_storage().data_ptr() != leaf.untyped_storage().data_ptr()
        assert leaf.grad.stride() == torch.empty_like(leaf).stride()
        ref = x.detach().contiguous().requires_grad_(True)
        rloss = deferredseg_loss(ref, target, experts, K, E, backend="reference")
        rloss.backward()
        torch.testing.assert_close(loss, rloss, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(leaf.grad, ref.grad, rtol=1e-5,
                                   atol=1e-5 * float(ref.grad.abs().max()))


@requires_cuda
@needs_backend
def test_deterministic_and_matches_cpu_kernel():
    K, E = 1, 3
    logits, target, experts = _inputs(2, K, E, (8, 32, 40))
    a = run("cuda", logits, target, experts, K, E)
    b = run("cuda", logits, target, experts, K, E)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    if "cpu" in available_backends("loss"):
        c = run("cpu", logits.cpu(), target.cpu(), experts.cpu(), K, E)
        torch.testing.assert_close(a[0].cpu(), c[0], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(a[2].cpu(), c[2], rtol=1e-5,
                                   atol=1e-5 * float(c[2].abs().max()))


@requires_cuda
@needs_backend
def test_runs_on_the_current_stream():
    """On a side stream the kernels run there: the result equals the default stream's."""
    K, E = 2, 3
    logits, target, experts = _inputs(2, K, E, (64, 96))
    want = run("cuda", logits, target, experts, K, E)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = run("cuda", logits, target, experts, K, E)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])


@requires_cuda
@needs_backend
def test_nan_and_bad_labels_never_crash():
    K, E = 3, 2
    logits, target, experts = _inputs(1, K, E, (4, 5), ignore_frac=0.0)
    x = logits.clone()
    x[0, K, 1, 2] = float("nan")
    loss, _, grad = run("cuda", x, target, experts, K, E)
    assert torch.isnan(loss)
    # On the GPU labels are not range-checked eagerly: a bad target makes the loss NaN.
    bad = target.clone()
    bad[0, 0, :2] = torch.tensor([10 ** 12, -7], device="cuda")
    loss = deferredseg_loss(logits, bad, experts, K, E, backend="cuda")
    assert torch.isnan(loss)
    torch.cuda.synchronize()


@requires_cuda
@needs_backend
def test_stats_layout():
    K, E = 3, 2
    logits, target, experts = _inputs(2, K, E, (4, 6))
    w = torch.tensor([0.5, 2.0, 1.5], device="cuda")
    stats = torch.ops.deferredseg.loss_stats(logits, target, experts, w, K, E, -100, True)
    cpu = torch.ops.deferredseg.loss_stats(logits.cpu(), target.cpu(), experts.cpu(), w.cpu(), K, E,
                                           -100, True)
    torch.testing.assert_close(stats.cpu(), cpu, rtol=1e-6, atol=1e-6)


@requires_cuda
@needs_backend
@pytest.mark.parametrize("opts", [dict(), dict(surrogate="ova", gate_target="benefit")],
                         ids=["default", "ova-benefit"])
def test_gradcheck_float64(opts):
    K, E = 3, 2
    g = torch.Generator().manual_seed(3)
    x = ((torch.randperm((K + E + 2) * 12, generator=g).double() + 0.5) / 7 - 3)
    x = x.reshape(1, K + E + 2, 3, 4).cuda().requires_grad_(True)
    _, target, experts = make_inputs(1, K, E, (3, 4), generator=g)
    target, experts = target.cuda(), experts.cuda()

    def f(v):
        return deferredseg_loss(v, target, experts, K, E, backend="cuda", coherence="l2",
                                gate_mse=0.0, lambda_coherence=0.7, **opts)

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6, rtol=1e-5)


@requires_cuda
@needs_backend
def test_opcheck_and_compile():
    K, E = 2, 3
    logits, target, experts = _inputs(2, K, E, (4, 5))
    opts = make_options(K, E)
    torch.library.opcheck(torch.ops.deferredseg.loss_stats.default,
                          (logits, target, experts, None, K, E, -100, False))
    stats = torch.ops.deferredseg.loss_stats(logits, target, experts, None, K, E, -100, False)
    torch.library.opcheck(torch.ops.deferredseg.loss_fused.default,
                          (logits.clone().requires_grad_(True), target, experts, None, stats, None,
                           None, K, E, -100, fused.float_params(opts, 1.0), fused.int_params(opts),
                           True))

    def f(v):
        return deferredseg_loss(v, target, experts, K, E, backend="cuda")

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True)
    out = []
    for fn in (f, cf):
        x = logits.clone().requires_grad_(True)
        y = fn(x)
        y.backward()
        out.append((y.detach(), x.grad))
    torch.testing.assert_close(out[1][0], out[0][0])
    torch.testing.assert_close(out[1][1], out[0][1])


@requires_cuda
@needs_backend
def test_offsets_beyond_int32():
    """A batch stride of 2^31 elements: every offset is computed in int64."""
    free, _ = torch.cuda.mem_get_info()
    if free < 8 * 2 ** 30:
        pytest.skip("needs 8 GiB of free GPU memory")
    K, E = 1, 2
    C = K + E + 2
    storage = torch.zeros(2 ** 31 + C * 64, dtype=torch.float16, device="cuda")
    x = storage.as_strided((2, C, 8, 8), (2 ** 31, 64, 8, 1))
    x.copy_(torch.randn(2, C, 8, 8, device="cuda"))
    _, target, experts = _inputs(2, K, E, (8, 8))
    leaf = x.detach().requires_grad_(True)  # no copy: the kernel reads at offset 2^31
    loss = deferredseg_loss(leaf, target, experts, K, E, backend="cuda")
    loss.backward()
    grad = leaf.grad
    rloss, _, rgrad = run("reference", x.contiguous(), target, experts, K, E)
    torch.testing.assert_close(loss, rloss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad.float().contiguous(), rgrad.float(), rtol=1e-2, atol=1e-3)
    del storage


def _cuda_route_run(logits, K, E, thr, mode, experts, cost, scores):
    from deferredseg_kernels import route

    out = route(logits.cuda(), K, E, thr, mode, experts.cuda(), expert_cost=cost, scores=scores,
                backend="cuda")
    return type(out)(*[t.cpu() if t is not None else None for t in out])


@requires_cuda
@pytest.mark.skipif("cuda" not in available_backends("route"),
                    reason="the C++ CUDA route kernel cannot run here (no GPU or not built with CUDA)")
@pytest.mark.parametrize("scores", ["softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_route_costs_scores_and_gain(dtype, scores):
    """Expert costs, scores and the gain mode on the device: the reference's routing
    except at near ties (see test_route.check_route_matrix), NaN and Inf included."""
    from test_route import check_route_matrix, check_route_nan_and_inf

    for K, E in ((1, 1), (4, 3), (2, 16)):
        check_route_matrix(_cuda_route_run, K, E, dtype, scores,
                           shapes=((1000,), (65, 77), (9, 17, 13)))
    check_route_nan_and_inf(_cuda_route_run)
