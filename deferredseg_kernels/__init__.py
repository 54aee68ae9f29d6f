"""deferredseg_kernels: the DeferredSeg objective and routing as tensor ops.

The low-level layer of the ``deferredseg`` distribution. It imports nothing
beyond torch (triton optionally), so it can be dropped into any training repo::

    from deferredseg_kernels import deferredseg_loss, route, split_logits, available_backends

Backends: ``"reference"`` (plain PyTorch, the oracle), ``"cpu"`` and ``"cuda"``
(the compiled C++ kernels), ``"triton"``; ``"auto"`` picks the fastest that can
run on the inputs' device. The math is documented in ``docs/objective.md``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from . import _dispatch
from ._checks import (
    ROUTE_MODES,
    ROUTE_SCORES,
    check_choice,
    check_expert_cost,
    check_float,
    check_inputs,
    check_int,
    check_label_range,
    check_labels,
    check_logits,
    is_compiling,
    route_threshold,
    threshold_logit,
)
from ._dispatch import BACKENDS, available_backends, register, runs_on, why_unavailable
from ._ext import EXT as _EXT
from ._version import __version__
from .options import (
    BALANCES,
    COHERENCE_MAPS,
    COHERENCES,
    GATE_TARGETS,
    OPTION_NAMES,
    PRESETS,
    SURROGATES,
    LossOptions,
    default_option,
    make_options,
)
from .reference import (
    balance_penalty,
    coherence_penalty,
    collab_pixelwise,
    deferredseg_loss_reference,
    model_correct,
    route_reference,
    split_logits,
)
from .types import LABEL_DTYPES, LOGITS_DTYPES, MAX_EXPERTS, TERM_NAMES, RouteResult, compute_dtype

__all__ = [
    "__version__",
    # the ops
    "deferredseg_loss",
    "loss_with_options",
    "route",
    "split_logits",
    "empty_cache",
    # their options, arguments and results
    "LossOptions",
    "make_options",
    "PRESETS",
    "default_option",
    "OPTION_NAMES",
    "SURROGATES",
    "GATE_TARGETS",
    "COHERENCES",
    "COHERENCE_MAPS",
    "BALANCES",
    "ROUTE_MODES",
    "ROUTE_SCORES",
    "RouteResult",
    "TERM_NAMES",
    "MAX_EXPERTS",
    # dtypes: of the inputs, and the one the ops compute in
    "LOGITS_DTYPES",
    "LABEL_DTYPES",
    "compute_dtype",
    # the backends: what `backend` accepts, and whether / where each one runs
    "BACKENDS",
    "available_backends",
    "why_unavailable",
    "runs_on",
    # the checks behind the error messages, for layers that validate their own arguments
    "check_choice",
    "check_float",
    "check_int",
    "check_label_range",
    "threshold_logit",
    # the plain-PyTorch reference and its per-term pieces, for modules of one term
    "deferredseg_loss_reference",
    "route_reference",
    "model_correct",
    "collab_pixelwise",
    "coherence_penalty",
    "balance_penalty",
]


def _reference_loss(logits, target, expert_labels, opts: LossOptions, return_terms: bool):
    if not is_compiling():  # reads values: a sync, and a graph break under torch.compile
        check_label_range(target, expert_labels, opts.num_labels, opts.ignore_index)
    return deferredseg_loss_reference(logits, target, expert_labels, opts, return_terms)


def _register_backends() -> None:
    """Register every backend's implementations (the backends are listed in _dispatch)."""
    register("reference", "loss", _reference_loss)
    register("reference", "route", route_reference)
    if _EXT is not None:
        from .ops import cpp

        for backend in ("cpu", "cuda"):  # one set of ops, on the device of the inputs
            register(backend, "loss", cpp.loss)
            register(backend, "route", cpp.route)
    from .ops import triton_support

    if triton_support.why_unavailable() is None:  # triton is optional
        from .ops import triton_loss, triton_route

        register("triton", "loss", triton_loss.loss)
        register("triton", "route", triton_route.route)


_register_backends()


def deferredseg_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    expert_labels: torch.Tensor,
    num_classes: int,
    num_experts: int,
    backend: str = "auto",
    return_terms: bool = False,
    **options: Any,
):
    """The DeferredSeg training objective (docs/objective.md section 3) of packed ``logits``.

    Args:
        logits: (B, K + E + 2, *S) float32 / bfloat16 / float16 (float64 for checks):
            K segmentation logits, E + 1 routing logits (experts, then the model),
            1 gate logit.
        target: (B, *S) or (B, 1, *S) uint8 / int32 / int64 labels in [0, max(K, 2))
            or ``ignore_index``.
        expert_labels: (B, E, *S) integer labels of each expert (``ignore_index``: no label).
        num_classes: K (1 means binary with a sigmoid).
        num_experts: E >= 1.
        backend: "auto", "reference", "triton", "cpu" or "cuda".
        return_terms: also return a dict of the detached terms
            ``{"seg", "collab", "gate", "coherence", "balance", "pbar"}`` (unweighted).
        **options: ``preset`` ("default": the training system's objective, one-vs-all
            correctness heads and a "benefit" gate; "paper": the paper's; see
            ``PRESETS``), then any option to override it: ``ignore_index``,
            ``class_weight``, ``lambda_seg``, ``lambda_collab``,
            ``lambda_gate``, ``lambda_coherence``, ``lambda_balance``, ``surrogate``
            ("softmax", "paper" or "ova"), ``paper_eps``, ``gate_target`` ("router" or
            "benefit"), ``gate_mse``, ``gate_sparsity``, ``coherence``,
            ``coherence_maps``, ``balance``, ``balance_low``, ``balance_high``,
            ``sync_balance``.

    Returns:
        The scalar loss (float32, or float64 for float64 logits), and the terms
        when ``return_terms`` is true.
    """
    opts = make_options(num_classes, num_experts, **options)
    return loss_with_options(logits, target, expert_labels, opts, backend, return_terms)


