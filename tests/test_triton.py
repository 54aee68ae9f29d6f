"""What only the Triton backend (ops/triton_loss.py, ops/triton_route.py) has,
against the reference.

On a machine without a GPU the kernels run on CPU tensors in Triton's interpreter
(conftest sets TRITON_INTERPRET=1 before triton is imported): every test below
except those marked ``gpu`` runs there. The loss checks every backend must pass
(option matrix, shapes, labels, layouts, low precision, the ops' contract,
gradcheck, opcheck, torch.compile) run on Triton in tests/test_conformance.py
(``[triton-...]``), on small shapes for the interpreter. Here: a monkeypatched tiny
pixel block that makes several programs (and tile borders inside an image row) out
of small inputs, poisoned buffers, autocast, errors raised before any launch, the
registration of the ops, kernels compiled for sm_90, the route kernel, and the
``gpu`` tests, which run checks on CUDA tensors with compiled kernels.
"""

from __future__ import annotations

import math

import pytest
import torch
from _backends import assert_close_to_max, check_results_to_max, run
from _inputs import TERMS, make_inputs, option_matrix
from conftest import HAS_CUDA, requires_cuda

import deferredseg_kernels as dk
from deferredseg_kernels import make_options

if "triton" not in dk.available_backends():
    pytest.skip(
        f"triton backend unavailable: {dk._dispatch.why_unavailable('triton')}",
        allow_module_level=True,
    )

from deferredseg_kernels.ops import (  # noqa: E402
    fused,
    triton_common,
    triton_loss,
    triton_loss_kernels,
    triton_route,
)

DEVICE = "cuda" if HAS_CUDA else "cpu"


# ----------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------


def _grad_out():
    # random upstream gradient, away from 0
    return float(torch.rand((), dtype=torch.float64) * 1.5 + 0.25)


def _compare(logits, target, experts, K, E, rtol=1e-5, **opts):
    """Triton vs the reference (_backends.check_results_to_max), with a random upstream
    gradient; returns (reference, triton) results."""
    go = _grad_out()
    ref = run("reference", logits, target, experts, K, E, go, **opts)
    tri = run("triton", logits, target, experts, K, E, go, **opts)
    check_results_to_max(tri, ref, rtol)
    assert tri[2].stride() == logits.stride() or not logits.is_contiguous()
    return ref, tri


@pytest.fixture
def small_blocks(monkeypatch):
    """16-pixel blocks: many programs and tile borders inside image rows; reduction
    chunks of 16 partial sums, so the two-level reductions have several chunks."""
    monkeypatch.setattr(triton_loss, "pixel_block", lambda n, w: (16, 4))
    monkeypatch.setattr(triton_route, "pixel_block", lambda n, w: (16, 4))
    monkeypatch.setattr(triton_loss, "_REDUCE_ROWS", 64)
    monkeypatch.setattr(triton_loss, "_CHUNK_ITERS", 1)


def _band(E):
    return dict(
        balance="band",
        balance_low=[0.5 / (E + 1)] * (E + 1),
        balance_high=[1.5 / (E + 1)] * (E + 1),
    )


# ----------------------------------------------------------------------------------
# many programs
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial", [(50,), (9, 11), (3, 5, 6)], ids=str)
def test_many_programs(small_blocks, spatial):
    """16-pixel tiles: coherence neighbours in other programs (halos), partial reductions."""
    K, E = 3, 2
    logits, target, experts = make_inputs(3, K, E, spatial, device=DEVICE)
    _compare(logits, target, experts, K, E, lambda_coherence=1.0)
    _compare(logits, target, experts, K, E, coherence="l2", surrogate="paper", **_band(E))
    _compare(
        logits, target, experts, K, E, lambda_coherence=1.0, surrogate="ova", gate_target="benefit"
    )


# ----------------------------------------------------------------------------------
# buffers: the gradient is written everywhere, into its own memory
# ----------------------------------------------------------------------------------


