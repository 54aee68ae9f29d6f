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

:func:`fit_routing` is that second stage as one call (cache, fit, select,
calibrate); ``deferredseg train`` and :func:`deferredseg.bolt_on.add_deferral`
(deferral added to a network trained elsewhere) both run it, with the settings of
a :class:`HeadSchedule`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from ..metrics import SELECTIONS, evaluate_policy
from ..policy import DeferralPolicy
from .checkpoint import load_checkpoint
from .config import TrainConfig
from .methods import BASE_METHOD

__all__ = [
    "HeadSchedule",
    "batch_parts",
    "iter_batches",
    "cache_head_inputs",
    "cached_outputs",
    "fit_heads",
    "fit_routing",
    "RoutingFit",
]

Pack = Callable[[torch.Tensor], torch.Tensor]


def _as_is(out: torch.Tensor) -> torch.Tensor:
    return out.float()


@dataclass(frozen=True)
class HeadSchedule:
    """How the routing heads are trained on cached inputs and their epoch selected.

    Each epoch (and the untrained heads) is validated at ``budget`` and the best by
    ``selection`` is kept.

    Args:
        epochs: epochs of the heads (>= 0; 0: the untrained heads only).
        lr: AdamW learning rate (finite, > 0), with a cosine schedule over every step.
        weight_decay: AdamW weight decay.
        batch_size: images a step (>= 1), also the batch size of the caching pass.
        seed: the shuffling seed.
        budget: the deferral budget of the validation, in [0, 1].
        selection: how the epoch is kept, one of
            :data:`deferredseg.metrics.SELECTIONS`.
        backend: the routing kernels of the validation.
        workers: the DataLoader workers of the caching pass (>= 0).
        max_steps: stop after this many optimiser steps (0: no limit).

    Raises:
        ValueError: ``epochs``, ``batch_size``, ``workers`` or ``max_steps`` not an
            integer in range, ``lr`` not a finite number > 0, ``budget`` outside
            [0, 1], an unknown ``selection``.
    """

    epochs: int = 30
    lr: float = 1e-2
    weight_decay: float = 1e-4
    batch_size: int = 4
    seed: int = 0
    budget: float = 0.1
    selection: str = "budget-dice"
    backend: str = "auto"
    workers: int = 0
    max_steps: int = 0  # stop after this many optimiser steps (0: no limit)

    def __post_init__(self) -> None:
        for name, low in (("epochs", 0), ("batch_size", 1), ("workers", 0), ("max_steps", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not (isinstance(self.budget, (int, float)) and 0.0 <= self.budget <= 1.0):
            raise ValueError(f"budget must be in [0, 1], got {self.budget!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {list(SELECTIONS)}, got {self.selection!r}")

    @classmethod
    def of(cls, cfg: TrainConfig) -> "HeadSchedule":
        """The second stage of a training configuration.

        Args:
            cfg: a :class:`~deferredseg.train.config.TrainConfig`.

        Returns:
            Its ``head_epochs``, ``head_lr``, ``weight_decay``, ``batch_size``,
            ``seed``, ``budget``, ``selection``, ``backend``, ``workers`` and
            ``max_steps`` as a schedule.

        Raises:
            ValueError: a value out of range (as the constructor).
        """
        return cls(
            epochs=int(cfg.head_epochs),
            lr=float(cfg.head_lr),
            weight_decay=float(cfg.weight_decay),
            batch_size=int(cfg.batch_size),
            seed=int(cfg.seed),
            budget=float(cfg.budget),
            selection=cfg.selection,
            backend=cfg.backend,
            workers=int(cfg.workers),
            max_steps=int(cfg.max_steps),  # --max-steps bounds this stage too
        )


def _schedule(settings) -> HeadSchedule:
    return settings if isinstance(settings, HeadSchedule) else HeadSchedule.of(settings)


def batch_parts(batch: Any, where: str = "data") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(image, target, expert labels)`` of one batch: a dict with the keys "image",
    "target" and "expert_labels" (what the package's datasets give), or a tuple or list
    ``(image, target, expert_labels)``. ``where`` names the argument in errors."""
    if isinstance(batch, dict):
        missing = [k for k in ("image", "target", "expert_labels") if k not in batch]
        if missing:
            raise ValueError(
                f"{where}: a batch given as a dict needs the keys 'image', 'target' and "
                f"'expert_labels'; missing {missing}, got keys {sorted(batch)}"
            )
        parts = (batch["image"], batch["target"], batch["expert_labels"])
    elif isinstance(batch, (tuple, list)) and len(batch) == 3:
        parts = tuple(batch)
    else:
        raise TypeError(
            f"{where}: a batch must be a dict with 'image', 'target', 'expert_labels' or a "
            f"tuple (image, target, expert_labels), got {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        )
    names = ("image", "target", "expert_labels")
    out = []
    for name, t in zip(names, parts):
        if hasattr(t, "as_tensor"):  # a MONAI MetaTensor
            t = t.as_tensor()
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: the batch's {name} must be a tensor, got {type(t).__name__}")
        out.append(t)
    image, target, experts = out
    if image.dim() < 3:
        raise ValueError(f"{where}: image must be (B, C, *S), got shape {tuple(image.shape)}")
    shape = (image.shape[0],) + tuple(image.shape[2:])
    if target.dim() == image.dim() and target.shape[1] == 1:
        target = target[:, 0]
    if tuple(target.shape) != shape:
        raise ValueError(
            f"{where}: target must have shape (B, *S) = {shape} for images of shape "
            f"{tuple(image.shape)}, got {tuple(target.shape)}"
        )
    if experts.dim() != image.dim() or (experts.shape[0],) + tuple(experts.shape[2:]) != shape:
        raise ValueError(
            f"{where}: expert_labels must have shape (B, E, *S) = ({shape[0]}, E, "
            f"{', '.join(map(str, shape[1:]))}) for images of shape {tuple(image.shape)}, "
            f"got {tuple(experts.shape)}"
        )
    return image, target, experts


def iter_batches(data, settings: HeadSchedule) -> Iterable[Any]:
    """The batches of a dataset (through a DataLoader) or of an iterable of batches."""
    from torch.utils.data import Dataset

    if isinstance(data, Dataset):
        from monai.data import DataLoader

        return DataLoader(
            data, batch_size=settings.batch_size, shuffle=False, num_workers=settings.workers
        )
    return data


@torch.no_grad()
def cache_head_inputs(
    model: nn.Module, data, settings, device: torch.device, where: str = "data"
) -> Dict[str, torch.Tensor]:
    """Segmentation logits, head inputs, targets and expert labels of every image (on the
    CPU). ``data``: a dataset of items (read through a DataLoader of ``batch_size``) or an
    iterable of batches (see :func:`batch_parts`); ``settings``: a :class:`HeadSchedule`
    or a training configuration."""
    settings = _schedule(settings)
    model.eval()
    parts: Dict[str, List[torch.Tensor]] = {"seg": [], "head_in": [], "target": [], "experts": []}
    for batch in iter_batches(data, settings):
        image, target, experts = batch_parts(batch, where)
        seg, head_in = model.head_inputs(image.to(device))
        parts["seg"].append(seg.float().cpu())
        parts["head_in"].append(head_in.float().cpu())
        parts["target"].append(target.cpu())
        parts["experts"].append(experts.cpu())
    if not parts["seg"]:
        raise ValueError(f"{where}: holds no batches")
    return {k: torch.cat(v) for k, v in parts.items()}


def cached_outputs(
    model: nn.Module,
    cache: Dict[str, torch.Tensor],
    settings,
    device: torch.device,
    pack: Optional[Pack] = None,
):
    """A function returning a new pass of ``(packed logits, target, expert labels)``
    batches of the heads over cached inputs: what the policy is calibrated and measured
    on. ``pack`` turns the heads' output into packed logits (default: as it is, float)."""
    settings = _schedule(settings)
    pack = pack or _as_is

    def batches():
        step = max(settings.batch_size, 8)
        with torch.no_grad():
            for i in range(0, len(cache["seg"]), step):
                seg = cache["seg"][i : i + step].to(device)
                hin = cache["head_in"][i : i + step].to(device)
                out = pack(model.heads_forward(seg, hin))
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
    settings,
    loss_fn,
    device: torch.device,
    policy: DeferralPolicy,
    pack: Optional[Pack] = None,
    log=None,
    on_epoch=None,
) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """Train the routing heads of ``model`` on cached inputs; keep the best epoch's weights.

    ``loss_fn(logits, target, experts) -> (loss, terms)``; ``policy``: the (uncalibrated)
    deferral policy every epoch is validated with, calibrated at the budget on the
    validation cache (:func:`~deferredseg.metrics.evaluate_policy`). The heads as
    initialised are a candidate too. Returns the best validation metrics (their
    ``"policy"``: the calibrated policy's record) and the per-epoch history; the model
    ends with the best heads. Epochs are numbered from 1 (0: the heads as initialised).
    ``on_epoch(epoch, metrics, mean terms)`` is called after each epoch's validation (the
    line printed per epoch).
    """
    settings = _schedule(settings)
    params = model.head_parameters()
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    n = len(train_cache["seg"])
    steps = max(math.ceil(n / settings.batch_size) * settings.epochs, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    gen = torch.Generator().manual_seed(settings.seed)
    best_score, best_state, best_metrics = -math.inf, None, {}
    history: List[Dict[str, Any]] = []
    step = 0

    val_data = cached_outputs(model, val_cache, settings, device, pack)

    def validate() -> Dict[str, Any]:
        model.eval()
        return evaluate_policy(
            policy, val_data, settings.budget, settings.selection, False, settings.backend
        )[1]

    def consider(epoch: int, m: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Record epoch ``epoch``'s validation (``m`` when already computed for these
        heads) and keep the heads if they are the best so far."""
        nonlocal best_score, best_state, best_metrics
        if m is None:
            m = validate()
        score = m["selection_score"] or 0.0
        history.append({"epoch": epoch, "step": step, **_scalar_items(m)})
        if log is not None:
            log.write(
                event="epoch",
                stage=2,
                epoch=epoch,
                selection=settings.selection,
                budget=settings.budget,
                **{f"val_{k}": v for k, v in _scalar_items(m).items()},
            )
        if score > best_score:
            best_score, best_metrics = score, dict(m, epoch=epoch, step=step)
            best_state = [p.detach().clone() for p in params]
        return m

    # the heads as initialised: with the uncertainty prior, confidence deferral; with
    # siblings, also the ensemble's error score. Every start is validated, training goes
    # on from the best, and that start is epoch 0: a candidate for the kept heads.
    heads = getattr(model, "routing_heads", None)
    starts = heads.prior_names() if hasattr(heads, "prior_names") else []
    start_metrics = None
    if len(starts) > 1:
        validated = {}
        for name in starts:
            heads.use_prior(name)
            validated[name] = validate()
        scores = {name: m["selection_score"] or 0.0 for name, m in validated.items()}
        chosen = max(starts, key=lambda name: scores[name])  # ties: the first, uncertainty
        heads.use_prior(chosen)
        start_metrics = validated[chosen]  # epoch 0 is this start: validated already
        if log is not None:
            log.write(event="start", stage=2, prior=chosen, val_selection_scores=scores)
    consider(0, start_metrics)
    for epoch in range(1, settings.epochs + 1):
        model.train()
        sums: Dict[str, float] = {}
        batches = 0
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, settings.batch_size):
            idx = perm[i : i + settings.batch_size]
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
            if settings.max_steps and step >= settings.max_steps:
                break  # --max-steps bounds this stage too
        m = consider(epoch)
        if on_epoch is not None:
            on_epoch(epoch, m, {k: v / max(batches, 1) for k, v in sums.items()})
        if settings.max_steps and step >= settings.max_steps:
            if log is not None:
                log.write(event="stopped", stage=2, reason="max_steps", step=step)
            break
    if best_state is not None:
        with torch.no_grad():
            for p, v in zip(params, best_state):
                p.copy_(v)
    model.eval()
    return best_metrics, history


@dataclass
class RoutingFit:
    """What :func:`fit_routing` returns."""

    policy: DeferralPolicy  # calibrated at the budget on the validation data
    metrics: Dict[str, Any]  # the best epoch's validation metrics (its "epoch" among them)
    history: List[Dict[str, Any]]  # every epoch's (epoch 0: the untrained heads)


def fit_routing(
    model: nn.Module,
    train_data,
    val_data,
    settings,
    loss_fn,
    policy: DeferralPolicy,
    device: torch.device,
    pack: Optional[Pack] = None,
    log=None,
    on_epoch=None,
) -> RoutingFit:
    """The second stage, shared by ``deferredseg train`` and
    :func:`deferredseg.bolt_on.add_deferral`: cache what the routing heads of ``model``
    read on ``train_data`` and ``val_data`` once (the backbone and segmentation are
    frozen), train the heads on the caches (:func:`fit_heads`), keep the best epoch by
    validation at the budget, and return the policy calibrated there.

    Args:
        model: anything with ``head_inputs``, ``heads_forward`` and ``head_parameters``
            (a :class:`~deferredseg.models.DeferredSegmentor` with ``heads="conv"``).
        train_data, val_data: datasets or iterables of batches (dicts with "image",
            "target", "expert_labels", or such tuples), each read once.
        settings: a :class:`HeadSchedule`, or a
            :class:`~deferredseg.train.config.TrainConfig` (:meth:`HeadSchedule.of`).
        loss_fn: ``(packed logits, target, expert_labels) -> (loss, terms)``.
        policy: the deferral policy to calibrate at each validation.
        device: where the heads train.
        pack: the method's output as packed logits (default: the output as it is).
        log: None, or an object with ``write(**record)`` that gets each epoch's record.
        on_epoch: None, or ``on_epoch(epoch, metrics, terms)`` after each validation.

    Returns:
        A :class:`RoutingFit`: the policy calibrated at the budget on ``val_data``
        (the kept epoch's heads are loaded into ``model``), that epoch's validation
        metrics and every epoch's.

    Raises:
        ValueError: a settings value out of range; a dataset with no batches; a batch
            whose target or expert labels do not fit its images; a dict batch without
            its keys.
        TypeError: a batch that is neither a dict nor a 3-tuple, or parts that are not
            tensors.
    """
    settings = _schedule(settings)
    train_cache = cache_head_inputs(model, train_data, settings, device, "train_data")
    val_cache = cache_head_inputs(model, val_data, settings, device, "val_data")
    best, history = fit_heads(
        model, train_cache, val_cache, settings, loss_fn, device, policy, pack, log, on_epoch
    )
    return RoutingFit(DeferralPolicy.from_dict(best["policy"]), best, history)


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


def sibling_seed(cfg: TrainConfig, k: int) -> int:
    """The network seed of sibling ``k`` (1, 2, ...): ``seed + 1000 k`` (``model_seed``
    instead of ``seed`` when it is set)."""
    return (cfg.seed if cfg.model_seed is None else cfg.model_seed) + 1000 * k


def sibling_config(cfg: TrainConfig, k: int, root: Path) -> TrainConfig:
    """Stage 1 of sibling ``k`` (1, 2, ...): the base's configuration with the same data,
    split and experts, the network seeded by :func:`sibling_seed`, written to
    ``root/sibling<k>``."""
    bcfg = base_config(cfg)
    return dataclasses.replace(
        bcfg,
        split_seed=cfg.data_split_seed,
        model_seed=sibling_seed(cfg, k),
        out=str(Path(root) / f"sibling{k}"),
    )


def load_sibling(model: nn.Module, index: int, path, device: torch.device) -> None:
    """Copy the backbone and segmentation head of the checkpoint at ``path`` (a trained
    base of the same architecture) into the model's sibling ``index``."""
    ck = load_checkpoint(path, map_location=device)
    try:
        model.load_sibling(index, ck["model"])
    except ValueError as err:
        raise ValueError(f"sibling checkpoint {path}: {err}") from None


def load_base(model: nn.Module, path, device: torch.device) -> None:
    """Copy the backbone and segmentation head of a trained checkpoint into ``model``."""
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
