"""Triton kernel of the inference routing (docs/objective.md section 4).

``deferredseg_triton::route`` takes the arguments of the C++ ``deferredseg::route`` op and
returns the same four tensors (assignment, defer_prob, model_pred, final).
One program per block of pixels of one image: the model's prediction (argmax z,
or z > 0 for K = 1), the expert a deferred pixel goes to, the deferral decision
and its score, and the final label when expert labels are given.

Without expert costs the chosen expert is the argmax over the E expert routing
logits; with costs it is the argmax of ``q_j - cost_j`` (q: softmax or sigmoid of
the routing logits). The gain ``g = (q_jhat - cost_jhat) - q_E`` is computed only
when it is used (costs given, or mode "gain"). Mode "gate": ``a > logit(threshold)``,
compared in the accumulation type exactly as the reference does; mode "router": the
router's argmax is an expert (without costs) or ``g >= 0`` (with costs); mode
"gain": ``g > threshold``. Argmax follows ``torch.argmax`` (first maximum; a NaN
wins), so without costs ``assignment``, ``model_pred`` and ``final`` are the
reference's bits.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._checks import ROUTE_SCORES
from ..types import LOGITS_DTYPES, RouteResult
from . import fused
from .triton_common import (
    acc_dtype,
    argmax_first,
    define_op,
    flat,
    launcher,
    load_channels,
    next_pow2,
    pixel_block,
    router_softmax,
    sigmoid,
    to_acc,
)

ROUTE_OP = "deferredseg_triton::route"


# Mode codes of the kernel's MODE switch.
_MODE_CODES = {"gate": 0, "router": 1, "gain": 2}


@triton.jit
def _route_kernel(
    x_ptr,
    l_ptr,
    thr_ptr,
    cost_ptr,
    asg_ptr,
    prob_ptr,
    pred_ptr,
    final_ptr,
    P,
    n_tiles,
    sxb,
    sxc,
    sxp,
    slb,
    sle,
    slp,
    K: tl.constexpr,
    E: tl.constexpr,
    KP: tl.constexpr,
    RP: tl.constexpr,
    MODE: tl.constexpr,
    HAS_COST: tl.constexpr,
    NEED_GAIN: tl.constexpr,
    SIGMOID_SCORES: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    IS_FP64: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_tiles
    p = (pid - b * n_tiles) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    pm = p < P
    x_row = x_ptr + b * sxb
    off_x = p * sxp

    if K == 1:
        z = to_acc(tl.load(x_row + off_x, mask=pm, other=0.0), IS_FP64)
        pred = (z > 0).to(tl.int64)  # z = 0 predicts 0
    else:
        kz = tl.arange(0, KP).to(tl.int64)
        zt = load_channels(x_row, 0, kz, K, off_x, pm, sxc, IS_FP64)
        pred = argmax_first(zt, kz, kz < K, KP)

    kr = tl.arange(0, RP).to(tl.int64)
    r = load_channels(x_row, K, kr, E + 1, off_x, pm, sxc, IS_FP64)
    if NEED_GAIN:
        # q [RP, BLOCK]: the options' correctness estimates (rows >= E + 1: padding).
        if SIGMOID_SCORES:
            q = sigmoid(r)
        else:
            _, ex, total, _ = router_softmax(r, kr, E)
            q = ex / total[None, :]
        if HAS_COST:
            cost = to_acc(tl.load(cost_ptr + kr, mask=kr < E, other=0.0), IS_FP64)
            value = q - cost[:, None]
            chosen = argmax_first(value, kr, kr < E, RP)
        else:
            value = q
            chosen = argmax_first(r, kr, kr < E, RP)
        # One term of each sum is selected: the sums are that term's exact bits.
        best = tl.sum(tl.where(kr[:, None] == chosen[None, :], value, 0.0), axis=0)
        q_model = tl.sum(tl.where(kr[:, None] == E, q, 0.0), axis=0)
        gain = best - q_model
    else:
        chosen = argmax_first(r, kr, kr < E, RP)  # the expert a deferred pixel goes to
        gain = tl.zeros([BLOCK_P], dtype=r.dtype)
    if MODE == 1:
        if HAS_COST:
            defer = gain >= 0  # ties go to the expert
        else:
            defer = argmax_first(r, kr, kr < E + 1, RP) < E
        _, _, _, prob = router_softmax(r, kr, E)
    elif MODE == 2:
        thr = to_acc(tl.load(thr_ptr), IS_FP64)
        defer = gain > thr
        prob = gain
    else:
        a = to_acc(tl.load(x_row + (K + E + 1) * sxc + off_x, mask=pm, other=0.0), IS_FP64)
        thr = to_acc(tl.load(thr_ptr), IS_FP64)
        defer = a > thr
        prob = sigmoid(a)

    out = b * P + p
    tl.store(asg_ptr + out, tl.where(defer, chosen, -1).to(tl.int8), mask=pm)
    tl.store(prob_ptr + out, prob.to(prob_ptr.dtype.element_ty), mask=pm)
    tl.store(pred_ptr + out, pred, mask=pm)
    if HAS_LABELS:
        # chosen is in [0, E): the load stays inside the expert labels.
        lab = tl.load(l_ptr + b * slb + chosen * sle + p * slp, mask=pm, other=0).to(tl.int64)
        tl.store(final_ptr + out, tl.where(defer, lab, pred), mask=pm)


def _route_impl(
    logits: torch.Tensor,
    num_classes: int,
    num_experts: int,
    decision_threshold: float,
    mode: str,
    expert_labels: Optional[torch.Tensor],
    expert_cost: Optional[torch.Tensor],
    scores: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if logits.dtype not in LOGITS_DTYPES:
        raise TypeError(
            "deferredseg triton route: logits must be float32, bfloat16, float16 or "
            f"float64, got dtype {logits.dtype}"
        )
    K, E = int(num_classes), int(num_experts)
    if logits.dim() < 3 or logits.dim() > 5 or logits.shape[1] != K + E + 2:
        raise ValueError(
            f"logits must have shape (B, {K + E + 2}, *S) with 1 to 3 spatial dims, "
            f"got shape {tuple(logits.shape)}"
        )
    if mode not in _MODE_CODES:
        raise ValueError(
            f"deferredseg triton route: mode must be one of {list(_MODE_CODES)}, got {mode!r}"
        )
    if scores not in ROUTE_SCORES:
        raise ValueError(
            f"deferredseg triton route: scores must be one of {list(ROUTE_SCORES)}, got {scores!r}"
        )
    B = logits.shape[0]
    out_shape = (B,) + tuple(logits.shape[2:])
    x = flat(logits, 2)
    P = x.shape[2]
    dev = logits.device
    acc = acc_dtype(logits.dtype)
    has_cost = expert_cost is not None
    if has_cost:
        if expert_cost.dim() != 1 or expert_cost.numel() != E:
            raise ValueError(
                f"deferredseg triton route: expert_cost must have shape ({E},), "
                f"got shape {tuple(expert_cost.shape)}"
            )
        cost = expert_cost.to(device=dev, dtype=acc).contiguous()
    else:
        cost = x  # never read
    assignment = torch.empty(out_shape, dtype=torch.int8, device=dev)
    defer_prob = torch.empty(out_shape, dtype=acc, device=dev)
    model_pred = torch.empty(out_shape, dtype=torch.int64, device=dev)
    has_labels = expert_labels is not None
    final = torch.empty(out_shape if has_labels else (0,), dtype=torch.int64, device=dev)
    lab = flat(expert_labels, 2) if has_labels else x
    # The decision threshold rounded to the accumulation type by torch, as the
    # reference's comparisons (`a > logit(t)`, `g > t`) do.
    thr = torch.full((1,), float(decision_threshold), dtype=acc, device=dev)
    KP, RP = next_pow2(max(K, 2)), next_pow2(E + 1)
    block, warps = pixel_block(P, max(KP, RP))
    n_tiles = triton.cdiv(P, block) if P > 0 else 0
    if B * n_tiles > 0:
        launcher(_route_kernel)[(B * n_tiles,)](
            x,
            lab,
            thr,
            cost,
            assignment,
            defer_prob,
            model_pred,
            final,
            P,
            n_tiles,
            x.stride(0),
            x.stride(1),
            x.stride(2),
            lab.stride(0),
            lab.stride(1),
            lab.stride(2),
            K=K,
            E=E,
            KP=KP,
            RP=RP,
            MODE=_MODE_CODES[mode],
            HAS_COST=has_cost,
            NEED_GAIN=has_cost or mode == "gain",
            SIGMOID_SCORES=scores == "sigmoid",
            HAS_LABELS=has_labels,
            IS_FP64=logits.dtype == torch.float64,
            BLOCK_P=block,
            num_warps=warps,
        )
    return assignment, defer_prob, model_pred, final


# The schema torch infers from the annotations of _route_impl (see define_op).
_ROUTE_SCHEMA = (
    "(Tensor logits, SymInt num_classes, SymInt num_experts, float decision_threshold, "
    "str mode, Tensor? expert_labels, Tensor? expert_cost, str scores) -> "
    "(Tensor, Tensor, Tensor, Tensor)"
)

route_op = define_op(ROUTE_OP, _ROUTE_SCHEMA, _route_impl, fused.fake_route)


def route(
    logits: torch.Tensor,
    num_classes: int,
    num_experts: int,
    decision_threshold: float,
    mode: str,
    expert_labels: Optional[torch.Tensor],
    expert_cost: Optional[tuple],
    scores: str,
) -> RouteResult:
    """The ``"triton"`` backend of :func:`deferredseg_kernels.route`."""
    return fused.route_with(
        route_op,
        logits,
        num_classes,
        num_experts,
        decision_threshold,
        mode,
        expert_labels,
        expert_cost,
        scores,
    )
