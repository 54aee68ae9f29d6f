"""One deferral policy: who labels each pixel at inference, and at what budget.

Every path of the package routes through :class:`DeferralPolicy`: training's
checkpoint selection (both schedules), ``evaluate``, ``predict`` and the review
folder, and a user's own loop. A policy says

- ``mode``: what ranks the pixels (the *deferral score*, higher defers first):

  - ``"gate"``: the gate's probability sigmoid(a);
  - ``"uncertainty"``: the segmentation head's own uncertainty, 1 - max class
    probability (confidence deferral);
  - ``"gain"``: the expected gain of asking, ``(q_j - cost_j) - q_model`` for the
    expert j the policy asks (q from the routing logits: ``scores``);
  - ``"router"``: the paper's inference, defer where the router's argmax is an
    expert; it has its own deferral rate and takes neither budget nor threshold
    (its score, the soft deferral mass D, is reported for ranking only);

- ``scores``: how correctness estimates q come from the routing logits
  (``"sigmoid"`` for the one-vs-all surrogate, ``"softmax"`` otherwise);
- ``expert_cost``: the cost of asking each expert;
- ``expert_choice``: who gets a deferred pixel: ``"heads"`` (the routing heads'
  ``argmax_j (q_j - cost_j)``), ``"best"`` (the best single expert,
  ``best_expert``) or ``"auto"`` (whichever of the two gives the higher system
  Dice on the calibration data, decided by :meth:`calibrate`);
- ``budget`` and ``threshold``: defer where the score is above ``threshold``;
  :meth:`calibrate` picks the threshold at which a ``budget`` share of the
  calibration (validation) pixels is deferred.

Calibration streams: it keeps one fixed-size histogram of the scores (no
logits are kept), so a validation set of any size calibrates in bounded memory,
and the realised deferral rate on the calibration pixels is known exactly.

The packed logits every path reads (docs/objective.md section 1) are
``(B, K + E + 2, *S)``: K segmentation logits, E + 1 routing logits (experts
0..E-1 first, the model last), then the gate; :func:`channel_layout` spells
that out for given K and E.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Union

import torch

from deferredseg_kernels import ROUTE_MODES, LossOptions, route, split_logits
from deferredseg_kernels._checks import (
    ROUTE_SCORES,
    check_choice,
    check_expert_cost,
    check_float,
    check_int,
)
from deferredseg_kernels.types import MAX_EXPERTS

from .scores import IGNORE_INDEX, nanmean, per_image_scores

__all__ = [
    "DeferralPolicy",
    "Routing",
    "ChannelLayout",
    "channel_layout",
    "ScoreHistogram",
    "MODES",
    "EXPERT_CHOICES",
    "IGNORE_INDEX",
    "RC_BUDGETS",
    "rc_area",
    "uncertainty",
]

#: The kernel's routing modes (deferredseg_kernels.ROUTE_MODES: the gate, the router, the
#: gain) and the base segmentor's own uncertainty (confidence deferral, no heads needed).
MODES = (*ROUTE_MODES, "uncertainty")
EXPERT_CHOICES = ("heads", "best", "auto")
#: The budgets whose validation system Dice make the risk-coverage area (``rc-auc``).
RC_BUDGETS = (0.0, 0.05, 0.1, 0.2, 0.3)
_BIG = 1e4  # a routing logit of -_BIG takes an expert out of the choice
_FORMAT = 1  # the version of to_dict()'s layout


# ----------------------------------------------------------------------------- layout


class ChannelLayout(NamedTuple):
    """Where each part of the packed logits lives, for K classes and E experts."""

    channels: int  # K + E + 2: a network's ``out_channels``
    segmentation: slice  # the K segmentation logits
    experts: slice  # the routing logits of experts 0..E-1
    model: int  # the routing logit of the model ("keep")
    gate: int  # the gate logit

    def describe(self) -> str:
        seg, ex = self.segmentation, self.experts
        return (
            f"{self.channels} channels: segmentation {seg.start}..{seg.stop - 1}, "
            f"experts {ex.start}..{ex.stop - 1}, model {self.model}, gate {self.gate}"
        )


def channel_layout(num_classes: int, num_experts: int) -> ChannelLayout:
    """The channel count and order of the packed logits for K classes and E experts.

    Args:
        num_classes: K >= 1 segmentation channels.
        num_experts: E experts, 1 to ``MAX_EXPERTS``.

    Returns:
        A :class:`ChannelLayout`: the channel count K + E + 2 and where each part lives.

    Raises:
        TypeError: a count that is not an int.
        ValueError: ``num_classes`` < 1, or ``num_experts`` outside [1, MAX_EXPERTS].

    >>> channel_layout(1, 3).describe()
    '6 channels: segmentation 0..0, experts 1..3, model 4, gate 5'
    """
    K = check_int("num_classes", num_classes, 1)
    E = check_int("num_experts", num_experts, 1, MAX_EXPERTS)
    return ChannelLayout(K + E + 2, slice(0, K), slice(K, K + E), K + E, K + E + 1)


# ----------------------------------------------------------------------------- scores


def uncertainty(z: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The segmentation head's own uncertainty: 1 - its max class probability.

    Args:
        z: segmentation logits (B, K, *S) (K = 1: one sigmoid logit).
        num_classes: K.

    Returns:
        The uncertainty (B, *S), float32, in [0, 1 - 1/max(K, 2)].
    """
    if num_classes == 1:
        p = torch.sigmoid(z[:, 0].float())
        return 1 - torch.maximum(p, 1 - p)
    return 1 - torch.softmax(z.float(), dim=1).amax(dim=1)


