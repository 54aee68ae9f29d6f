"""Routing at inference (SPEC section 4): semantics, and every backend bit for bit."""

import math

import pytest
import torch

import deferredseg_kernels as dk
from deferredseg_kernels import available_backends, route
from deferredseg_kernels._ext import EXT, ExtensionMismatchError, check_build, has_cuda_kernels

from _inputs import iter_shapes, make_inputs
from conftest import HAS_CUDA, requires_cuda

ROUTE_BACKENDS = [b for b in available_backends("route") if b != "reference"]


def test_gate_mode_semantics_by_hand():
    K, E = 2, 2
    # 3 pixels: gate s = (0.2, 0.8, 0.8); experts' routing logits pick 1, 0, 1.
    logits = torch.zeros(1, K + E + 2, 3)
    logits[0, 0] = torch.tensor([1.0, 0.0, 0.0])  # z: model predicts 0, 1 (tie -> 0), 0
    logits[0, 1] = torch.tensor([0.0, 0.5, 0.0])
    logits[0, K] = torch.tensor([0.0, 2.0, 0.0])
    logits[0, K + 1] = torch.tensor([1.0, 1.0, 3.0])
    logits[0, K + E] = torch.tensor([5.0, 5.0, 5.0])  # the model's routing logit
    logits[0, K + E + 1] = torch.logit(torch.tensor([0.2, 0.8, 0.8]))
    experts = torch.tensor([[[1, 1, 1], [0, 0, 0]]])
    out = route(logits, K, E, threshold=0.5, expert_labels=experts, backend="reference")
    assert out.assignment.tolist() == [[-1, 0, 1]]
    assert out.model_pred.tolist() == [[0, 1, 0]]
    assert out.final.tolist() == [[0, 1, 0]]
    assert out.defer_prob[0].tolist() == pytest.approx([0.2, 0.8, 0.8])
    # router mode: the model's logit 5 wins everywhere -> nothing deferred
    out = route(logits, K, E, mode="router", backend="reference")
    assert out.assignment.tolist() == [[-1, -1, -1]] and out.final is None
    # threshold 0 defers everything, 1 nothing
    assert (route(logits, K, E, threshold=0.0).assignment >= 0).all()
    assert (route(logits, K, E, threshold=1.0).assignment == -1).all()


def test_router_mode_tie_goes_to_expert_and_k1_threshold_at_zero():
    K, E = 1, 1
    logits = torch.zeros(1, 4, 2)
    logits[0, 0] = torch.tensor([0.0, 0.1])  # z = 0 predicts 0, z > 0 predicts 1
    out = route(logits, K, E, mode="router", backend="reference")
    assert out.assignment.tolist() == [[0, 0]]
    assert out.model_pred.tolist() == [[0, 1]]
    assert out.defer_prob[0].tolist() == pytest.approx([0.5, 0.5])


def test_output_dtypes_and_shapes():
    logits, _, experts = make_inputs(2, 3, 2, (4, 5, 6))
    out = route(logits, 3, 2, expert_labels=experts, backend="reference")
    assert out.assignment.dtype == torch.int8 and out.assignment.shape == (2, 4, 5, 6)
    assert out.defer_prob.dtype == torch.float32
    assert out.model_pred.dtype == torch.int64 and out.final.dtype == torch.int64
    out64 = route(logits.double(), 3, 2, backend="reference")
    assert out64.defer_prob.dtype == torch.float64


def _near_threshold_logits(K, E, spatial, dtype, threshold):
    logits, _, experts = make_inputs(2, K, E, spatial, dtype=dtype)
    # Put some gate logits exactly at, just below and just above logit(threshold),
    # and force argmax ties in z and r.
    t = math.log(threshold) - math.log1p(-threshold)
    flat = logits[:, K + E + 1].reshape(-1)
    n = flat.numel()
    vals = torch.tensor([t, math.nextafter(t, -math.inf), math.nextafter(t, math.inf)])
    flat[: min(3, n)] = vals[: min(3, n)].to(dtype)
    logits[:, 1] = logits[:, 0] if K >= 2 else logits[:, 1]
    logits[:, K + 1] = logits[:, K]
    return logits, experts


def _assert_same_route(a, b):
    assert torch.equal(a.assignment, b.assignment)
    assert torch.equal(a.model_pred, b.model_pred)
    assert (a.final is None) == (b.final is None)
    if a.final is not None:
        assert torch.equal(a.final, b.final)
    assert a.defer_prob.dtype == b.defer_prob.dtype
    torch.testing.assert_close(a.defer_prob, b.defer_prob, rtol=2e-6, atol=1e-7, equal_nan=True)


@pytest.mark.parametrize("backend", ROUTE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("mode", ["gate", "router"])
@pytest.mark.parametrize("K,E", [(1, 1), (3, 2), (5, 16)])
def test_backends_match_reference_bit_for_bit(backend, dtype, mode, K, E):
    for spatial in iter_shapes():
        for threshold in (0.5, 0.3):
            logits, experts = _near_threshold_logits(K, E, spatial, dtype, threshold)
            want = route(logits, K, E, threshold, mode, experts, backend="reference")
            got = route(logits, K, E, threshold, mode, experts, backend=backend)
            _assert_same_route(got, want)


@pytest.mark.parametrize("backend", ROUTE_BACKENDS)
@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int32, torch.int64])
def test_backends_label_dtypes_and_layouts(backend, label_dtype):
    K, E = 3, 3
    logits, _, experts = make_inputs(2, K, E, (6, 7), label_dtype=label_dtype, ignore_frac=0,
                                     expert_ignore_frac=0)
    big = torch.randn(2, K + E + 5, 6, 7)
    big[:, 2:2 + K + E + 2] = logits
    variants = {
        "contiguous": logits,
        "channels_last": logits.contiguous(memory_format=torch.channels_last),
        "channel_slice": big[:, 2:2 + K + E + 2],
        "batch_flip": logits.flip(0).contiguous().flip(0),
        "spatial_transpose": logits.transpose(2, 3).contiguous().transpose(2, 3),
        "spatial_step": torch.repeat_interleave(logits, 2, dim=3)[..., ::2],
    }
    experts_t = experts.transpose(2, 3).contiguous().transpose(2, 3)
    want = route(logits, K, E, expert_labels=experts, backend="reference")
    for name, x in variants.items():
        assert torch.equal(x, logits), name
        got = route(x, K, E, expert_labels=experts_t, backend=backend)
        _assert_same_route(got, want)


