"""The driver shared by every fused backend (C++ CPU, C++ CUDA, Triton).

A fused backend provides two ops with the same contract:

``stats(logits, target, expert_labels, class_weight, K, E, ignore_index, check_expert_labels)``
    One pass over the routing channels and the labels. Returns a float64 vector of
    ``stats_len(E) = E + 7`` values::

        [S_0 .. S_E,   sum over valid pixels of pi_k (k = 0..E)     index 0 .. E
         N_V,          number of valid pixels                        index E + 1
         W,            sum over valid pixels of class_weight[y]      index E + 2
                       (N_V when class_weight is None)
         n_0, n_1, n_2 valid neighbour pairs along spatial axis 0,1,2 index E + 3 .. E + 5
                       (0 for axes the input does not have)
         bad]          labels out of range: targets not in [0, K') and index E + 6
                       != ignore_index, plus (when check_expert_labels)
                       expert labels not in [0, K') and != ignore_index

    The loss op takes this vector as it is, or with one more entry, ``E + 8`` values:
    ``N_B`` at index E + 7, the denominator of pbar (pbar_k = S_k / N_B; absent,
    N_B = N_V). The driver adds it under ``sync_balance`` (a process group is
    initialised), where S_0 .. S_E and N_B are summed over every rank, while N_V and
    the other entries stay this rank's (the seg, collab, gate and coherence terms are
    means over this rank's pixels, as in the reference).

    The offsets are declared once, in :mod:`deferredseg_kernels.contract`
    (``STAT_OFFSETS``); below, ``stat_count(E)``, ``stat_weight(E)``,
    ``stat_pairs(E, d)``, ``stat_bad(E)``, ``stat_balance_count(E)`` (the accessors of
    ``csrc/loss_pixel.h``) are read from them, as are the ``STAT_*`` offsets the Triton
    kernels read.

``loss(logits, target, expert_labels, class_weight, stats, balance_low, balance_high,
       K, E, ignore_index, fparams, iparams, compute_grad) -> (terms, grad)``
    One pass that computes every term and, when ``compute_grad``, the gradient of
    the total loss with respect to the packed logits. ``stats`` is the E + 7 or
    E + 8 vector above. ``terms`` is ``[loss, seg, collab, gate, coherence,
    balance]`` (float64 for float64 logits, float32 otherwise); ``grad`` has the
    logits' shape and dtype (shape (0,) when ``compute_grad`` is false).
    ``fparams`` / ``iparams``: the options encoded as declared once in
    :mod:`deferredseg_kernels.contract` (``FLOAT_FIELDS``, then ``INT_FIELDS`` coded by
    ``CODES``; :func:`~deferredseg_kernels.contract.encode` makes them,
    :func:`~deferredseg_kernels.contract.decode` names them), ``iparams`` optionally
    with one more entry, ``check_experts``: 1 makes the loss op itself raise ValueError
    on expert labels out of range (the C++ CPU kernel reads them in that pass anyway,
    so the stats pass need not read them a second time; other kernels refuse 1).

The driver runs the stats op, all-reduces the balance sums when asked, runs the
loss op, and wires autograd: the gradient is computed in the forward pass, and
backward only rescales it by the incoming gradient.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import torch

from .. import contract
from .._checks import check_label_range, is_compiling
from ..options import LossOptions
from ..types import TERM_NAMES, RouteResult, compute_dtype

# The option encoding (fparams / iparams), the stats layout and ``terms``, as declared
# once in deferredseg_kernels/contract.py (csrc/contract.h is generated from it).
FPARAMS = tuple(f.name for f in contract.FLOAT_FIELDS)
IPARAMS = tuple(f.name for f in contract.INT_FIELDS)
TERMS_LEN = len(contract.TERMS)  # the loss, then the terms in TERM_NAMES order
# Where each entry sits in ``terms``: the loss first, then TERM_NAMES.
TERM_INDEX = {name: i for i, name in enumerate(contract.TERMS)}


# ------------------------------------------------------------------ stats layout
# Where each entry of the stats vector of E experts sits (the layout of the module
# docstring), named as the accessors of csrc/loss_pixel.h. Entries 0 .. E hold the sums
# S_0 .. S_E; every other entry sits at E + its offset (contract.STAT_OFFSETS), which the
# Triton kernels read (as constexpr globals) and the functions below return for a given E.
MAX_SPATIAL = contract.MAX_SPATIAL  # spatial axes a logits tensor may have
STAT_COUNT = contract.STAT_OFFSETS["count"]  # N_V, the valid pixels of this call
STAT_WEIGHT = contract.STAT_OFFSETS["weight"]  # W, the class-weight mass of the valid pixels
STAT_PAIRS = contract.STAT_OFFSETS["pairs"]  # + d: the valid neighbour pairs along axis d
STAT_BAD = contract.STAT_OFFSETS["bad"]  # the labels out of range
STAT_BALANCE_COUNT = contract.STAT_OFFSETS["balance_count"]  # N_B: the optional last entry


def stats_len(num_experts: int) -> int:
    """The stats op's output length (without the optional N_B)."""
    return num_experts + STAT_BALANCE_COUNT


