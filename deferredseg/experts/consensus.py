"""Targets from several real annotators: a named rater, the majority vote, STAPLE.

In multi-rater data every rater is an expert of the DeferredSeg router; the
ground truth the model is trained against is one of

- a named rater (``method="<rater name>"`` or an integer index),
- the pixel-wise majority vote (``method="majority"``, the default; ties go to the
  lowest label, so a 2-2 split between background and foreground is background),
- STAPLE (``method="staple"``; Warfield, Zou and Wells, IEEE TMI 2004): the EM
  estimate of the true labels together with every rater's confusion matrix.
  One implementation serves binary (two labels: sensitivity and specificity)
  and multi-class data.

Rater labels equal to ``ignore_index`` mean "no label here" and are left out;
a pixel no rater labelled gets ``ignore_index``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch

__all__ = ["majority_vote", "staple", "StapleResult", "consensus_target", "CONSENSUS_METHODS"]

CONSENSUS_METHODS = ("majority", "staple")


def _check_raters(raters: torch.Tensor, name: str = "raters") -> None:
    if not isinstance(raters, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(raters).__name__}")
    if raters.dtype.is_floating_point or raters.dtype == torch.bool or raters.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got dtype {raters.dtype}")
    if raters.dim() < 2:
        raise ValueError(f"{name} must be (R, *S) or (B, R, *S), got shape {tuple(raters.shape)}")


def _check_range(raters: torch.Tensor, num_labels: int, ignore_index: int) -> None:
    valid = raters != ignore_index
    if valid.any():
        v = raters[valid]
        lo, hi = int(v.min()), int(v.max())
        if lo < 0 or hi >= num_labels:
            raise ValueError(
                f"rater labels must lie in [0, {num_labels}) or equal ignore_index="
                f"{ignore_index}, got values in [{lo}, {hi}]"
            )


def majority_vote(
    raters: torch.Tensor, num_labels: int, rater_dim: int = 1, ignore_index: int = -100
) -> torch.Tensor:
    """Pixel-wise majority vote over ``rater_dim`` of an integer tensor.

    ``raters`` is (B, R, *S) with the default ``rater_dim=1`` (use ``rater_dim=0``
    for one image's (R, *S)). Ties go to the lowest label; pixels with no valid
    vote get ``ignore_index``.

    Args:
        raters: the raters' integer labels.
        num_labels: L, the number of label values.
        rater_dim: the raters' dim.
        ignore_index: the label of "no label here" (left out of the vote).

    Returns:
        int64 labels, ``raters`` without the rater dim.

    Raises:
        TypeError: ``raters`` is not an integer tensor.
        ValueError: ``raters`` with fewer than 2 dims, or a label outside
            [0, num_labels) that is not ``ignore_index``.
    """
    _check_raters(raters)
    _check_range(raters, num_labels, ignore_index)
    x = raters.long().movedim(rater_dim, 0)  # (R, ...)
    valid = x != ignore_index
    safe = torch.where(valid, x, torch.zeros_like(x))
    counts = torch.zeros((num_labels,) + tuple(x.shape[1:]), dtype=torch.int64, device=x.device)
    counts.scatter_add_(0, safe, valid.long())  # counts[label, p] += 1 for each valid vote
    out = counts.argmax(dim=0)  # first maximum: ties go to the lowest label
    return torch.where(valid.any(dim=0), out, torch.full_like(out, ignore_index))


class StapleResult(NamedTuple):
    """What :func:`staple` returns (without the batch dim B for ``rater_dim=0``).

    Attributes:
        labels: (B, *S) int64, the argmax of the posterior (ties: the lowest label;
            ``ignore_index`` where no rater voted).
        probs: (B, L, *S) float64, the posterior probability of each true label.
        confusion: (B, R, L, L), ``confusion[b, j, s, t]`` = P(rater j says s | truth t).
        prior: (B, L), the label prior (given, the vote frequencies, or estimated).
        iterations: the EM rounds run.
    """

    labels: torch.Tensor  # (B, *S) int64: argmax of the posterior (ties: lowest label)
    probs: torch.Tensor  # (B, L, *S) float: posterior probability of each true label
    confusion: torch.Tensor  # (B, R, L, L): confusion[b, j, s, t] = P(rater j says s | truth t)
    prior: torch.Tensor  # (B, L): the label prior (given, the vote frequencies, or estimated)
    iterations: int  # EM rounds run


def staple(
    raters: torch.Tensor,
    num_labels: int,
    rater_dim: int = 1,
    max_iter: int = 100,
    tol: float = 1e-6,
    init_accuracy: float = 0.9,
    ignore_index: int = -100,
    prior: Union[str, torch.Tensor, Sequence[float]] = "votes",
    eps: float = 1e-6,
) -> StapleResult:
    """STAPLE (simultaneous truth and performance level estimation) by EM.

    Each image of the batch is estimated on its own (a rater's performance is a
    per-image quantity, as in the original method), all images at once.

    Model: the true label t of a pixel has prior f(t); rater j reports
    s with probability theta_j[s, t]. E-step: the posterior W(t | votes) is
    proportional to f(t) * prod_j theta_j[d_j, t] (computed in log space);
    M-step: theta_j[s, t] = sum_p W_p(t) [d_pj = s] / sum_p W_p(t) over the
    pixels rater j labelled. Iterates until no entry of theta moves more than
    ``tol``. For two labels theta_j[1, 1] is rater j's sensitivity and
    theta_j[0, 0] its specificity: this is binary STAPLE.

    Args:
        raters: (B, R, *S) (``rater_dim=1``) or (R, *S) (``rater_dim=0``) integer labels.
        num_labels: L >= 2, the number of label values.
        init_accuracy: the initial diagonal of every theta_j (off-diagonal mass
            spread evenly), in (1/L, 1).
        prior: f(t): ``"votes"`` (default, as in Warfield et al.: the label
            frequencies of all rater votes of the image, fixed), ``"estimate"``
            (re-estimated in every M-step as the mean posterior; less biased
            when the raters' errors make the vote frequencies differ from the
            true ones) or L probabilities.
        rater_dim: the raters' dim, 1 (a batch) or 0 (one image).
        max_iter: the most EM rounds.
        tol: stop when no entry of theta moves more than this.
        ignore_index: the label of "no label here".
        eps: the floor of probabilities before their logarithm.

    Returns:
        A :class:`StapleResult`.

    Raises:
        TypeError: ``raters`` is not an integer tensor.
        ValueError: ``raters`` with fewer than 2 dims; ``num_labels`` < 2;
            ``init_accuracy`` outside (1/L, 1); a label outside [0, L) that is not
            ``ignore_index``; a ``prior`` that is neither ``"votes"``, ``"estimate"``
            nor L non-negative probabilities summing to 1.
    """
    _check_raters(raters)
    if num_labels < 2:
        raise ValueError(f"num_labels must be >= 2, got {num_labels}")
    if not (1.0 / num_labels < init_accuracy < 1.0):
        raise ValueError(
            f"init_accuracy must lie in (1/num_labels, 1) = ({1.0 / num_labels:.3g}, 1), "
            f"got {init_accuracy}"
        )
    _check_range(raters, num_labels, ignore_index)
    single = rater_dim == 0
    x = raters.long().unsqueeze(0) if single else raters.long().movedim(rater_dim, 1)
    B, R = x.shape[:2]
    S = tuple(x.shape[2:])
    L = num_labels
    d = x.reshape(B, R, -1)  # (B, R, N)
    valid = d != ignore_index
    safe = torch.where(valid, d, torch.zeros_like(d))
    onehot = torch.nn.functional.one_hot(safe, L).to(torch.float64) * valid.unsqueeze(
        -1
    )  # (B,R,N,L)

    if isinstance(prior, str):
        if prior not in ("votes", "estimate"):
            raise ValueError(
                f"prior must be 'votes', 'estimate' or {L} probabilities, got {prior!r}"
            )
        estimate_prior = prior == "estimate"
        votes = onehot.sum(dim=(1, 2))  # (B, L)
        f = (votes + eps) / (votes + eps).sum(dim=1, keepdim=True)
    else:
        estimate_prior = False
        f = torch.as_tensor(prior, dtype=torch.float64, device=x.device).reshape(-1)
        if f.numel() != L or (f < 0).any() or abs(f.sum().item() - 1) > 1e-6:
            raise ValueError(
                f"prior must be {L} non-negative probabilities summing to 1, got {prior!r}"
            )
        f = f.clamp_min(eps).expand(B, L)
    log_prior = f.log()

    off = (1.0 - init_accuracy) / (L - 1)
    theta = torch.full((B, R, L, L), off, dtype=torch.float64, device=x.device)
    theta.diagonal(dim1=2, dim2=3).fill_(init_accuracy)

    it = 0
    for it in range(1, max_iter + 1):
        # E-step: log W(t) = log f(t) + sum_j log theta_j[d_j, t] over the raters that voted.
        log_theta = theta.clamp_min(eps).log()  # (B, R, L(s), L(t))
        per_rater = torch.einsum(
            "brns,brst->brnt", onehot, log_theta
        )  # 0 where the rater did not vote
        logw = log_prior.unsqueeze(1) + per_rater.sum(dim=1)  # (B, N, L)
        W = torch.softmax(logw, dim=-1)
        if estimate_prior:
            f = W.mean(dim=1).clamp_min(eps)
            log_prior = f.log()
        # M-step: theta_j[s, t] = sum_p W_p(t) [d_pj = s] / sum_p W_p(t) [rater j voted at p].
        num = torch.einsum("brns,bnt->brst", onehot, W)
        den = num.sum(dim=2, keepdim=True)
        new = torch.where(den > 0, num / den.clamp_min(1e-300), theta)
        delta = (new - theta).abs().max().item() if new.numel() else 0.0
        theta = new
        if delta < tol:
            break

    log_theta = theta.clamp_min(eps).log()
    logw = log_prior.unsqueeze(1) + torch.einsum("brns,brst->brnt", onehot, log_theta).sum(dim=1)
    W = torch.softmax(logw, dim=-1)  # (B, N, L)
    labels = W.argmax(dim=-1)
    any_vote = valid.any(dim=1)
    labels = torch.where(any_vote, labels, torch.full_like(labels, ignore_index))
    probs = W.transpose(1, 2).reshape(B, L, *S)
    labels = labels.reshape(B, *S)
    if single:
        return StapleResult(labels[0], probs[0], theta[0], f[0], it)
    return StapleResult(labels, probs, theta, f, it)


def consensus_target(
    raters: torch.Tensor,
    method: Union[str, int] = "majority",
    num_labels: int = 2,
    rater_names: Optional[Sequence[str]] = None,
    rater_dim: int = 1,
    ignore_index: int = -100,
    **staple_kwargs,
) -> torch.Tensor:
    """The training target from multi-rater labels.

    Args:
        raters: (B, R, *S) (``rater_dim=1``) or (R, *S) (``rater_dim=0``) integer labels.
        method: ``"majority"`` (default), ``"staple"``, a rater name (looked up in
            ``rater_names``) or a rater index.
        num_labels: L, the number of label values.
        rater_names: the raters' names, in order.
        rater_dim: the raters' dim.
        ignore_index: the label of "no label here".
        **staple_kwargs: the other arguments of :func:`staple`.

    Returns:
        int64 labels without the rater dim.

    Raises:
        TypeError: ``raters`` is not an integer tensor; ``method`` neither a string
            nor an int.
        ValueError: ``raters`` with fewer than 2 dims; a name not in ``rater_names``;
            an index out of range; a label out of range; what :func:`staple` raises.
    """
    _check_raters(raters)
    R = raters.shape[rater_dim]
    if isinstance(method, str) and method in CONSENSUS_METHODS:
        if method == "majority":
            return majority_vote(raters, num_labels, rater_dim, ignore_index)
        return staple(
            raters, num_labels, rater_dim, ignore_index=ignore_index, **staple_kwargs
        ).labels
    if isinstance(method, bool) or not isinstance(method, (str, int)):
        raise TypeError(
            f"method must be 'majority', 'staple', a rater name or a rater index, got {method!r}"
        )
    if isinstance(method, str):
        names = list(rater_names) if rater_names is not None else []
        if method not in names:
            raise ValueError(
                f"method={method!r} is neither 'majority', 'staple' nor a rater name; "
                f"rater names: {names}"
            )
        index = names.index(method)
    else:
        index = method
    if not -R <= index < R:
        raise ValueError(f"rater index {index} out of range for {R} raters")
    _check_range(raters, num_labels, ignore_index)
    return raters.select(rater_dim, index).long()