def test_poisoned_gradient_buffer(monkeypatch):
    """Every element of the gradient is written (a NaN-filled buffer comes back clean)."""
    K, E = 3, 2
    real = fused.grad_buffer

    def poisoned(logits):
        g = real(logits)
        g.fill_(float("nan"))
        return g

    monkeypatch.setattr(fused, "grad_buffer", poisoned)
    for ignore_frac in (0.3, 1.0):
        logits, target, experts = make_inputs(
            2, K, E, (5, 7), ignore_frac=ignore_frac, device=DEVICE
        )
        logits = logits.to(memory_format=torch.channels_last)
        loss, _, grad = run("triton", logits, target, experts, K, E)
        assert bool(torch.isfinite(grad).all())
        monkeypatch.setattr(fused, "grad_buffer", real)
        ref = run("reference", logits, target, experts, K, E)
        assert_close_to_max(grad, ref[2], "grad")
        monkeypatch.setattr(fused, "grad_buffer", poisoned)


def test_input_not_overwritten_and_heap_poisoned():
    K, E = 2, 2
    logits, target, experts = make_inputs(2, K, E, (8, 9), device=DEVICE)
    before = logits.clone()
    # Recycle memory filled with NaN so fresh buffers start dirty where the allocator reuses.
    junk = [torch.full(logits.shape, float("nan"), device=DEVICE) for _ in range(4)]
    junk += [
        torch.full((E + 7,), float("nan"), dtype=torch.float64, device=DEVICE) for _ in range(4)
    ]
    del junk
    ref = run("reference", logits, target, experts, K, E)
    junk = [torch.full(logits.shape, float("nan"), device=DEVICE) for _ in range(4)]
    del junk
    tri = run("triton", logits, target, experts, K, E)
    assert torch.equal(logits, before)
    assert_close_to_max(tri[2], ref[2], "grad")
    assert_close_to_max(tri[0], ref[0], "loss")


# ----------------------------------------------------------------------------------
# determinism, autocast
# ----------------------------------------------------------------------------------


def test_deterministic(small_blocks):
    K, E = 3, 3
    logits, target, experts = make_inputs(3, K, E, (11, 13), device=DEVICE)
    a = run("triton", logits, target, experts, K, E)
    b = run("triton", logits, target, experts, K, E)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    assert all(torch.equal(a[1][n], b[1][n]) for n in TERMS)


def test_autocast():
    K, E = 3, 2
    logits, target, experts = make_inputs(2, K, E, (5, 6), device=DEVICE)
    plain = run("triton", logits, target, experts, K, E)
    with torch.autocast(device_type=DEVICE, dtype=torch.bfloat16):
        inside = run("triton", logits, target, experts, K, E)
    assert torch.equal(plain[0], inside[0]) and torch.equal(plain[2], inside[2])


# ----------------------------------------------------------------------------------
# errors before launch
# ----------------------------------------------------------------------------------


def test_bad_inputs_rejected_before_launch(monkeypatch):
    calls = []

    def spy(kernel):
        calls.append(kernel)
        return triton_common.launcher(kernel)

    monkeypatch.setattr(triton_loss, "launcher", spy)
    monkeypatch.setattr(triton_route, "launcher", spy)
    K, E = 3, 2
    logits, target, experts = make_inputs(2, K, E, (4, 5), device=DEVICE)
    cases = [
        (ValueError, "logits", dict(logits=logits[:, :-1])),
        (ValueError, "target", dict(target=target[:, :-1])),
        (TypeError, "target", dict(target=target.float())),
        (ValueError, "expert_labels", dict(experts=experts[:, :1])),
        (TypeError, "logits", dict(logits=logits.to(torch.int32))),
        (ValueError, "device", dict(target=target.to("meta"))),
        (ValueError, "surrogate", dict(surrogate="nope")),
        (ValueError, "gate_target", dict(gate_target="nope")),
        (ValueError, "coherence", dict(coherence="l3")),
        (ValueError, "balance_low", dict(balance="band")),
        (TypeError, "unknown option", dict(not_an_option=1)),
    ]
    for exc, words, change in cases:
        args = dict(logits=logits, target=target, experts=experts)
        opts = {k: v for k, v in change.items() if k not in args}
        args.update({k: v for k, v in change.items() if k in args})
        with pytest.raises(exc, match=words):
            dk.deferredseg_loss(
                args["logits"], args["target"], args["experts"], K, E, backend="triton", **opts
            )
    with pytest.raises(ValueError, match="mode"):
        dk.route(logits, K, E, 0.5, mode="nope", backend="triton")
    with pytest.raises(ValueError, match="threshold"):
        dk.route(logits, K, E, 1.5, backend="triton")
    with pytest.raises(ValueError, match="expert_labels"):
        dk.route(logits, K, E, 0.5, expert_labels=experts[:, :1], backend="triton")
    assert calls == [], "a kernel was launched for bad input"


