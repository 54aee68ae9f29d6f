"""The plain-PyTorch reference of the DeferredSeg objective and routing.

This module is the oracle every kernel is tested against, so it is written for
clarity, not speed: each term of docs/objective.md section 3 is one block,
computed with ordinary tensor operations and differentiated by autograd. It runs
on any device; float64 logits are computed in float64 (for ``gradcheck``),
everything else in float32.

Inputs are assumed validated (see ``_checks`` and ``options``); the public entry
points in ``deferredseg_kernels`` do that before calling in here. The result type
and the dtype rules come from ``types``, which the backends share.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .options import LossOptions
from .types import RouteResult, compute_dtype


def split_logits(
    logits: torch.Tensor, num_classes: int, num_experts: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views ``(z, r, a)`` of the packed logits: (B, K, *S), (B, E + 1, *S), (B, *S)."""
    K, E = num_classes, num_experts
    if logits.dim() < 2 or logits.shape[1] != K + E + 2:
        raise ValueError(
            f"logits must have num_classes + num_experts + 2 = {K + E + 2} channels "
            f"in dim 1, got shape {tuple(logits.shape)}"
        )
    return logits[:, :K], logits[:, K : K + E + 1], logits[:, K + E + 1]


def _softplus(x: torch.Tensor) -> torch.Tensor:
    # log(1 + exp(x)), stable for any x, with the exact derivative sigmoid(x).
    return torch.logaddexp(x, torch.zeros((), dtype=x.dtype, device=x.device))


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``mask``; 0 (with zero gradient) when the mask is empty."""
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    count = mask.sum().clamp_min(1).to(values.dtype)
    return total / count


def model_correct(z: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    if num_classes >= 2:
        return z.argmax(dim=1) == y  # argmax ties go to the lowest index
    return (z[:, 0] > 0) == (y == 1)  # z = 0 predicts 0


def _seg_term(z, y, valid, opts: LossOptions) -> torch.Tensor:
    if opts.num_classes >= 2:
        logp = torch.log_softmax(z, dim=1)
        l_seg = -logp.gather(1, y.unsqueeze(1)).squeeze(1)
    else:
        z0 = z[:, 0]
        l_seg = _softplus(z0) - y.to(z0.dtype) * z0
    if opts.class_weight is None:
        return _masked_mean(l_seg, valid)
    w = torch.tensor(opts.class_weight, dtype=z.dtype, device=z.device)[y]
    w = torch.where(valid, w, torch.zeros_like(w))
    num = torch.where(valid, w * l_seg, torch.zeros_like(l_seg)).sum()
    den = w.sum()
    # All valid pixels carrying weight 0: the term is 0, not 0/0.
    return torch.where(
        den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num)
    )


def collab_pixelwise(
    logpi: torch.Tensor,
    c0: torch.Tensor,
    cj: torch.Tensor,
    surrogate: str,
    paper_eps: float,
    r: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """l_collab(p) of every pixel: (B, *S) from log pi (B, E + 1, *S), c0 (B, *S), cj (B, E, *S).

    ``r``: the routing logits (B, E + 1, *S), needed by ``surrogate="ova"`` only.
    """
    E = logpi.shape[1] - 1
    c0 = c0.to(logpi.dtype)
    cj = cj.to(logpi.dtype)
    if surrogate == "softmax":
        return -c0 * logpi[:, E] - (cj * logpi[:, :E]).sum(dim=1)
    if surrogate == "ova":
        # one-vs-all: a binary cross-entropy with logits per option, target c_k
        if r is None:
            raise ValueError("surrogate='ova' needs the routing logits r")
        return ova_pixelwise(r, c0, cj)
    # "paper": the authors' released variant, on softmax probabilities plus eps
    pi = logpi.exp()
    return -c0 * torch.log(pi[:, E] + paper_eps) + (
        (1 - 2 * cj) * torch.log(pi[:, :E] + paper_eps)
    ).sum(dim=1)


def ova_pixelwise(r: torch.Tensor, c0: torch.Tensor, cj: torch.Tensor) -> torch.Tensor:
    """The one-vs-all surrogate of every pixel: sum_k BCEWithLogits(r_k, c_k), c_E = c0."""
    c = torch.cat([cj, c0.unsqueeze(1)], dim=1).to(r.dtype)
    return (_softplus(r) - c * r).sum(dim=1)


def _collab_term(logpi, c0, cj, valid, opts: LossOptions, r=None) -> torch.Tensor:
    return _masked_mean(collab_pixelwise(logpi, c0, cj, opts.surrogate, opts.paper_eps, r), valid)


def gate_target(r: torch.Tensor, c0: torch.Tensor, cj: torch.Tensor, kind: str) -> torch.Tensor:
    """The gate's BCE target per pixel, (B, *S) bool, a constant (no gradient).

    ``"router"``: h = [argmax r < E] (a tie between an expert and the model goes to the
    expert). ``"benefit"``: (1 - c0) c_jhat, the model is wrong and the expert the router
    would choose, jhat = argmax_{j<E} r_j (ties to the lowest index), is right.
    """
    E = r.shape[1] - 1
    if kind == "router":
        return r.argmax(dim=1) < E
    jhat = r[:, :E].argmax(dim=1, keepdim=True)
    return ~c0 & cj.gather(1, jhat).squeeze(1)


def _gate_term(a, D, hard, valid, opts: LossOptions) -> torch.Tensor:
    s = torch.sigmoid(a)
    l_gate = (
        _softplus(a)
        - hard.to(a.dtype) * a
        + opts.gate_mse * (s - D.detach()) ** 2
        + opts.gate_sparsity * s
    )
    return _masked_mean(l_gate, valid)


def coherence_penalty(M: torch.Tensor, valid: torch.Tensor, coherence: str) -> torch.Tensor:
    """sum over spatial axes of the mean rho(M_p - M_{p+e_d}) over pairs of valid pixels.

    ``M`` and ``valid`` are (B, *S); an axis without a valid pair adds 0.
    """
    total = torch.zeros((), dtype=M.dtype, device=M.device)
    for dim in range(1, M.dim()):  # every spatial axis of (B, *S)
        n = M.shape[dim]
        if n < 2:
            continue  # no pair along this axis: adds 0
        diff = M.narrow(dim, 0, n - 1) - M.narrow(dim, 1, n - 1)
        both = valid.narrow(dim, 0, n - 1) & valid.narrow(dim, 1, n - 1)
        rho = diff.abs() if coherence == "l1" else diff * diff
        total = total + _masked_mean(rho, both)
    return total


def _coherence_term(maps: Dict[str, torch.Tensor], valid, opts: LossOptions) -> torch.Tensor:
    total = torch.zeros((), dtype=maps["router"].dtype, device=valid.device)
    for name in opts.coherence_maps:
        total = total + coherence_penalty(maps[name], valid, opts.coherence)
    return total


def _sync_sums(sums: torch.Tensor, count: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """All-reduce the balance sums over the default process group, when one exists.

    The value becomes the sum over every rank. The gradient that flows back into
    this rank's own pixels is multiplied by the world size, because
    DistributedDataParallel *averages* gradients over ranks: after that average
    each parameter gets exactly the single-process gradient of the balance term
    on the concatenated batch.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return sums, count
    world = dist.get_world_size()
    packed = torch.cat([sums.detach(), count.to(sums.dtype).reshape(1)])
    dist.all_reduce(packed)
    local = sums * world
    return local - local.detach() + packed[:-1], packed[-1]


