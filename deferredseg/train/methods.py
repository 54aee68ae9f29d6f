"""The methods of the comparison: one record each, so that adding a method touches one place.

Every method trains and evaluates through the same loop; what differs is held by
its :class:`Method` record in :data:`REGISTRY`:

- ``deferredseg``: the full objective; ``no-coherence`` / ``no-balance``: without
  that term;
- ``model-only``: the base segmentor alone (segmentation loss only, never defers);
- ``confidence``: the same base segmentor, deferring its least confident pixels
  to the best single expert, at a deferral rate matched to another run;
- ``l2d-single``: single-expert learning to defer (Mozannar and Sontag): a softmax
  over the K' classes and one "defer" output, trained with their surrogate,
  deferring to the best single expert.

Each method's network output is packed into the packed logits of
docs/objective.md section 1 (:func:`packed_logits`), so that one evaluator, one
threshold search and one ``route`` serve them all.

The functions here read the settings they need through :class:`MethodConfig`, the
part of a training configuration a method uses; ``TrainConfig`` (``train/config.py``,
which imports this module for the method names) is one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

import torch

from ..policy import DeferralPolicy, uncertainty

__all__ = [
    "MethodConfig",
    "Method",
    "REGISTRY",
    "METHODS",
    "BASE_METHOD",
    "HEADS",
    "ROUTING_WEIGHTS",
    "method_of",
    "packed_logits",
    "route_mode",
    "policy_for",
    "checkpoint_policy",
    "l2d_loss",
    "l2d_outputs",
]

BIG = 1e4  # a logit that rules an option out

# What a method trains on top of the segmentation head:
#   "routing": the routing and gate heads of DeferredSegmentor (the objective);
#   "defer":   one "defer" logit (joint: a head of K' + 1 logits; two-stage: the gate channel);
#   "none":    nothing; the routing heads are built (same checkpoint layout) but never trained.
HEADS = ("routing", "defer", "none")

# The objective's weights of the terms that train the routing and gate heads.
ROUTING_WEIGHTS = ("lambda_collab", "lambda_gate", "lambda_coherence", "lambda_balance")


class MethodConfig(Protocol):
    """What a method reads from a training configuration (``TrainConfig`` has it all)."""

    method: str
    num_classes: int
    training: str
    route_mode: str
    expert_choice: str
    expert_cost: Optional[List[float]]

    @property
    def route_scores(self) -> str:
        """How route() reads the routing logits: "sigmoid" or "softmax"."""
        ...

    def loss_options(self) -> Dict[str, Any]:
        """The options of the loss (``DeferredSegLoss``) by name: weights, terms, backend."""
        ...


LossFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor], Tuple[torch.Tensor, Dict[str, torch.Tensor]]
]


@dataclass(frozen=True)
class Method:
    """What one method of the comparison is.

    ``head``: what it trains besides the segmentation head (one of :data:`HEADS`).
    ``loss(cfg, num_experts, best_expert, sync)``: its training loss, a function
    ``(network output, target, expert labels) -> (loss, terms)``.
    ``zero_weights``: the objective's loss weights it sets to 0 (the rest come from
    the configuration). ``pack(out, cfg, num_experts, best_expert)``: its float
    network output as packed logits. ``single_expert``: it defers to the best
    single expert (chosen on the validation split) through its packed gate, so it
    routes in the ``gate`` mode. ``defers``: False for a method that never defers.
    """

    name: str
    summary: str
    head: str
    loss: Callable[..., LossFn]
    pack: Callable[..., torch.Tensor]
    zero_weights: Tuple[str, ...] = ()
    single_expert: bool = False
    defers: bool = True

    @property
    def learns_routing(self) -> bool:
        """Whether it learns to route: it then has a second stage in two-stage training,
        and its routing channels are tied to the trained experts by name."""
        return self.head != "none"


# ----------------------------------------------------------------------------- losses


def _criterion(cfg: MethodConfig, num_experts: int, sync: bool):
    """The DeferredSeg objective with ``cfg``'s loss options and the method's zeroed weights."""
    from ..losses import DeferredSegLoss

    options = cfg.loss_options()
    options.update({name: 0.0 for name in method_of(cfg).zero_weights})
    return DeferredSegLoss(cfg.num_classes, num_experts, sync_balance=sync, **options)


def _objective_loss(cfg: MethodConfig, num_experts: int, best_expert: int, sync: bool) -> LossFn:
    criterion = _criterion(cfg, num_experts, sync)

    def loss_fn(out, target, experts):
        loss = criterion(out, target, experts)
        terms = dict(criterion.last_terms)
        terms["deferral"] = terms["pbar"][:num_experts].sum()
        return loss, terms

    return loss_fn


def l2d_loss(
    out: torch.Tensor, target: torch.Tensor, expert: torch.Tensor, ignore_index: int = -100
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Mozannar and Sontag's surrogate: -log p_y - [m == y] log p_defer, over valid pixels."""
    logp = torch.log_softmax(out.float(), dim=1)
    valid = target != ignore_index
    y = torch.where(valid, target, torch.zeros_like(target))
    per_pixel = -logp.gather(1, y.unsqueeze(1)).squeeze(1) - (expert == y).float() * logp[:, -1]
    count = valid.sum().clamp_min(1)
    loss = torch.where(valid, per_pixel, torch.zeros_like(per_pixel)).sum() / count
    defer = (logp[:, -1].exp() * valid).sum() / count
    return loss, {"l2d": loss.detach(), "deferral": defer.detach()}