def loss_with_options(
    logits: torch.Tensor,
    target: torch.Tensor,
    expert_labels: torch.Tensor,
    opts: LossOptions,
    backend: str = "auto",
    return_terms: bool = False,
):
    """:func:`deferredseg_loss` with options already validated by :func:`make_options`.

    For callers that evaluate the loss many times with the same options (the loss
    modules), so the options are checked once, not on every step.
    """
    target, expert_labels = check_inputs(logits, target, expert_labels, opts)
    impl = _dispatch.select(backend, "loss", logits.device)
    return impl(logits, target, expert_labels, opts, return_terms)


def route(
    logits: torch.Tensor,
    num_classes: int,
    num_experts: int,
    threshold: float = 0.5,
    mode: str = "gate",
    expert_labels: Optional[torch.Tensor] = None,
    expert_cost: Optional[Sequence[float]] = None,
    scores: str = "softmax",
    backend: str = "auto",
) -> RouteResult:
    """Inference routing (docs/objective.md section 4): who labels each pixel.

    Per-option correctness estimates ``q_k`` (k < E the experts, k = E the model)
    come from the routing logits r: ``scores="softmax"``: ``q = softmax(r)`` (the
    softmax and paper surrogates); ``scores="sigmoid"``: ``q_k = sigmoid(r_k)`` (the
    one-vs-all surrogate). A deferred pixel goes to ``jhat = argmax_{j<E} (q_j - cost_j)``
    (ties to the lowest index); without ``expert_cost`` that is ``argmax_{j<E} r_j``,
    the same bits on every backend. The gain is ``g = (q_jhat - cost_jhat) - q_E``.

    Modes:

    - ``"gate"`` (default): defer where ``sigmoid(a) > threshold``, decided as
      ``a > logit(threshold)`` (identical in exact arithmetic and the same bits on
      every backend); ``threshold`` in [0, 1]; ``defer_prob`` is ``sigmoid(a)``.
    - ``"router"``: without costs, defer where the router's argmax over all E + 1
      options is an expert; with costs, where ``g >= 0`` (ties to the expert).
      ``threshold`` is not used (but must be in [0, 1]); ``defer_prob`` is D.
    - ``"gain"``: defer where ``g > threshold`` (any finite real); ``defer_prob`` is
      ``g``, the deferral score (it may be negative).

    Args:
        expert_cost: None, or E finite costs >= 0 (a sequence or a 1-D tensor): the
            cost of asking each expert (the model's is 0).
        scores: "softmax" or "sigmoid", how ``q`` comes from r (see above).

    With costs or in mode "gain" the backends may disagree where two competing
    scores, or the gain and the threshold, are within rounding of each other (a
    few float32 ulps); elsewhere every backend routes the same pixels.

    Returns a :class:`RouteResult` ``(assignment, defer_prob, model_pred, final)``:
    assignment int8 (-1: the model keeps the pixel), defer_prob float32 (float64
    for float64 logits), model_pred int64, final int64 (None without ``expert_labels``).
    """
    K = check_int("num_classes", num_classes, 1)
    E = check_int("num_experts", num_experts, 1, MAX_EXPERTS)
    check_logits(logits, K + E + 2, K, E)
    check_choice("mode", mode, ROUTE_MODES)
    check_choice("scores", scores, ROUTE_SCORES)
    thr = route_threshold(threshold, mode)
    cost = check_expert_cost(expert_cost, E)
    if expert_labels is not None:
        B, S = logits.shape[0], tuple(logits.shape[2:])
        check_labels(
            "expert_labels", expert_labels, logits, (B, E) + S, allow_singleton_channel=False
        )
    impl = _dispatch.select(backend, "route", logits.device)
    return impl(logits, K, E, thr, mode, expert_labels, cost, scores)


def empty_cache() -> int:
    """Free the gradient buffer that the C++ CPU kernel keeps between calls.

    For logits of 4 MiB to 256 MiB the CPU kernel reuses one gradient buffer from
    call to call, once nothing of the caller's (tensor, view or storage) still
    refers to it: a fresh buffer of that size costs a page fault per 4 KiB page on
    every training step. Like ``torch.cuda.empty_cache()``, this hands the buffer
    back; the environment variable ``DEFERREDSEG_CPU_GRAD_CACHE=0`` turns the reuse
    off. Returns the number of bytes freed (0 without the compiled kernels).
    """
    if _EXT is None or not hasattr(torch.ops.deferredseg, "empty_cpu_cache"):
        return 0
    return int(torch.ops.deferredseg.empty_cpu_cache())