def test_op_rejects_bad_dtype_clearly():
    K, E = 1, 1
    x = torch.zeros(1, 4, 3, dtype=torch.int32, device=DEVICE)
    t = torch.zeros(1, 3, dtype=torch.int64, device=DEVICE)
    lab = torch.zeros(1, 1, 3, dtype=torch.int64, device=DEVICE)
    with pytest.raises(TypeError, match="logits.*int32"):
        triton_loss.loss(x, t, lab, make_options(K, E), False)


# ----------------------------------------------------------------------------------
# custom-op machinery (the loss ops' opcheck and torch.compile: test_conformance)
# ----------------------------------------------------------------------------------


def test_route_opcheck():
    K, E = 3, 2
    logits, _, experts = make_inputs(2, K, E, (4, 5), device=DEVICE)
    torch.library.opcheck(
        triton_route.route_op, (logits, K, E, 0.3, "gate", experts, None, "softmax")
    )
    torch.library.opcheck(
        triton_route.route_op, (logits, K, E, 0.3, "router", None, None, "softmax")
    )
    cost = torch.tensor([0.1, 0.0], device=DEVICE)
    torch.library.opcheck(
        triton_route.route_op, (logits, K, E, -0.1, "gain", experts, cost, "sigmoid")
    )
    torch.library.opcheck(
        triton_route.route_op, (logits, K, E, 0.0, "router", None, cost, "softmax")
    )


def test_route_torch_compile_fullgraph():
    """No graph break; the same routing as eager. (On CPU the ops are opaque custom ops
    around the interpreted kernels; on a GPU, triton_op lets Inductor schedule the
    kernels: see test_gpu_compile_and_opcheck.)"""
    K, E = 3, 2
    logits, _, experts = make_inputs(2, K, E, (5, 6), device=DEVICE)
    torch._dynamo.reset()
    route_c = torch.compile(
        lambda x: dk.route(x, K, E, 0.4, "router", experts, backend="triton"), fullgraph=True
    )
    r1, r2 = route_c(logits), dk.route(logits, K, E, 0.4, "router", experts, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(r1, r2))
    gain_c = torch.compile(
        lambda x: dk.route(
            x,
            K,
            E,
            -0.1,
            "gain",
            experts,
            expert_cost=[0.0, 0.2],
            scores="sigmoid",
            backend="triton",
        ),
        fullgraph=True,
    )
    r1 = gain_c(logits)
    r2 = dk.route(
        logits,
        K,
        E,
        -0.1,
        "gain",
        experts,
        expert_cost=[0.0, 0.2],
        scores="sigmoid",
        backend="triton",
    )
    assert all(torch.equal(a, b) for a, b in zip(r1, r2))


def test_registered_backend():
    assert "triton" in dk.available_backends("loss")
    assert "triton" in dk.available_backends("route")
    from deferredseg_kernels import _dispatch

    assert _dispatch.select("triton", "loss", torch.device(DEVICE)) is triton_loss.loss
    assert _dispatch.select("triton", "route", torch.device(DEVICE)) is triton_route.route


def test_support_versions():
    from deferredseg_kernels.ops import triton_support

    assert triton_support.why_unavailable() is None
    assert triton_support._version_tuple("3.6.0+git1234") == (3, 6, 0)
    assert triton_support._version_tuple("3.2") >= triton_support.MIN_TRITON
    assert triton_support._version_tuple("2.3.1") < triton_support.MIN_TRITON


