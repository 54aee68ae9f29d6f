"""Evaluation: metrics of a network on a split at its deferral policy, and :func:`evaluate`,
which calibrates the policy for a budget on the validation split, measures the test split
and writes metrics and figures.

Every method is evaluated through its packed logits (:func:`~.methods.packed_logits`)
with its policy (:func:`~.methods.policy_for`); calibration and measurement are
:meth:`deferredseg.policy.DeferralPolicy.calibrate` and :func:`deferredseg.metrics.measure`.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

from ..fileio import atomic_write_json
from ..metrics import measure
from ..policy import DeferralPolicy
from .builders import best_single_expert, build_data
from .config import TrainConfig
from .datacheck import check_evaluation_data, match_experts
from .methods import checkpoint_policy, method_of, packed_logits, policy_for
from .runtime import load_trained, resolve_device

__all__ = ["network_outputs", "evaluate", "evaluate_outputs", "CURVE_BUDGETS"]

#: The budgets of the risk-coverage curve ``evaluate`` draws: denser where budgets are used.
CURVE_BUDGETS = (0.0, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0)

Batch = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def network_outputs(
    model: nn.Module,
    dataset,
    cfg: TrainConfig,
    num_experts: int,
    best_expert: int,
    device: torch.device,
) -> Callable[[], Iterator[Batch]]:
    """A function that returns a new pass of ``(packed logits, target, expert labels,
    voxel sizes or None)`` batches of ``model`` over ``dataset`` (eval mode, no gradients):
    what a policy is calibrated and measured on. Nothing is kept between batches."""
    from monai.data import DataLoader

    def batches() -> Iterator[Batch]:
        with torch.no_grad(), _eval_mode(model):
            for batch in DataLoader(
                dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.workers
            ):
                x = batch["image"].to(device)
                logits = packed_logits(cfg, model(x), num_experts, best_expert)
                target, experts = batch["target"].to(device), batch["expert_labels"].to(device)
                yield logits, target, experts, batch.get("spacing")

    return batches


def evaluate(
    checkpoint_path,
    out: Optional[str] = None,
    split: str = "test",
    threshold: Optional[float] = None,
    budget: Optional[float] = None,
    overrides: Optional[Dict[str, Any]] = None,
    figures: bool = True,
    device: str = "auto",
    with_hd95: bool = True,
    matched: bool = False,
    sweep: bool = True,
) -> Dict[str, Any]:
    """Evaluate a checkpoint on ``split``; write metrics.json (and figures) to ``out``.

    The checkpoint's policy is calibrated for ``budget`` (default: the training
    budget) on the validation split, unless ``threshold`` fixes it, the method never
    defers, or it routes by the router (its own rate). ``matched``: also report the
    metrics at the threshold that defers exactly ``budget`` of *this* split's pixels
    (``matched_*``: methods compared at equal test deferral rates). ``sweep``: the
    risk-coverage curve at this split's score quantiles (:data:`CURVE_BUDGETS`).
    """
    dev = resolve_device(device)
    model, cfg, ck = load_trained(checkpoint_path, dev, overrides)
    if "bolt_on" in ck and not cfg.data:  # add_deferral's checkpoint records no data
        raise ValueError(
            f"checkpoint {checkpoint_path}: written by deferredseg.bolt_on (add_deferral), it "
            "records no data to evaluate on; give the data (--layout, --data) or measure it "
            "in Python with deferredseg.metrics.measure(deferral.policy, deferral.outputs(...))"
        )
    method = method_of(cfg)
    check_evaluation_data(cfg, split)  # an empty split or a bad file, before computing
    ds = build_data(cfg, split)
    E = ck["num_experts"]
    best_expert = ck.get("best_expert", 0)
    val = None  # the validation split, read once when needed
    if method.learns_routing:  # routing channels are the trained experts: by name or refused
        ds = match_experts(ds, cfg, split, ck.get("expert_names"), build_data)
    else:  # the base segmentor does not depend on the experts: evaluate it with these
        E = ds.info.num_experts
        val = build_data(cfg, "val")
        best_expert = best_single_expert(val, E)
    if ds.info.num_experts != E:
        raise ValueError(
            f"the checkpoint was trained with {E} experts, the {split} data has "
            f"{ds.info.num_experts}"
        )
    policy = _policy(ck, cfg, E, best_expert, overrides)
    if policy.defers and policy.mode != "router" and threshold is None and val is None:
        # calibration reads the experts' labels too (the expert choice): the trained ones
        val = match_experts(build_data(cfg, "val"), cfg, "val", ck.get("expert_names"), build_data)
    metrics, examples = evaluate_outputs(
        policy,
        None if val is None else network_outputs(model, val, cfg, E, best_expert, dev),
        network_outputs(model, ds, cfg, E, best_expert, dev),
        budget=cfg.budget if budget is None else budget,
        threshold=threshold,
        matched=matched,
        sweep=sweep,
        with_hd95=with_hd95,
        backend=cfg.backend,
        keep_examples=4 if figures else 0,
    )
    for i, ex in enumerate(examples):  # the images shown next to their routing
        item = ds[i]
        ex.update(id=item["id"], image=item["image"])
    metrics.update(
        method=cfg.method,
        split=split,
        checkpoint=str(checkpoint_path),
        expert_names=list(ds.info.expert_names),
        # each expert's share of the deferred pixels, by name (the evaluator's list is in
        # the order of the routing channels, which is that of expert_names)
        expert_share=dict(zip(ds.info.expert_names, metrics["expert_share"])),
        selection={"by": cfg.selection, "budget": cfg.budget, "val": ck.get("val")},
    )
    if out:
        _write(
            metrics,
            examples if figures else None,
            Path(out),
            cfg,
            ds.info,
            Path(checkpoint_path).parent / "log.jsonl",
        )
    return metrics


def evaluate_outputs(
    policy: DeferralPolicy,
    val_data: Optional[Callable[[], Iterator[Batch]]],
    test_data: Callable[[], Iterator[Batch]],
    budget: float,
    threshold: Optional[float] = None,
    matched: bool = False,
    sweep: bool = True,
    with_hd95: bool = False,
    backend: str = "auto",
    keep_examples: int = 0,
) -> Tuple[Dict[str, Any], List[Dict[str, torch.Tensor]]]:
    """Evaluation of any network's outputs at a budget: ``policy`` calibrated for
    ``budget`` on ``val_data`` (unless ``threshold`` fixes it, it never defers, or it
    routes by the router at its own rate), then measured on ``test_data``
    (:func:`deferredseg.metrics.measure`). ``matched``: also the metrics at the threshold
    that defers exactly ``budget`` of the test pixels (``matched_*``); ``sweep``: the
    risk-coverage curve at the test split's score quantiles (:data:`CURVE_BUDGETS`).
    The data are functions returning a new pass of (packed logits, target, expert
    labels) batches (:func:`network_outputs`)."""
    if not policy.defers or policy.mode == "router":
        budget, source = None, "its own rate" if policy.mode == "router" else "never defers"
    elif threshold is not None:
        policy = policy.with_threshold(threshold)
        budget, source = None, "fixed threshold"
    else:
        if val_data is None:
            raise ValueError("a budget needs validation outputs (val_data) to calibrate on")
        policy = policy.calibrate(val_data, budget)
        source = "validation split"
    budgets = list(CURVE_BUDGETS) if sweep else []
    if matched and budget is not None and budget not in budgets:
        budgets.append(budget)
    curve = policy.sweep(test_data, sorted(budgets)) if budgets else []
    metrics, examples = measure(policy, test_data, curve, with_hd95, backend, keep_examples)
    if matched and budget is not None:
        point = next(c for c in metrics["risk_coverage"] if c["budget"] == budget)
        metrics.update(
            {
                "matched_system_dice": point["system_dice"],
                "matched_deferral_rate": point["deferral_rate"],
                "matched_deferral_components_per_image": point["deferral_components_per_image"],
            }
        )
    metrics.update(budget=budget, threshold_source=source, policy=policy.to_dict())
    return metrics, examples


def _policy(
    ck: Dict[str, Any],
    cfg: TrainConfig,
    num_experts: int,
    best_expert: int,
    overrides: Optional[Dict[str, Any]],
) -> DeferralPolicy:
    """The checkpoint's policy, or the method's own where ``overrides`` change how it
    routes (``route_mode``, ``expert_cost``, ``expert_choice``): that one is calibrated anew."""
    routing_changed = any(
        (overrides or {}).get(k) is not None for k in ("route_mode", "expert_cost")
    )
    if routing_changed or not method_of(cfg).learns_routing:
        return policy_for(cfg, num_experts, best_expert)
    return checkpoint_policy(ck, cfg)


def _write(
    metrics: Dict[str, Any],
    examples: Optional[List[Dict[str, torch.Tensor]]],
    out_dir: Path,
    cfg: TrainConfig,
    info,
    log_path: Path,
) -> None:
    """metrics.json in ``out_dir``; with ``examples``, the figures too (listed in it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "metrics.json", metrics)
    if examples is None:
        return
    from . import figures as figs  # here: it imports matplotlib, which only figures need

    paths = figs.save_examples(
        examples,
        out_dir / "examples.png",
        cfg.num_classes,
        list(info.expert_names),
        figs.reference_name(info.target),
    )
    paths += figs.plot_risk_coverage(
        {cfg.method: metrics["risk_coverage"]},
        out_dir / "risk_coverage.png",
        {
            f"operating point: {metrics['deferral_rate']:.1%} deferred, threshold "
            f"{_fmt(metrics.get('threshold'))} ({metrics['threshold_source']})": (
                metrics["deferral_rate"],
                metrics["system_dice"],
            )
        },
    )
    base_log = log_path.parent / "base" / "log.jsonl"  # stage 1 of two-stage training
    logs = (
        [("stage 1: base segmentor", base_log), ("stage 2: routing heads", log_path)]
        if base_log.exists()
        else [("training", log_path)]
    )
    paths += figs.plot_training_curves(logs, out_dir / "training_curves.png")
    metrics["figures"] = [str(p) for p in paths]
    atomic_write_json(out_dir / "metrics.json", metrics)


def _fmt(value: Optional[float]) -> str:
    return "none" if value is None else f"{value:.4g}"
