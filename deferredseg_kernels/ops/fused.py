"""The driver shared by every fused backend (C++ CPU, C++ CUDA, Triton).

A fused backend provides two ops with the same contract:

``stats(logits, target, expert_labels, class_weight, K, E, ignore_index, check_expert_labels)``
    One pass over the routing channels and the labels. Returns a float64 vector of
    ``STATS_LEN(E) = E + 7`` values::

        [S_0 .. S_E,   sum over valid pixels of pi_k (k = 0..E)     index 0 .. E
         N_V,          number of valid pixels                        index E + 1
         W,            sum over valid pixels of class_weight[y]      index E + 2
                       (N_V when class_weight is None)
         n_0, n_1, n_2 valid neighbour pairs along spatial axis 0,1,2 index E + 3 .. E + 5
                       (0 for axes the input does not have)
         bad]          labels out of range: targets not in [0, K') and index E + 6
                       != ignore_index, plus (when check_expert_labels)
                       expert labels not in [0, K') and != ignore_index

``loss(logits, target, expert_labels, class_weight, stats, balance_low, balance_high,
       K, E, ignore_index, fparams, iparams, compute_grad) -> (terms, grad)``
    One pass that computes every term and, when ``compute_grad``, the gradient of
    the total loss with respect to the packed logits. ``stats`` is the vector above
    with its balance part (indices 0 .. E + 1) already all-reduced when
    ``sync_balance`` is on. ``terms`` is ``[loss, seg, collab, gate, coherence,
    balance]`` (float64 for float64 logits, float32 otherwise); ``grad`` has the
    logits' shape and dtype (shape (0,) when ``compute_grad`` is false).
    ``fparams`` = FPARAMS order, ``iparams`` = IPARAMS order below.

The driver runs the stats op, all-reduces the balance sums when asked, runs the
loss op, and wires autograd: the gradient is computed in the forward pass, and
backward only rescales it by the incoming gradient.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import torch

from .._checks import LossOptions
from ..reference import compute_dtype

FPARAMS = ("lambda_seg", "lambda_collab", "lambda_gate", "lambda_coherence", "lambda_balance",
           "paper_eps", "gate_mse", "gate_sparsity", "balance_grad_scale")
IPARAMS = ("surrogate", "coherence", "coherence_maps", "balance")
# iparams encodings
SURROGATE_CODE = {"softmax": 0, "paper": 1}
COHERENCE_CODE = {"l1": 0, "l2": 1}
MAP_BITS = {"router": 1, "gate": 2}
BALANCE_CODE = {"cv2": 0, "band": 1}
TERMS_LEN = 6  # loss, seg, collab, gate, coherence, balance


def stats_len(num_experts: int) -> int:
    return num_experts + 7


def int_params(opts: LossOptions) -> List[int]:
    maps = 0
    for name in opts.coherence_maps:
        maps |= MAP_BITS[name]
    return [SURROGATE_CODE[opts.surrogate], COHERENCE_CODE[opts.coherence], maps,
            BALANCE_CODE[opts.balance]]


def float_params(opts: LossOptions, balance_grad_scale: float) -> List[float]:
    return [opts.lambda_seg, opts.lambda_collab, opts.lambda_gate, opts.lambda_coherence,
            opts.lambda_balance, opts.paper_eps, opts.gate_mse, opts.gate_sparsity,
            float(balance_grad_scale)]


def grad_buffer(logits: torch.Tensor) -> torch.Tensor:
    """The gradient buffer for ``logits``: its own memory, in the logits' memory format."""
    if logits.is_non_overlapping_and_dense():
        return torch.empty_like(logits)
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def fake_stats(logits, target, expert_labels, class_weight, num_classes, num_experts,
               ignore_index, check_expert_labels):
    return logits.new_empty((stats_len(num_experts),), dtype=torch.float64)


def fake_loss(logits, target, expert_labels, class_weight, stats, balance_low, balance_high,
              num_classes, num_experts, ignore_index, fparams, iparams, compute_grad):
    terms = logits.new_empty((TERMS_LEN,), dtype=compute_dtype(logits.dtype))
    grad = grad_buffer(logits) if compute_grad else logits.new_empty((0,))
    return terms, grad


def register_loss_autograd(op_name: str) -> None:
    """Autograd for a fused loss op: backward rescales the gradient made in forward."""

    def setup_context(ctx, inputs, output):
        _, grad = output
        ctx.save_for_backward(grad)

    def backward(ctx, grad_terms, grad_grad):
        (grad,) = ctx.saved_tensors
        g = None
        if ctx.needs_input_grad[0]:
            # Only terms[0] (the total loss) is differentiable; the other terms are
            # handed out detached by the driver.
            g = (grad * grad_terms[0].to(grad.dtype)) if grad.numel() else None
        return (g,) + (None,) * 12

    torch.library.register_autograd(op_name, backward, setup_context=setup_context)


def _sync_balance(stats: torch.Tensor, num_experts: int):
    """All-reduce the balance part of the stats; returns (stats, gradient scale)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return stats, 1.0
    head = stats[: num_experts + 2].clone()
    dist.all_reduce(head)
    # DistributedDataParallel averages gradients over ranks; scaling the balance
    # gradient by the world size makes that average the single-process gradient.
    return torch.cat([head, stats[num_experts + 2:]]), float(dist.get_world_size())


def _as_param_tensor(values, logits: torch.Tensor) -> Optional[torch.Tensor]:
    if values is None:
        return None
    return torch.tensor(values, dtype=compute_dtype(logits.dtype), device=logits.device)


def fused_loss(stats_op: Callable, loss_op: Callable, logits: torch.Tensor,
               target: torch.Tensor, expert_labels: torch.Tensor, opts: LossOptions,
               return_terms: bool, check_labels_eagerly: bool):
    """Run a fused backend. ``check_labels_eagerly``: raise on bad labels (CPU, eager)."""
    K, E = opts.num_classes, opts.num_experts
    class_weight = _as_param_tensor(opts.class_weight, logits)
    compiling = bool(getattr(torch.compiler, "is_compiling", lambda: False)())
    check_now = check_labels_eagerly and not compiling
    stats = stats_op(logits, target, expert_labels, class_weight, K, E, opts.ignore_index,
                     check_now)
    if check_now and stats[E + 6].item() > 0:
        from .._checks import check_label_range

        check_label_range(target, expert_labels, opts.num_labels, opts.ignore_index)
        raise ValueError("target must hold labels in "
                         f"[0, {opts.num_labels}) or ignore_index={opts.ignore_index}")
    scale = 1.0
    if opts.sync_balance:
        stats, scale = _sync_balance(stats, E)
    compute_grad = logits.requires_grad and torch.is_grad_enabled()
    terms, _ = loss_op(logits, target, expert_labels, class_weight, stats,
                       _as_param_tensor(opts.balance_low, logits),
                       _as_param_tensor(opts.balance_high, logits),
                       K, E, opts.ignore_index, float_params(opts, scale), int_params(opts),
                       compute_grad)
    loss = terms[0]
    # A target out of range (not checked eagerly on GPU) makes the loss NaN, never
    # an out-of-bounds read.
    loss = torch.where(stats[E + 6] > 0, torch.full_like(loss, float("nan")), loss)
    if not return_terms:
        return loss
    count = stats[E + 1]
    pbar = (stats[: E + 1] / count.clamp_min(1)).to(terms.dtype)
    out = {name: terms[i + 1].detach() for i, name in
           enumerate(("seg", "collab", "gate", "coherence", "balance"))}
    out["pbar"] = pbar.detach()
    return loss, out