def balance_penalty(
    pi: torch.Tensor, valid: torch.Tensor, opts: LossOptions
) -> Tuple[torch.Tensor, torch.Tensor]:
    """BAL and pbar from routing probabilities ``pi`` (B, E + 1, *S) and ``valid`` (B, *S)."""
    E = opts.num_experts
    mask = valid.unsqueeze(1)
    sums = torch.where(mask, pi, torch.zeros_like(pi)).transpose(0, 1).reshape(E + 1, -1).sum(1)
    count = valid.sum().to(pi.dtype)
    if opts.sync_balance:
        sums, count = _sync_sums(sums, count)
    has_pixels = count > 0
    pbar = sums / torch.where(has_pixels, count, torch.ones_like(count))
    zero = torch.zeros((), dtype=pi.dtype, device=pi.device)
    if opts.balance == "cv2":
        if E == 1:
            bal = zero + 0 * pbar.sum()  # a single expert always has an even load
        else:
            P = pbar[:E]
            tot = P.sum()
            ok = tot > 0
            safe = torch.where(ok, tot, torch.ones_like(tot))
            bal = torch.where(ok, E * (P * P).sum() / (safe * safe) - 1, zero)
    else:  # "band"
        low = torch.tensor(opts.balance_low, dtype=pi.dtype, device=pi.device)
        high = torch.tensor(opts.balance_high, dtype=pi.dtype, device=pi.device)
        band = (F.relu(pbar - high) + F.relu(low - pbar)).sum()
        bal = torch.where(has_pixels, band, zero)
    return bal, pbar


