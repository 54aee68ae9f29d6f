"""Routing at inference (docs/objective.md section 4): semantics, and every backend bit for bit."""

import math

import pytest
import torch
from _inputs import iter_shapes, make_inputs
from conftest import HAS_CUDA, requires_cuda

import deferredseg_kernels as dk
from deferredseg_kernels import available_backends, route
from deferredseg_kernels._ext import EXT, ExtensionMismatchError, check_build, has_cuda_kernels

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


def _put_at_threshold_logit(gate: torch.Tensor, threshold: float) -> None:
    """Write logit(threshold) rounded to the gate's dtype, and the two values next to it
    in that dtype, into the first three elements of ``gate`` (a contiguous slice).
    Next to 0 they are the smallest normal numbers (subnormals are flushed to zero on
    some devices: not what this checks)."""
    t = torch.tensor([math.log(threshold) - math.log1p(-threshold)], dtype=gate.dtype)
    if float(t) == 0.0:
        tiny = torch.finfo(gate.dtype).tiny
        vals = torch.tensor([0.0, -tiny, tiny], dtype=gate.dtype)
    else:
        # Stepping the bit pattern by one moves to the next representable value on
        # either side (away from 0 for +1, whatever the sign).
        bits = t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])
        vals = torch.cat([t, (bits - 1).view(gate.dtype), (bits + 1).view(gate.dtype)])
    flat = gate.view(-1)  # a view: the writes reach the logits
    n = min(3, flat.numel())
    flat[:n] = vals[:n]


def _near_threshold_logits(K, E, spatial, dtype, threshold):
    logits, _, experts = make_inputs(2, K, E, spatial, dtype=dtype)
    # Put some gate logits exactly at, just below and just above logit(threshold),
    # and force argmax ties in z and r.
    _put_at_threshold_logit(logits[0, K + E + 1], threshold)
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
    # Without expert costs the scores kind does not enter modes "gate" and "router":
    # every backend routes the same pixels bit for bit with either.
    for spatial in iter_shapes():
        for threshold in (0.5, 0.3):
            logits, experts = _near_threshold_logits(K, E, spatial, dtype, threshold)
            want = route(logits, K, E, threshold, mode, experts, backend="reference")
            for scores in ("softmax", "sigmoid"):
                got = route(logits, K, E, threshold, mode, experts, scores=scores, backend=backend)
                _assert_same_route(got, want)


# ------------------------------------------------------------------------------------
# Scores, expert costs and the gain mode
# ------------------------------------------------------------------------------------

# The near-tie width: with costs or in mode "gain" the backends may disagree only where
# two competing scores, or the gain and the number it is compared with, are closer than this.
TIE_TOL = 1e-4


def _scores64(logits, K, E, scores):
    r = logits.detach().cpu().double()[:, K : K + E + 1]
    return torch.sigmoid(r) if scores == "sigmoid" else torch.softmax(r, dim=1)


def near_ties(logits, K, E, threshold, mode, expert_cost=None, scores="softmax"):
    """(B, *S) bool, computed in float64: the pixels where backends may route differently.

    With costs: the best two experts' ``q_j - cost_j`` differ by less than TIE_TOL. Mode
    "gain": the gain is within TIE_TOL of the threshold; mode "router" with costs: within
    TIE_TOL of 0. Exact ties count too: the reference's PyTorch ops may round one logit's
    sigmoid or softmax differently at two positions (vectorised and scalar loops), so
    identical logits need not give it identical scores. NaN is never a near tie.
    """
    q = _scores64(logits, K, E, scores)
    near = torch.zeros((logits.shape[0],) + tuple(logits.shape[2:]), dtype=torch.bool)
    if expert_cost is not None:
        cost = torch.as_tensor(expert_cost, dtype=torch.float64)
        value = q[:, :E] - cost.view((1, E) + (1,) * (logits.dim() - 2))
        top = value.topk(min(2, E), dim=1).values
        best = top[:, 0]
        if E >= 2:
            near |= (top[:, 0] - top[:, 1]) < TIE_TOL
    else:
        chosen = logits.detach().cpu().double()[:, K : K + E].argmax(dim=1, keepdim=True)
        best = q[:, :E].gather(1, chosen).squeeze(1)
    gain = best - q[:, E]
    if mode == "gain":
        gap = (gain - threshold).abs()
    elif mode == "router" and expert_cost is not None:
        gap = gain.abs()
    else:
        return near
    return near | (gap < TIE_TOL)