class Routing(NamedTuple):
    """What :meth:`DeferralPolicy.route` returns.

    Attributes:
        assignment: (B, *S) int8: -1 where the model keeps the pixel, j where expert j
            labels it.
        score: (B, *S) float32, the policy's deferral score (the gate's probability,
            the uncertainty, the expected gain, which may be negative, or the router's D).
        model_pred: (B, *S) int64, the model's labels.
        final: (B, *S) int64, the combined labels (the model's, or the chosen expert's
            where deferred) when expert labels were given, else None.
    """

    assignment: torch.Tensor  # (B, *S) int8: -1 the model keeps the pixel, j expert j labels it
    score: torch.Tensor  # (B, *S) float32
    model_pred: torch.Tensor  # (B, *S) int64
    final: Optional[torch.Tensor]  # (B, *S) int64 with expert labels, else None


# ----------------------------------------------------------------------------- histogram


class ScoreHistogram:
    """A fixed-size histogram of ranking values, for thresholds at any budget.

    Values ``x`` are binned on ``asinh(x)`` over [-LIMIT, LIMIT] (|x| up to about
    1.6e5 before the end bins), ``BINS`` bins: bin i holds
    ``edge_i <= asinh(x) < edge_{i+1}``. The count above an edge is exact, so a
    threshold at an edge has a known deferral rate on the data it was built from.
    """

    BINS = 1 << 16
    LIMIT = 13.0

    def __init__(self) -> None:
        self.counts = torch.zeros(self.BINS, dtype=torch.int64)
        self.total = 0

    def add(self, values: torch.Tensor) -> None:
        """Count ``values`` (any shape, any device; NaN values are left out).

        Args:
            values: ranking values, a tensor.
        """
        v = values.detach().reshape(-1).double()
        v = v[~torch.isnan(v)]
        if v.numel() == 0:
            return
        t = torch.asinh(v)
        width = 2 * self.LIMIT / self.BINS
        idx = ((t + self.LIMIT) / width).floor().clamp(0, self.BINS - 1).long()
        self.counts += torch.bincount(idx.cpu(), minlength=self.BINS)
        self.total += int(v.numel())

    def edge(self, i: int) -> float:
        """The ranking value at the lower edge of bin ``i``.

        Args:
            i: a bin index in [0, BINS] (``BINS``: the edge above every bin).

        Returns:
            ``sinh`` of the bin's lower edge on the asinh scale.
        """
        return math.sinh(-self.LIMIT + i * 2 * self.LIMIT / self.BINS)

    def cut(self, budget: float) -> tuple:
        """The cut that defers the share of the counted values closest to ``budget``.

        Args:
            budget: the share to defer (values at or above the cut's edge).

        Returns:
            ``(i, rate)``: the bin whose lower edge is the cut (``BINS`` when nothing is
            deferred: ``budget <= 0`` or nothing counted) and the share at or above it;
            among equally close cuts the higher edge.
        """
        if budget <= 0 or self.total == 0:
            return self.BINS, 0.0
        above = torch.flip(torch.cumsum(torch.flip(self.counts, [0]), 0), [0]).double()
        rates = above / self.total  # rates[i]: share at or above edge i, decreasing in i
        i = int(torch.argmin((rates - budget).abs()))
        # among equally close cuts prefer the higher edge (the smaller share)
        while i + 1 < self.BINS and float(rates[i + 1]) == float(rates[i]):
            i += 1
        return i, float(rates[i])


# ----------------------------------------------------------------------------- the policy

