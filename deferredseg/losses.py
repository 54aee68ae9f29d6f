"""Drop-in loss modules, used like MONAI losses.

``DeferredSegLoss`` is the whole objective of docs/objective.md section 3 on packed
logits and runs on the fastest backend available (``backend="auto"``). The other
modules are its parts on their own, for people who want only one of them with their
own heads: they take separate tensors and run the PyTorch reference of that part.

All of them subclass ``torch.nn.modules.loss._Loss``, take a ``reduction``
(``"mean"``, ``"sum"`` or ``"none"``, see each class), check their arguments in
``__init__``, and name the argument, what was expected and what was given in
every error.

``reduction`` of the image-level losses (``DeferredSegLoss``, ``SpatialCoherenceLoss``,
``LoadBalancingLoss``): ``"none"`` evaluates the batch's ``"mean"`` loss on each image
on its own and returns one value per image, shape (B,); ``"sum"`` returns the sum of
those. ``"mean"`` (the default) is the loss of the whole batch, which is a mean over
the batch's valid pixels (pairs, for coherence) with batch-level terms (the loads of
the balance term, the class weights' normalisation): it is in general NOT the mean
of ``"none"``. ``SurrogateCollaborationLoss`` is a per-pixel loss: its ``"none"`` is
one value per pixel.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Union

import torch
from torch.nn.modules.loss import _Loss

from deferredseg_kernels import (
    BACKENDS,
    BALANCES,
    COHERENCES,
    LABEL_DTYPES,
    SURROGATES,
    balance_penalty,
    check_choice,
    check_float,
    check_inputs,
    check_int,
    check_label_range,
    coherence_penalty,
    collab_pixelwise,
    compute_dtype,
    default_option,
    loss_with_options,
    make_options,
    model_correct,
)

from .policy import DeferralPolicy

__all__ = [
    "DeferredSegLoss",
    "SurrogateCollaborationLoss",
    "SpatialCoherenceLoss",
    "LoadBalancingLoss",
]
REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(reduction: Any, sync_balance: bool = False) -> str:
    """``reduction`` checked against :data:`REDUCTIONS` (and against ``sync_balance``)."""
    reduction = check_choice("reduction", reduction, REDUCTIONS)
    if sync_balance and reduction != "mean":
        raise ValueError(
            f"reduction must be 'mean' when sync_balance=True (the loads are all-reduced "
            f"over the whole batch of every rank, not per image), got {reduction!r}"
        )
    return reduction


def _per_image(like: torch.Tensor, one: Callable[[slice], torch.Tensor]) -> torch.Tensor:
    """``one(slice(b, b + 1))`` for every image b of ``like`` (B, ...), stacked into (B,).

    An empty batch gives an empty (0,) tensor of the loss's dtype.
    """
    values = [one(slice(b, b + 1)).reshape(()) for b in range(like.shape[0])]
    if not values:
        return torch.zeros(0, dtype=compute_dtype(like.dtype), device=like.device)
    return torch.stack(values)


def _reduce_images(per_image: torch.Tensor, reduction: str) -> torch.Tensor:
    """The per-image values (B,) for ``"none"``, their sum for ``"sum"``."""
    return per_image if reduction == "none" else per_image.sum()


def _check_tensor(name: str, value: Any, floating: bool) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {value.dtype}")
    if not floating and value.dtype not in LABEL_DTYPES:
        raise TypeError(
            f"{name} must have an integer dtype in "
            f"{[str(d) for d in LABEL_DTYPES]}, got {value.dtype}"
        )
    return value


def _valid_mask(
    target: Optional[torch.Tensor], shape, device, ignore_index: int, name: str = "target"
) -> torch.Tensor:
    if target is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    _check_tensor(name, target, floating=False)
    if tuple(target.shape) == (shape[0], 1) + tuple(shape[1:]):
        target = target.squeeze(1)
    if tuple(target.shape) != tuple(shape):
        raise ValueError(
            f"{name} must have shape {tuple(shape)} or "
            f"{(shape[0], 1) + tuple(shape[1:])}, got {tuple(target.shape)}"
        )
    if target.device != device:
        raise ValueError(f"{name} must be on {device}, got {target.device}")
    return target != ignore_index


class DeferredSegLoss(_Loss):
    """The DeferredSeg objective: segmentation + collaboration + gate + coherence + balance.

    The network's output is the packed logits ``(B, K + E + 2, *S)``: K segmentation
    logits, then E + 1 routing logits (experts 0..E-1, then the model), then the gate
    (:func:`deferredseg.policy.channel_layout`; ``criterion.out_channels`` is the count).

    Args:
        num_classes: K segmentation channels (1: binary with a sigmoid).
        num_experts: E experts.
        backend: one of ``deferredseg_kernels.BACKENDS`` ("auto": the fastest that runs here).
        preset: ``"default"``, the objective ``deferredseg train`` uses (one-vs-all
            correctness heads, a gate trained on "the model is wrong and the chosen
            expert is right", ``gate_mse=0``, ``gate_sparsity=0``, ``lambda_gate=0.3``),
            or ``"paper"``, the paper's objective (softmax surrogate, a gate trained on
            the router's decision). Options given below win over the preset.
        reduction: ``"mean"`` (default): the objective of the batch, as the functional
            ``deferredseg_kernels.deferredseg_loss`` computes it. ``"none"``: one value
            per image, shape (B,), each the objective of that image on its own (so
            every term, the balance term included, is that image's: its loads, its
            valid pixels). ``"sum"``: the sum of the ``"none"`` values. ``"mean"`` is
            not the mean of ``"none"`` in general: the balance term of a batch is not
            the mean of its images' balance terms, and the pixel means weigh images by
            their valid pixels. ``"none"`` and ``"sum"`` run the backend once per image.
        **options: the options of docs/objective.md section 5 (``ignore_index``,
            ``class_weight``, ``lambda_*``, ``surrogate``, ``paper_eps``, ``gate_target``,
            ``gate_mse``, ``gate_sparsity``, ``coherence``, ``coherence_maps``, ``balance``,
            ``balance_low``, ``balance_high``, ``sync_balance``). Among them:
            ``surrogate``: "ova" (the default preset's; one-vs-all: a binary
            cross-entropy per option, so that sigmoid(r_k) estimates the probability
            that option k is right), "softmax" (the paper's) or "paper" (the authors'
            released variant); ``gate_target``: what the gate learns to predict,
            "benefit" (the default preset's: the model is wrong and the expert the
            router would choose is right) or "router" (the paper's: h = [argmax r < E],
            the router defers). See docs/objective.md.

    ``forward(logits, target, expert_labels)`` returns the loss; the detached terms of
    the last call are in ``last_terms`` (scalars, ``pbar`` (E + 1,); with ``"none"`` or
    ``"sum"`` one row per image: (B,), ``pbar`` (B, E + 1)). :meth:`policy` gives the
    deferral policy that routes what this loss trains (to calibrate for a budget on
    validation).

    Raises:
        ValueError: ``num_classes`` or ``num_experts`` < 1, an unknown ``backend``,
            ``preset`` or ``reduction``, an option string or value out of its range,
            or ``reduction`` other than ``"mean"`` with ``sync_balance=True``.
        TypeError: an unknown option name, or an option of the wrong type.

    Example::

        criterion = DeferredSegLoss(num_classes=1, num_experts=3)
        loss = criterion(model(images), labels, expert_labels)
        loss.backward()
        policy = criterion.policy().calibrate(val_batches, budget=0.1)
    """

    def __init__(
        self,
        num_classes: int,
        num_experts: int,
        backend: str = "auto",
        preset: str = "default",
        reduction: str = "mean",
        **options: Any,
    ) -> None:
        super().__init__()
        self.options = make_options(num_classes, num_experts, preset=preset, **options)
        self.backend = check_choice("backend", backend, BACKENDS)
        self.reduction = _check_reduction(reduction, self.options.sync_balance)
        self.last_terms: Dict[str, torch.Tensor] = {}

    @property
    def num_classes(self) -> int:
        return self.options.num_classes

    @property
    def num_experts(self) -> int:
        return self.options.num_experts

    @property
    def out_channels(self) -> int:
        """K + E + 2: the channel count the network must output."""
        return self.options.num_channels

    def policy(self, **kwargs: Any):
        """The deferral policy for networks trained with this loss.

        Args:
            **kwargs: the other fields of :class:`~deferredseg.policy.DeferralPolicy`
                (``mode``, ``threshold``, ``expert_cost``, ``backend``).

        Returns:
            A :class:`~deferredseg.policy.DeferralPolicy` with this loss's K, E, ignore
            index and scores (``"sigmoid"`` for the one-vs-all surrogate, else
            ``"softmax"``).

        Raises:
            ValueError, TypeError: a field in ``kwargs`` that the policy refuses.
        """
        return DeferralPolicy.for_loss(self, **kwargs)

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, expert_labels: torch.Tensor
    ) -> torch.Tensor:
        """The objective of a batch, reduced as ``self.reduction`` says.

        Args:
            logits: packed logits (B, K + E + 2, *S), floating.
            target: labels (B, *S) or (B, 1, *S), integer; ``ignore_index`` marks
                pixels left out.
            expert_labels: the experts' labels (B, E, *S), integer.

        Returns:
            ``"mean"``: the scalar objective of the batch. ``"sum"``: a scalar, the sum
            of the per-image objectives. ``"none"``: the per-image objectives, shape (B,).
            The loss dtype is float32 (float64 for float64 logits).

        Raises:
            TypeError: a tensor of the wrong type or dtype (float labels, integer logits).
            ValueError: a wrong channel count or shape, tensors on different devices,
                labels out of range (reference and CPU backends; GPU backends give NaN).
            RuntimeError: ``backend`` cannot run here (not built, no GPU, no triton).
        """
        if self.reduction == "mean":
            loss, terms = loss_with_options(
                logits, target, expert_labels, self.options, self.backend, return_terms=True
            )
            self.last_terms = terms
            return loss
        # the batch's checks first, so that errors name the batch's shapes
        target, expert_labels = check_inputs(logits, target, expert_labels, self.options)
        per_terms = []

        def one(b: slice) -> torch.Tensor:
            loss, terms = loss_with_options(
                logits[b],
                target[b],
                expert_labels[b],
                self.options,
                self.backend,
                return_terms=True,
            )
            per_terms.append(terms)
            return loss

        per_image = _per_image(logits, one)
        self.last_terms = (
            {k: torch.stack([t[k] for t in per_terms]) for k in per_terms[0]} if per_terms else {}
        )
        return _reduce_images(per_image, self.reduction)

    def extra_repr(self) -> str:
        o = self.options
        return (
            f"num_classes={o.num_classes}, num_experts={o.num_experts}, "
            f"backend={self.backend!r}, surrogate={o.surrogate!r}, "
            f"gate_target={o.gate_target!r}, coherence={o.coherence!r}, "
            f"balance={o.balance!r}"
        )


class SurrogateCollaborationLoss(_Loss):
    """The pixel-wise surrogate collaboration loss l_collab of docs/objective.md section 3.

    Args:
        num_experts: E.
        surrogate: "ova" (default, as the objective's default preset; one-vs-all:
            sum_k BCEWithLogits(r_k, c_k) over the E + 1 options), "softmax" (the paper's)
            or "paper" (the authors' released variant).
        paper_eps: eps of the "paper" surrogate.
        ignore_index: target value of pixels to ignore.
        reduction: "mean" (over the batch's valid pixels), "sum" (over them) or
            "none" (one value per pixel, (B, *S), 0 at ignored pixels).

    ``forward(routing_logits, target, expert_labels, model_prediction)``:
    routing_logits (B, E + 1, *S) (experts, then the model); target (B, *S) or
    (B, 1, *S); expert_labels (B, E, *S); model_prediction either the model's
    segmentation logits (B, K, *S) (float; K = 1: sigmoid, z > 0 predicts 1) or its
    predicted labels (B, *S) (integer). The model's correctness is a constant.
    It returns the loss reduced as ``reduction`` says.

    Raises:
        ValueError: in ``__init__``, ``num_experts`` < 1, an unknown ``surrogate`` or
            ``reduction``, ``paper_eps`` <= 0; in ``forward``, a tensor of the wrong
            shape or device, or a target label out of range.
        TypeError: an argument of the wrong type, or a tensor of the wrong dtype
            (float labels, integer logits).
    """

    def __init__(
        self,
        num_experts: int,
        surrogate: str = default_option("surrogate"),
        paper_eps: float = 1e-8,
        ignore_index: int = -100,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction=check_choice("reduction", reduction, REDUCTIONS))
        self.num_experts = check_int("num_experts", num_experts, 1)
        self.surrogate = check_choice("surrogate", surrogate, SURROGATES)
        self.paper_eps = check_float("paper_eps", paper_eps, strictly_positive=True)
        self.ignore_index = check_int("ignore_index", ignore_index, -(2**63))

    def forward(
        self,
        routing_logits: torch.Tensor,
        target: torch.Tensor,
        expert_labels: torch.Tensor,
        model_prediction: torch.Tensor,
    ) -> torch.Tensor:
        E = self.num_experts
        _check_tensor("routing_logits", routing_logits, floating=True)
        if routing_logits.dim() < 3 or routing_logits.shape[1] != E + 1:
            raise ValueError(
                f"routing_logits must have shape (B, num_experts + 1 = {E + 1}, *S), "
                f"got {tuple(routing_logits.shape)}"
            )
        B, S = routing_logits.shape[0], tuple(routing_logits.shape[2:])
        dev = routing_logits.device
        valid = _valid_mask(target, (B,) + S, dev, self.ignore_index)
        target = target.reshape((B,) + S)
        _check_tensor("expert_labels", expert_labels, floating=False)
        if tuple(expert_labels.shape) != (B, E) + S:
            raise ValueError(
                f"expert_labels must have shape {(B, E) + S}, got {tuple(expert_labels.shape)}"
            )
        if not isinstance(model_prediction, torch.Tensor):
            raise TypeError(
                f"model_prediction must be a torch.Tensor, got {type(model_prediction).__name__}"
            )
        y = torch.where(valid, target.long(), torch.zeros_like(target, dtype=torch.long))
        if model_prediction.is_floating_point():
            if (
                model_prediction.dim() != len(S) + 2
                or model_prediction.shape[0] != B
                or tuple(model_prediction.shape[2:]) != S
            ):
                raise ValueError(
                    f"model_prediction logits must have shape (B, K) + {S} with "
                    f"B = {B}, got {tuple(model_prediction.shape)}"
                )
            K = model_prediction.shape[1]
            check_label_range(target, None, max(K, 2), self.ignore_index)
            c0 = model_correct(model_prediction.detach(), y, K)
        else:
            _check_tensor("model_prediction", model_prediction, floating=False)
            if tuple(model_prediction.shape) != (B,) + S:
                raise ValueError(
                    f"model_prediction labels must have shape {(B,) + S}, "
                    f"got {tuple(model_prediction.shape)}"
                )
            c0 = model_prediction.long() == y
        x = routing_logits.to(compute_dtype(routing_logits.dtype))
        experts = expert_labels.long()
        cj = (experts == y.unsqueeze(1)) & (experts != self.ignore_index)
        per_pixel = collab_pixelwise(
            torch.log_softmax(x, dim=1), c0, cj, self.surrogate, self.paper_eps, x
        )
        per_pixel = torch.where(valid, per_pixel, torch.zeros_like(per_pixel))
        if self.reduction == "none":
            return per_pixel
        if self.reduction == "sum":
            return per_pixel.sum()
        return per_pixel.sum() / valid.sum().clamp_min(1).to(per_pixel.dtype)


class SpatialCoherenceLoss(_Loss):
    """COH of docs/objective.md section 3 for one map: mean |M_p - M_q| (or squared) over
    neighbours.

    Args:
        spatial_dims: 1, 2 or 3; tells (B, 1, H, W) from a 3D map (B, D, H, W).
        coherence: "l1" (default) or "l2".
        ignore_index: target value of pixels to leave out of every pair.
        reduction: "mean" (default): the batch's penalty, the mean over all its valid
            pairs (summed over the axes); "none": that penalty of each image on its
            own, shape (B,); "sum": the sum of those.

    ``forward(prob_map, target=None)``: prob_map (B, *S) or (B, 1, *S), e.g. the
    deferral probability; pairs touching an ignored pixel of ``target`` are left out.
    It returns the penalty reduced as ``reduction`` says.

    Raises:
        ValueError: ``spatial_dims`` not in 1..3, an unknown ``coherence`` or
            ``reduction``; in ``forward``, a map or target of the wrong shape or device.
        TypeError: an argument of the wrong type, a non-floating map or a
            non-integer target.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        coherence: str = "l1",
        ignore_index: int = -100,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction=_check_reduction(reduction))
        self.spatial_dims = check_int("spatial_dims", spatial_dims, 1, 3)
        self.coherence = check_choice("coherence", coherence, COHERENCES)
        self.ignore_index = check_int("ignore_index", ignore_index, -(2**63))

    def forward(
        self, prob_map: torch.Tensor, target: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        _check_tensor("prob_map", prob_map, floating=True)
        n = self.spatial_dims
        if prob_map.dim() == n + 2 and prob_map.shape[1] == 1:
            prob_map = prob_map[:, 0]
        if prob_map.dim() != n + 1:
            raise ValueError(
                f"prob_map must have shape (B, *S) or (B, 1, *S) with "
                f"spatial_dims={n}, got {tuple(prob_map.shape)}"
            )
        M = prob_map.to(compute_dtype(prob_map.dtype))
        valid = _valid_mask(target, tuple(M.shape), M.device, self.ignore_index)
        if self.reduction == "mean":
            return coherence_penalty(M, valid, self.coherence)
        per_image = _per_image(M, lambda b: coherence_penalty(M[b], valid[b], self.coherence))
        return _reduce_images(per_image, self.reduction)


class LoadBalancingLoss(_Loss):
    """BAL of docs/objective.md section 3 from routing logits (B, E + 1, *S): experts, then
    the model.

    Args:
        num_experts: E.
        balance: "cv2" (default; squared coefficient of variation of the expert loads)
            or "band" (needs ``balance_low`` and ``balance_high``, length E + 1).
        ignore_index: target value of pixels left out of the loads.
        sync_balance: all-reduce the loads over the default process group.
        reduction: "mean" (default): the penalty of the batch's loads; "none": the
            penalty of each image's own loads, shape (B,); "sum": the sum of those.
            Only "mean" goes with ``sync_balance=True``.

    ``forward(routing_logits, target=None)`` returns the penalty reduced as
    ``reduction`` says; ``last_pbar`` holds the mean loads (E + 1,), or one row per
    image (B, E + 1) with "none" or "sum".

    Raises:
        ValueError: ``num_experts`` < 1, an unknown ``balance`` or ``reduction``,
            "band" without ``balance_low``/``balance_high`` of length E + 1, a
            reduction other than "mean" with ``sync_balance=True``; in ``forward``,
            tensors of the wrong shape or device.
        TypeError: an argument of the wrong type, non-floating logits or a
            non-integer target.
    """

    def __init__(
        self,
        num_experts: int,
        balance: str = "cv2",
        balance_low: Optional[Union[Sequence[float], torch.Tensor]] = None,
        balance_high: Optional[Union[Sequence[float], torch.Tensor]] = None,
        ignore_index: int = -100,
        sync_balance: bool = False,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        check_choice("balance", balance, BALANCES)
        self.options = make_options(
            1,
            num_experts,
            balance=balance,
            balance_low=balance_low,
            balance_high=balance_high,
            ignore_index=ignore_index,
            sync_balance=sync_balance,
        )
        self.reduction = _check_reduction(reduction, self.options.sync_balance)
        self.last_pbar: Optional[torch.Tensor] = None

    def forward(
        self, routing_logits: torch.Tensor, target: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        E = self.options.num_experts
        _check_tensor("routing_logits", routing_logits, floating=True)
        if routing_logits.dim() < 3 or routing_logits.shape[1] != E + 1:
            raise ValueError(
                f"routing_logits must have shape (B, num_experts + 1 = {E + 1}, *S), "
                f"got {tuple(routing_logits.shape)}"
            )
        shape = (routing_logits.shape[0],) + tuple(routing_logits.shape[2:])
        valid = _valid_mask(target, shape, routing_logits.device, self.options.ignore_index)
        x = routing_logits.to(compute_dtype(routing_logits.dtype))
        pi = torch.softmax(x, dim=1)
        if self.reduction == "mean":
            bal, pbar = balance_penalty(pi, valid, self.options)
            self.last_pbar = pbar.detach()
            return bal
        pbars = []

        def one(b: slice) -> torch.Tensor:
            bal, pbar = balance_penalty(pi[b], valid[b], self.options)
            pbars.append(pbar.detach())
            return bal

        per_image = _per_image(x, one)
        self.last_pbar = torch.stack(pbars) if pbars else x.new_zeros((0, E + 1))
        return _reduce_images(per_image, self.reduction)