def assert_route_agrees(got, want, near, mode, expert_cost):
    """``got`` against the reference's ``want``: what the spec makes bit for bit is
    equal; the chosen expert and the decision differ at most at ``near`` pixels."""
    near = near.to(got.assignment.device)
    assert torch.equal(got.model_pred, want.model_pred)
    deferred_got, deferred_want = got.assignment >= 0, want.assignment >= 0
    if mode == "gate" or (mode == "router" and expert_cost is None):
        assert torch.equal(deferred_got, deferred_want), "the deferral decision is exact here"
    both = deferred_got & deferred_want
    if expert_cost is None:
        assert torch.equal(got.assignment[both], want.assignment[both]), "argmax r is exact"
    differ = got.assignment != want.assignment
    assert not bool((differ & ~near).any()), (
        f"{int((differ & ~near).sum())} pixel(s) routed differently away from a near tie"
    )
    assert (got.final is None) == (want.final is None)
    if want.final is not None:
        assert not bool(((got.final != want.final) & ~near).any())
    assert got.defer_prob.dtype == want.defer_prob.dtype
    atol = 1e-6 if mode == "gain" and got.defer_prob.dtype != torch.float64 else 1e-7
    torch.testing.assert_close(
        got.defer_prob, want.defer_prob, rtol=2e-6, atol=atol, equal_nan=True
    )


def _costs(E):
    return [0.1 * (j % 3) for j in range(E)]


def _matrix_logits(K, E, spatial, dtype):
    """Fresh inputs with exact ties on some pixels: in z, between experts 0 and 1 (between
    the expert and the model when E = 1) on every eighth, and gate logits at logit(0.3)."""
    logits, _, experts = make_inputs(2, K, E, spatial, dtype=dtype)
    _put_at_threshold_logit(logits[0, K + E + 1], 0.3)
    if K >= 2:
        logits[:, 1, ..., ::3] = logits[:, 0, ..., ::3]
    logits[:, K + 1, ..., ::8] = logits[:, K, ..., ::8]
    return logits, experts


# (mode, threshold) pairs of the matrix: the gain mode at a few cut-offs, either sign.
MODE_THRESHOLDS = (("gate", 0.3), ("router", 0.5), ("gain", 0.0), ("gain", -0.25), ("gain", 0.4))


def route_runner(backend, device="cpu"):
    """``run`` for :func:`check_route_matrix` / :func:`check_route_nan_and_inf`: the public
    ``route`` on ``backend``, inputs on ``device``, results back on the CPU."""

    def run(logits, K, E, thr, mode, experts, cost, scores):
        out = route(
            logits.to(device),
            K,
            E,
            thr,
            mode,
            experts.to(device),
            expert_cost=cost,
            scores=scores,
            backend=backend,
        )
        return type(out)(*[t.cpu() if t is not None else None for t in out])

    return run


def check_route_matrix(run, K, E, dtype, scores, shapes=((37,), (7, 13), (3, 5, 7))):
    """``run(logits, K, E, threshold, mode, experts, cost, scores)`` -> RouteResult of the
    backend under test, against the reference over modes x costs, on fresh inputs with
    exact ties in z and r and gate logits at the threshold's logit."""
    for spatial in shapes:
        logits, experts = _matrix_logits(K, E, spatial, dtype)
        for mode, thr in MODE_THRESHOLDS:
            for cost in (None, _costs(E), [0.0] * E):
                want = route(
                    logits,
                    K,
                    E,
                    thr,
                    mode,
                    experts,
                    expert_cost=cost,
                    scores=scores,
                    backend="reference",
                )
                got = run(logits, K, E, thr, mode, experts, cost, scores)
                near = near_ties(logits, K, E, thr, mode, cost, scores)
                # The forced ties are about one pixel in 8; other near ties are rare.
                assert float(near.float().mean()) < 0.25, "too many near ties to test anything"
                assert_route_agrees(got, want, near, mode, cost)