def test_ops_have_the_declared_schemas():
    for name, schema in (
        ("loss_stats", triton_loss._STATS_SCHEMA),
        ("loss_fused", triton_loss._LOSS_SCHEMA),
        ("route", triton_route._ROUTE_SCHEMA),
    ):
        got = str(getattr(torch.ops.deferredseg_triton, name).default._schema)
        assert got == f"deferredseg_triton::{name}{schema}"


def test_define_op_rejects_annotations_that_differ_from_the_schema():
    """Where triton_op infers the schema from the annotations (torch 2.11), annotations
    that drift from the declared schema would silently change the op: refused on every
    torch, before anything is registered."""

    def launch(x: torch.Tensor, n: float) -> torch.Tensor:
        return x

    def unannotated(x, n):
        return x

    schema = "(Tensor x, SymInt n) -> Tensor"
    for fn in (launch, unannotated):
        with pytest.raises((TypeError, ValueError), match="annotations|annotation") as err:
            triton_common.define_op("deferredseg_test::drift", schema, fn, fn)
        if fn is launch:
            assert "float n" in str(err.value) and "SymInt n" in str(err.value)
    assert not hasattr(torch.ops.deferredseg_test, "drift")


def test_offsets_are_int64_in_kernel_source():
    """Every kernel casts program_id to int64 before computing offsets (>2^31 elements;
    the real check on a GPU is test_gpu_large_offsets)."""
    import inspect

    for kernel in (
        triton_loss_kernels._stats_kernel,
        triton_loss_kernels._loss_kernel,
        triton_route._route_kernel,
    ):
        src = inspect.getsource(kernel.fn)
        assert "tl.program_id(0).to(tl.int64)" in src
        assert "tl.arange(0, BLOCK_P).to(tl.int64)" in src


_SM90_SCRIPT = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from deferredseg_kernels.ops import triton_loss_kernels as L, triton_route as R

assert type(L._loss_kernel).__name__ == "JITFunction", type(L._loss_kernel)
# Registered through torch.library.triton_op, which some torch versions give the
# schema inferred from the annotations whatever schema= says.
import torch
from deferredseg_kernels.ops import triton_loss as H
for name, schema in (("loss_stats", H._STATS_SCHEMA), ("loss_fused", H._LOSS_SCHEMA),
                     ("route", R._ROUTE_SCHEMA)):
    got = str(getattr(torch.ops.deferredseg_triton, name).default._schema)
    assert got == "deferredseg_triton::" + name + schema, got
target = GPUTarget("cuda", 90, 32)

# triton >= 3.3 names the constexpr values `constexprs`, triton 3.2 `constants`.
import inspect
CONSTS_KW = ("constexprs" if "constexprs" in inspect.signature(ASTSource.__init__).parameters
             else "constants")

def build(fn, types, consts):
    sig = {n: ("constexpr" if n in consts else types.get(n, "i64")) for n in fn.arg_names}
    triton.compile(ASTSource(fn=fn, signature=sig, **{CONSTS_KW: consts}), target=target,
                   options={"num_warps": 8})

