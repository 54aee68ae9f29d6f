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
from typing import Any, Dict, List, Tuple

import torch
import torch.nn as nn

from ..metrics import evaluate_policy
from .config import TrainConfig
from .methods import BASE_METHOD, packed_logits, policy_for

__all__ = ["cache_head_inputs", "cached_outputs", "fit_heads"]


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


def cached_outputs(
    model: nn.Module,
    cache: Dict[str, torch.Tensor],
    cfg: TrainConfig,
    device: torch.device,
    num_experts: int,
    best_expert: int,
):
    """A function returning a new pass of ``(packed logits, target, expert labels)``
    batches of the heads over cached inputs: what the policy is calibrated and measured on."""

    def batches():
        step = max(cfg.batch_size, 8)
        with torch.no_grad():
            for i in range(0, len(cache["seg"]), step):
                seg = cache["seg"][i : i + step].to(device)
                hin = cache["head_in"][i : i + step].to(device)
                out = packed_logits(cfg, model.heads_forward(seg, hin), num_experts, best_expert)
                yield (
                    out,
                    cache["target"][i : i + step].to(device),
                    cache["experts"][i : i + step].to(device),
                )

    return batches


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
) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """Train the routing heads of ``model`` on cached inputs; keep the best epoch's weights.

    ``loss_fn(logits, target, experts) -> (loss, terms)``. Returns the best
    validation metrics and the per-epoch history; the model ends with the best heads.
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

    policy = policy_for(cfg, num_experts, best_expert)
    val_data = cached_outputs(model, val_cache, cfg, device, num_experts, best_expert)

    def consider(epoch: int) -> None:
        nonlocal best_score, best_state, best_metrics
        model.eval()
        _, m = evaluate_policy(policy, val_data, cfg.budget, cfg.selection, False, cfg.backend)
        score = m["selection_score"] or 0.0
        history.append({"epoch": epoch, **_scalar_items(m)})
        if log is not None:
            log.write(
                event="epoch",
                stage=2,
                epoch=epoch,
                selection=cfg.selection,
                budget=cfg.budget,
                **{f"val_{k}": v for k, v in _scalar_items(m).items()},
            )
        if score > best_score:
            best_score, best_metrics = score, dict(m, epoch=epoch)
            best_state = [p.detach().clone() for p in params]

    consider(-1)  # the heads as initialised (with the uncertainty prior: confidence deferral)
    for epoch in range(cfg.head_epochs):
        model.train()
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
            if log is not None:
                log.write(
                    event="step",
                    stage=2,
                    epoch=epoch,
                    step=step,
                    loss=float(loss.detach()),
                    **{k: float(v) for k, v in terms.items() if k != "pbar"},
                )
        consider(epoch)
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


def _scalar_items(metrics: Dict[str, Any]) -> Dict[str, Any]:
    """The numbers of a metrics dict, and its policy record (kept with the best epoch)."""
    out = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) or v is None}
    out["policy"] = metrics["policy"]
    return out