@pytest.mark.parametrize("backend", ROUTE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("scores", ["softmax", "sigmoid"])
@pytest.mark.parametrize("K,E", [(1, 1), (3, 2), (5, 16)])
def test_backends_match_reference_with_costs_scores_and_gain(backend, dtype, scores, K, E):
    run = route_runner(backend)
    check_route_matrix(run, K, E, dtype, scores)


@pytest.mark.parametrize("backend", ROUTE_BACKENDS)
def test_backends_equal_costs_resolve_exact_ties_to_the_lowest_index(backend):
    K, E = 2, 4
    logits, _, experts = make_inputs(2, K, E, (9, 11))
    logits[:, K + 1] = logits[:, K]  # experts 0 and 1: identical logits
    logits[:, K + 3] = logits[:, K + 2]  # experts 2 and 3 too
    for scores in ("softmax", "sigmoid"):
        for mode in ("gate", "router", "gain"):
            args = (logits, K, E, 0.0 if mode == "gain" else 0.5, mode, experts)
            want = route(*args, expert_cost=[0.1] * E, scores=scores, backend="reference")
            got = route(*args, expert_cost=[0.1] * E, scores=scores, backend=backend)
            # A kernel computes equal logits' scores to the same bits: the lowest index wins.
            assert set(got.assignment.unique().tolist()) <= {-1, 0, 2}
            # The reference may round them differently (see near_ties): fold the pairs.
            folded = torch.where(want.assignment >= 0, want.assignment // 2 * 2, want.assignment)
            q = _scores64(logits, K, E, scores)
            near = (q[:, 0] - q[:, 2]).abs() < TIE_TOL
            if mode != "gate":  # the gain against the threshold 0
                near |= (torch.maximum(q[:, 0], q[:, 2]) - 0.1 - q[:, E]).abs() < TIE_TOL
            assert float(near.float().mean()) < 0.05
            assert not bool(((got.assignment != folded) & ~near).any())


def check_route_nan_and_inf(run):
    """NaN and infinite routing logits with the new options: as the reference (a NaN
    score wins an argmax, a NaN gain defers nothing), ``run`` as in check_route_matrix."""
    K, E = 3, 3
    logits, _, experts = make_inputs(1, K, E, (5, 5))
    logits[0, K + 1, 0, 0] = float("nan")  # an expert's routing logit
    logits[0, K + E, 1, 1] = float("nan")  # the model's routing logit
    logits[0, K + 2, 2, 2] = float("inf")
    logits[0, K, 3, 3] = float("-inf")
    logits[0, K + E, 4, 4] = float("-inf")
    for scores in ("softmax", "sigmoid"):
        for mode, thr in MODE_THRESHOLDS:
            for cost in (None, [0.05, 0.0, 0.1]):
                want = route(
                    logits,
                    K,
                    E,
                    thr,
                    mode,
                    experts,
                    expert_cost=cost,
                    scores=scores,
                    backend="reference",
                )
                got = run(logits, K, E, thr, mode, experts, cost, scores)
                assert_route_agrees(
                    got, want, near_ties(logits, K, E, thr, mode, cost, scores), mode, cost
                )


@pytest.mark.parametrize("backend", ROUTE_BACKENDS)
def test_backends_new_options_nan_and_inf(backend):
    run = route_runner(backend)
    check_route_nan_and_inf(run)


def _naive_route(r, a, E, threshold, mode, cost, scores):
    """One pixel by the spec's words, in Python floats: (assignment, defer_prob)."""
    if scores == "sigmoid":
        q = [1.0 / (1.0 + math.exp(-v)) for v in r]
    else:
        m = max(r)
        ex = [math.exp(v - m) for v in r]
        q = [e / sum(ex) for e in ex]
    D = sum(math.exp(v - max(r)) for v in r[:E]) / sum(math.exp(v - max(r)) for v in r)
    if cost is None:
        jhat = max(range(E), key=lambda j: (r[j], -j))
        best = q[jhat]
    else:
        jhat = max(range(E), key=lambda j: (q[j] - cost[j], -j))
        best = q[jhat] - cost[jhat]
    gain = best - q[E]
    if mode == "gate":
        defer, prob = 1.0 / (1.0 + math.exp(-a)) > threshold, 1.0 / (1.0 + math.exp(-a))
    elif mode == "router":
        defer = (max(range(E + 1), key=lambda k: (r[k], -k)) < E) if cost is None else gain >= 0
        prob = D
    else:
        defer, prob = gain > threshold, gain
    return (jhat if defer else -1), prob


@pytest.mark.parametrize("scores", ["softmax", "sigmoid"])
@pytest.mark.parametrize(
    "mode,threshold", [("gate", 0.4), ("router", 0.5), ("gain", 0.1), ("gain", -0.3)]
)
@pytest.mark.parametrize("cost", [None, (0.0, 0.15, 0.05)])
def test_reference_follows_the_spec_pixel_by_pixel(scores, mode, threshold, cost):
    K, E = 2, 3
    logits, _, _ = make_inputs(1, K, E, (40,), dtype=torch.float64)
    out = route(logits, K, E, threshold, mode, expert_cost=cost, scores=scores, backend="reference")
    for p in range(40):
        r = logits[0, K : K + E + 1, p].tolist()
        assignment, prob = _naive_route(
            r, float(logits[0, K + E + 1, p]), E, threshold, mode, cost, scores
        )
        assert int(out.assignment[0, p]) == assignment, p
        assert float(out.defer_prob[0, p]) == pytest.approx(prob, abs=1e-12), p


def test_gain_mode_and_costs_by_hand():
    K, E = 1, 2
    # Routing logits (expert 0, expert 1, model) of 3 pixels, in float64.
    r = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 3.0], [1.0, 0.9, -1.0]], dtype=torch.float64)
    logits = torch.zeros(1, K + E + 2, 3, dtype=torch.float64)
    logits[0, K : K + E + 1] = r.T
    q = torch.softmax(r, dim=1)
    out = route(logits, K, E, 0.0, "gain", backend="reference")
    # No costs: the first maximum of r among the experts; gain = q_jhat - q_model.
    assert out.defer_prob[0].tolist() == pytest.approx(
        [float(q[0, 0] - q[0, 2]), float(q[1, 0] - q[1, 2]), float(q[2, 0] - q[2, 2])]
    )
    assert out.assignment.tolist() == [[0, -1, 0]]
    # A cost on expert 0 moves pixel 2 to expert 1 (q are 0.49 and 0.44 there).
    out = route(logits, K, E, 0.0, "gain", expert_cost=[0.1, 0.0], backend="reference")
    assert out.assignment.tolist() == [[0, -1, 1]]
    assert float(out.defer_prob[0, 2]) == pytest.approx(float(q[2, 1] - q[2, 2]))
    # Pixel 0: q = (0.665, 0.090, 0.245): deferring gains 0.42, so threshold 0.5 keeps it.
    assert route(logits, K, E, 0.5, "gain", backend="reference").assignment.tolist() == [
        [-1, -1, -1]
    ]
    # sigmoid scores: each option on its own; model logit 3 at pixel 1 still keeps it.
    out = route(logits, K, E, 0.0, "gain", scores="sigmoid", backend="reference")
    s = torch.sigmoid(r)
    assert out.defer_prob[0].tolist() == pytest.approx((s[:, 0] - s[:, 2]).tolist())
    assert out.assignment.tolist() == [[0, -1, 0]]