# The options as the launcher passes them: the floats by their declared names, the codes
# of the int options (upper-cased names) as constexprs.
from deferredseg_kernels import contract
flt = {f.name: "fp32" for f in contract.FLOAT_FIELDS}
CODES = contract.CODES
for xdt, K, E, nd, grad, paper, sur in (("bf16", 4, 3, 2, True, False, 2),
                                       ("fp64", 1, 2, 3, True, True, 1),
                                       ("fp16", 32, 16, 1, False, False, 0)):
    ptrs = dict(x_ptr="*" + xdt, t_ptr="*u8", l_ptr="*i64", cw_ptr="*fp32", stats_ptr="*fp64",
                low_ptr="*fp32", high_ptr="*fp32", g_ptr="*" + xdt, part_ptr="*fp32",
                thr_ptr="*fp32", asg_ptr="*i8", prob_ptr="*fp32", pred_ptr="*i64",
                final_ptr="*i64", **flt)
    KP, RP = max(2, triton.next_power_of_2(K)), triton.next_power_of_2(E + 1)
    build(L._loss_kernel, ptrs, dict(K=K, E=E, KP=KP, RP=RP, NDIM=nd, HAS_WEIGHT=True,
                                     SURROGATE=sur,
                                     COHERENCE=CODES["coherence"]["l2" if paper else "l1"],
                                     COHERENCE_MAPS=CODES["coherence_maps"]["router"]
                                     | CODES["coherence_maps"]["gate"],
                                     BALANCE=CODES["balance"]["band" if paper else "cv2"],
                                     GATE_TARGET=CODES["gate_target"][
                                         "router" if paper else "benefit"],
                                     COMPUTE_GRAD=grad, IS_FP64=xdt == "fp64",
                                     BF16_BY_HAND=False, BLOCK_P=256))
    build(L._stats_kernel, ptrs, dict(K=K, E=E, RP=RP, NDIM=nd, HAS_WEIGHT=True,
                                      CHECK_EXPERTS=True, IS_FP64=xdt == "fp64", BLOCK_P=256))
    ptrs["cost_ptr"] = "*fp64" if xdt == "fp64" else "*fp32"
    for mode, cost, sig in ((0, False, False), (1, paper, paper), (2, True, not paper),
                            (2, False, True), (0, True, False)):
        build(R._route_kernel, ptrs, dict(K=K, E=E, KP=KP, RP=RP, MODE=mode, HAS_COST=cost,
                                          NEED_GAIN=cost or mode == 2, SIGMOID_SCORES=sig,
                                          HAS_LABELS=True, IS_FP64=xdt == "fp64", BLOCK_P=256))
red = dict(part_ptr="*fp32", out_ptr="*fp64", stats_ptr="*fp64", low_ptr="*fp32",
           high_ptr="*fp32", terms_ptr="*fp32", **flt)
