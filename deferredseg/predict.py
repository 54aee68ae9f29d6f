"""Prediction for ``deferredseg predict``: a trained checkpoint's labels, deferral scores
and routing for new images.

- :class:`Predictor`: a checkpoint (a training run's or a bolt-on one, read by
  :func:`deferredseg.train.runtime.load_trained`) ready to segment and route batches of
  new images of any size, its deferral policy chosen by :meth:`Predictor.choose_policy`;
- :func:`infer_logits`: the network's output for one batch, directly when the images have
  the training size and by MONAI's ``sliding_window_inference`` otherwise;
- :func:`resolve_policy`: the checkpoint's deferral policy at its calibrated threshold, an
  explicit ``threshold=``, or calibrated for ``budget=`` on the validation split;
- :func:`list_images`: the images of a folder that ``predict`` reads.

What a folder run writes (the outputs in the input's format, the review database, the
tasks and ``manifest.jsonl``) is the review layer's:
:func:`deferredseg.review.intake.predict`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .data.io import split_name
from .policy import DeferralPolicy
from .train.bolt_on import NO_VALIDATION_DATA
from .train.builders import build_data
from .train.datacheck import match_experts
from .train.evaluation import network_outputs
from .train.methods import checkpoint_policy, packed_logits
from .train.runtime import load_trained, resolve_device

__all__ = [
    "Predictor",
    "RoutedBatch",
    "infer_logits",
    "resolve_policy",
    "describe_routing",
    "list_images",
]


# ----------------------------------------------------------------------------- model


def infer_logits(
    model: torch.nn.Module,
    x: torch.Tensor,
    roi_size: Sequence[int],
    overlap: float = 0.25,
    sw_batch_size: int = 4,
    mode: str = "auto",
    amp: bool = False,
) -> torch.Tensor:
    """The model's raw output for ``x`` (B, C, *S), float32.

    ``mode="auto"``: a direct pass when ``S`` equals ``roi_size``, MONAI's
    ``sliding_window_inference`` (Gaussian blending) otherwise, which also pads an
    image smaller than the window; ``"direct"`` / ``"window"`` force one of them.
    """
    from monai.inferers import sliding_window_inference

    if mode not in ("auto", "direct", "window"):
        raise ValueError(f"mode must be 'auto', 'direct' or 'window', got {mode!r}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    roi = tuple(int(r) for r in roi_size)
    if len(roi) != x.ndim - 2:
        raise ValueError(f"window {roi} has {len(roi)} axes, the images {x.ndim - 2}")
    direct = mode == "direct" or (mode == "auto" and tuple(x.shape[2:]) == roi)
    with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        if direct:
            out = model(x)
        else:
            out = sliding_window_inference(
                x, roi, sw_batch_size, model, overlap=overlap, mode="gaussian", progress=False
            )
    if hasattr(out, "as_tensor"):
        out = out.as_tensor()
    return out.float()


def resolve_policy(
    ck: Dict[str, Any],
    cfg,
    threshold: Optional[float] = None,
    budget: Optional[float] = None,
    calibrate=None,
) -> Tuple[DeferralPolicy, str]:
    """``(policy, where its threshold came from)``: the checkpoint's policy with an explicit
    ``threshold``, or calibrated for ``budget`` by ``calibrate(policy, budget)`` (on the
    validation split), or as the checkpoint recorded it; a checkpoint without a calibrated
    policy (a run's ``last.pt``) is calibrated for its training budget."""
    policy = checkpoint_policy(ck, cfg)
    if not policy.defers:
        if threshold is not None or budget is not None:
            raise ValueError(f"the {cfg.method} method never defers: no threshold or budget")
        return policy, f"{cfg.method} method (never defers)"
    if policy.mode == "router":
        if threshold is not None or budget is not None:
            raise ValueError(
                "this checkpoint routes by the router's argmax (mode 'router', its own rate): "
                "it takes no threshold or budget"
            )
        return policy, "the router's argmax"
    if threshold is not None:
        return policy.with_threshold(threshold), "--threshold"
    if budget is None and policy.threshold is not None:
        return policy, "checkpoint"
    budget = policy.budget if budget is None else budget
    budget = cfg.budget if budget is None else budget
    if calibrate is None:
        raise ValueError("a budget needs the validation data of the checkpoint")
    return calibrate(policy, float(budget)), f"budget {budget:g} on the validation split"


# ----------------------------------------------------------------------------- folders


def describe_routing(routing: Dict[str, Any]) -> str:
    """A predict run's routing in a few words: the threshold (if any) and where it came from."""
    thr = routing.get("threshold")
    return f"threshold {thr:.4g} ({routing['source']})" if thr is not None else routing["source"]


def list_images(folder: Path) -> List[Path]:
    """The image files of ``folder`` (.png, .npy, .nii, .nii.gz; hidden files left out),
    sorted by name; an error when there is none."""
    if not folder.is_dir():
        raise FileNotFoundError(f"images folder {folder} not found")
    files = [
        p
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.startswith(".") and split_name(p.name) is not None
    ]
    if not files:
        raise FileNotFoundError(
            f"images folder {folder} holds no .png, .npy, .nii or .nii.gz files"
        )
    return files


class RoutedBatch(NamedTuple):
    """:meth:`Predictor.route`'s result for B images of shape S (numpy, on the CPU)."""

    model_pred: np.ndarray  # (B, *S) the model's labels
    score: np.ndarray  # (B, *S) float32, the policy's deferral score
    assignment: np.ndarray  # (B, *S) -1 for the model, j for expert j
    network_seconds: float
    route_seconds: float


class Predictor:
    """The trained network of ``checkpoint`` on ``device``, ready to segment and route new
    images.

    ``window``: the sliding window (default: the training image size); ``overlap`` of
    neighbouring windows; ``sw_batch_size`` windows per pass; ``inference``: see
    :func:`infer_logits`; ``backend``: the routing kernels (default: the best one of this
    machine, not the training one's). Call :meth:`choose_policy` before :meth:`route`.
    """

    def __init__(
        self,
        checkpoint: Union[str, Path],
        window: Optional[Sequence[int]] = None,
        overlap: float = 0.25,
        sw_batch_size: int = 4,
        device: str = "auto",
        backend: Optional[str] = None,
        inference: str = "auto",
    ):
        self.checkpoint_path = Path(checkpoint)
        self.device = resolve_device(device)
        self.model, self.cfg, self.checkpoint = load_trained(checkpoint, self.device)
        cfg, ck = self.cfg, self.checkpoint
        self.num_classes, self.num_experts = int(cfg.num_classes), int(ck["num_experts"])
        self.in_channels, self.spatial_dims = int(ck["in_channels"]), int(cfg.spatial_dims)
        self.best_expert = int(ck.get("best_expert", 0))
        E, sd = self.num_experts, self.spatial_dims
        self.expert_names = list(ck.get("expert_names") or [f"expert{j}" for j in range(E)])
        self.backend = backend or "auto"
        train_size = list(cfg.spatial_size) if cfg.spatial_size else [cfg.image_size] * sd
        self.window = [int(w) for w in (window or train_size)]
        if len(self.window) != sd or min(self.window) < 1:
            raise ValueError(f"window must be {sd} positive sizes, got {list(window or [])}")
        self.overlap, self.sw_batch_size, self.inference = overlap, sw_batch_size, inference
        self.policy: Optional[DeferralPolicy] = None
        self.routing: Dict[str, Any] = {}
        from monai.transforms import ScaleIntensity  # monai's transforms: a slow import

        self._scale = ScaleIntensity(minv=0.0, maxv=1.0)  # as the training pipeline does

    def _calibrate(self, policy: DeferralPolicy, budget: float) -> DeferralPolicy:
        cfg, ck = self.cfg, self.checkpoint
        if "bolt_on" in ck:  # deferral added to a network trained elsewhere: no data recorded
            raise ValueError(f"budget={budget:g}: {NO_VALIDATION_DATA}")
        val_ds = match_experts(
            build_data(cfg, "val"), cfg, "val", ck.get("expert_names"), build_data
        )
        val = network_outputs(
            self.model, val_ds, cfg, self.num_experts, self.best_expert, self.device
        )
        return policy.calibrate(val, budget)

    def choose_policy(
        self, threshold: Optional[float] = None, budget: Optional[float] = None
    ) -> Dict[str, Any]:
        """Set the deferral policy (see :func:`resolve_policy`); returns the routing record
        (mode, threshold, budget, where the threshold came from, the policy as a dict)."""
        policy, source = resolve_policy(
            self.checkpoint, self.cfg, threshold, budget, self._calibrate
        )
        self.policy = policy
        self.routing = {
            "mode": policy.mode,
            "threshold": policy.threshold,
            "budget": policy.budget,
            "source": source,
            "policy": policy.to_dict(),
        }
        return self.routing

    def batch(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Images of one shape ``(C, *S)`` (raw intensities) as one scaled batch on the device."""
        x = torch.stack([torch.as_tensor(np.asarray(self._scale(im))) for im in images])
        return x.to(self.device)

    def route(self, x: torch.Tensor) -> RoutedBatch:
        """The model's labels, the deferral scores and who labels each pixel of the batch
        ``x`` (from :meth:`batch`) under the chosen policy."""
        if self.policy is None:
            raise ValueError("no policy chosen: call choose_policy() before route()")
        dev = self.device
        t0 = time.perf_counter()
        raw = infer_logits(
            self.model,
            x,
            self.window,
            self.overlap,
            self.sw_batch_size,
            self.inference,
            dev.type == "cuda",
        )
        logits = packed_logits(self.cfg, raw, self.num_experts, self.best_expert)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        r = self.policy.route(logits, backend=self.backend)
        assignment = r.assignment.cpu().numpy()
        score = r.score.float().cpu().numpy()
        model_pred = r.model_pred.cpu().numpy()
        return RoutedBatch(model_pred, score, assignment, t1 - t0, time.perf_counter() - t1)