def l2d_outputs(packed: torch.Tensor, num_classes: int) -> torch.Tensor:
    """A DeferredSegmentor's output read as L2D's (K' class logits, one defer logit).

    Two-stage L2D trains only the gate channel as the "defer" logit, against the
    frozen base segmentor's class logits (for K = 1, the logits [0, z]).
    """
    z, a = packed[:, :num_classes], packed[:, -1:]
    classes = torch.cat([torch.zeros_like(z), z], dim=1) if num_classes == 1 else z
    return torch.cat([classes, a], dim=1)


def _l2d_view(out: torch.Tensor, cfg: MethodConfig) -> torch.Tensor:
    """L2D's (K' + 1) logits: the joint network's own, or read from a DeferredSegmentor."""
    return l2d_outputs(out, cfg.num_classes) if cfg.training == "two-stage" else out


def _l2d_single_loss(cfg: MethodConfig, num_experts: int, best_expert: int, sync: bool) -> LossFn:
    def loss_fn(out, target, experts):
        return l2d_loss(_l2d_view(out, cfg), target, experts[:, best_expert])

    return loss_fn


# ----------------------------------------------------------------------------- packing


def _as_is(
    out: torch.Tensor, cfg: MethodConfig, num_experts: int, best_expert: int
) -> torch.Tensor:
    return out


def _one_expert(
    z: torch.Tensor,
    gate: torch.Tensor,
    num_experts: int,
    best_expert: int,
    expert_logit,
    model_logit=None,
) -> torch.Tensor:
    """Packed logits whose routing allows the best expert (and the model) only."""
    shape = (z.shape[0], num_experts + 1) + tuple(z.shape[2:])
    r = torch.full(shape, -BIG, device=z.device)
    r[:, best_expert] = expert_logit
    if model_logit is not None:
        r[:, num_experts] = model_logit
    return torch.cat([z, r, gate.unsqueeze(1)], dim=1)


def _never_defers(
    out: torch.Tensor, cfg: MethodConfig, num_experts: int, best_expert: int
) -> torch.Tensor:
    z = out[:, : cfg.num_classes]
    return _one_expert(z, torch.full_like(z[:, 0], -BIG), num_experts, best_expert, 0.0)


def _defers_uncertain(
    out: torch.Tensor, cfg: MethodConfig, num_experts: int, best_expert: int
) -> torch.Tensor:
    # defer where uncertainty > t: the gate's probability is the uncertainty itself
    z = out[:, : cfg.num_classes]
    gate = torch.logit(uncertainty(z, cfg.num_classes).clamp(1e-6, 1 - 1e-6))
    return _one_expert(z, gate, num_experts, best_expert, 0.0)


def _defers_l2d(
    out: torch.Tensor, cfg: MethodConfig, num_experts: int, best_expert: int
) -> torch.Tensor:
    out = _l2d_view(out, cfg)
    classes, defer = out[:, :-1], out[:, -1]
    z = (classes[:, 1:2] - classes[:, :1]) if cfg.num_classes == 1 else classes
    top = classes.amax(dim=1)
    return _one_expert(z, defer - top, num_experts, best_expert, defer, top)


# ----------------------------------------------------------------------------- the registry