def test_router_mode_with_costs_defers_at_a_gain_of_at_least_zero():
    K, E = 1, 1
    logits = torch.zeros(1, 4, 2)
    logits[0, K] = torch.tensor([0.0, 0.5])  # the expert's routing logit; the model's is 0
    out = route(logits, K, E, mode="router", backend="reference")
    assert out.assignment.tolist() == [[0, 0]]  # argmax r: the tie goes to the expert
    out = route(logits, K, E, mode="router", expert_cost=[0.0], backend="reference")
    assert out.assignment.tolist() == [[0, 0]]  # g = 0 and g > 0: both deferred
    assert out.defer_prob[0].tolist() == pytest.approx(
        [0.5, float(torch.sigmoid(torch.tensor(0.5)))]
    )
    out = route(logits, K, E, mode="router", expert_cost=[0.2], backend="reference")
    # g = softmax gap - 0.2: -0.2 at pixel 0; sigmoid(0.5) - sigmoid(-0.5) - 0.2 = 0.045 at 1
    assert out.assignment.tolist() == [[-1, 0]]
    out = route(
        logits, K, E, mode="router", expert_cost=[0.2], scores="sigmoid", backend="reference"
    )
    # sigmoid(0.5) - 0.2 - sigmoid(0) = -0.078: kept
    assert out.assignment.tolist() == [[-1, -1]]