def stat_count(num_experts: int) -> int:
    return num_experts + STAT_COUNT


def stat_weight(num_experts: int) -> int:
    return num_experts + STAT_WEIGHT


def stat_pairs(num_experts: int, axis: int) -> int:
    return num_experts + STAT_PAIRS + axis


def stat_bad(num_experts: int) -> int:
    return num_experts + STAT_BAD


def stat_balance_count(num_experts: int) -> int:
    return num_experts + STAT_BALANCE_COUNT


def int_params(opts: LossOptions) -> List[int]:
    """``iparams`` of ``opts`` (contract.INT_FIELDS order, without check_experts)."""
    return contract.int_params(opts)


def float_params(opts: LossOptions, balance_grad_scale: float) -> List[float]:
    """``fparams`` of ``opts`` (contract.FLOAT_FIELDS order)."""
    return contract.float_params(opts, balance_grad_scale)


def grad_buffer(logits: torch.Tensor) -> torch.Tensor:
    """The gradient buffer for ``logits``: its own memory, in the logits' memory format.

    ``empty_like`` with ``preserve_format`` keeps the strides of a non-overlapping and
    dense tensor (contiguous, channels-last, any permutation) and gives a dense layout
    otherwise (``at::empty_like`` in C++ does the same).
    """
    return torch.empty_like(logits, memory_format=torch.preserve_format)


def fake_stats(
    logits,
    target,
    expert_labels,
    class_weight,
    num_classes,
    num_experts,
    ignore_index,
    check_expert_labels,
):
    return logits.new_empty((stats_len(num_experts),), dtype=torch.float64)


def fake_loss(
    logits,
    target,
    expert_labels,
    class_weight,
    stats,
    balance_low,
    balance_high,
    num_classes,
    num_experts,
    ignore_index,
    fparams,
    iparams,
    compute_grad,
):
    terms = logits.new_empty((TERMS_LEN,), dtype=compute_dtype(logits.dtype))
    grad = grad_buffer(logits) if compute_grad else logits.new_empty((0,))
    return terms, grad


def _traced(t: torch.Tensor) -> bool:
    """True while torch.compile / AOT autograd / FX trace (values are not known then)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return is_compiling() or type(t) is not torch.Tensor or _get_current_dispatch_mode() is not None


def rescale(grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``grad * scale``, rounded once to the gradient's dtype.

    Eager: an incoming gradient of exactly 1 (the loss is the last node, the usual
    case) returns the forward pass's gradient itself, with no pass over memory; any
    other value multiplies by it as a Python float, which PyTorch applies in
    float32 even to bf16 / fp16 tensors (one read, one write; reading the value is a
    device sync, as in Liger-Kernel's losses). Traced: the float32 expression,
    which the compiler fuses into one kernel.
    """
    if not _traced(scale):
        s = float(scale)
        return grad if s == 1.0 else grad * s
    acc = compute_dtype(grad.dtype)
    return (grad.to(acc) * scale.to(acc)).to(grad.dtype)


