"""What only the C++ CUDA kernels (backend="cuda") have, against the reference.

The checks every backend must pass run on this one in tests/test_conformance.py
(``[cuda-...]``). Here: the build check, which runs everywhere a CUDA build of
torch is installed; the current stream, offsets beyond int32 and the route kernel
with costs and scores, which need a GPU (``requires_cuda``) and skip cleanly
without one.
"""

import pytest
import torch
from _backends import run
from _inputs import make_inputs
from conftest import requires_cuda

from deferredseg_kernels import available_backends, deferredseg_loss
from deferredseg_kernels._ext import EXT

needs_backend = pytest.mark.skipif(
    "cuda" not in available_backends("loss"),
    reason="the C++ CUDA kernels cannot run here (no GPU or not built with CUDA)",
)


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
def test_offsets_beyond_int32():
    """A batch stride of 2^31 elements: every offset is computed in int64."""
    free, _ = torch.cuda.mem_get_info()
    if free < 8 * 2**30:
        pytest.skip("needs 8 GiB of free GPU memory")
    K, E = 1, 2
    C = K + E + 2
    storage = torch.zeros(2**31 + C * 64, dtype=torch.float16, device="cuda")
    x = storage.as_strided((2, C, 8, 8), (2**31, 64, 8, 1))
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


@requires_cuda
@pytest.mark.skipif(
    "cuda" not in available_backends("route"),
    reason="the C++ CUDA route kernel cannot run here (no GPU or not built with CUDA)",
)
@pytest.mark.parametrize("scores", ["softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_route_costs_scores_and_gain(dtype, scores):
    """Expert costs, scores and the gain mode on the device: the reference's routing
    except at near ties (see test_route.check_route_matrix), NaN and Inf included."""
    from test_route import check_route_matrix, check_route_nan_and_inf, route_runner

    run = route_runner("cuda", "cuda")
    for K, E in ((1, 1), (4, 3), (2, 16)):
        check_route_matrix(run, K, E, dtype, scores, shapes=((1000,), (65, 77), (9, 17, 13)))
    check_route_nan_and_inf(run)