Batch = Union[torch.Tensor, Sequence[Optional[torch.Tensor]], Dict[str, torch.Tensor]]
Data = Union[Iterable[Batch], Callable[[], Iterable[Batch]]]


def _unpack(batch: Batch):
    """(logits, target or None, expert labels or None) of one calibration batch."""
    if isinstance(batch, torch.Tensor):
        return batch, None, None
    if isinstance(batch, dict):
        if "logits" not in batch:
            raise ValueError(
                f"a calibration batch given as a dict needs the key 'logits' (and optionally "
                f"'target', 'expert_labels'), got keys {sorted(batch)}"
            )
        return batch["logits"], batch.get("target"), batch.get("expert_labels")
    if isinstance(batch, (tuple, list)) and 1 <= len(batch) <= 4:  # a 4th item: voxel sizes
        parts = list(batch[:3]) + [None] * (3 - min(len(batch), 3))
        return parts[0], parts[1], parts[2]
    raise TypeError(
        "a calibration batch must be logits, (logits, target), (logits, target, "
        f"expert_labels) or a dict with 'logits', got {type(batch).__name__}"
    )


@dataclass(frozen=True)
class DeferralPolicy:
    """Who labels each pixel: the model or one of the experts (see the module docstring).

    Args:
        num_classes: K, the segmentation channels of the packed logits.
        num_experts: E.
        mode: one of :data:`MODES` (default ``"gate"``).
        scores: ``"sigmoid"`` (the one-vs-all surrogate, the loss's default) or
            ``"softmax"``: how correctness estimates come from the routing logits.
        expert_cost: None or E finite costs >= 0.
        expert_choice: one of :data:`EXPERT_CHOICES` (default ``"auto"``).
        best_expert: the best single expert's index (``"best"`` needs it; ``"auto"``
            finds it on the calibration data when not given).
        budget: the share of pixels to defer, in [0, 1] (not in mode ``"router"``).
        threshold: defer where the score is above it: in [0, 1] in the modes
            ``"gate"`` and ``"uncertainty"``, any finite number in ``"gain"``, None in
            ``"router"``. Set by :meth:`calibrate` for the budget.
        chosen: with ``expert_choice="auto"``, what calibration chose (``"heads"`` or
            ``"best"``); calibrating again (another budget) decides anew.
        ignore_index: label value of pixels that count nowhere.
        calibration: what :meth:`calibrate` measured (read-only record).

    Raises:
        TypeError: a field of the wrong type (a count, a cost, the budget or threshold
            not a number).
        ValueError: a count out of range, an unknown ``mode``, ``scores`` or
            ``expert_choice``; ``chosen`` given unless ``expert_choice="auto"``;
            ``expert_cost`` not E finite values >= 0; ``best_expert`` outside [0, E) or
            missing for ``expert_choice="best"``; a ``budget`` outside [0, 1] or a
            ``threshold`` outside its range (both must be None in mode ``"router"``).

    Example::

        policy = DeferralPolicy(num_classes=1, num_experts=3)
        policy = policy.calibrate(val_batches, budget=0.1)  # (logits, target, experts)
        out = policy.route(model(x), expert_labels)  # out.assignment: -1 model, j expert j
    """

    num_classes: int
    num_experts: int
    mode: str = "gate"
    scores: str = "sigmoid"
    expert_cost: Optional[Sequence[float]] = None
    expert_choice: str = "auto"
    best_expert: Optional[int] = None
    budget: Optional[float] = None
    threshold: Optional[float] = None
    chosen: Optional[str] = None
    ignore_index: int = IGNORE_INDEX
    calibration: Dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        K = check_int("num_classes", self.num_classes, 1)
        E = check_int("num_experts", self.num_experts, 1, MAX_EXPERTS)
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("num_classes", K)
        set_("num_experts", E)
        check_choice("mode", self.mode, MODES)
        check_choice("scores", self.scores, ROUTE_SCORES)
        check_choice("expert_choice", self.expert_choice, EXPERT_CHOICES)
        if self.chosen is not None:
            check_choice("chosen", self.chosen, EXPERT_CHOICES[:2])
            if self.expert_choice != "auto":
                raise ValueError(
                    f"chosen must be None unless expert_choice is 'auto' (calibration decides "
                    f"it), got chosen={self.chosen!r} with expert_choice={self.expert_choice!r}"
                )
        cost = check_expert_cost(self.expert_cost, E)
        set_("expert_cost", None if cost is None else list(cost))
        if self.best_expert is not None:
            set_("best_expert", check_int("best_expert", self.best_expert, 0, E - 1))
        elif self.expert_choice == "best":
            raise ValueError(
                "expert_choice='best' needs best_expert (an index in [0, E)), got None"
            )
        set_("ignore_index", check_int("ignore_index", self.ignore_index, -(2**63)))
        if self.budget is not None:
            if self.mode == "router":
                raise ValueError(
                    "budget must be None in mode 'router' (the router's argmax defers at its "
                    f"own rate), got {self.budget}"
                )
            b = check_float("budget", self.budget)
            if not 0.0 <= b <= 1.0:
                raise ValueError(f"budget must be in [0, 1], got {b}")
            set_("budget", b)
        if self.threshold is not None:
            set_("threshold", self._check_threshold(self.threshold))
        set_("calibration", dict(self.calibration or {}))

    def _check_threshold(self, value: Any) -> float:
        if self.mode == "router":
            raise ValueError(
                f"threshold must be None in mode 'router' (it defers by the router's argmax), "
                f"got {value}"
            )
        t = check_float("threshold", value)
        if self.mode != "gain" and not 0.0 <= t <= 1.0:
            raise ValueError(f"threshold must be in [0, 1] in mode {self.mode!r}, got {t}")
        return t

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def for_loss(cls, loss, **kwargs: Any) -> "DeferralPolicy":
        """A policy for networks trained with ``loss``.

        Args:
            loss: a :class:`~deferredseg.losses.DeferredSegLoss` or its
                :class:`~deferredseg_kernels.LossOptions`.
            **kwargs: the policy's other fields (``mode``, ``expert_cost``, ...).

        Returns:
            A policy with the loss's K, E and ignore index, and the scores its surrogate
            trains (``"sigmoid"`` for one-vs-all, ``"softmax"`` otherwise), unless
            ``kwargs`` set them.

        Raises:
            TypeError: ``loss`` is neither a DeferredSegLoss nor LossOptions.
            ValueError, TypeError: a field in ``kwargs`` that the constructor refuses.
        """
        o = getattr(loss, "options", loss)
        if not isinstance(o, LossOptions):
            raise TypeError(
                f"loss must be a DeferredSegLoss or LossOptions, got {type(loss).__name__}"
            )
        kwargs.setdefault("scores", "sigmoid" if o.surrogate == "ova" else "softmax")
        kwargs.setdefault("ignore_index", o.ignore_index)
        return cls(o.num_classes, o.num_experts, **kwargs)

    @classmethod
    def never(cls, num_classes: int, num_experts: int, **kwargs: Any) -> "DeferralPolicy":
        """A policy that never defers (the model alone).

        Args:
            num_classes: K.
            num_experts: E.
            **kwargs: the policy's other fields (default ``mode="gate"``,
                ``expert_choice="heads"``); not ``budget`` or ``threshold``.

        Returns:
            A policy at budget 0 and threshold 1 (``defers`` is False).

        Raises:
            ValueError, TypeError: a field the constructor refuses (mode ``"router"``,
                which has no threshold, among them).
        """
        kwargs.setdefault("mode", "gate")
        kwargs.setdefault("expert_choice", "heads")
        return cls(num_classes, num_experts, budget=0.0, threshold=1.0, **kwargs)

    def with_threshold(self, threshold: float) -> "DeferralPolicy":
        """This policy at a fixed threshold instead of a budget.

        Args:
            threshold: defer where the score is above it (in [0, 1], any finite number
                in mode ``"gain"``).

        Returns:
            A copy without budget or calibration record; an ``"auto"`` expert choice not
            yet decided by calibration goes to the heads.

        Raises:
            ValueError: a threshold out of range, or any threshold in mode ``"router"``.
            TypeError: a threshold that is not a number.
        """
        chosen = (self.chosen or "heads") if self.expert_choice == "auto" else None
        return self.replace(threshold=threshold, budget=None, chosen=chosen, calibration={})

    def replace(self, **changes: Any) -> "DeferralPolicy":
        """A copy with some fields changed.

        Args:
            **changes: field names and their new values.

        Returns:
            The new policy (validated like the constructor's arguments).

        Raises:
            TypeError: an unknown field name, or a value of the wrong type.
            ValueError: a value the constructor refuses.
        """
        return replace(self, **changes)

    @property
    def defers(self) -> bool:
        """False for a policy that never defers (threshold at the top of its range)."""
        return self.mode == "router" or self.threshold is None or self.threshold < 1.0

    @property
    def layout(self) -> ChannelLayout:
        """The :class:`ChannelLayout` of the packed logits this policy reads."""
        return channel_layout(self.num_classes, self.num_experts)

    # -- scores and routing ---------------------------------------------------------------------
    def _check_logits(self, logits: Any) -> torch.Tensor:
        if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
            got = type(logits).__name__ if not isinstance(logits, torch.Tensor) else logits.dtype
            raise TypeError(f"logits must be a floating torch.Tensor, got {got}")
        C = self.layout.channels
        if logits.dim() < 3 or logits.shape[1] != C:
            raise ValueError(
                f"logits must be (B, {C}, *S): {self.layout.describe()}; "
                f"got shape {tuple(logits.shape)}"
            )
        return logits

    def _choices(self) -> List[str]:
        return ["heads", "best"] if self.expert_choice == "auto" else [self.expert_choice]

    def _packed(self, logits: torch.Tensor, choice: str) -> torch.Tensor:
        """The packed logits the route kernel reads for ``choice``: for the best single
        expert, the other experts taken out; in mode "uncertainty", the gate replaced
        by the uncertainty's logit."""
        K, E = self.num_classes, self.num_experts
        if choice == "best" and E > 1:
            r = logits[:, K : K + E].float()
            keep = torch.zeros(E, dtype=torch.bool, device=logits.device)
            keep[self._best()] = True
            r = torch.where(keep.view(1, E, *([1] * (r.dim() - 2))), r, torch.full_like(r, -_BIG))
            logits = torch.cat([logits[:, :K].float(), r, logits[:, K + E :].float()], dim=1)
        if self.mode == "uncertainty":
            u = uncertainty(logits[:, :K], K).clamp(1e-7, 1 - 1e-7)
            logits = torch.cat([logits[:, :-1].float(), torch.logit(u).unsqueeze(1)], dim=1)
        return logits

    def _best(self) -> int:
        if self.best_expert is None:
            raise ValueError(
                f"expert_choice={self.expert_choice!r} needs best_expert; calibrate() with "
                "expert labels finds it, or give it"
            )
        return self.best_expert

    def _cost(self, choice: str) -> Optional[List[float]]:
        if self.expert_cost is None or choice != "best" or self.num_experts == 1:
            return self.expert_cost
        # only the best expert can be chosen: every expert costs what it costs
        return [self.expert_cost[self._best()]] * self.num_experts

    def _rank(self, logits: torch.Tensor, choice: str) -> torch.Tensor:
        """The value the threshold cuts, per pixel: the gate logit (gate, uncertainty:
        the route kernel compares logits), the gain itself, D for the router."""
        lg = self._packed(logits, choice)
        z, r, a = split_logits(lg.float(), self.num_classes, self.num_experts)
        if self.mode in ("gate", "uncertainty"):
            return a
        if self.mode == "router":
            return torch.softmax(r, dim=1)[:, : self.num_experts].sum(dim=1)
        q = torch.sigmoid(r) if self.scores == "sigmoid" else torch.softmax(r, dim=1)
        net = q[:, : self.num_experts]
        cost = self._cost(choice)
        if cost is not None:
            c = torch.tensor(cost, dtype=net.dtype, device=net.device)
            net = net - c.view(1, -1, *([1] * (net.dim() - 2)))
        return net.amax(dim=1) - q[:, self.num_experts]

    def _resolved(self) -> str:
        """Who gets a deferred pixel: ``expert_choice``, or for "auto" what calibration chose."""
        if self.expert_choice != "auto":
            return self.expert_choice
        if self.chosen is None:
            raise ValueError(
                "expert_choice='auto' is decided by calibrate(); route with a calibrated "
                "policy, give chosen='heads' or 'best', or choose expert_choice 'heads' or 'best'"
            )
        return self.chosen

    def ranking(self, logits: torch.Tensor) -> torch.Tensor:
        """A monotone transform of :meth:`score` that does not saturate.

        What calibration and AUROCs rank by: the gate's logit instead of its
        probability (modes ``"gate"``, ``"uncertainty"``), else the score itself.

        Args:
            logits: packed logits (B, K + E + 2, *S), floating.

        Returns:
            The ranking values (B, *S), float32 (higher: deferred first).

        Raises:
            TypeError: ``logits`` is not a floating tensor.
            ValueError: ``logits`` does not have the layout's shape; a choice of the
                best expert without ``best_expert``.
        """
        self._check_logits(logits)
        return self._rank(logits, self._choice_or_heads())

    def _choice_or_heads(self) -> str:
        if self.expert_choice == "auto":
            return self.chosen or "heads"
        return self.expert_choice

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        """The deferral score of each pixel.

        Args:
            logits: packed logits (B, K + E + 2, *S), floating.

        Returns:
            The score (B, *S), float32 (higher: deferred first): the gate's probability,
            the uncertainty, the expected gain (may be negative) or the router's D, by
            ``mode``.

        Raises:
            TypeError: ``logits`` is not a floating tensor.
            ValueError: ``logits`` does not have the layout's shape; a choice of the
                best expert without ``best_expert``.
        """
        self._check_logits(logits)
        v = self._rank(logits, self._choice_or_heads())
        return torch.sigmoid(v) if self.mode in ("gate", "uncertainty") else v

    def route(
        self,
        logits: torch.Tensor,
        expert_labels: Optional[torch.Tensor] = None,
        backend: str = "auto",
    ) -> Routing:
        """Who labels each pixel, and the combined segmentation.

        Args:
            logits: packed logits (B, K + E + 2, *S), floating.
            expert_labels: None, or the experts' labels (B, E, *S), integer: then
                ``final`` holds the combined labels.
            backend: the route kernel's backend (``deferredseg_kernels.BACKENDS``).

        Returns:
            A :class:`Routing` ``(assignment, score, model_pred, final)``.

        Raises:
            TypeError: ``logits`` is not a floating tensor, or ``expert_labels`` not an
                integer tensor.
            ValueError: a shape that does not fit the layout; no threshold (not
                calibrated, outside mode ``"router"``); ``expert_choice="auto"`` not yet
                decided by :meth:`calibrate`; an unknown ``backend``.
            RuntimeError: ``backend`` cannot run here.
        """
        self._check_logits(logits)
        if self.mode != "router" and self.threshold is None:
            raise ValueError(
                "this policy has no threshold: calibrate(data, budget=...) it on validation "
                "outputs, or give threshold="
            )
        return self._route(logits, expert_labels, backend, self._resolved(), self.threshold)

    def _route(self, logits, expert_labels, backend, choice, threshold) -> Routing:
        K, E = self.num_classes, self.num_experts
        lg = self._packed(logits, choice)
        mode = "gate" if self.mode == "uncertainty" else self.mode
        kw: Dict[str, Any] = dict(expert_labels=expert_labels, backend=backend, scores=self.scores)
        cost = self._cost(choice)
        if cost is not None:
            kw["expert_cost"] = cost
        out = route(lg, K, E, threshold=0.5 if mode == "router" else threshold, mode=mode, **kw)
        assignment, final = out.assignment, out.final
        if choice == "best" and E > 1:  # whatever ties decided, the best expert labels it
            deferred = assignment >= 0
            assignment = torch.where(
                deferred, torch.full_like(assignment, self._best()), assignment
            )
            if expert_labels is not None:
                final = torch.where(deferred, expert_labels[:, self._best()].long(), out.model_pred)
        return Routing(assignment, out.defer_prob, out.model_pred, final)

    # -- calibration -----------------------------------------------------------------------------
    def _batches(self, data: Data, passes: int) -> Iterable[Batch]:
        it = data() if callable(data) else data
        if passes > 1 and iter(it) is it:
            raise TypeError(
                "data must be re-iterable (a list, a DataLoader, or a function returning a new "
                "iterator) to calibrate with expert_choice='auto'; got a one-pass "
                f"{type(it).__name__}"
            )
        return it

    def histograms(self, data: Data, choices: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        """One pass over ``data``: the histograms calibration cuts.

        Args:
            data: batches, as for :meth:`calibrate`.
            choices: the expert choices to histogram (default: the candidates of
                ``expert_choice``); outside mode ``"gain"`` only the first (the score
                does not depend on who is asked).

        Returns:
            ``{"hist": {choice: ScoreHistogram of the valid pixels' ranking},
            "agree": each expert's count of valid pixels that agree with the target
            (float64 (E,)), or None without targets and expert labels}``. The
            ``"best"`` histogram stays empty while ``best_expert`` is unknown.

        Raises:
            TypeError: a batch of another form, or logits that are not a floating
                tensor.
            ValueError: logits or a target whose shape does not fit.
        """
        choices = list(choices or self._choices())
        if self.mode != "gain":  # the score does not depend on who is asked: one histogram
            choices = choices[:1]
        hist = {c: ScoreHistogram() for c in choices}
        agree = torch.zeros(self.num_experts, dtype=torch.float64)
        seen_experts = False
        for batch in self._batches(data, 1):
            logits, target, experts = _unpack(batch)
            self._check_logits(logits)
            valid = self._valid(logits, target)
            if experts is not None and target is not None:
                t = target.squeeze(1) if target.dim() == logits.dim() else target
                ok = (experts == t.unsqueeze(1)) & valid.unsqueeze(1)
                agree += ok.flatten(2).sum((0, 2)).double().cpu()
                seen_experts = True
            with torch.no_grad():
                for c, h in hist.items():
                    if c == "best" and self.best_expert is None:
                        continue  # filled after the best expert is known (below)
                    h.add(self._rank(logits, c)[valid])
        return {"hist": hist, "agree": agree if seen_experts else None}

    def _valid(self, logits: torch.Tensor, target: Optional[torch.Tensor]) -> torch.Tensor:
        shape = (logits.shape[0],) + tuple(logits.shape[2:])
        if target is None:
            return torch.ones(shape, dtype=torch.bool, device=logits.device)
        t = target.squeeze(1) if target.dim() == logits.dim() else target
        if tuple(t.shape) != shape:
            raise ValueError(f"target must have shape {shape}, got {tuple(target.shape)}")
        return t != self.ignore_index

    def at_budget(self, hist: ScoreHistogram, budget: float, choice: Optional[str] = None):
        """This policy with the threshold that defers ``budget`` of ``hist``'s pixels.

        Args:
            hist: the ranking histogram (from :meth:`histograms`).
            budget: the share of the pixels to defer, in [0, 1].
            choice: with ``expert_choice="auto"``, the choice ``hist`` was made for.

        Returns:
            A copy with ``budget``, the threshold at the histogram's cut, ``chosen`` and
            the ``calibration`` record (budget, realised rate, pixel count).

        Raises:
            ValueError: a budget outside [0, 1], or mode ``"router"``.
            TypeError: a budget that is not a number.
        """
        p = self.replace(budget=budget)  # validates the budget and the mode
        i, rate = hist.cut(p.budget)
        if i >= hist.BINS:
            thr = 1.0  # above every score: never defers
        elif i == 0:  # the lowest bin holds everything below it too: defer every pixel
            thr = -1e30 if self.mode == "gain" else 0.0
        else:
            x = hist.edge(i)
            thr = x if self.mode == "gain" else _sigmoid64(x)
            # the kernel defers score > threshold; the edge's own values are deferred too
            thr = math.nextafter(thr, -math.inf)
            if self.mode != "gain":
                thr = min(max(thr, 0.0), 1.0)
        cal = {"budget": p.budget, "rate": rate, "pixels": hist.total}
        chosen = (choice or self.chosen) if self.expert_choice == "auto" else None
        return p.replace(threshold=thr, chosen=chosen, calibration=cal)

    def calibrate(self, data: Data, budget: Optional[float] = None) -> "DeferralPolicy":
        """This policy with the threshold that defers ``budget`` (default: this policy's
        budget) of the valid pixels of ``data``, the expert choice decided.

        ``data``: an iterable of batches (a list, a DataLoader, a generator) or a
        function that returns one; a batch is packed logits, or ``(logits, target)``,
        or ``(logits, target, expert_labels)``, or a dict with those keys. Pixels whose
        target is ``ignore_index`` are left out. One pass; with ``expert_choice="auto"``
        and expert labels a second one measures the validation system Dice of the
        heads' choice and of the best single expert at the budget and keeps the higher
        (data must then be re-iterable). ``calibration`` records the realised rate.

        Args:
            data: the calibration batches, or a function that returns a new iterable of
                them.
            budget: the share of valid pixels to defer, in [0, 1] (default: ``budget``).

        Returns:
            The calibrated policy (a copy; this one is unchanged).

        Raises:
            ValueError: mode ``"router"`` (no threshold); no budget, or one outside
                [0, 1]; a batch whose logits or target have the wrong shape; a dict
                batch without ``"logits"``.
            TypeError: a budget that is not a number; a batch of another form or with
                non-floating logits; one-pass ``data`` (a generator) when the auto expert
                choice needs two passes.
        """
        if self.mode == "router":
            raise ValueError("a policy in mode 'router' has no threshold to calibrate")
        budget = self.budget if budget is None else budget
        if budget is None:
            raise ValueError("budget must be given (a share of the pixels in [0, 1]), got None")
        passes = 2 if self.expert_choice == "auto" else 1
        data = data if callable(data) else self._batches(data, passes)
        first = self.histograms(data)
        policy = self
        if first["agree"] is not None and self.best_expert is None:
            policy = self.replace(best_expert=int(first["agree"].argmax()))
        if self.expert_choice != "auto":
            return policy.at_budget(first["hist"][self.expert_choice], budget)
        if first["agree"] is None or policy.best_expert is None or self.num_experts == 1:
            out = policy.at_budget(first["hist"]["heads"], budget, choice="heads")
            out.calibration["expert_choice"] = "heads (no expert labels to compare)"
            return out
        hist_best = first["hist"].get("best", first["hist"]["heads"])
        if hist_best.total == 0:  # the best expert was unknown in the first pass
            hist_best = policy.histograms(data, ["best"])["hist"]["best"]
        candidates = {
            "heads": policy.at_budget(first["hist"]["heads"], budget, choice="heads"),
            "best": policy.at_budget(hist_best, budget, choice="best"),
        }
        dice = _system_dice(candidates, data)
        pick = "best" if dice["best"] > dice["heads"] else "heads"
        out = candidates[pick]
        out.calibration["system_dice"] = dice
        return out

    def sweep(self, data: Data, budgets: Sequence[float]) -> List["DeferralPolicy"]:
        """This policy at each of several budgets, from one pass over ``data``.

        For a risk-coverage curve, or rates matched on a split. A policy that never
        defers, or routes by the router, stays as it is.

        Args:
            data: batches, as for :meth:`calibrate`.
            budgets: the shares of pixels to defer, each in [0, 1].

        Returns:
            One policy per budget (a one-item list of this policy when it never defers
            or is in mode ``"router"``).

        Raises:
            ValueError: ``expert_choice="auto"`` not yet decided by :meth:`calibrate`;
                a budget outside [0, 1]; a batch of the wrong shape.
            TypeError: a batch of another form.
        """
        if self.mode == "router" or not self.defers:
            return [self]
        choice = self._resolved()
        hist = self.histograms(data, [choice])["hist"][choice]
        return [self.at_budget(hist, b) for b in budgets]

    # -- records ---------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready record (checkpoints, metrics.json, the review folder).

        Returns:
            A dict of every field and the record's ``format``; :meth:`from_dict` reads it.
        """
        return {
            "format": _FORMAT,
            "num_classes": self.num_classes,
            "num_experts": self.num_experts,
            "mode": self.mode,
            "scores": self.scores,
            "expert_cost": None if self.expert_cost is None else list(self.expert_cost),
            "expert_choice": self.expert_choice,
            "best_expert": self.best_expert,
            "budget": self.budget,
            "threshold": self.threshold,
            "chosen": self.chosen,
            "ignore_index": self.ignore_index,
            "calibration": dict(self.calibration),
        }

    @classmethod
    def from_dict(cls, record: Dict[str, Any]) -> "DeferralPolicy":
        """The policy of a :meth:`to_dict` record.

        Args:
            record: the dict :meth:`to_dict` wrote.

        Returns:
            The policy, every field validated as by the constructor.

        Raises:
            TypeError: ``record`` is not a dict, or a field of the wrong type.
            ValueError: another record ``format``, an unknown field, or a field value
                the constructor refuses.
        """
        if not isinstance(record, dict):
            raise TypeError(f"record must be a dict, got {type(record).__name__}")
        values = dict(record)
        fmt = values.pop("format", _FORMAT)
        if fmt != _FORMAT:
            raise ValueError(f"record format must be {_FORMAT}, got {fmt!r}")
        names = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown policy field(s) {unknown}; expected {sorted(names)}")
        return cls(**values)


def _sigmoid64(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _system_dice(policies: Dict[str, DeferralPolicy], data: Data) -> Dict[str, float]:
    """Mean per-image system Dice of each policy on ``data`` (a second pass)."""
    sums = {k: [] for k in policies}
    for batch in data() if callable(data) else data:
        logits, target, experts = _unpack(batch)
        t = target.squeeze(1) if target.dim() == logits.dim() else target
        for k, p in policies.items():
            out = p.route(logits, experts)
            nl = max(p.num_classes, 2)
            sums[k] += per_image_scores(out.final, t, nl, None, p.ignore_index, False)["dice"]
    return {k: nanmean(v) for k, v in sums.items()}


def rc_area(points: Sequence[tuple]) -> float:
    """The risk-coverage area of ``(deferral rate, system Dice)`` points.

    Args:
        points: ``(rate, dice)`` pairs; pairs whose Dice is None or NaN are left out.

    Returns:
        The mean system Dice over the rates they span (trapezoids); the mean Dice when
        they span no rate; NaN without points.
    """
    pts = sorted((r, d) for r, d in points if d is not None and not math.isnan(d))
    if not pts:
        return float("nan")
    if pts[-1][0] == pts[0][0]:
        return float(sum(d for _, d in pts) / len(pts))
    area = sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(pts, pts[1:]))
    return area / (pts[-1][0] - pts[0][0])
