"""The C++ CUDA kernels (csrc/cuda) run on the CPU, through the emulation of
csrc/cuda/emulation.h: what only this build has.

CI has no GPU, so tests/test_cuda_kernel.py skips there. _backends.emulation_ops
compiles the same .cu sources as plain C++ with ``-DDS_CUDA_EMULATION`` (every CUDA
thread of a block a fiber, blocks one after another, ``__syncthreads`` and warp
shuffles as barriers) and registers them as ``torch.ops.deferredseg_cuda_emu``, for
CPU tensors. That checks the kernels' indexing, grid-stride loops, block reductions
and formulas on every run. It cannot check what only a GPU has: the device math
library, the memory model, streams and speed (test_cuda_kernel.py on a GPU machine
does).

The loss checks every backend must pass run on the emulated kernels in
tests/test_conformance.py (``[cuda_emu-...]``). Here: the route kernel (bit for bit,
costs, scores, the gain mode, NaN and Inf, label dtypes and layouts) and offsets
beyond int32.
"""

from __future__ import annotations

import pytest
import torch
from _backends import emulation_loss, emulation_ops, route_with
from _inputs import iter_shapes, make_inputs

from deferredseg_kernels import (
    check_expert_cost,
    deferredseg_loss,
    route,
    route_threshold,
    threshold_logit,
)
from deferredseg_kernels.reference import route_reference


@pytest.fixture(scope="module")
def emu():
    """torch.ops.deferredseg_cuda_emu, built on first use (about 15 s; ninja keeps it)."""
    return emulation_ops()


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
            got = route_with(emu.route, logits, K, E, thr, mode, experts)
            _assert_same_route(got, want)
            bare = route_with(emu.route, logits, K, E, thr, mode, None)
            assert bare.final is None
            assert torch.equal(bare.assignment, want.assignment)


def _emu_runner(emu):
    """``run`` for test_route's checks: the emulated route op through the shared driver."""

    def run(logits, K, E, thr, mode, experts, cost, scores):
        return route_with(
            emu.route,
            logits,
            K,
            E,
            route_threshold(thr, mode),
            mode,
            experts,
            check_expert_cost(cost, E),
            scores,
        )

    return run


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("scores", ["softmax", "sigmoid"])
@pytest.mark.parametrize("K,E", [(1, 1), (3, 2), (5, 16)])
def test_route_costs_scores_and_gain_match_reference(emu, dtype, scores, K, E):
    """Expert costs, sigmoid scores and the gain mode on the emulated CUDA kernel: the
    reference's bits except at near ties (see test_route.check_route_matrix)."""
    from test_route import check_route_matrix

    run = _emu_runner(emu)
    check_route_matrix(run, K, E, dtype, scores, shapes=((37,), (40, 33)))


def test_route_new_options_nan_and_inf(emu):
    from test_route import check_route_nan_and_inf

    run = _emu_runner(emu)
    check_route_nan_and_inf(run)


def test_route_label_dtypes_and_layouts(emu):
    K, E = 3, 3
    for label_dtype in (torch.uint8, torch.int32, torch.int64):
        logits, _, experts = make_inputs(
            2, K, E, (26, 27), label_dtype=label_dtype, ignore_frac=0, expert_ignore_frac=0
        )
        want = route_reference(logits, K, E, 0.0, "gate", experts)
        for x in (
            logits.contiguous(memory_format=torch.channels_last),
            logits.transpose(2, 3).contiguous().transpose(2, 3),
        ):
            got = route_with(
                emu.route,
                x,
                K,
                E,
                0.0,
                "gate",
                experts.transpose(2, 3).contiguous().transpose(2, 3),
            )
            assert torch.equal(got.assignment, want.assignment)
            assert torch.equal(got.final, want.final)
            assert torch.equal(got.model_pred, want.model_pred)


def test_offsets_beyond_int32(emu):
    """A batch stride of 2^31 elements: every offset is computed in int64 (a 4 GiB
    fp16 storage, of which only the pages the view touches are ever written)."""
    K, E = 1, 2
    C = K + E + 2
    storage = torch.empty(2**31 + C * 64, dtype=torch.float16)
    x = storage.as_strided((2, C, 8, 8), (2**31, 64, 8, 1))
    x.copy_(torch.randn(2, C, 8, 8))
    _, target, experts = make_inputs(2, K, E, (8, 8))
    leaf = x.detach().requires_grad_(True)  # no copy: the kernels read at offset 2^31
    loss = emulation_loss(emu, leaf, target, experts, K, E)
    loss.backward()
    ref = x.detach().contiguous().requires_grad_(True)
    rloss = deferredseg_loss(ref, target, experts, K, E, backend="reference")
    rloss.backward()
    torch.testing.assert_close(loss, rloss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(leaf.grad.float(), ref.grad.float(), rtol=1e-2, atol=1e-3)
    del storage