def test_defaults_are_todays_routing_and_costs_accept_tensors():
    K, E = 3, 2
    logits, _, experts = make_inputs(2, K, E, (6, 7))
    for mode in ("gate", "router"):
        base = route(logits, K, E, 0.4, mode, experts, backend="reference")
        same = route(
            logits,
            K,
            E,
            0.4,
            mode,
            experts,
            expert_cost=None,
            scores="softmax",
            backend="reference",
        )
        _assert_same_route(same, base)
        assert torch.equal(base.defer_prob, same.defer_prob)
    by_list = route(logits, K, E, 0.1, "gain", experts, expert_cost=[0.2, 0.05])
    for cost in (
        (0.2, 0.05),
        torch.tensor([0.2, 0.05]),
        torch.tensor([0.2, 0.05], dtype=torch.float64),
    ):
        _assert_same_route(route(logits, K, E, 0.1, "gain", experts, expert_cost=cost), by_list)
    ints = route(logits, K, E, 0.1, "gain", experts, expert_cost=torch.tensor([1, 0]))
    _assert_same_route(ints, route(logits, K, E, 0.1, "gain", experts, expert_cost=[1.0, 0.0]))
    # The gain lies in [-1 - max cost, 1]: thresholds outside it defer nothing or everything.
    assert (route(logits, K, E, 1.0, "gain").assignment == -1).all()
    assert (route(logits, K, E, -1.0 - 1e-6, "gain").assignment >= 0).all()
    assert (route(logits, K, E, -2.5, "gain", expert_cost=[1.5, 1.0]).assignment >= 0).all()


@pytest.mark.parametrize("backend", ["reference"] + ROUTE_BACKENDS)
@pytest.mark.parametrize(
    "kw,exc,words",
    [
        (dict(expert_cost=[0.1]), ValueError, ["expert_cost", "length 2", "length 1"]),
        (dict(expert_cost=[0.1, float("nan")]), ValueError, ["expert_cost[1]", "finite"]),
        (dict(expert_cost=[0.1, -0.2]), ValueError, ["expert_cost[1]", ">= 0", "-0.2"]),
        (dict(expert_cost=[0.1, "x"]), TypeError, ["expert_cost[1]", "real number", "str"]),
        (dict(expert_cost="cheap"), TypeError, ["expert_cost", "str"]),
        (dict(expert_cost=0.1), TypeError, ["expert_cost", "float"]),
        (dict(expert_cost=torch.zeros(2, 1)), ValueError, ["expert_cost", "1-D", "(2, 1)"]),
        (
            dict(expert_cost=torch.zeros(2, dtype=torch.bool)),
            TypeError,
            ["expert_cost", "torch.bool"],
        ),
        (dict(scores="probit"), ValueError, ["scores", "probit", "sigmoid"]),
        (dict(scores=None), TypeError, ["scores", "None"]),
        (dict(mode="gain", threshold=float("inf")), ValueError, ["threshold", "finite"]),
        (dict(mode="gain", threshold="high"), TypeError, ["threshold", "str"]),
        (dict(mode="gate", threshold=-0.1), ValueError, ["threshold", "[0, 1]", "'gate'"]),
        (dict(mode="router", threshold=2.0), ValueError, ["threshold", "[0, 1]", "'router'"]),
        (dict(mode="benefit"), ValueError, ["mode", "benefit", "gain"]),
    ],
)
def test_new_route_arguments_are_checked_by_name(backend, kw, exc, words):
    K, E = 2, 2
    logits, _, _ = make_inputs(2, K, E, (4, 5))
    with pytest.raises(exc) as info:
        route(logits, K, E, **kw, backend=backend)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


