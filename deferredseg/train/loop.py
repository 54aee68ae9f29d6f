"""The slim training loop (no training framework): :func:`train`.

It trains every method of the comparison (:mod:`.methods`), so baselines run
through the very same loop, in either schedule (``training``): ``joint`` (one
loop, the whole objective) or ``two-stage`` (:mod:`.two_stage`: the base
segmentor in that same loop, then the routing heads on its frozen features).
Each epoch is validated at the deferral budget and the best epoch is kept
(``best.pt``, with how it routes); ``last.pt`` is written for ``--resume``.
Under ``torchrun`` (:mod:`.distributed`) it uses DistributedDataParallel with
``sync_balance=True`` and a distributed sampler, and writes logs and
checkpoints on rank 0 only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from deferredseg_kernels import TERM_NAMES

from ..metrics import evaluate_policy
from . import two_stage as ts
from .builders import best_single_expert, build_data, build_model
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .datacheck import check_training_data, checkpoint_record
from .distributed import DistInfo
from .evaluation import network_outputs
from .methods import method_of, packed_logits, policy_for
from .report import EpochMeter
from .rundir import RunDir, open_run
from .runtime import resolve_device

__all__ = ["train"]


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
        # Every rank has checked --out before rank 0 writes to it: without this a slower rank
        # could find rank 0's fresh log and refuse the run as an existing one.
        info.barrier()
        for note in run.notes:
            print(f"note: {note}", file=sys.stderr)
        log = JsonLog(out_dir / "log.jsonl" if out_dir else None, info.is_main)
        if cfg.training == "two-stage" and method_of(cfg).learns_routing:
            return _train_two_stage(cfg, device, info, out_dir, log, run)
        return _train(cfg, device, info, out_dir, log, run)
    finally:
        if run is not None:
            run.close()
        info.close()


class JsonLog:
    """``log.jsonl``: one JSON record a line, each with its time (rank 0 only)."""

    def __init__(self, path: Optional[Path], enabled: bool) -> None:
        self.path = path if enabled else None

    def write(self, **record: Any) -> None:
        if self.path is None:
            return
        record["time"] = time.time()
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------- helpers


def _data_and_model(cfg: TrainConfig, device: torch.device):
    """(train set, validation set, E, input channels, model on ``device``), seeded."""
    torch.manual_seed(cfg.seed)
    train_ds = build_data(cfg, "train")
    val_ds = build_data(cfg, "val")
    E = train_ds.info.num_experts
    in_channels = int(train_ds[0]["image"].shape[0])
    if cfg.model_seed is not None:  # the network's own seed (a sibling: same data, new init)
        torch.manual_seed(cfg.model_seed)
    return train_ds, val_ds, E, in_channels, build_model(cfg, in_channels, E).to(device)


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

    sampler = DistributedSampler(
        dataset,
        num_replicas=info.world,
        rank=info.rank,
        shuffle=True,
        seed=cfg.seed if cfg.model_seed is None else cfg.model_seed,
        drop_last=False,
    )
    sampler.set_epoch(epoch)
    idx = list(sampler)[skip * cfg.batch_size :]
    return DataLoader(
        Subset(dataset, idx), batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.workers
    )


def _micro_batches_per_epoch(n: int, cfg: TrainConfig, world: int) -> int:
    per_rank = math.ceil(n / world)
    return math.ceil(per_rank / cfg.batch_size)


def _progress(loader, cfg: TrainConfig, info: DistInfo, epoch: int):
    if not (cfg.progress and info.is_main):
        return loader
    from tqdm import tqdm

    return tqdm(
        loader,
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        leave=False,
        dynamic_ncols=True,
        disable=None,
    )  # a bar on a terminal only: logs written to files stay readable


def untrained_terms(cfg: TrainConfig, zero_weights=()) -> set:
    """The loss terms a configuration computes but does not train (weight 0): left out of
    the lines printed per epoch, where they would only mislead."""
    weights = {term: getattr(cfg, f"lambda_{term}") for term in TERM_NAMES}
    for name in zero_weights:
        weights[name.replace("lambda_", "")] = 0.0
    return {k for k, w in weights.items() if float(w) == 0.0}


def _to_float(v):
    return float(v.item()) if isinstance(v, torch.Tensor) and v.numel() == 1 else v


def _scalars(metrics: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) or v is None}


def _validate(
    model: nn.Module,
    val_ds,
    cfg: TrainConfig,
    num_experts: int,
    best_expert: int,
    device: torch.device,
) -> Dict[str, Any]:
    """Validation of what will be used: the method's policy calibrated for the budget on
    this split and measured there (:func:`deferredseg.metrics.evaluate_policy`)."""
    data = network_outputs(model, val_ds, cfg, num_experts, best_expert, device)
    policy = policy_for(cfg, num_experts, best_expert)
    _, metrics = evaluate_policy(policy, data, cfg.budget, cfg.selection, cfg.val_hd95, cfg.backend)
    return metrics


# ----------------------------------------------------------------------------- joint


def _train(
    cfg: TrainConfig,
    device: torch.device,
    info: DistInfo,
    out_dir: Optional[Path],
    log: JsonLog,
    run: Optional[RunDir] = None,
) -> Dict[str, Any]:
    """The whole network trained with the method's loss (joint, or stage 1 of two-stage)."""
    method = method_of(cfg)
    train_ds, val_ds, E, in_channels, model = _data_and_model(cfg, device)
    best_expert = best_single_expert(val_ds, E) if method.defers else 0
    loss_fn = method.loss(cfg, E, best_expert, info.world > 1)
    ddp_model = model
    if info.world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    micro = _micro_batches_per_epoch(len(train_ds), cfg, info.world)
    steps_per_epoch = math.ceil(micro / cfg.grad_accum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg, steps_per_epoch))
    amp = cfg.amp if cfg.amp is not None else device.type == "cuda"
    expert_names = list(train_ds.info.expert_names)
    hidden = untrained_terms(cfg, method.zero_weights)

    start_epoch, skip, global_step, best, stale = 0, 0, 0, -1.0, 0
    last_path = out_dir / "last.pt" if out_dir else None
    if cfg.resume:
        if last_path is None or not last_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {last_path}")
        ck = load_checkpoint(last_path, map_location=device)
        if list(ck.get("expert_names") or expert_names) != expert_names:
            raise ValueError(
                f"--resume: {last_path} was trained with experts "
                f"{ck['expert_names']}, the data now give {expert_names}; "
                f"experts cannot change in a resumed run"
            )
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        start_epoch, skip = ck["epoch"], ck["step_in_epoch"] * cfg.grad_accum
        global_step, best, stale = ck["global_step"], ck["best"], ck["stale"]
        torch.set_rng_state(ck["rng"])
        log.write(event="resume", epoch=start_epoch, step=global_step)

    def checkpoint(path: Path, epoch: int, step_in_epoch: int, extra: Dict[str, Any]) -> None:
        if info.is_main and path is not None:
            save_checkpoint(
                path,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "epoch": epoch,
                    "step_in_epoch": step_in_epoch,
                    "global_step": global_step,
                    "best": best,
                    "stale": stale,
                    "rng": torch.get_rng_state(),
                    "config": cfg.to_dict(),
                    "num_experts": E,
                    "in_channels": in_channels,
                    "best_expert": best_expert,
                    "expert_names": expert_names,
                    **checkpoint_record(cfg, expert_names),
                    **extra,
                },
            )

    stopped_early = False
    best_rate = None
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
            loss, terms = loss_fn(out, target, experts)
            (loss / cfg.grad_accum).backward()
            pending += 1
            if pending < cfg.grad_accum and i < len(loader) - 1:
                continue
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            pending = 0
            global_step += 1
            step_in_epoch += 1
            record = {k: _to_float(v) for k, v in terms.items() if k != "pbar"}
            record.update(loss=float(loss.detach()), lr=scheduler.get_last_lr()[0])
            meter.add(record)
            log.write(event="step", epoch=epoch + 1, step=global_step, **record)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k != "lr"})
            if cfg.checkpoint_every and global_step % cfg.checkpoint_every == 0:
                checkpoint(last_path, epoch, step_in_epoch, {})
            if run is not None:  # SIGINT / SIGTERM: last.pt of this very step, then stop
                run.check_interrupt(
                    lambda: checkpoint(last_path, epoch, step_in_epoch, {}), epoch, global_step
                )
            if cfg.max_steps and global_step >= cfg.max_steps:
                checkpoint(last_path, epoch, step_in_epoch, {})  # before: resume as if unstopped
                log.write(event="stopped", reason="max_steps", step=global_step)
                if best < 0 and out_dir is not None and info.is_main:
                    # nothing validated yet (a smoke run): this step's model is best.pt, so
                    # that the run can be evaluated and its second stage trained
                    metrics = _validate(model, val_ds, cfg, E, best_expert, device)
                    checkpoint(
                        out_dir / "best.pt",
                        epoch + 1,
                        step_in_epoch,
                        {
                            "val": dict(_scalars(metrics), epoch=epoch + 1),
                            "policy": metrics["policy"],
                        },
                    )
                info.barrier()
                return {"stopped": True, "global_step": global_step}
        # validation on rank 0; the decision to stop is shared with the other ranks
        if info.is_main:
            metrics = _validate(model, val_ds, cfg, E, best_expert, device)
            score = metrics["selection_score"] or 0.0
            improved = score > best
            if improved:
                best, stale = score, 0
                best_rate = metrics.get("deferral_rate")
            else:
                stale += 1
            log.write(
                event="epoch",
                epoch=epoch + 1,  # epochs are numbered from 1 everywhere a user reads them
                step=global_step,
                **{f"val_{k}": v for k, v in _scalars(metrics).items()},
            )
            # stays on screen; only the terms this loss trains, deferral only if it defers
            print(meter.line(epoch, cfg.epochs, metrics, hidden, method.defers), flush=True)
            if improved and out_dir is not None:
                checkpoint(
                    out_dir / "best.pt",
                    epoch + 1,
                    0,
                    {"val": dict(_scalars(metrics), epoch=epoch + 1), "policy": metrics["policy"]},
                )
            checkpoint(last_path, epoch + 1, 0, {})
        if run is not None:  # a signal during validation: last.pt is this epoch's end
            run.check_interrupt(lambda: None, epoch, global_step)
        if info.broadcast_flag(bool(cfg.patience and stale >= cfg.patience), device):
            stopped_early = True
            log.write(event="early_stop", epoch=epoch + 1, best_val_system_dice=best)
            break
    info.barrier()
    return {
        "stopped": False,
        "best_val_system_dice": best,
        "best_val_deferral_rate": best_rate,
        "selection": cfg.selection,
        "budget": cfg.budget,
        "global_step": global_step,
        "early_stopped": stopped_early,
        "out": str(out_dir) if out_dir else None,
    }


