"""Evaluation metrics of a deferral system.

Segmentation quality (Dice, IoU, sensitivity, HD95) comes from MONAI's metric
functions (:mod:`deferredseg.scores`), computed per image and per foreground class
(HD95 in mm from each image's voxel spacing where it is known, ``hd95_unit`` "mm",
else in pixels, "px"), and averaged over the classes and images where it is defined
(an image without that class in the ground truth does not count: MONAI's
``ignore_empty``). It is reported for the fused prediction (``system_*``), the model
alone (``model_*``), and inside the expert-routed and model-routed regions. Deferral
is described by its rate, each expert's share of the deferred pixels, and its
fragmentation (connected components of the deferral mask per image). The
risk-coverage curve routes with the same policy at a series of budgets and records
system Dice against deferral rate; its area is :func:`deferredseg.policy.rc_area`.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from deferredseg_kernels import model_correct

from .policy import RC_BUDGETS, DeferralPolicy, Routing, ScoreHistogram, rc_area, uncertainty
from .scores import has_spacing, nanmean, per_image_scores

#: How checkpoints are selected on validation (:func:`evaluate_policy`).
SELECTIONS = ("budget-dice", "rc-auc")


def count_components(mask: torch.Tensor) -> List[int]:
    """The number of connected components (face connectivity) of each image's mask.

    Args:
        mask: (B, *S) boolean (or 0/1) tensor.

    Returns:
        B counts.
    """
    from scipy import ndimage

    return [int(ndimage.label(m)[1]) for m in mask.cpu().numpy().astype(bool)]


class DeferralEvaluator:
    """Accumulates the metrics of a deferral system over batches.

    ``update(logits, target, expert_labels)`` routes with ``policy`` (a
    :class:`~deferredseg.policy.DeferralPolicy` with its threshold) and records every
    metric; ``sweep``: more policies (the same one at other budgets) whose system Dice
    and deferral rate make the risk-coverage curve. ``result()`` returns them as a
    JSON-ready dict (NaN becomes None).

    Args:
        policy: the policy to evaluate, with its threshold (calibrated, or fixed).
        with_hd95: also compute HD95 (slower).
        sweep: more policies whose system Dice and deferral rate make the
            risk-coverage curve (``result()["risk_coverage"]``).
        backend: the route kernel's backend (``deferredseg_kernels.BACKENDS``).

    Raises:
        TypeError: ``policy`` is not a :class:`~deferredseg.policy.DeferralPolicy`.
    """

    def __init__(
        self,
        policy: DeferralPolicy,
        with_hd95: bool = True,
        sweep: Sequence[DeferralPolicy] = (),
        backend: str = "auto",
    ) -> None:
        if not isinstance(policy, DeferralPolicy):
            raise TypeError(f"policy must be a DeferralPolicy, got {type(policy).__name__}")
        self.policy = policy
        self.K, self.E = policy.num_classes, policy.num_experts
        self.num_labels = max(self.K, 2)
        self.ignore_index = policy.ignore_index
        self.with_hd95 = with_hd95
        self.sweep = tuple(sweep)
        self.backend = backend
        self.scores: Dict[str, List[float]] = {}
        self.deferred = 0
        self.valid = 0
        self.per_expert = [0] * self.E
        self.components: List[int] = []
        self.sweep_dice: List[List[float]] = [[] for _ in self.sweep]
        self.sweep_deferred = [0] * len(self.sweep)
        self.sweep_components: List[List[int]] = [[] for _ in self.sweep]
        self.hd95_units: set = set()  # "mm" (batches with a voxel size), "px" (without)

    def _add(self, prefix: str, values: Dict[str, List[float]]) -> None:
        for k, v in values.items():
            self.scores.setdefault(f"{prefix}_{k}", []).extend(v)

    @torch.no_grad()
    def update(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        expert_labels: torch.Tensor,
        spacing: Optional[torch.Tensor] = None,
    ) -> Routing:
        """Record one batch.

        Args:
            logits: packed logits (B, K + E + 2, *S), floating.
            target: labels (B, *S) or (B, 1, *S); ``ignore_index`` pixels count nowhere.
            expert_labels: the experts' labels (B, E, *S), integer.
            spacing: None, or the images' voxel sizes in mm (B, D): HD95 in mm, else
                in pixels.

        Returns:
            The batch's :class:`~deferredseg.policy.Routing` under ``policy``.

        Raises:
            TypeError: ``logits`` not a floating tensor, labels not integer tensors.
            ValueError: shapes that do not fit the policy's layout; a policy without a
                threshold, or with ``expert_choice="auto"`` not yet decided (as
                :meth:`~deferredseg.policy.DeferralPolicy.route`).
            RuntimeError: ``backend`` cannot run here.
        """
        if target.dim() == logits.dim():
            target = target.squeeze(1)
        out = self.policy.route(logits, expert_labels, backend=self.backend)
        valid = target != self.ignore_index
        deferred = (out.assignment >= 0) & valid
        nl, ii, hd = self.num_labels, self.ignore_index, self.with_hd95
        if not has_spacing(spacing):
            spacing = None
        self.hd95_units.add("mm" if spacing is not None else "px")
        self._add("system", per_image_scores(out.final, target, nl, None, ii, hd, spacing))
        self._add("model", per_image_scores(out.model_pred, target, nl, None, ii, hd, spacing))
        self._add("expert_region", per_image_scores(out.final, target, nl, deferred, ii, False))
        self._add("model_region", per_image_scores(out.final, target, nl, ~deferred, ii, False))
        self.valid += int(valid.sum())
        self.deferred += int(deferred.sum())
        for j in range(self.E):
            self.per_expert[j] += int(((out.assignment == j) & valid).sum())
        self.components += count_components(deferred)
        for i, p in enumerate(self.sweep):
            swept = p.route(logits, expert_labels, backend=self.backend)
            self.sweep_dice[i] += per_image_scores(swept.final, target, nl, None, ii, False)["dice"]
            d = (swept.assignment >= 0) & valid
            self.sweep_deferred[i] += int(d.sum())
            self.sweep_components[i] += count_components(d)
        return out

    def risk_coverage(self) -> List[Dict[str, float]]:
        """System Dice against deferral rate, one point per policy of the sweep.

        Returns:
            One dict per policy of ``sweep``: its ``budget``, ``threshold``,
            ``deferral_rate``, ``system_dice`` and ``deferral_components_per_image``.
        """
        return [
            {
                "budget": p.budget,
                "threshold": p.threshold,
                "deferral_rate": d / max(self.valid, 1),
                "system_dice": nanmean(dice),
                "deferral_components_per_image": float(np.mean(c)) if c else float("nan"),
            }
            for p, d, dice, c in zip(
                self.sweep, self.sweep_deferred, self.sweep_dice, self.sweep_components
            )
        ]

    def result(self) -> Dict[str, object]:
        """The metrics of the batches recorded so far.

        Returns:
            A JSON-ready dict (NaN as None): ``system_*``, ``model_*``,
            ``expert_region_*``, ``model_region_*`` (dice, iou, sensitivity, hd95 with
            ``hd95_unit``), ``deferral_rate``, ``expert_share``,
            ``deferral_components_per_image``, ``risk_coverage``,
            ``risk_coverage_auc`` and ``images``.
        """
        res: Dict[str, object] = {k: nanmean(v) for k, v in self.scores.items()}
        res["deferral_rate"] = self.deferred / max(self.valid, 1)
        total = sum(self.per_expert)
        res["expert_share"] = [n / total if total else 0.0 for n in self.per_expert]
        res["deferral_components_per_image"] = (
            float(np.mean(self.components)) if self.components else float("nan")
        )
        curve = self.risk_coverage()
        res["risk_coverage"] = curve
        res["risk_coverage_auc"] = rc_area([(c["deferral_rate"], c["system_dice"]) for c in curve])
        res["images"] = len(self.components)
        if self.with_hd95:  # the unit of system_hd95 and model_hd95
            units = sorted(self.hd95_units)
            res["hd95_unit"] = units[0] if len(units) == 1 else "mixed (mm where known, else px)"
        return _json_ready(res)


def histogram_auroc(positives: ScoreHistogram, negatives: ScoreHistogram) -> Optional[float]:
    """AUROC from two histograms of the same bins.

    Args:
        positives: the ranking values of the positives.
        negatives: those of the negatives.

    Returns:
        P(a positive ranks above a negative), ties within a bin counted half; None
        without positives or negatives.
    """
    if positives.total == 0 or negatives.total == 0:
        return None
    pos, neg = positives.counts.double(), negatives.counts.double()
    below = torch.cumsum(neg, 0) - neg  # negatives in lower bins
    wins = (pos * below).sum() + 0.5 * (pos * neg).sum()
    return float(wins / (positives.total * negatives.total))


Batches = Callable[[], Iterable[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]


@torch.no_grad()
def measure(
    policy: DeferralPolicy,
    data: Batches,
    sweep: Sequence[DeferralPolicy] = (),
    with_hd95: bool = False,
    backend: str = "auto",
    keep_examples: int = 0,
) -> Tuple[Dict[str, object], List[Dict[str, torch.Tensor]]]:
    """Every metric of ``policy`` on ``data`` (``(packed logits, target, expert labels)``
    batches, with a fourth item, the images' voxel sizes, for HD95 in mm), the ``sweep``'s
    risk-coverage curve, and how well the policy's score and
    the segmentation head's uncertainty rank the model's wrong pixels (AUROC, from
    histograms: bounded memory). Also the first ``keep_examples`` images' routing.

    Args:
        policy: the policy, with its threshold.
        data: a function that returns a new iterable of batches.
        sweep: the same policy at other budgets, for the risk-coverage curve.
        with_hd95: also compute HD95.
        backend: the route kernel's backend.
        keep_examples: how many images' routing to return.

    Returns:
        ``(metrics, examples)``: the :meth:`DeferralEvaluator.result` dict plus
        ``route_mode``, ``threshold``, ``auroc_model_wrong_score`` and
        ``auroc_model_wrong_uncertainty``; and up to ``keep_examples`` dicts of one
        image's ``target``, ``assignment``, ``final``, ``model_pred`` and ``score``
        (CPU tensors).

    Raises:
        TypeError: ``policy`` is not a DeferralPolicy, or a batch's tensors of the
            wrong type.
        ValueError: shapes that do not fit the policy; a policy that cannot route yet
            (no threshold, or an undecided ``expert_choice="auto"``).
        RuntimeError: ``backend`` cannot run here.
    """
    ev = DeferralEvaluator(policy, with_hd95, sweep, backend)
    hists = {k: ScoreHistogram() for k in ("score_wrong", "score_right", "unc_wrong", "unc_right")}
    unc_policy = policy.replace(mode="uncertainty", budget=None, threshold=None)
    examples: List[Dict[str, torch.Tensor]] = []
    K = policy.num_classes
    counts = {"wrong": 0, "wrong_deferred": 0, "confident_wrong": 0, "confident_wrong_deferred": 0}
    for batch in data():
        logits, target, experts = batch[:3]
        spacing = batch[3] if len(batch) > 3 else None
        t = target.squeeze(1) if target.dim() == logits.dim() else target
        out = ev.update(logits, t, experts, spacing)
        valid = t != policy.ignore_index
        wrong = ~model_correct(logits[:, :K], t, K) & valid
        right = valid & ~wrong
        # confidently wrong: confidence above 0.5 (|2p - 1| for a sigmoid; 2 max p - 1 for a
        # softmax), which no ranking by the uncertainty reaches before the unsure pixels
        confident = wrong & (uncertainty(logits[:, :K].float(), K) < 0.25)
        deferred = out.assignment >= 0
        counts["wrong"] += int(wrong.sum())
        counts["wrong_deferred"] += int((wrong & deferred).sum())
        counts["confident_wrong"] += int(confident.sum())
        counts["confident_wrong_deferred"] += int((confident & deferred).sum())
        score = policy.ranking(logits)
        unc = unc_policy.ranking(logits)
        hists["score_wrong"].add(score[wrong])
        hists["score_right"].add(score[right])
        hists["unc_wrong"].add(unc[wrong])
        hists["unc_right"].add(unc[right])
        for b in range(logits.shape[0]):
            if len(examples) < keep_examples:
                examples.append(
                    {
                        "target": t[b].cpu(),
                        "assignment": out.assignment[b].cpu(),
                        "final": out.final[b].cpu(),
                        "model_pred": out.model_pred[b].cpu(),
                        "score": out.score[b].cpu(),
                    }
                )
    res = ev.result()
    res["route_mode"] = policy.mode
    res["threshold"] = policy.threshold
    res["auroc_model_wrong_score"] = histogram_auroc(hists["score_wrong"], hists["score_right"])
    res["auroc_model_wrong_uncertainty"] = histogram_auroc(hists["unc_wrong"], hists["unc_right"])
    n = counts["wrong"]
    res["model_wrong_deferred"] = counts["wrong_deferred"] / n if n else None
    res["confident_wrong_share"] = counts["confident_wrong"] / n if n else None
    c = counts["confident_wrong"]
    res["confident_wrong_deferred"] = counts["confident_wrong_deferred"] / c if c else None
    return res, examples


def evaluate_policy(
    policy: DeferralPolicy,
    data: Batches,
    budget: float,
    selection: str = "budget-dice",
    with_hd95: bool = False,
    backend: str = "auto",
) -> Tuple[DeferralPolicy, Dict[str, object]]:
    """Validation at the budget, the one every path uses: ``policy`` calibrated on
    ``data`` for ``budget`` (unless it never defers or routes by the router), then
    measured on the same data. ``metrics["selection_score"]`` ranks checkpoints: the
    system Dice (``selection="budget-dice"``) or the risk-coverage area over the budgets
    :data:`~deferredseg.policy.RC_BUDGETS` (``"rc-auc"``).

    Args:
        policy: the policy to calibrate and measure.
        data: a function that returns a new iterable of ``(logits, target,
            expert_labels)`` batches (a fourth item: voxel sizes, for HD95 in mm).
        budget: the share of valid pixels to defer, in [0, 1].
        selection: one of :data:`SELECTIONS`.
        with_hd95: also compute HD95.
        backend: the route kernel's backend.

    Returns:
        ``(policy, metrics)``: the calibrated policy and the :func:`measure` metrics
        with ``selection_score`` and ``policy`` (its :meth:`~deferredseg.policy.
        DeferralPolicy.to_dict` record).

    Raises:
        ValueError: an unknown ``selection``; a budget outside [0, 1]; batches of the
            wrong shape (as :meth:`~deferredseg.policy.DeferralPolicy.calibrate`).
        TypeError: a budget that is not a number, batches of the wrong type.
        RuntimeError: ``backend`` cannot run here.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {list(SELECTIONS)}, got {selection!r}")
    if policy.mode != "router" and policy.defers:
        policy = policy.calibrate(data, budget)
    sweep = policy.sweep(data, RC_BUDGETS) if selection == "rc-auc" else ()
    metrics, _ = measure(policy, data, sweep, with_hd95, backend)
    key = "system_dice" if selection == "budget-dice" else "risk_coverage_auc"
    metrics["selection_score"] = metrics.get(key)
    metrics["policy"] = policy.to_dict()
    return policy, metrics


def _json_ready(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value