def deferredseg_loss_reference(
    logits: torch.Tensor,
    target: torch.Tensor,
    expert_labels: torch.Tensor,
    opts: LossOptions,
    return_terms: bool = False,
):
    """docs/objective.md section 3, term by term. ``target`` is (B, *S); inputs are validated."""
    K, E = opts.num_classes, opts.num_experts
    x = logits.to(compute_dtype(logits.dtype))
    z, r, a = split_logits(x, K, E)

    valid = target != opts.ignore_index
    y = torch.where(valid, target.long(), torch.zeros_like(target, dtype=torch.long))
    experts = expert_labels.long()

    # Per-pixel quantities (docs/objective.md section 2).
    c0 = model_correct(z, y, K)  # constant: no gradient
    cj = (experts == y.unsqueeze(1)) & (experts != opts.ignore_index)
    logpi = torch.log_softmax(r, dim=1)
    pi = logpi.exp()
    D = pi[:, :E].sum(dim=1)  # soft deferral mass
    hard = gate_target(r, c0, cj, opts.gate_target)  # the gate's target: h or the benefit

    seg = _seg_term(z, y, valid, opts)
    collab = _collab_term(logpi, c0, cj, valid, opts, r)
    gate = _gate_term(a, D, hard, valid, opts)
    coherence = _coherence_term({"router": D, "gate": torch.sigmoid(a)}, valid, opts)
    balance, pbar = balance_penalty(pi, valid, opts)

    loss = (
        opts.lambda_seg * seg
        + opts.lambda_collab * collab
        + opts.lambda_gate * gate
        + opts.lambda_coherence * coherence
        + opts.lambda_balance * balance
    )
    if not return_terms:
        return loss
    terms = {"seg": seg, "collab": collab, "gate": gate, "coherence": coherence, "balance": balance}
    terms = {k: v.detach() for k, v in terms.items()}
    terms["pbar"] = pbar.detach()
    return loss, terms


def route_scores(r: torch.Tensor, scores: str) -> torch.Tensor:
    """The per-option correctness estimates q (B, E + 1, *S) of routing logits ``r``:
    ``softmax(r)`` over the options, or ``sigmoid(r)`` per option (one-vs-all)."""
    return torch.sigmoid(r) if scores == "sigmoid" else torch.softmax(r, dim=1)


def route_reference(
    logits: torch.Tensor,
    num_classes: int,
    num_experts: int,
    threshold: float,
    mode: str,
    expert_labels: Optional[torch.Tensor],
    expert_cost: Optional[Sequence[float]] = None,
    scores: str = "softmax",
) -> RouteResult:
    """docs/objective.md section 4 (routing at inference). ``threshold`` is the number
    the decision compares against, see ``_checks.route_threshold``: logit(threshold)
    in modes "gate" and "router" (unused there), the threshold itself in mode "gain".

    The chosen expert is ``argmax_{j<E} (q_j - cost_j)`` (first maximum; a NaN wins);
    without costs it is ``argmax_{j<E} r_j``, the same in exact arithmetic for both
    score kinds, and the same bits on every backend. The gain is
    ``g = (q_jhat - cost_jhat) - q_E``.
    """
    K, E = num_classes, num_experts
    x = logits.detach().to(compute_dtype(logits.dtype))
    z, r, a = split_logits(x, K, E)
    if K >= 2:
        model_pred = z.argmax(dim=1)
    else:
        model_pred = (z[:, 0] > 0).long()
    need_gain = expert_cost is not None or mode == "gain"
    gain = None
    if expert_cost is None:
        chosen = r[:, :E].argmax(dim=1)  # the expert a deferred pixel goes to
    if need_gain:
        q = route_scores(r, scores)
        value = q[:, :E]
        if expert_cost is not None:
            cost = torch.tensor(expert_cost, dtype=x.dtype, device=x.device)
            value = value - cost.view((1, E) + (1,) * (x.dim() - 2))
            chosen = value.argmax(dim=1)
        gain = value.gather(1, chosen.unsqueeze(1)).squeeze(1) - q[:, E]
    if mode == "gate":
        defer = a > threshold  # == sigmoid(a) > threshold, with threshold = logit(t)
        defer_prob = torch.sigmoid(a)
    elif mode == "router":
        if expert_cost is None:
            defer = r.argmax(dim=1) < E
        else:
            defer = gain >= 0  # ties go to the expert, as argmax's ties do without costs
        defer_prob = torch.softmax(r, dim=1)[:, :E].sum(dim=1)
    else:  # "gain"
        defer = gain > threshold
        defer_prob = gain
    assignment = torch.where(defer, chosen, torch.full_like(chosen, -1)).to(torch.int8)
    final = None
    if expert_labels is not None:
        expert_pred = expert_labels.long().gather(1, chosen.unsqueeze(1)).squeeze(1)
        final = torch.where(defer, expert_pred, model_pred)
    return RouteResult(assignment, defer_prob, model_pred, final)
