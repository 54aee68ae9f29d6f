"""Evaluation: metrics of a network on a split, the threshold for a deferral budget,
and :func:`evaluate`, which does both for a checkpoint and writes metrics and figures.

Every method is evaluated through its packed logits (:func:`~.methods.packed_logits`)
in its routing mode (:func:`~.methods.route_mode`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from deferredseg_kernels import model_correct

from ..metrics import DeferralEvaluator
from .builders import best_single_expert, build_data, load_trained
from .config import TrainConfig
from .datacheck import check_evaluation_data, match_experts
from .distributed import resolve_device
from .methods import method_of, packed_logits, route_mode
from .routing import auroc, budget_threshold, deferral_score, route_logits, uncertainty

__all__ = ["evaluate_model", "threshold_for_budget", "routing_record", "evaluate"]


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    dataset,
    cfg: TrainConfig,
    num_experts: int,
    best_expert: int,
    device: torch.device,
    threshold: Optional[float] = None,
    with_hd95: bool = False,
    thresholds: Optional[Iterable[float]] = None,
    keep_examples: int = 0,
) -> Tuple[Dict[str, Any], List[Dict[str, torch.Tensor]]]:
    """Metrics of ``model`` on ``dataset`` (and the first ``keep_examples`` images' outputs)."""
    from monai.data import DataLoader

    was_training = model.training
    model.eval()
    thr = cfg.threshold if threshold is None else threshold
    kw = {} if thresholds is None else {"thresholds": tuple(thresholds)}
    mode = route_mode(cfg)
    ev = DeferralEvaluator(
        cfg.num_classes,
        num_experts,
        threshold=thr,
        mode=mode,
        with_hd95=with_hd95,
        backend=cfg.backend,
        scores=cfg.route_scores,
        expert_cost=cfg.expert_cost,
        **kw,
    )
    score_parts, wrong_parts, unc_parts = [], [], []
    examples: List[Dict[str, torch.Tensor]] = []
    for batch in DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.workers
    ):
        x = batch["image"].to(device)
        target = batch["target"].to(device)
        experts = batch["expert_labels"].to(device)
        logits = packed_logits(cfg, model(x), num_experts, best_expert)
        ev.update(logits, target, experts, batch.get("spacing"))
        valid = target != -100
        z = logits[:, : cfg.num_classes]
        wrong = ~model_correct(z, target, cfg.num_classes)
        score_parts.append(
            deferral_score(
                logits, cfg.num_classes, num_experts, mode, cfg.route_scores, cfg.expert_cost
            )[valid].cpu()
        )
        unc_parts.append(uncertainty(z, cfg.num_classes)[valid].cpu())
        wrong_parts.append(wrong[valid].cpu())
        if len(examples) < keep_examples:
            out = route_logits(
                logits,
                cfg.num_classes,
                num_experts,
                mode,
                thr,
                experts,
                cfg.route_scores,
                cfg.expert_cost,
                backend=cfg.backend,
            )
            for b in range(x.shape[0]):
                if len(examples) < keep_examples:
                    examples.append(
                        {
                            "id": batch["id"][b],
                            "image": x[b].cpu(),
                            "target": target[b].cpu(),
                            "assignment": out.assignment[b].cpu(),
                            "final": out.final[b].cpu(),
                            "model_pred": out.model_pred[b].cpu(),
                            "defer_prob": out.defer_prob[b].cpu(),
                        }
                    )
    model.train(was_training)
    res = ev.result()
    if score_parts:
        wrong_all = torch.cat(wrong_parts)
        res["route_mode"] = mode
        res["auroc_model_wrong_score"] = auroc(torch.cat(score_parts), wrong_all)
        res["auroc_model_wrong_uncertainty"] = auroc(torch.cat(unc_parts), wrong_all)
    return res, examples


def routing_record(cfg: TrainConfig, threshold: Optional[float]) -> Dict[str, Any]:
    """How a checkpoint routes (``best.pt["routing"]``, read by predict): the mode, the
    budget and the threshold chosen for it on the validation split, scores, costs."""
    return {
        "mode": route_mode(cfg),
        "budget": cfg.budget,
        "threshold": threshold,
        "scores": cfg.route_scores,
        "expert_cost": cfg.expert_cost,
        "selection": cfg.selection,
    }