# ----------------------------------------------------------------------------- two-stage


def _train_two_stage(
    cfg: TrainConfig,
    device: torch.device,
    info: DistInfo,
    out_dir: Optional[Path],
    log: JsonLog,
    run: Optional[RunDir] = None,
) -> Dict[str, Any]:
    """Stage 1 (or ``base_checkpoint``), then the routing heads on frozen features."""
    import tempfile

    base_path = cfg.base_checkpoint
    tmp = None
    stage1_stopped = False
    if base_path is None:
        bcfg = ts.base_config(cfg)
        if bcfg.out is None:
            tmp = tempfile.TemporaryDirectory(prefix="deferredseg-base-")
            bcfg = dataclasses.replace(bcfg, out=tmp.name)
        bdir = Path(bcfg.out)
        if info.is_main:
            bdir.mkdir(parents=True, exist_ok=True)
        log.write(event="stage", stage=1, what="base segmentor", out=str(bdir))
        if info.is_main:
            print(
                f"stage 1 of 2: the base segmentor, segmentation loss only ({cfg.epochs} "
                f"epochs) -> {bdir}",
                flush=True,
            )
        res = _train(bcfg, device, info, bdir, JsonLog(bdir / "log.jsonl", info.is_main), run)
        # stopped by --max-steps: stage 2 still runs (on the base's best.pt, written at the
        # stop when no epoch had ended), with its own --max-steps bound, so that a smoke run
        # ends with a usable best.pt
        stage1_stopped = bool(res.get("stopped"))
        base_path = str(bdir / "best.pt")
    info.barrier()
    sibling_paths = list(cfg.sibling_checkpoints or [])
    if len(sibling_paths) < cfg.num_siblings:
        if tmp is None and cfg.out is None:
            tmp = tempfile.TemporaryDirectory(prefix="deferredseg-base-")
        root = Path(cfg.out) if cfg.out else Path(tmp.name)
        for k in range(1, cfg.num_siblings + 1):
            scfg = ts.sibling_config(cfg, k, root)
            sdir = Path(scfg.out)
            # a resumed run resumes the sibling it stopped in; the later ones start afresh
            scfg = dataclasses.replace(scfg, resume=cfg.resume and (sdir / "last.pt").is_file())
            if info.is_main:
                sdir.mkdir(parents=True, exist_ok=True)
                print(
                    f"stage 1, sibling {k} of {cfg.num_siblings}: the base's architecture "
                    f"from seed {scfg.model_seed} -> {sdir}",
                    flush=True,
                )
            log.write(event="stage", stage=1, what=f"sibling {k}", out=str(sdir))
            res = _train(scfg, device, info, sdir, JsonLog(sdir / "log.jsonl", info.is_main), run)
            stage1_stopped = stage1_stopped or bool(res.get("stopped"))
            sibling_paths.append(str(sdir / "best.pt"))
        info.barrier()
    train_ds, val_ds, E, in_channels, model = _data_and_model(cfg, device)
    ts.load_base(model, base_path, device)
    for k, path in enumerate(sibling_paths[: cfg.num_siblings]):
        ts.load_sibling(model, k, path, device)
    if tmp is not None:
        tmp.cleanup()
    best_expert = best_single_expert(val_ds, E)
    log.write(event="stage", stage=2, what="routing heads", base=str(base_path))
    if info.is_main:
        print(
            f"stage 2 of 2: the routing and gate heads on the frozen base ({cfg.head_epochs} "
            f"epochs; epoch 0: the heads as initialised)",
            flush=True,
        )
    hidden = untrained_terms(dataclasses.replace(cfg, lambda_seg=0.0), method_of(cfg).zero_weights)

    def on_epoch(epoch: int, metrics: Dict[str, Any], terms: Dict[str, float]) -> None:
        meter = EpochMeter()
        meter.add(terms)
        print(meter.line(epoch - 1, cfg.head_epochs, metrics, hidden), flush=True)

    # the segmentation head is frozen: its loss term would only cost time
    loss_fn = method_of(cfg).loss(dataclasses.replace(cfg, lambda_seg=0.0), E, best_expert, False)
    fit = ts.fit_routing(  # the same core as deferredseg.bolt_on.add_deferral
        model,
        train_ds,
        val_ds,
        ts.HeadSchedule.of(cfg),
        loss_fn,
        policy_for(cfg, E, best_expert),
        device,
        pack=lambda out: packed_logits(cfg, out, E, best_expert),
        log=log if info.is_main else None,
        on_epoch=on_epoch if info.is_main else None,
    )
    best, history = fit.metrics, fit.history
    if out_dir is not None and info.is_main:
        expert_names = list(train_ds.info.expert_names)
        state = {
            "model": model.state_dict(),
            "epoch": best.get("epoch"),  # the best stage-2 epoch, as printed and in val
            "step_in_epoch": 0,
            "global_step": best.get("step", 0),
            "best": best.get("selection_score"),
            "stale": 0,
            "rng": torch.get_rng_state(),
            "config": cfg.to_dict(),
            "num_experts": E,
            "in_channels": in_channels,
            "best_expert": best_expert,
            "expert_names": expert_names,
            "base_checkpoint": str(base_path),
            "sibling_checkpoints": sibling_paths,
            "val": _scalars(best),
            "policy": best["policy"],
            "stage": 2,
            **checkpoint_record(cfg, expert_names),
        }
        save_checkpoint(out_dir / "best.pt", state)
        save_checkpoint(out_dir / "last.pt", state)  # the finished run, for --resume and tools
    log.write(
        event="best",
        selection=cfg.selection,
        budget=cfg.budget,
        **{f"val_{k}": v for k, v in _scalars(best).items()},
    )
    info.barrier()
    stage2_steps = history[-1].get("step", 0) if history else 0
    return {
        "stopped": stage1_stopped or bool(cfg.max_steps and stage2_steps >= cfg.max_steps),
        "global_step": stage2_steps,
        "best_val_system_dice": best.get("system_dice"),
        "best_val_deferral_rate": best.get("deferral_rate"),
        "selection": cfg.selection,
        "budget": cfg.budget,
        "threshold": best.get("threshold"),
        "history": history,
        "out": str(out_dir) if out_dir else None,
    }
