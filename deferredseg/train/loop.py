"""The slim training and evaluation loop (no training framework).

One function trains (:func:`train`), one evaluates a checkpoint
(:func:`evaluate`); both work for every method of the comparison
(``config.METHODS``), so baselines run through the very same loop:

- ``deferredseg``: the full objective; ``no-coherence`` / ``no-balance``: without
  that term;
- ``model-only``: the base segmentor alone (segmentation loss only, never defers);
- ``confidence``: the same base segmentor, deferring its least confident pixels
  to the best single expert, at a deferral rate matched to another run;
- ``l2d-single``: single-expert learning to defer (Mozannar and Sontag): a softmax
  over the K' classes and one "defer" output, trained with their surrogate,
  deferring to the best single expert.

Under ``torchrun`` the loop uses DistributedDataParallel with
``sync_balance=True``, a distributed sampler, and writes logs and checkpoints on
rank 0 only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..losses import DeferredSegLoss
from ..metrics import DeferralEvaluator
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from deferredseg_kernels.reference import model_correct

from .routing import auroc, budget_threshold, deferral_score, route_logits, uncertainty
from .datacheck import check_evaluation_data, check_training_data, checkpoint_record, match_experts
from .report import EpochMeter
from .rundir import RunDir, open_run

BIG = 1e4  # a logit that rules an option out


# ----------------------------------------------------------------------------- setup


class DistInfo:
    """Rank and world size; a process group is created when torchrun launched us."""

    def __init__(self, device: torch.device) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owns_group = False
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.owns_group = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but no CUDA device is available")
    if name == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return torch.device(name)


def _expert_spec(cfg: TrainConfig, num_labels: int, seed: int):
    from ..experts import ExpertPanel, make_experts

    profile = cfg.expert_profile or ("structured" if cfg.layout == "synthetic" else "same-accuracy")
    panel = make_experts(profile, num_labels=num_labels, seed=seed, resample=cfg.resample_experts)
    if cfg.experts is not None:
        if cfg.experts > panel.num_experts:
            raise ValueError(f"experts={cfg.experts} but the {profile!r} profile has "
                             f"{panel.num_experts} experts")
        panel = ExpertPanel(panel.experts[: cfg.experts], num_labels=num_labels, seed=seed,
                            resample=cfg.resample_experts, names=panel.names[: cfg.experts])
    return panel


def build_data(cfg: TrainConfig, split: str, raters: Optional[List[str]] = None):
    """The dataset of ``split`` ("train", "val", "test") described by ``cfg``
    (``raters``: the multirater experts by name, in this order)."""
    from ..data import build_dataset, scan_multirater
    from ..data.scan import parse_label_map

    num_labels = max(cfg.num_classes, 2)
    kw: Dict[str, Any] = dict(num_classes=cfg.num_classes, seed=cfg.seed, split_file=cfg.split_file,
                              spatial_size=cfg.spatial_size)
    if cfg.target is not None:
        kw["target"] = cfg.target
    if cfg.label_map is not None:
        kw["label_map"] = parse_label_map(cfg.label_map)
    if cfg.layout == "multirater":
        if raters is not None:
            kw["raters"] = list(raters)
        elif cfg.experts is not None:
            names = scan_multirater(cfg.data)[1]
            if cfg.experts > len(names):
                raise ValueError(f"experts={cfg.experts} but {cfg.data} has {len(names)} raters")
            kw["raters"] = names[: cfg.experts]
    else:
        kw["experts"] = _expert_spec(cfg, num_labels, cfg.seed)
        kw["resample_experts"] = cfg.resample_experts
    if cfg.layout == "synthetic":
        kw.update(num_images=cfg.num_images, spatial_dims=cfg.spatial_dims,
                  image_size=cfg.image_size)
    return build_dataset(cfg.layout, cfg.data, split, **kw)


class L2DNet(nn.Module):
    """Backbone + one 1x1 head with K' class logits and a final "defer" logit."""

    def __init__(self, backbone: nn.Module, features: int, num_labels: int, spatial_dims: int):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]
        self.backbone = backbone
        self.head = conv(features, num_labels + 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def build_model(cfg: TrainConfig, in_channels: int, num_experts: int) -> nn.Module:
    from ..models import DeferredSegmentor
    from ..models.backbones import build_backbone

    if cfg.method == "l2d-single" and cfg.training == "joint":
        net = build_backbone(cfg.backbone, spatial_dims=cfg.spatial_dims, in_channels=in_channels,
                             features=cfg.features)
        return L2DNet(net, cfg.features, max(cfg.num_classes, 2), cfg.spatial_dims)
    return DeferredSegmentor.from_monai(cfg.backbone, num_classes=cfg.num_classes,
                                       num_experts=num_experts, spatial_dims=cfg.spatial_dims,
                                       in_channels=in_channels, features=cfg.features,
                                       heads=cfg.head_kind, head_channels=cfg.head_channels,
                                       detach_heads=cfg.training == "two-stage")


def build_criterion(cfg: TrainConfig, num_experts: int, sync: bool):
    if cfg.method == "l2d-single":
        return None  # the Mozannar-Sontag loss below
    lambdas = dict(lambda_seg=cfg.lambda_seg, lambda_collab=cfg.lambda_collab,
                   lambda_gate=cfg.lambda_gate, lambda_coherence=cfg.lambda_coherence,
                   lambda_balance=cfg.lambda_balance)
    if cfg.method == "no-coherence":
        lambdas["lambda_coherence"] = 0.0
    elif cfg.method == "no-balance":
        lambdas["lambda_balance"] = 0.0
    elif cfg.method in ("model-only", "confidence"):
        lambdas.update(lambda_collab=0.0, lambda_gate=0.0, lambda_coherence=0.0,
                       lambda_balance=0.0)
    extra: Dict[str, Any] = {}
    if cfg.gate_target != "router":
        extra["gate_target"] = cfg.gate_target
    if cfg.balance_low is not None:
        extra["balance_low"] = list(cfg.balance_low)
    if cfg.balance_high is not None:
        extra["balance_high"] = list(cfg.balance_high)
    return DeferredSegLoss(cfg.num_classes, num_experts, backend=cfg.backend,
                           surrogate=cfg.surrogate, coherence=cfg.coherence, balance=cfg.balance,
                           gate_mse=cfg.gate_mse, gate_sparsity=cfg.gate_sparsity,
                           sync_balance=sync, **extra, **lambdas)


def l2d_loss(out: torch.Tensor, target: torch.Tensor, expert: torch.Tensor,
             ignore_index: int = -100) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Mozannar and Sontag's surrogate: -log p_y - [m == y] log p_defer, over valid pixels."""
    logp = torch.log_softmax(out.float(), dim=1)
    valid = target != ignore_index
    y = torch.where(valid, target, torch.zeros_like(target))
    l = -logp.gather(1, y.unsqueeze(1)).squeeze(1) - (expert == y).float() * logp[:, -1]
    loss = torch.where(valid, l, torch.zeros_like(l)).sum() / valid.sum().clamp_min(1)
    defer = (logp[:, -1].exp() * valid).sum() / valid.sum().clamp_min(1)
    return loss, {"l2d": loss.detach(), "deferral": defer.detach()}


def l2d_outputs(packed: torch.Tensor, num_classes: int) -> torch.Tensor:
    """A DeferredSegmentor's output read as L2D's (K' class logits, one defer logit).

    Two-stage L2D trains only the gate channel as the "defer" logit, against the
    frozen base segmentor's class logits (for K = 1, the logits [0, z]).
    """
    z, a = packed[:, :num_classes], packed[:, -1:]
    classes = torch.cat([torch.zeros_like(z), z], dim=1) if num_classes == 1 else z
    return torch.cat([classes, a], dim=1)


# ----------------------------------------------------------------------------- packing


def packed_logits(cfg: TrainConfig, model_out: torch.Tensor, num_experts: int,
                  best_expert: int) -> torch.Tensor:
    """Every method's output as SPEC packed logits, so one evaluator serves them all."""
    K, E = cfg.num_classes, num_experts
    out = model_out.float()
    if cfg.method == "l2d-single" and cfg.training == "two-stage":
        out = l2d_outputs(out, K)
    if cfg.method == "l2d-single":
        classes, defer = out[:, :-1], out[:, -1]
        z = (classes[:, 1:2] - classes[:, :1]) if K == 1 else classes
        top = classes.amax(dim=1)
        r = torch.full((out.shape[0], E + 1) + tuple(out.shape[2:]), -BIG, device=out.device)
        r[:, best_expert] = defer
        r[:, E] = top
        return torch.cat([z, r, (defer - top).unsqueeze(1)], dim=1)
    if cfg.method in ("model-only", "confidence"):
        z = out[:, :K]
        r = torch.full((out.shape[0], E + 1) + tuple(out.shape[2:]), -BIG, device=out.device)
        r[:, best_expert] = 0.0
        if cfg.method == "model-only":
            a = torch.full_like(z[:, 0], -BIG)  # never defers
        else:
            # defer where uncertainty > t: the gate's probability is the uncertainty itself
            a = torch.logit(uncertainty(z, K).clamp(1e-6, 1 - 1e-6))
        return torch.cat([z, r, a.unsqueeze(1)], dim=1)
    return out


# ----------------------------------------------------------------------------- loop


def _schedule(cfg: TrainConfig, steps_per_epoch: int):
    total = max(cfg.epochs * steps_per_epoch, 1)
    if cfg.schedule == "cosine":
        return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    if cfg.schedule == "step":
        return lambda step: cfg.gamma ** ((step // max(steps_per_epoch, 1)) // cfg.step_size)
    return lambda step: 1.0


def _batches(dataset, cfg: TrainConfig, epoch: int, info: DistInfo, skip: int):
    """This rank's micro-batches of ``epoch``, after skipping the first ``skip``."""
    from monai.data import DataLoader
    from torch.utils.data import Subset
    from torch.utils.data.distributed import DistributedSampler

    sampler = DistributedSampler(dataset, num_replicas=info.world, rank=info.rank, shuffle=True,
                                 seed=cfg.seed, drop_last=False)
    sampler.set_epoch(epoch)
    idx = list(sampler)[skip * cfg.batch_size:]
    return DataLoader(Subset(dataset, idx), batch_size=cfg.batch_size, shuffle=False,
                      num_workers=cfg.workers)


def _micro_batches_per_epoch(n: int, cfg: TrainConfig, world: int) -> int:
    per_rank = math.ceil(n / world)
    return math.ceil(per_rank / cfg.batch_size)


def best_single_expert(dataset, num_experts: int, ignore_index: int = -100) -> int:
    """The expert that agrees most often with the target on ``dataset``."""
    hits = torch.zeros(num_experts)
    for i in range(len(dataset)):
        item = dataset[i]
        t, m = item["target"], item["expert_labels"]
        valid = t != ignore_index
        hits += ((m == t.unsqueeze(0)) & valid.unsqueeze(0)).flatten(1).sum(1).float()
    return int(hits.argmax())


class JsonLog:
    def __init__(self, path: Optional[Path], enabled: bool) -> None:
        self.path = path if enabled else None

    def write(self, **record: Any) -> None:
        if self.path is None:
            return
        record["time"] = time.time()
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _to_float(v):
    return float(v.item()) if isinstance(v, torch.Tensor) and v.numel() == 1 else v


@torch.no_grad()
def evaluate_model(model: nn.Module, dataset, cfg: TrainConfig, num_experts: int,
                   best_expert: int, device: torch.device, threshold: Optional[float] = None,
                   with_hd95: bool = False,
                   thresholds: Optional[Iterable[float]] = None,
                   keep_examples: int = 0) -> Tuple[Dict[str, Any], List[Dict[str, torch.Tensor]]]:
    """Metrics of ``model`` on ``dataset`` (and the first ``keep_examples`` images' outputs)."""
    from monai.data import DataLoader

    was_training = model.training
    model.eval()
    thr = cfg.threshold if threshold is None else threshold
    kw = {} if thresholds is None else {"thresholds": tuple(thresholds)}
    mode = route_mode(cfg)
    ev = DeferralEvaluator(cfg.num_classes, num_experts, threshold=thr, mode=mode,
                           with_hd95=with_hd95, backend=cfg.backend, scores=cfg.route_scores,
                           expert_cost=cfg.expert_cost, **kw)
    score_parts, wrong_parts, unc_parts = [], [], []
    examples: List[Dict[str, torch.Tensor]] = []
    for batch in DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False,
                            num_workers=cfg.workers):
        x = batch["image"].to(device)
        target = batch["target"].to(device)
        experts = batch["expert_labels"].to(device)
        logits = packed_logits(cfg, model(x), num_experts, best_expert)
        ev.update(logits, target, experts)
        valid = target != -100
        z = logits[:, :cfg.num_classes]
        wrong = ~model_correct(z, target, cfg.num_classes)
        score_parts.append(deferral_score(logits, cfg.num_classes, num_experts, mode,
                                          cfg.route_scores, cfg.expert_cost)[valid].cpu())
        unc_parts.append(uncertainty(z, cfg.num_classes)[valid].cpu())
        wrong_parts.append(wrong[valid].cpu())
        if len(examples) < keep_examples:
            out = route_logits(logits, cfg.num_classes, num_experts, mode, thr, experts,
                               cfg.route_scores, cfg.expert_cost, backend=cfg.backend)
            for b in range(x.shape[0]):
                if len(examples) < keep_examples:
                    examples.append({"id": batch["id"][b], "image": x[b].cpu(), "target": target[b].cpu(),
                                     "assignment": out.assignment[b].cpu(),
                                     "final": out.final[b].cpu(),
                                     "model_pred": out.model_pred[b].cpu(),
                                     "defer_prob": out.defer_prob[b].cpu()})
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
    return {"mode": route_mode(cfg), "budget": cfg.budget, "threshold": threshold,
            "scores": cfg.route_scores, "expert_cost": cfg.expert_cost, "selection": cfg.selection}


def route_mode(cfg: TrainConfig) -> str:
    """The routing mode a method is evaluated in (baselines route through their packed gate)."""
    if cfg.method in ("model-only", "confidence", "l2d-single"):
        return "gate"
    return cfg.route_mode


@torch.no_grad()
def threshold_for_budget(model: nn.Module, dataset, cfg: TrainConfig, num_experts: int,
                         best_expert: int, device: torch.device, budget: float) -> float:
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
        s = deferral_score(logits, cfg.num_classes, num_experts, mode, cfg.route_scores,
                           cfg.expert_cost)
        scores.append(s[valid].double().cpu())
    model.train(was_training)
    return budget_threshold(torch.cat(scores).numpy(), budget, mode)


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Train one model as ``cfg`` says; returns the best validation metrics and paths."""
    cfg.validate()
    cfg = check_training_data(cfg)  # every file's header, dims from the files, split sizes
    device = resolve_device(cfg.device)
    info = DistInfo(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    out_dir = Path(cfg.out) if cfg.out else None
    run = None
    try:
        run = open_run(cfg, info.is_main)  # checks, locks (and moves aside) --out; signals
        for note in run.notes:
            print(f"note: {note}", file=sys.stderr)
        log = JsonLog(out_dir / "log.jsonl" if out_dir else None, info.is_main)
        if cfg.training == "two-stage" and cfg.method not in ("model-only", "confidence"):
            return _train_two_stage(cfg, device, info, out_dir, log, run)
        return _train(cfg, device, info, out_dir, log, run)
    finally:
        if run is not None:
            run.close()
        info.close()


def _data_and_model(cfg: TrainConfig, device: torch.device):
    """(train set, validation set, E, input channels, model on ``device``), seeded."""
    torch.manual_seed(cfg.seed)
    train_ds = build_data(cfg, "train")
    val_ds = build_data(cfg, "val")
    E = train_ds.info.num_experts
    in_channels = int(train_ds[0]["image"].shape[0])
    return train_ds, val_ds, E, in_channels, build_model(cfg, in_channels, E).to(device)


def _train(cfg: TrainConfig, device: torch.device, info: DistInfo, out_dir: Optional[Path],
           log: JsonLog, run: Optional[RunDir] = None) -> Dict[str, Any]:
    train_ds, val_ds, E, in_channels, model = _data_and_model(cfg, device)
    criterion = build_criterion(cfg, E, sync=info.world > 1)
    best_expert = best_single_expert(val_ds, E) if cfg.method in (
        "confidence", "l2d-single", "model-only") else 0
    ddp_model = model
    if info.world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    micro = _micro_batches_per_epoch(len(train_ds), cfg, info.world)
    steps_per_epoch = math.ceil(micro / cfg.grad_accum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg, steps_per_epoch))
    amp = cfg.amp if cfg.amp is not None else device.type == "cuda"

    start_epoch, skip, global_step, best, stale = 0, 0, 0, -1.0, 0
    last_path = out_dir / "last.pt" if out_dir else None
    if cfg.resume:
        if last_path is None or not last_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {last_path}")
        ck = load_checkpoint(last_path, map_location=device)
        if list(ck.get("expert_names") or train_ds.info.expert_names) != list(train_ds.info.expert_names):
            raise ValueError(f"--resume: {last_path} was trained with experts {ck['expert_names']}, "
                             f"the data now give {list(train_ds.info.expert_names)}; experts cannot "
                             f"change in a resumed run")
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        start_epoch, skip = ck["epoch"], ck["step_in_epoch"] * cfg.grad_accum
        global_step, best, stale = ck["global_step"], ck["best"], ck["stale"]
        torch.set_rng_state(ck["rng"])
        log.write(event="resume", epoch=start_epoch, step=global_step)

    def checkpoint(path: Path, epoch: int, step_in_epoch: int, extra: Dict[str, Any]) -> None:
        if info.is_main and path is not None:
            save_checkpoint(path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch,
                "step_in_epoch": step_in_epoch, "global_step": global_step, "best": best,
                "stale": stale, "rng": torch.get_rng_state(), "config": cfg.to_dict(),
                "num_experts": E, "in_channels": in_channels, "best_expert": best_expert,
                "expert_names": list(train_ds.info.expert_names),
                **checkpoint_record(cfg, train_ds.info.expert_names), **extra})

    stopped_early = False
    best_rate = None
    history: List[Dict[str, Any]] = []
    for epoch in range(start_epoch, cfg.epochs):
        loader = _batches(train_ds, cfg, epoch, info, skip)
        step_in_epoch = skip // cfg.grad_accum
        skip = 0
        bar = _progress(loader, cfg, info, epoch)
        ddp_model.train()
        optimizer.zero_grad(set_to_none=True)
        pending = 0
        meter = EpochMeter()  # the epoch's mean loss terms, for the line printed per epoch
        for i, batch in enumerate(bar):
            x = batch["image"].to(device)
            target = batch["target"].to(device)
            experts = batch["expert_labels"].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = ddp_model(x)
            if criterion is None:
                loss, terms = l2d_loss(out, target, experts[:, best_expert])
            else:
                loss = criterion(out, target, experts)
                terms = dict(criterion.last_terms)
                terms["deferral"] = terms["pbar"][:E].sum()
            (loss / cfg.grad_accum).backward()
            pending += 1
            last_micro = (i == len(loader) - 1)
            if pending == cfg.grad_accum or last_micro:
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                pending = 0
                global_step += 1
                step_in_epoch += 1
                record = {k: _to_float(v) for k, v in terms.items() if k != "pbar"}
                record.update(loss=float(loss.detach()), lr=scheduler.get_last_lr()[0])
                meter.add(record)
                log.write(event="step", epoch=epoch, step=global_step, **record)
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k != "lr"})
                if cfg.checkpoint_every and global_step % cfg.checkpoint_every == 0:
                    checkpoint(last_path, epoch, step_in_epoch, {})
                if run is not None:  # SIGINT / SIGTERM: last.pt of this very step, then stop
                    run.check_interrupt(lambda: checkpoint(last_path, epoch, step_in_epoch, {}),
                                        epoch, global_step)
                if cfg.max_steps and global_step >= cfg.max_steps:
                    checkpoint(last_path, epoch, step_in_epoch, {})
                    log.write(event="stopped", reason="max_steps", step=global_step)
                    return {"stopped": True, "global_step": global_step}
        # validation on rank 0; the decision to stop is shared with the other ranks
        metrics: Dict[str, Any] = {}
        if info.is_main:
            # select what will be used: the system at the deferral budget, its threshold
            # chosen on this split (the base segmentor alone never defers)
            thr = 1.0 if cfg.method == "model-only" else threshold_for_budget(
                model, val_ds, cfg, E, best_expert, device, cfg.budget)
            metrics, _ = evaluate_model(model, val_ds, cfg, E, best_expert, device, threshold=thr,
                                        with_hd95=cfg.val_hd95,
                                        thresholds=None if cfg.selection == "rc-auc" else (thr,))
            metrics["threshold"] = thr
            score = (metrics.get("system_dice") if cfg.selection == "budget-dice"
                     else metrics.get("risk_coverage_auc")) or 0.0
            improved = score > best
            if improved:
                best, stale = score, 0
                best_rate = metrics.get("deferral_rate")
            else:
                stale += 1
            log.write(event="epoch", epoch=epoch, step=global_step,
                      **{f"val_{k}": v for k, v in metrics.items() if k != "risk_coverage"})
            history.append({"epoch": epoch, **metrics})
            print(meter.line(epoch, cfg.epochs, metrics), flush=True)  # stays on screen
            if improved and out_dir is not None:
                checkpoint(out_dir / "best.pt", epoch + 1, 0, {"val": _scalars(metrics),
                                                               "routing": routing_record(cfg, thr)})
            checkpoint(last_path, epoch + 1, 0, {})
        if run is not None:  # a signal during validation: last.pt is this epoch's end
            run.check_interrupt(lambda: None, epoch, global_step)
        stop = torch.tensor([1.0 if (cfg.patience and stale >= cfg.patience) else 0.0])
        if info.world > 1:
            stop = stop.to(device)
            dist.broadcast(stop, 0)
        if bool(stop.item()):
            stopped_early = True
            log.write(event="early_stop", epoch=epoch, best_val_system_dice=best)
            break
    info.barrier()
    return {"stopped": False, "best_val_system_dice": best, "best_val_deferral_rate": best_rate,
            "selection": cfg.selection, "budget": cfg.budget, "global_step": global_step,
            "early_stopped": stopped_early, "out": str(out_dir) if out_dir else None}


def _train_two_stage(cfg: TrainConfig, device: torch.device, info: DistInfo,
                     out_dir: Optional[Path], log: JsonLog, run: Optional[RunDir] = None
                     ) -> Dict[str, Any]:
    """Stage 1 (or ``base_checkpoint``), then the routing heads on frozen features."""
    import tempfile

    from . import two_stage as ts

    base_path = cfg.base_checkpoint
    tmp = None
    if base_path is None:
        bcfg = ts.base_config(cfg)
        if bcfg.out is None:
            tmp = tempfile.TemporaryDirectory(prefix="deferredseg-base-")
            bcfg = dataclasses.replace(bcfg, out=tmp.name)
        bdir = Path(bcfg.out)
        if info.is_main:
            bdir.mkdir(parents=True, exist_ok=True)
        log.write(event="stage", stage=1, what="base segmentor", out=str(bdir))
        res = _train(bcfg, device, info, bdir, JsonLog(bdir / "log.jsonl", info.is_main), run)
        if res.get("stopped"):
            return res
        base_path = str(bdir / "best.pt")
    info.barrier()
    train_ds, val_ds, E, in_channels, model = _data_and_model(cfg, device)
    ts.load_base(model, base_path, device)
    if tmp is not None:
        tmp.cleanup()
    best_expert = best_single_expert(val_ds, E)
    log.write(event="stage", stage=2, what="routing heads", base=str(base_path))
    train_cache = ts.cache_head_inputs(model, train_ds, cfg, device)
    val_cache = ts.cache_head_inputs(model, val_ds, cfg, device)
    if cfg.method == "l2d-single":
        def loss_fn(out, target, experts):
            return l2d_loss(l2d_outputs(out, cfg.num_classes), target, experts[:, best_expert])
    else:
        criterion = build_criterion(dataclasses.replace(cfg, lambda_seg=0.0), E, sync=False)

        def loss_fn(out, target, experts):
            loss = criterion(out, target, experts)
            terms = dict(criterion.last_terms)
            terms["deferral"] = terms["pbar"][:E].sum()
            return loss, terms
    best, history = ts.fit_heads(model, train_cache, val_cache, cfg, loss_fn, device, E, best_expert,
                                 log if info.is_main else None)
    routing = routing_record(cfg, best.get("threshold"))
    if out_dir is not None and info.is_main:
        state = {"model": model.state_dict(), "epoch": cfg.head_epochs, "step_in_epoch": 0,
                 "global_step": 0, "best": best.get("selection_score"), "stale": 0,
                 "rng": torch.get_rng_state(), "config": cfg.to_dict(), "num_experts": E,
                 "in_channels": in_channels, "best_expert": best_expert,
                 "expert_names": list(train_ds.info.expert_names), "base_checkpoint": str(base_path),
                 "val": _scalars(best), "routing": routing, "stage": 2,
                 **checkpoint_record(cfg, train_ds.info.expert_names)}
        save_checkpoint(out_dir / "best.pt", state)
        save_checkpoint(out_dir / "last.pt", state)  # the finished run, for --resume and tools
    log.write(event="best", selection=cfg.selection, budget=cfg.budget,
              **{f"val_{k}": v for k, v in best.items()})
    info.barrier()
    return {"stopped": False, "best_val_system_dice": best.get("system_dice"),
            "best_val_deferral_rate": best.get("deferral_rate"), "selection": cfg.selection,
            "budget": cfg.budget, "threshold": best.get("threshold"), "history": history,
            "out": str(out_dir) if out_dir else None}


def _scalars(metrics: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) or v is None}


def _progress(loader, cfg: TrainConfig, info: DistInfo, epoch: int):
    if not (cfg.progress and info.is_main):
        return loader
    from tqdm import tqdm

    return tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True,
                disable=None)  # a bar on a terminal only: logs written to files stay readable


# ----------------------------------------------------------------------------- evaluation


def load_trained(checkpoint_path, device: torch.device, overrides: Optional[Dict[str, Any]] = None):
    """(model, config, checkpoint dict) of a checkpoint written by :func:`train`."""
    ck = load_checkpoint(checkpoint_path, map_location=device)
    values = dict(ck["config"])
    if "training" not in values:  # written before two-stage training existed
        values.update(training="joint", surrogate="softmax", gate_target="router",
                      gate_mse=0.5, gate_sparsity=0.1)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    values["resume"] = False
    cfg = TrainConfig.from_dict(values, source=str(checkpoint_path))
    model = build_model(cfg, ck["in_channels"], ck["num_experts"]).to(device)
    model.load_state_dict(ck["model"])
    model.eval()
    return model, cfg, ck


def evaluate(checkpoint_path, out: Optional[str] = None, split: str = "test",
             threshold: Optional[float] = None, budget: Optional[float] = None,
             overrides: Optional[Dict[str, Any]] = None, figures: bool = True,
             device: str = "auto", with_hd95: bool = True, matched: bool = False,
             sweep: bool = True) -> Dict[str, Any]:
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
    check_evaluation_data(cfg, split)  # an empty split or a bad file, before computing
    ds = build_data(cfg, split)
    if cfg.method not in ("model-only", "confidence"):  # the base segmentor routes nothing
        ds = match_experts(ds, cfg, split, ck.get("expert_names"), build_data)  # by name or refused
    E = ck["num_experts"]
    best_expert = ck.get("best_expert", 0)
    if cfg.method in ("model-only", "confidence"):
        # the base segmentor does not depend on the experts: evaluate it with these
        E = ds.info.num_experts
        best_expert = best_single_expert(build_data(cfg, "val"), E)
    if ds.info.num_experts != E:
        raise ValueError(f"the checkpoint was trained with {E} experts, the {split} data has "
                         f"{ds.info.num_experts}")
    if threshold is None and budget is None:
        budget = cfg.budget
    if cfg.method == "model-only":
        threshold, budget = 1.0, None  # the base segmentor alone never defers
    if route_mode(cfg) == "router":
        threshold, budget = 0.5, None  # the router's argmax decides, at its own rate
    if budget is not None:
        threshold = threshold_for_budget(model, build_data(cfg, "val"), cfg, E, best_expert, dev,
                                         budget)
    metrics, examples = evaluate_model(model, ds, cfg, E, best_expert, dev, threshold=threshold,
                                       with_hd95=with_hd95, keep_examples=4 if figures else 0,
                                       thresholds=None if sweep else (threshold,))
    if matched and budget is not None:
        t_test = threshold_for_budget(model, ds, cfg, E, best_expert, dev, budget)
        m2, _ = evaluate_model(model, ds, cfg, E, best_expert, dev, threshold=t_test,
                               with_hd95=False, thresholds=(t_test,))
        metrics.update({f"matched_{k}": m2[k] for k in ("system_dice", "deferral_rate",
                                                         "deferral_components_per_image")})
    metrics.update(method=cfg.method, threshold=cfg.threshold if threshold is None else threshold,
                   budget=budget, split=split, checkpoint=str(checkpoint_path),
                   expert_names=list(ds.info.expert_names), route_mode=route_mode(cfg),
                   selection={"by": cfg.selection, "budget": cfg.budget,
                              "val": ck.get("val")})
    if out:
        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / "metrics.json", "w") as f:
            json.dump(metrics, f, indent=2)
        if figures:
            from . import figures as figs

            paths = figs.save_examples(examples, out_dir / "examples.png", cfg.num_classes,
                                       list(ds.info.expert_names), figs.reference_name(ds.info.target))
            paths += figs.plot_risk_coverage({cfg.method: metrics["risk_coverage"]},
                                             out_dir / "risk_coverage.png",
                                             {cfg.method: (metrics["deferral_rate"],
                                                           metrics["system_dice"])})
            log_path = Path(checkpoint_path).parent / "log.jsonl"
            if log_path.exists():
                paths += figs.plot_training_curves(log_path, out_dir / "training_curves.png")
            metrics["figures"] = [str(p) for p in paths]
            with open(out_dir / "metrics.json", "w") as f:
                json.dump(metrics, f, indent=2)
    return metrics