@torch.no_grad()
def threshold_for_budget(
    model: nn.Module,
    dataset,
    cfg: TrainConfig,
    num_experts: int,
    best_expert: int,
    device: torch.device,
    budget: float,
) -> float:
    """The gate threshold at which ``model`` defers a ``budget`` fraction of ``dataset``'s pixels.

    Works for every method through its packed gate (the confidence baseline's gate
    is its uncertainty, L2D's the defer-vs-best-class margin), so methods can be
    compared at the same deferral rate. Choose it on a validation split.
    """
    from monai.data import DataLoader

    if not 0.0 <= budget <= 1.0:
        raise ValueError(f"budget must be in [0, 1], got {budget}")
    mode = route_mode(cfg)
    was_training = model.training
    model.eval()
    scores = []
    for batch in DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False):
        logits = packed_logits(cfg, model(batch["image"].to(device)), num_experts, best_expert)
        valid = batch["target"].to(device) != -100
        s = deferral_score(
            logits, cfg.num_classes, num_experts, mode, cfg.route_scores, cfg.expert_cost
        )
        scores.append(s[valid].double().cpu())
    model.train(was_training)
    return budget_threshold(torch.cat(scores).numpy(), budget, mode)


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

    ``budget``: instead of a fixed ``threshold``, the one at which the model defers
    that fraction of the pixels of the validation split (the deferral budget).
    Without either, the training configuration's budget is used. ``matched``:
    also report the metrics at the threshold that defers exactly ``budget`` of
    *this* split's pixels (``matched_*``: methods compared at equal test
    deferral rates).
    """
    dev = resolve_device(device)
    model, cfg, ck = load_trained(checkpoint_path, dev, overrides)
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
    if threshold is None and budget is None:
        budget = cfg.budget
    if not method.defers:  # the base segmentor alone never defers
        threshold, budget = 1.0, None
    if route_mode(cfg) == "router":
        threshold, budget = 0.5, None  # the router's argmax decides, at its own rate
    if budget is not None:
        val = build_data(cfg, "val") if val is None else val
        threshold = threshold_for_budget(model, val, cfg, E, best_expert, dev, budget)
    metrics, examples = evaluate_model(
        model,
        ds,
        cfg,
        E,
        best_expert,
        dev,
        threshold=threshold,
        with_hd95=with_hd95,
        keep_examples=4 if figures else 0,
        thresholds=None if sweep else (threshold,),
    )
    if matched and budget is not None:
        t_test = threshold_for_budget(model, ds, cfg, E, best_expert, dev, budget)
        m2, _ = evaluate_model(
            model,
            ds,
            cfg,
            E,
            best_expert,
            dev,
            threshold=t_test,
            with_hd95=False,
            thresholds=(t_test,),
        )
        metrics.update(
            {
                f"matched_{k}": m2[k]
                for k in ("system_dice", "deferral_rate", "deferral_components_per_image")
            }
        )
    metrics.update(
        method=cfg.method,
        threshold=cfg.threshold if threshold is None else threshold,
        budget=budget,
        split=split,
        checkpoint=str(checkpoint_path),
        expert_names=list(ds.info.expert_names),
        # each expert's share of the deferred pixels, by name (the evaluator's list is in
        # the order of the routing channels, which is that of expert_names)
        expert_share=dict(zip(ds.info.expert_names, metrics["expert_share"])),
        route_mode=route_mode(cfg),
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
    with open(out_dir / "metrics.json", "w") as f:
        json.dump(metrics, f, indent=2)
    if examples is None:
        return
    from . import figures as figs

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
        {cfg.method: (metrics["deferral_rate"], metrics["system_dice"])},
    )
    if log_path.exists():
        paths += figs.plot_training_curves(log_path, out_dir / "training_curves.png")
    metrics["figures"] = [str(p) for p in paths]
    with open(out_dir / "metrics.json", "w") as f:
        json.dump(metrics, f, indent=2)