build(L._chunk_sum_kernel, red, dict(NCP=16, BLOCK_R=256, ITERS=16))
build(L._reduce_kernel, red, dict(NCP=16, BLOCK_R=256))
build(L._finalize_kernel, red, dict(E=3, RP=4, BALANCE=CODES["balance"]["band"], BLOCK_R=256))
print("compiled")
"""


@pytest.mark.slow
@pytest.mark.skipif(HAS_CUDA, reason="the GPU tests run the compiled kernels themselves")
def test_kernels_compile_for_sm90():
    """The interpreter accepts programs the compiler rejects: compile the kernels for an
    H100 (sm_90, through ptxas to a cubin) without a GPU, in a process without
    TRITON_INTERPRET, for a few variants (bf16 / fp64 / fp16, 1-3 spatial dims, K = 1
    to 32, E up to 16, with and without the gradient). That process imports the package
    as a GPU user does, so the ops register through triton_op: with the declared schemas."""
    import os
    import subprocess
    import sys

    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", _SM90_SCRIPT],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0 and ("ptxas" in proc.stderr and "not found" in proc.stderr):
        pytest.skip("no ptxas in this triton install")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


# ----------------------------------------------------------------------------------
# route
# ----------------------------------------------------------------------------------


def _poison_allocator(numel: int) -> None:
    """Free blocks of the output sizes filled with 0x55 bytes, so that fresh outputs that
    reuse them start dirty (the CUDA caching allocator, and malloc's size bins on CPU)."""
    junk = [
        torch.full((numel * size,), 0x55, dtype=torch.uint8, device=DEVICE)
        for size in (1, 4, 8, 8, 8)
        for _ in range(2)
    ]
    del junk


def _route_equal(logits, K, E, thr, mode, experts):
    ref = dk.route(logits, K, E, thr, mode, experts, backend="reference")
    _poison_allocator(logits.shape[0] * math.prod(logits.shape[2:]))
    tri = dk.route(logits, K, E, thr, mode, experts, backend="triton")
    assert torch.equal(tri.assignment, ref.assignment), "assignment"
    assert torch.equal(tri.model_pred, ref.model_pred), "model_pred"
    if experts is None:
        assert tri.final is None
    else:
        assert torch.equal(tri.final, ref.final), "final"
    assert tri.defer_prob.dtype == ref.defer_prob.dtype
    torch.testing.assert_close(tri.defer_prob, ref.defer_prob, rtol=1e-6, atol=1e-7, equal_nan=True)


@pytest.mark.parametrize("mode", ["gate", "router"])
@pytest.mark.parametrize(
    "K,E,spatial", [(3, 2, (7, 13)), (1, 3, (37,)), (4, 16, (3, 5, 7)), (32, 1, (2, 9))]
)
def test_route_bitwise(mode, K, E, spatial):
    logits, _, experts = make_inputs(2, K, E, spatial, device=DEVICE)
    # integer logits make ties in z and r (lowest index wins), and a == logit(thr) for
    # thr = 0.5 (a == 0): '>' must not defer there.
    ties = torch.randint(-2, 3, logits.shape, device=DEVICE).float()
    for x in (logits, ties):
        for thr in (0.5, 0.2, 0.0, 1.0, 1 / (1 + math.exp(-1.0))):
            _route_equal(x, K, E, thr, mode, experts)
        _route_equal(x, K, E, 0.5, mode, None)


@pytest.mark.parametrize("scores", ["softmax", "sigmoid"])
@pytest.mark.parametrize("K,E", [(3, 2), (4, 16), (1, 1)])
def test_route_costs_scores_gain_small_blocks(scores, K, E, small_blocks):
    """Costs, scores and the gain mode, in 16-pixel blocks (tile borders inside rows),
    against the reference: exact but at near ties (see test_route.check_route_matrix)."""
    from test_route import check_route_matrix, route_runner

    run = route_runner("triton", DEVICE)

    check_route_matrix(run, K, E, torch.float16, scores, shapes=((7, 13), (2, 3, 5)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_route_dtypes_and_nan(dtype, small_blocks):
    K, E = 3, 3
    logits, _, experts = make_inputs(
        2, K, E, (6, 7), dtype=dtype, device=DEVICE, label_dtype=torch.uint8, ignore_index=255
    )
    logits[0, 1, 2, 3] = float("nan")  # model argmax: the NaN wins
    logits[1, K + 2, 0, 0] = float("nan")  # router argmax: the NaN wins
    for mode in ("gate", "router"):
        _route_equal(logits, K, E, 0.35, mode, experts)
        _route_equal(
            logits.to(memory_format=torch.channels_last), K, E, 0.35, mode, experts.to(torch.int32)
        )


# ----------------------------------------------------------------------------------
# GPU only
# ----------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_gpu_matches_reference(dtype):
    for K, E, S in ((4, 3, (64, 80)), (1, 3, (16, 20, 24)), (32, 16, (33, 47)), (2, 1, (1000,))):
        logits, target, experts = make_inputs(2, K, E, S, dtype=dtype, device="cuda")
        if dtype == torch.float32:
            _compare(logits, target, experts, K, E, lambda_coherence=1.0)
        elif dtype == torch.float64:
            _compare(logits, target, experts, K, E, rtol=1e-7)
        else:  # grad_output = 1: see test_low_precision for the rescaled gradient
            truth = run("reference", logits.double(), target, experts, K, E)
            ref = run("reference", logits, target, experts, K, E)
            tri = run("triton", logits, target, experts, K, E)
            e_tri = float((tri[2].double() - truth[2]).abs().max())
            e_ref = float((ref[2].double() - truth[2]).abs().max())
            assert e_tri <= 2 * e_ref + 1e-7 * float(truth[2].abs().max()), (K, E, S, e_tri, e_ref)
            assert abs(float(tri[0]) - float(truth[0])) <= 2 * abs(
                float(ref[0]) - float(truth[0])
            ) + 1e-6 * abs(float(truth[0]))


@requires_cuda
@pytest.mark.gpu
def test_gpu_layouts_options_determinism():
    K, E = 3, 2
    for opts in option_matrix(E)[::3]:
        logits, target, experts = make_inputs(2, K, E, (37, 41), device="cuda")
        _compare(logits.to(memory_format=torch.channels_last), target, experts, K, E, **opts)
    logits, target, experts = make_inputs(3, K, E, (40, 50, 30), device="cuda")
    a = run("triton", logits, target, experts, K, E)
    b = run("triton", logits, target, experts, K, E)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])


@requires_cuda
@pytest.mark.gpu
def test_gpu_compile_and_opcheck():
    K, E = 3, 2
    logits, target, experts = make_inputs(2, K, E, (32, 48), device="cuda")
    torch._dynamo.reset()

    def f(x):
        return dk.deferredseg_loss(x, target, experts, K, E, backend="triton")

    compiled = torch.compile(f, fullgraph=True)
    x1 = logits.clone().requires_grad_()
    (g1,) = torch.autograd.grad(compiled(x1), x1)
    x2 = logits.clone().requires_grad_()
    (g2,) = torch.autograd.grad(f(x2), x2)
    assert_close_to_max(g1, g2, "compiled grad", rtol=1e-6)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        compiled(logits)
    w = torch.ones(3, device="cuda")
    torch.library.opcheck(triton_loss.loss_stats, (logits, target, experts, w, K, E, -100, False))
    stats = triton_loss.loss_stats(logits, target, experts, w, K, E, -100, False)
    opts = make_options(K, E)
    torch.library.opcheck(
        triton_loss.loss_fused,
        (
            logits.clone().requires_grad_(),
            target,
            experts,
            w,
            stats,
            None,
            None,
            K,
            E,
            -100,
            fused.float_params(opts, 1.0),
            fused.int_params(opts),
            True,
        ),
    )
    torch.library.opcheck(
        triton_route.route_op, (logits, K, E, 0.3, "gate", experts, None, "softmax")
    )
    torch.library.opcheck(
        triton_route.route_op,
        (logits, K, E, 0.0, "gain", experts, torch.tensor([0.1, 0.0], device="cuda"), "sigmoid"),
    )


@requires_cuda
@pytest.mark.gpu
def test_gpu_route_bitwise():
    for K, E in ((3, 2), (1, 3), (32, 16)):
        logits, _, experts = make_inputs(2, K, E, (65, 77), device="cuda")
        for mode in ("gate", "router"):
            _route_equal(logits, K, E, 0.4, mode, experts)
            _route_equal(logits.bfloat16(), K, E, 0.5, mode, None)
    from test_route import check_route_matrix, route_runner

    run = route_runner("triton", "cuda")

    for K, E in ((3, 2), (1, 3), (32, 16)):
        for scores in ("softmax", "sigmoid"):
            check_route_matrix(run, K, E, torch.bfloat16, scores, shapes=((65, 77),))


@requires_cuda
@pytest.mark.gpu
def test_gpu_large_offsets():
    """More than 2^31 elements: offsets past int32 (the gate channel of the last pixels)."""
    free, _ = torch.cuda.mem_get_info()
    K, E = 1, 2
    C = K + E + 2
    P = (2**31) // C + (1 << 20)
    if free < 14 * P * C:
        pytest.skip("not enough GPU memory for a >2^31-element tensor")
    n = 4096
    logits = torch.zeros((1, C, P), dtype=torch.bfloat16, device="cuda")
    tail_x, tail_t, tail_e = make_inputs(
        1,
        K,
        E,
        (n,),
        dtype=torch.bfloat16,
        device="cuda",
        label_dtype=torch.uint8,
        ignore_index=255,
        ignore_frac=0.0,
    )
    logits[..., -n:] = tail_x
    target = torch.full((1, P), 255, dtype=torch.uint8, device="cuda")
    target[:, -n:] = tail_t
    experts = torch.zeros((1, E, P), dtype=torch.uint8, device="cuda")
    experts[..., -n:] = tail_e
    assert logits.numel() > 2**31
    # Only the last n pixels are valid, so the loss equals the loss of that window alone.
    big = run("triton", logits, target, experts, K, E, ignore_index=255)
    del logits
    small = run("reference", tail_x, tail_t, tail_e, K, E, ignore_index=255)
    assert_close_to_max(big[0], small[0], "loss", rtol=1e-4)
    assert_close_to_max(
        big[2][..., -n:].float(), small[2].float(), "tail grad", rtol=2e-2, atol_rel=1e-2
    )
    assert float(big[2][..., :-n].abs().amax()) == 0.0