@pytest.mark.parametrize("backend", ROUTE_BACKENDS)
def test_backends_nan_and_inf_follow_torch_argmax(backend):
    K, E = 3, 3
    logits, _, experts = make_inputs(1, K, E, (5, 5))
    logits[0, 1, 0, 0] = float("nan")
    logits[0, 0, 0, 1] = float("nan")
    logits[0, 2, 0, 1] = float("nan")
    logits[0, K + 2, 1, 1] = float("nan")
    logits[0, K + E, 2, 2] = float("inf")
    logits[0, K + E + 1, 3, 3] = float("nan")
    logits[0, K + E + 1, 4, 4] = float("-inf")
    for mode in ("gate", "router"):
        want = route(logits, K, E, mode=mode, expert_labels=experts, backend="reference")
        got = route(logits, K, E, mode=mode, expert_labels=experts, backend=backend)
        _assert_same_route(got, want)


@pytest.mark.parametrize("backend", ROUTE_BACKENDS)
def test_backends_empty_batch(backend):
    logits = torch.zeros(0, 5, 3, 3)
    out = route(logits, 1, 2, backend=backend)
    assert out.assignment.shape == (0, 3, 3)


@pytest.mark.skipif(EXT is None, reason="C++ extension not built")
def test_cpp_route_opcheck():
    K, E = 3, 2
    logits, _, experts = make_inputs(2, K, E, (4, 5))
    torch.library.opcheck(torch.ops.deferredseg.route.default, (logits, K, E, 0.0, False, experts))
    torch.library.opcheck(torch.ops.deferredseg.route.default, (logits, K, E, 0.3, True, None))


@pytest.mark.skipif("cpu" not in ROUTE_BACKENDS, reason="C++ extension not built")
def test_cpp_route_under_torch_compile_fullgraph():
    K, E = 2, 3
    logits, _, experts = make_inputs(2, K, E, (8, 8))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x, m):
        out = route(x, K, E, 0.4, "gate", m, backend="cpu")
        return out.assignment, out.final

    a, fin = f(logits, experts)
    want = route(logits, K, E, 0.4, "gate", experts, backend="reference")
    assert torch.equal(a, want.assignment) and torch.equal(fin, want.final)


@pytest.mark.skipif(torch.version.cuda is None or EXT is None or not EXT.with_cuda,
                    reason="not a CUDA-enabled build")
def test_cuda_enabled_build_has_cuda_kernels():
    assert has_cuda_kernels()
    assert EXT.cuda_version == torch.version.cuda
    assert torch._C._dispatch_has_kernel_for_dispatch_key("deferredseg::route", "CUDA")


@pytest.mark.skipif(torch.version.cuda is None or EXT is None, reason="needs a CUDA build of torch")
def test_ci_builds_cuda_kernels_with_a_cuda_torch():
    # CI's CUDA-enabled install path must really compile csrc/cuda: a silent CPU-only
    # fallback there would leave the CUDA code uncompiled.
    import os

    if os.environ.get("DS_EXPECT_CUDA_BUILD") != "1":
        pytest.skip("DS_EXPECT_CUDA_BUILD is not set (only CI's CUDA build path sets it)")
    assert EXT.with_cuda == 1


def test_extension_mismatch_message_names_both_versions():
    with pytest.raises(ExtensionMismatchError) as info:
        check_build("2.14.1+cu130", "13.0", "2.14.1+cu128", "12.8")
    msg = str(info.value)
    assert "13.0" in msg and "12.8" in msg and "pip install --no-build-isolation" in msg
    with pytest.raises(ExtensionMismatchError, match="CPU-only"):
        check_build("2.14.1+cu130", "13.0", "2.14.1+cpu", None)
    with pytest.raises(ExtensionMismatchError, match="built against torch 2.13.0"):
        check_build("2.13.0+cpu", "", "2.14.1+cu130", "13.0")
    check_build("2.14.1+cu130", "13.0", "2.14.1+cu130", "13.0")  # same: no error
    check_build("2.13.0+cpu", "", "2.13.0+cpu", None)


def test_available_backends_tell_the_truth():
    names = available_backends()
    assert "reference" in names
    assert ("cpu" in names) == (EXT is not None)
    assert ("cuda" in names) == (has_cuda_kernels() and HAS_CUDA)
    assert set(available_backends("route")) <= set(names)


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_route_matches_reference(backend):
    if backend not in available_backends("route"):
        pytest.skip(f"{backend} route not available")
    K, E = 4, 3
    for mode in ("gate", "router"):
        logits, experts = _near_threshold_logits(K, E, (33, 65), torch.bfloat16, 0.5)
        want = route(logits, K, E, 0.5, mode, experts, backend="reference")
        got = route(logits.cuda(), K, E, 0.5, mode, experts.cuda(), backend=backend)
        _assert_same_route(type(want)(*[t.cpu() if t is not None else None for t in got]), want)


def test_public_api_names():
    for name in ("deferredseg_loss", "route", "split_logits", "available_backends"):
        assert hasattr(dk, name)