@pytest.mark.skipif(EXT is None, reason="C++ extension not built")
def test_cpp_route_op_rejects_bad_mode_scores_and_cost_shape():
    K, E = 2, 2
    logits, _, _ = make_inputs(1, K, E, (3, 4))
    op = torch.ops.deferredseg.route
    with pytest.raises(
        RuntimeError, match="mode must be one of 'gate', 'router', 'gain', got 'soft'"
    ):
        op(logits, K, E, 0.0, "soft", None, None, "softmax")
    with pytest.raises(RuntimeError, match="scores must be 'softmax' or 'sigmoid', got 'probit'"):
        op(logits, K, E, 0.0, "gate", None, None, "probit")
    with pytest.raises(RuntimeError, match=r"expert_cost must have shape \(2\)"):
        op(logits, K, E, 0.0, "gain", None, torch.zeros(3), "softmax")


@pytest.mark.parametrize("backend", ROUTE_BACKENDS)
@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int32, torch.int64])
def test_backends_label_dtypes_and_layouts(backend, label_dtype):
    K, E = 3, 3
    logits, _, experts = make_inputs(
        2, K, E, (6, 7), label_dtype=label_dtype, ignore_frac=0, expert_ignore_frac=0
    )
    big = torch.randn(2, K + E + 5, 6, 7)
    big[:, 2 : 2 + K + E + 2] = logits
    variants = {
        "contiguous": logits,
        "channels_last": logits.contiguous(memory_format=torch.channels_last),
        "channel_slice": big[:, 2 : 2 + K + E + 2],
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
    op = torch.ops.deferredseg.route.default
    cost = torch.tensor([0.1, 0.0])
    torch.library.opcheck(op, (logits, K, E, 0.0, "gate", experts, None, "softmax"))
    torch.library.opcheck(op, (logits, K, E, 0.3, "router", None, None, "softmax"))
    torch.library.opcheck(op, (logits, K, E, 0.3, "router", experts, cost, "sigmoid"))
    torch.library.opcheck(op, (logits, K, E, -0.2, "gain", experts, cost, "softmax"))
    torch.library.opcheck(op, (logits.double(), K, E, 0.1, "gain", None, None, "sigmoid"))


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

    @torch.compile(fullgraph=True, backend="aot_eager")
    def g(x, m):
        out = route(
            x, K, E, 0.05, "gain", m, expert_cost=[0.1, 0.0, 0.2], scores="sigmoid", backend="cpu"
        )
        return out.assignment, out.defer_prob, out.final

    a, prob, fin = g(logits, experts)
    eager = route(
        logits,
        K,
        E,
        0.05,
        "gain",
        experts,
        expert_cost=[0.1, 0.0, 0.2],
        scores="sigmoid",
        backend="cpu",
    )
    assert torch.equal(a, eager.assignment) and torch.equal(fin, eager.final)
    assert torch.equal(prob, eager.defer_prob)


@pytest.mark.skipif(
    torch.version.cuda is None or EXT is None or not EXT.with_cuda,
    reason="not a CUDA-enabled build",
)
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

    run = route_runner(backend, "cuda")

    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for scores in ("softmax", "sigmoid"):
            check_route_matrix(run, K, E, dtype, scores, shapes=((33, 65),))
            check_route_matrix(run, 2, 16, dtype, scores, shapes=((17, 9, 5),))


def test_public_api_names():
    for name in ("deferredseg_loss", "route", "split_logits", "available_backends"):
        assert hasattr(dk, name)
