"""Drop-in loss modules, used like MONAI losses.

``DeferredSegLoss`` is the whole objective of docs/objective.md section 3 on packed
logits and runs on the fastest backend available (``backend="auto"``). The other
modules are its parts on their own, for people who want only one of them with their
own heads: they take separate tensors and run the PyTorch reference of that part.

All of them subclass ``torch.nn.modules.loss._Loss``, check their arguments in
``__init__``, and name the argument, what was expected and what was given in
every error.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Union

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

    ``forward(logits, target, expert_labels)`` returns the scalar loss; the detached
    terms of the last call are in ``last_terms``. :meth:`policy` gives the deferral
    policy that routes what this loss trains (to calibrate for a budget on validation).

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
        **options: Any,
    ) -> None:
        super().__init__()
        self.options = make_options(num_classes, num_experts, preset=preset, **options)
        self.backend = check_choice("backend", backend, BACKENDS)
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
        """The :class:`~deferredseg.policy.DeferralPolicy` for networks trained with this
        loss (its K, E, ignore index and scores); ``kwargs`` set its other fields."""
        return DeferralPolicy.for_loss(self, **kwargs)

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, expert_labels: torch.Tensor
    ) -> torch.Tensor:
        loss, terms = loss_with_options(
            logits, target, expert_labels, self.options, self.backend, return_terms=True
        )
        self.last_terms = terms
        return loss

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
        reduction: "mean" (over valid pixels), "sum" or "none" ((B, *S), 0 at ignored pixels).

    ``forward(routing_logits, target, expert_labels, model_prediction)``:
    routing_logits (B, E + 1, *S) (experts, then the model); target (B, *S) or
    (B, 1, *S); expert_labels (B, E, *S); model_prediction either the model's
    segmentation logits (B, K, *S) (float; K = 1: sigmoid, z > 0 predicts 1) or its
    predicted labels (B, *S) (integer). The model's correctness is a constant.
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

    ``forward(prob_map, target=None)``: prob_map (B, *S) or (B, 1, *S), e.g. the
    deferral probability; pairs touching an ignored pixel of ``target`` are left out.
    """

    def __init__(
        self, spatial_dims: int = 2, coherence: str = "l1", ignore_index: int = -100
    ) -> None:
        super().__init__()
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
        return coherence_penalty(M, valid, self.coherence)


class LoadBalancingLoss(_Loss):
    """BAL of docs/objective.md section 3 from routing logits (B, E + 1, *S): experts, then
    the model.

    Args:
        num_experts: E.
        balance: "cv2" (default; squared coefficient of variation of the expert loads)
            or "band" (needs ``balance_low`` and ``balance_high``, length E + 1).
        ignore_index: target value of pixels left out of the loads.
        sync_balance: all-reduce the loads over the default process group.

    ``forward(routing_logits, target=None)``; ``last_pbar`` holds the mean loads.
    """

    def __init__(
        self,
        num_experts: int,
        balance: str = "cv2",
        balance_low: Optional[Union[Sequence[float], torch.Tensor]] = None,
        balance_high: Optional[Union[Sequence[float], torch.Tensor]] = None,
        ignore_index: int = -100,
        sync_balance: bool = False,
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
        bal, pbar = balance_penalty(torch.softmax(x, dim=1), valid, self.options)
        self.last_pbar = pbar.detach()
        return bal