def _objective_method(name: str, summary: str, *zero: str) -> Method:
    return Method(
        name, summary, head="routing", loss=_objective_loss, pack=_as_is, zero_weights=zero
    )


def _base_method(name: str, summary: str, pack, defers: bool) -> Method:
    return Method(
        name,
        summary,
        head="none",
        loss=_objective_loss,
        pack=pack,
        zero_weights=ROUTING_WEIGHTS,
        single_expert=True,
        defers=defers,
    )


REGISTRY: Dict[str, Method] = {
    m.name: m
    for m in (
        _objective_method("deferredseg", "the full objective"),
        _objective_method(
            "no-coherence", "the objective without the coherence term", "lambda_coherence"
        ),
        _objective_method("no-balance", "the objective without the balance term", "lambda_balance"),
        _base_method(
            "model-only", "the base segmentor alone, never defers", _never_defers, defers=False
        ),
        _base_method(
            "confidence",
            "the base segmentor, its least confident pixels to the best single expert",
            _defers_uncertain,
            defers=True,
        ),
        Method(
            "l2d-single",
            "single-expert learning to defer (Mozannar and Sontag)",
            head="defer",
            loss=_l2d_single_loss,
            pack=_defers_l2d,
            single_expert=True,
        ),
    )
}

METHODS = tuple(REGISTRY)  # the values of the ``method`` option
BASE_METHOD = "model-only"  # stage 1 of two-stage training: the base segmentor alone


def method_of(cfg: MethodConfig) -> Method:
    """The record of ``cfg.method``."""
    try:
        return REGISTRY[cfg.method]
    except KeyError:
        raise ValueError(f"method must be one of {list(METHODS)}, got {cfg.method!r}") from None


def packed_logits(
    cfg: MethodConfig, model_out: torch.Tensor, num_experts: int, best_expert: int
) -> torch.Tensor:
    """Every method's output as packed logits (docs/objective.md section 1), so one
    evaluator serves them all."""
    return method_of(cfg).pack(model_out.float(), cfg, num_experts, best_expert)


def route_mode(cfg: MethodConfig) -> str:
    """The routing mode a method is evaluated in (single-expert baselines route through
    their packed gate)."""
    return "gate" if method_of(cfg).single_expert else cfg.route_mode


def policy_for(cfg: MethodConfig, num_experts: int, best_expert: int) -> DeferralPolicy:
    """The deferral policy ``cfg``'s method routes its packed logits with (not yet
    calibrated): the base segmentor alone never defers; the single-expert baselines
    defer through their packed gate to the best single expert (their packing already
    leaves no other); the methods that learn to route use ``cfg``'s mode, scores, costs
    and expert choice (``best_expert``: the best single expert on validation)."""
    K, E = cfg.num_classes, num_experts
    method = method_of(cfg)
    common = dict(scores=cfg.route_scores, best_expert=best_expert)
    if not method.defers:
        return DeferralPolicy.never(K, E, expert_choice="heads", **common)
    if method.single_expert:
        return DeferralPolicy(K, E, mode="gate", expert_choice="heads", **common)
    choice = cfg.expert_choice
    if cfg.route_mode == "router" and choice == "auto":
        choice = "heads"  # the router's argmax has no budget at which to compare the two
    return DeferralPolicy(
        K, E, mode=cfg.route_mode, expert_cost=cfg.expert_cost, expert_choice=choice, **common
    )


def checkpoint_policy(ck: Dict, cfg: MethodConfig) -> DeferralPolicy:
    """The policy a checkpoint routes with: the calibrated one training recorded
    (``ck["policy"]``), or, for a checkpoint written before policies or without one (a
    run's ``last.pt``), the method's uncalibrated policy with whatever threshold and
    budget it recorded."""
    if ck.get("policy"):
        return DeferralPolicy.from_dict(ck["policy"])
    E = int(ck["num_experts"])
    policy = policy_for(cfg, E, int(ck.get("best_expert", 0)))
    old = dict(ck.get("routing") or {})  # the record of earlier versions
    if not policy.defers or policy.mode == "router":
        return policy
    if old.get("threshold") is not None and old.get("mode", policy.mode) == policy.mode:
        policy = policy.with_threshold(old["threshold"])  # those routed by the heads' choice
    if old.get("budget") is not None:
        policy = policy.replace(budget=old["budget"])
    return policy
