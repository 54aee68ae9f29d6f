"""Experts for DeferredSeg: real annotators and simulated ones.

- Real annotators (:mod:`.consensus`): in multi-rater data every rater is an
  expert; the training target is a named rater, the majority vote (default) or
  STAPLE (:func:`consensus_target`, :func:`majority_vote`, :func:`staple`).
- Simulated discrepancy experts (:mod:`.simulated`): the released code's
  per-pixel model with the ``"same-accuracy"`` and ``"complementary"`` profiles
  (:func:`simulated_experts`, :class:`DiscrepancyExpert`).
- Structured experts (:mod:`.structured`): boundary dilation / erosion, smooth
  boundary wobble, region-specific skill, missed small components
  (:func:`structured_experts` and the classes).

Every simulated expert runs vectorised on the target's device and is seeded
through an :class:`ExpertPanel`, which returns ``expert_labels`` (B, E, *S) int64.
"""

from ._morph import boundary_band, connected_components, dilate, erode
from .consensus import CONSENSUS_METHODS, StapleResult, consensus_target, majority_vote, staple
from .simulated import (
    PROFILES,
    DiscrepancyExpert,
    ExpertModel,
    ExpertPanel,
    derive_seed,
    simulated_experts,
)
from .structured import (
    BoundaryShiftExpert,
    ChainExpert,
    MissedComponentsExpert,
    RegionSkillExpert,
    SmoothBoundaryExpert,
    dilate_labels,
    erode_labels,
    structured_experts,
)

__all__ = [
    "CONSENSUS_METHODS",
    "StapleResult",
    "consensus_target",
    "majority_vote",
    "staple",
    "PROFILES",
    "DiscrepancyExpert",
    "ExpertModel",
    "ExpertPanel",
    "derive_seed",
    "simulated_experts",
    "BoundaryShiftExpert",
    "ChainExpert",
    "MissedComponentsExpert",
    "RegionSkillExpert",
    "SmoothBoundaryExpert",
    "dilate_labels",
    "erode_labels",
    "structured_experts",
    "boundary_band",
    "connected_components",
    "dilate",
    "erode",
    "make_experts",
]


def make_experts(
    spec="same-accuracy",
    num_labels: int = 2,
    seed: int = 0,
    resample: bool = True,
    ignore_index: int = -100,
    **kwargs,
) -> ExpertPanel:
    """An :class:`ExpertPanel` from a short description.

    ``spec`` is ``"same-accuracy"`` or ``"complementary"`` (the released code's
    profiles), ``"structured"`` (the five structured experts), a sequence of
    ``(fg_acc, bg_acc, edge_boost)`` triples, a sequence of :class:`ExpertModel`,
    or a ready :class:`ExpertPanel` (returned as is). ``kwargs`` go to
    :func:`simulated_experts` (``edge_radius``) or :func:`structured_experts` (``scale``).

    Args:
        spec: the description (see above).
        num_labels: K' = max(K, 2), the number of label values.
        seed: the seed of every random draw.
        resample: new labels at every call (True) or fixed per image (False).
        ignore_index: the label of ignored pixels.
        **kwargs: see above.

    Returns:
        The :class:`ExpertPanel`.

    Raises:
        TypeError: ``spec`` of none of those kinds; an unexpected keyword in
            ``kwargs``; a list of expert models holding something else.
        ValueError: an unknown profile name, or what :func:`simulated_experts`,
            :func:`structured_experts` or :class:`ExpertPanel` raise.
    """
    if isinstance(spec, ExpertPanel):
        return spec
    if isinstance(spec, str) and spec == "structured":
        return structured_experts(
            num_labels=num_labels, seed=seed, resample=resample, ignore_index=ignore_index, **kwargs
        )
    if isinstance(spec, str) or (
        isinstance(spec, (list, tuple)) and spec and not isinstance(spec[0], ExpertModel)
    ):
        return simulated_experts(
            spec,
            num_labels=num_labels,
            seed=seed,
            resample=resample,
            ignore_index=ignore_index,
            **kwargs,
        )
    if isinstance(spec, (list, tuple)):
        return ExpertPanel(
            spec, num_labels=num_labels, seed=seed, resample=resample, ignore_index=ignore_index
        )
    raise TypeError(
        f"experts must be a profile name, 'structured', a list of (fg_acc, bg_acc, edge_boost), "
        f"a list of ExpertModel or an ExpertPanel, got {type(spec).__name__}"
    )