def _logits_grad(ctx, grad_loss: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The backward of a fused loss op: the saved gradient times ``grad_loss``, the
    incoming gradient of terms[0] (None: nothing flows back)."""
    (grad,) = ctx.saved_tensors
    # Only terms[0] (the total loss) is differentiable; the other terms are handed
    # out detached by the driver. A gradient made in forward has the logits' >= 3
    # dims (possibly 0 elements); the shape-(0,) placeholder means no gradient.
    if ctx.needs_input_grad[0] and grad.dim() > 1 and grad_loss is not None:
        return rescale(grad, grad_loss)
    return None


def register_loss_autograd(op_name: str) -> None:
    """Autograd for a fused loss op: backward rescales the gradient made in forward."""

    def setup_context(ctx, inputs, output):
        _, grad = output
        ctx.save_for_backward(grad)
        # Nothing flows back through the gradient output: without this, autograd would
        # fill a logits-sized tensor of zeros for it on every backward.
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_terms, grad_grad):
        return (_logits_grad(ctx, None if grad_terms is None else grad_terms[0]),) + (None,) * 12

    torch.library.register_autograd(op_name, backward, setup_context=setup_context)


class _EagerLoss(torch.autograd.Function):
    """The autograd of register_loss_autograd, for plain eager calls.

    torch.library's autograd wrapper re-binds the op's 13 arguments to its schema on
    every call, which costs more than the kernel itself on small inputs; eager calls
    (no tracing, no functorch transform) go through this Function instead, which runs
    the op below the autograd dispatch keys (the op's own autograd is not entered)
    and has the same backward. Traced calls use the registered autograd.

    Outputs: the loss (terms[0], its own 0-dim tensor, so that backward starts here
    and not at a select of ``terms``) and the detached terms.
    """

    @staticmethod
    def forward(ctx, logits, run):
        with torch._C._AutoDispatchBelowAutograd():
            terms, grad = run(logits)
        ctx.save_for_backward(grad)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(terms)
        return terms[0].clone(), terms

    @staticmethod
    def backward(ctx, grad_loss, grad_terms):
        return _logits_grad(ctx, grad_loss), None


def _plain_eager(t: torch.Tensor) -> bool:
    functorch = getattr(torch._C, "_are_functorch_transforms_active", lambda: True)
    return not _traced(t) and not functorch()


def _balance_stats(stats: torch.Tensor, num_experts: int, sync: bool):
    """The loss op's stats (see the module docstring) and the balance gradient scale.

    Without a process group to sync over, the stats op's E + 7 values as they are.
    """
    if not sync:
        return stats, 1.0
    import torch.distributed as dist

    E = num_experts
    if not (dist.is_available() and dist.is_initialized()):
        return stats, 1.0
    at_count = stat_count(E)  # S_0 .. S_E come before N_V
    head = stats[: at_count + 1].clone()  # S_0 .. S_E and N_V
    dist.all_reduce(head)
    # Global S_0..S_E, this rank's N_V .. bad, then the global count N_B.
    synced = torch.cat([head[:at_count], stats[at_count:], head[at_count:]])
    # DistributedDataParallel averages gradients over ranks; scaling the balance
    # gradient by the world size makes that average the single-process gradient.
    return synced, float(dist.get_world_size())


def _as_param_tensor(values, logits: torch.Tensor) -> Optional[torch.Tensor]:
    if values is None:
        return None
    return torch.tensor(values, dtype=compute_dtype(logits.dtype), device=logits.device)


def fused_loss(
    stats_op: Callable,
    loss_op: Callable,
    logits: torch.Tensor,
    target: torch.Tensor,
    expert_labels: torch.Tensor,
    opts: LossOptions,
    return_terms: bool,
    check_labels_eagerly: bool,
    experts_checked_in_loss: bool = False,
):
    """Run a fused backend. ``check_labels_eagerly``: raise on bad labels (CPU, eager).

    ``experts_checked_in_loss``: the loss op checks the expert labels (iparams[5]),
    so the stats op checks only the target.
    """
    K, E = opts.num_classes, opts.num_experts
    class_weight = _as_param_tensor(opts.class_weight, logits)
    check_now = check_labels_eagerly and not is_compiling()
    experts_in_loss = check_now and experts_checked_in_loss
    # The stats carry no gradient of their own: the loss op's gradient already holds the
    # balance term's path through them, so the stats op sees detached logits (an op
    # without an autograd formula must not sit on the backward graph).
    stats = stats_op(
        logits.detach(),
        target,
        expert_labels,
        class_weight,
        K,
        E,
        opts.ignore_index,
        check_now and not experts_in_loss,
    )
    if check_now and stats.tolist()[stat_bad(E)] > 0:  # (one call; stats[i].item() is two ops)
        check_label_range(target, expert_labels, opts.num_labels, opts.ignore_index)
        raise ValueError(
            f"target must hold labels in [0, {opts.num_labels}) or ignore_index={opts.ignore_index}"
        )
    stats, scale = _balance_stats(stats, E, opts.sync_balance)
    compute_grad = logits.requires_grad and torch.is_grad_enabled()
    fparams, iparams = contract.encode(opts, scale, check_experts=True if experts_in_loss else None)
    args = (
        target,
        expert_labels,
        class_weight,
        stats,
        _as_param_tensor(opts.balance_low, logits),
        _as_param_tensor(opts.balance_high, logits),
        K,
        E,
        opts.ignore_index,
        fparams,
        iparams,
        compute_grad,
    )
    try:
        if compute_grad and _plain_eager(logits):
            loss, terms = _EagerLoss.apply(logits, lambda x: loss_op(x, *args))
        else:
            terms, _ = loss_op(logits, *args)
            loss = terms[0]
    except ValueError:
        if experts_in_loss:  # name the offending values, as the other paths do
            check_label_range(target, expert_labels, opts.num_labels, opts.ignore_index)
        raise
    if not check_now:
        # A target out of range (not checked eagerly on GPU or while compiling) makes
        # the loss NaN, never an out-of-bounds read. (Checked eagerly, it has raised.)
        loss = torch.where(stats[stat_bad(E)] > 0, torch.full_like(loss, float("nan")), loss)
    if not return_terms:
        return loss
    has_nb = stats.numel() > stat_balance_count(E)
    count = stats[stat_balance_count(E) if has_nb else stat_count(E)]  # N_B, or N_V
    pbar = (stats[: stat_count(E)] / count.clamp_min(1)).to(terms.dtype)  # S_k / count
    out = {name: terms[i + 1].detach() for i, name in enumerate(TERM_NAMES)}
    out["pbar"] = pbar.detach()
    return loss, out


# ----------------------------------------------------------------------------- route
# The compiled route ops (C++ ``deferredseg::route``, Triton ``deferredseg_triton::route``)
# share one schema:
#   (logits, K, E, decision_threshold, mode, expert_labels, expert_cost, scores) ->
#   (assignment int8, defer_prob, model_pred int64, final int64 or shape (0,)).
# decision_threshold: logit(threshold) in modes "gate" and "router" (unused there), the
# threshold itself in mode "gain" (see _checks.route_threshold); mode: "gate", "router"
# or "gain"; expert_cost: None or E costs as a 1-D tensor of the accumulation dtype on
# the logits' device; scores: "softmax" or "sigmoid".


def fake_route(
    logits, num_classes, num_experts, decision_threshold, mode, expert_labels, expert_cost, scores
):
    shape = (logits.shape[0],) + tuple(logits.shape[2:])
    return (
        logits.new_empty(shape, dtype=torch.int8),
        logits.new_empty(shape, dtype=compute_dtype(logits.dtype)),
        logits.new_empty(shape, dtype=torch.int64),
        logits.new_empty(shape if expert_labels is not None else (0,), dtype=torch.int64),
    )


def route_with(
    op: Callable,
    logits: torch.Tensor,
    num_classes: int,
    num_experts: int,
    decision_threshold: float,
    mode: str,
    expert_labels: Optional[torch.Tensor],
    expert_cost: Optional[tuple] = None,
    scores: str = "softmax",
) -> RouteResult:
    """Run a compiled route op and wrap its outputs as a RouteResult.

    ``expert_cost``: the validated costs (a tuple) or None; they reach the op as a
    tensor of the accumulation dtype on the logits' device.
    """
    assignment, defer_prob, model_pred, final = op(
        logits.detach(),
        num_classes,
        num_experts,
        float(decision_threshold),
        mode,
        expert_labels,
        _as_param_tensor(expert_cost, logits),
        scores,
    )
    return RouteResult(
        assignment, defer_prob, model_pred, final if expert_labels is not None else None
    )
