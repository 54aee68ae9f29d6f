"""Two-stage training: the base segmentor first, then the routing heads on its frozen features.

Stage 1 is the ordinary loop with the segmentation loss alone (the ``model-only``
method), or a given ``base_checkpoint``. Stage 2 freezes the backbone and the
segmentation head, computes once what the routing heads read (the features and
the segmentation logits of every training and validation image: there is no
augmentation in this loop and the experts' labels are fixed per image), and
trains only the heads on those tensors, with the whole objective. The routing
then cannot degrade the segmentation, and the second stage costs a fraction of
the first. The epoch kept is the one with the best validation system Dice at
the deferral budget (or risk-coverage area), with the threshold chosen for that
budget on the validation split.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from .config import TrainConfig
from .methods import BASE_METHOD, packed_logits

__all__ = ["cache_head_inputs", "fit_heads", "budget_metrics"]


@torch.no_grad()
def cache_head_inputs(
    model: nn.Module, dataset, cfg: TrainConfig, device: torch.device
) -> Dict[str, torch.Tensor]:
    """Segmentation logits, head inputs, targets and expert labels of every image (on the CPU)."""
    from monai.data import DataLoader

    model.eval()
    parts: Dict[str, List[torch.Tensor]] = {"seg": [], "head_in": [], "target": [], "experts": []}
    for batch in DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.workers
    ):
        seg, head_in = model.head_inputs(batch["image"].to(device))
        parts["seg"].append(seg.float().cpu())
        parts["head_in"].append(head_in.float().cpu())
        parts["target"].append(batch["target"])
        parts["experts"].append(batch["expert_labels"])
    return {k: torch.cat(v) for k, v in parts.items()}


@torch.no_grad()
def packed_from_cache(
    model: nn.Module,
    cache: Dict[str, torch.Tensor],
    cfg: TrainConfig,
    device: torch.device,
    num_experts: int,
    best_expert: int,
) -> torch.Tensor:
    out = []
    step = max(cfg.batch_size, 8)
    for i in range(0, len(cache["seg"]), step):
        seg = cache["seg"][i : i + step].to(device)
        hin = cache["head_in"][i : i + step].to(device)
        out.append(
            packed_logits(cfg, model.heads_forward(seg, hin), num_experts, best_expert).cpu()
        )
    return torch.cat(out)


def budget_metrics(
    logits: torch.Tensor,
    target: torch.Tensor,
    experts: torch.Tensor,
    cfg: TrainConfig,
    num_experts: int,
    budget: float,
    threshold: Optional[float] = None,
) -> Dict[str, Any]:
    """System and model Dice, deferral rate and the threshold at ``budget`` on these logits.

    The threshold is chosen on these same pixels unless given.
    """
    from ..metrics import per_image_scores
    from .methods import route_mode
    from .routing import budget_threshold, deferral_score, route_logits

    K, E = cfg.num_classes, num_experts
    valid = target != -100
    mode = route_mode(cfg)  # the mode evaluation uses, so selection and evaluation agree
    if threshold is None and mode != "router":
        s = deferral_score(logits, K, E, mode, cfg.route_scores, cfg.expert_cost)
        threshold = budget_threshold(s[valid].numpy(), budget, mode)
    out = route_logits(
        logits,
        K,
        E,
        mode,
        0.5 if threshold is None else threshold,
        experts,
        cfg.route_scores,
        cfg.expert_cost,
        backend=cfg.backend,
    )
    nl = max(K, 2)
    sys_d = per_image_scores(out.final, target, nl, None, -100, False)["dice"]
    mod_d = per_image_scores(out.model_pred, target, nl, None, -100, False)["dice"]
    finite = lambda xs: [x for x in xs if not math.isnan(x)]  # noqa: E731
    rate = float(((out.assignment >= 0) & valid).sum()) / max(int(valid.sum()), 1)
    return {
        "system_dice": float(np.mean(finite(sys_d))) if finite(sys_d) else None,
        "model_dice": float(np.mean(finite(mod_d))) if finite(mod_d) else None,
        "deferral_rate": rate,
        "threshold": threshold,
    }


def rc_area(logits, target, experts, cfg: TrainConfig, num_experts: int) -> float:
    """Mean system Dice over the budgets 0, 5, ..., 30% (a cheap risk-coverage area)."""
    vals = [
        budget_metrics(logits, target, experts, cfg, num_experts, b)["system_dice"] or 0.0
        for b in (0.0, 0.05, 0.1, 0.2, 0.3)
    ]
    return float(np.mean(vals))


def fit_heads(
    model: nn.Module,
    train_cache: Dict[str, torch.Tensor],
    val_cache: Dict[str, torch.Tensor],
    cfg: TrainConfig,
    loss_fn,
    device: torch.device,
    num_experts: int,
    best_expert: int,
    log=None,
    on_epoch=None,
) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """Train the routing heads of ``model`` on cached inputs; keep the best epoch's weights.

    ``loss_fn(logits, target, experts) -> (loss, terms)``. Returns the best
    validation metrics and the per-epoch history; the model ends with the best heads.
    Epochs are numbered from 1 (0: the heads as initialised). ``on_epoch(epoch, metrics,
    mean terms)`` is called after each epoch's validation (the line printed per epoch).
    """
    params = model.head_parameters()
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.head_lr, weight_decay=cfg.weight_decay)
    n = len(train_cache["seg"])
    steps = max(math.ceil(n / cfg.batch_size) * cfg.head_epochs, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    best_score, best_state, best_metrics = -math.inf, None, {}
    history: List[Dict[str, Any]] = []
    step = 0

    def consider(epoch: int) -> Dict[str, Any]:
        nonlocal best_score, best_state, best_metrics
        logits = packed_from_cache(model, val_cache, cfg, device, num_experts, best_expert)
        m = budget_metrics(
            logits, val_cache["target"], val_cache["experts"], cfg, num_experts, cfg.budget
        )
        score = (
            (m["system_dice"] or 0.0)
            if cfg.selection == "budget-dice"
            else rc_area(logits, val_cache["target"], val_cache["experts"], cfg, num_experts)
        )
        m["selection_score"] = score
        history.append({"epoch": epoch, "step": step, **m})
        if log is not None:
            log.write(
                event="epoch",
                stage=2,
                epoch=epoch,
                selection=cfg.selection,
                budget=cfg.budget,
                **{f"val_{k}": v for k, v in m.items()},
            )
        if score > best_score:
            best_score, best_metrics = score, dict(m, epoch=epoch, step=step)
            best_state = [p.detach().clone() for p in params]
        return m

    consider(0)  # the heads as initialised (with the uncertainty prior: confidence deferral)
    for epoch in range(1, cfg.head_epochs + 1):
        model.train()
        sums: Dict[str, float] = {}
        batches = 0
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            seg = train_cache["seg"][idx].to(device)
            hin = train_cache["head_in"][idx].to(device)
            out = model.heads_forward(seg, hin)
            loss, terms = loss_fn(
                out, train_cache["target"][idx].to(device), train_cache["experts"][idx].to(device)
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            batches += 1
            for k, v in [("loss", loss), *terms.items()]:
                if k != "pbar":
                    sums[k] = sums.get(k, 0.0) + float(v.detach() if hasattr(v, "detach") else v)
            if log is not None:
                log.write(
                    event="step",
                    stage=2,
                    epoch=epoch,
                    step=step,
                    loss=float(loss.detach()),
                    **{k: float(v) for k, v in terms.items() if k != "pbar"},
                )
            if cfg.max_steps and step >= cfg.max_steps:
                break  # --max-steps bounds this stage too
        m = consider(epoch)
        if on_epoch is not None:
            on_epoch(epoch, m, {k: v / max(batches, 1) for k, v in sums.items()})
        if cfg.max_steps and step >= cfg.max_steps:
            if log is not None:
                log.write(event="stopped", stage=2, reason="max_steps", step=step)
            break
    if best_state is not None:
        with torch.no_grad():
            for p, v in zip(params, best_state):
                p.copy_(v)
    model.eval()
    return best_metrics, history


def base_config(cfg: TrainConfig) -> TrainConfig:
    """The configuration of stage 1: the segmentation loss alone, in the joint loop."""
    return dataclasses.replace(
        cfg,
        method=BASE_METHOD,
        training="joint",
        heads="linear",
        out=str(Path(cfg.out) / "base") if cfg.out else None,
        seeds=None,
    )


def load_base(model: nn.Module, path, device: torch.device) -> None:
    """Copy the backbone and segmentation head of a trained checkpoint into ``model``."""
    from .checkpoint import load_checkpoint

    ck = load_checkpoint(path, map_location=device)
    state = {k: v for k, v in ck["model"].items() if k.startswith(("backbone.", "seg_head."))}
    if not state:
        raise ValueError(f"base_checkpoint {path}: holds no backbone weights (keys 'backbone.*')")
    missing = [
        k for k in model.state_dict() if k.startswith(("backbone.", "seg_head.")) and k not in state
    ]
    if missing:
        raise ValueError(
            f"base_checkpoint {path}: does not match this model; missing {missing[:5]} "
            "(same backbone, features and number of classes are needed)"
        )
    model.load_state_dict(state, strict=False)
