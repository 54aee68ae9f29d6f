"""What a configuration builds: the simulated experts, the datasets, the network.

Also what every method's evaluation needs from the data: the best single expert
(:func:`best_single_expert`). The trained network of a checkpoint is
:func:`deferredseg.train.runtime.load_trained`.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from .config import TrainConfig
from .methods import method_of

__all__ = [
    "expert_panel",
    "build_data",
    "L2DNet",
    "build_model",
    "best_single_expert",
]


def expert_panel(cfg: TrainConfig, num_labels: int, seed: int):
    """The simulated experts of ``cfg`` (its profile, or the first ``cfg.experts`` of it)."""
    from ..data.layouts import get_layout
    from ..experts import ExpertPanel, make_experts

    profile = cfg.expert_profile or get_layout(cfg.layout).default_profile
    panel = make_experts(profile, num_labels=num_labels, seed=seed, resample=cfg.resample_experts)
    if cfg.experts is not None:
        if cfg.experts > panel.num_experts:
            raise ValueError(
                f"experts={cfg.experts} but the {profile!r} profile has {panel.num_experts} experts"
            )
        panel = ExpertPanel(
            panel.experts[: cfg.experts],
            num_labels=num_labels,
            seed=seed,
            resample=cfg.resample_experts,
            names=panel.names[: cfg.experts],
        )
    return panel


def build_data(cfg: TrainConfig, split: str, raters: Optional[List[str]] = None):
    """The dataset of ``split`` ("train", "val", "test") described by ``cfg``
    (``raters``: the multirater experts by name, in this order)."""
    from ..data import build_dataset
    from ..data.layouts import get_layout
    from ..data.scan import parse_label_map

    num_labels = max(cfg.num_classes, 2)
    kw: Dict[str, Any] = dict(
        num_classes=cfg.num_classes,
        seed=cfg.seed,
        split_seed=cfg.split_seed,
        split_file=cfg.split_file,
        spatial_size=cfg.spatial_size,
        spacing=cfg.spacing,
    )
    if cfg.target is not None:
        kw["target"] = cfg.target
    if cfg.label_map is not None:
        kw["label_map"] = parse_label_map(cfg.label_map)
    layout = get_layout(cfg.layout)
    if layout.raters:  # the experts are rater folders, chosen by name
        if raters is not None:
            kw["raters"] = list(raters)
        elif cfg.experts is not None:
            names = layout.scan(cfg.data).rater_names
            if cfg.experts > len(names):
                raise ValueError(f"experts={cfg.experts} but {cfg.data} has {len(names)} raters")
            kw["raters"] = names[: cfg.experts]
    else:
        kw["experts"] = expert_panel(cfg, num_labels, cfg.seed)
        kw["resample_experts"] = cfg.resample_experts
    if not layout.files:  # generated data: their number, dimensions and size
        kw.update(
            num_images=cfg.num_images, spatial_dims=cfg.spatial_dims, image_size=cfg.image_size
        )
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
    """The network of ``cfg``'s method: a DeferredSegmentor, or, for a method with a
    "defer" head trained jointly, a backbone with one K' + 1 head (:class:`L2DNet`)."""
    from ..models import DeferredSegmentor
    from ..models.backbones import build_backbone

    if method_of(cfg).head == "defer" and cfg.training == "joint":
        net = build_backbone(
            cfg.backbone,
            spatial_dims=cfg.spatial_dims,
            in_channels=in_channels,
            features=cfg.features,
        )
        return L2DNet(net, cfg.features, max(cfg.num_classes, 2), cfg.spatial_dims)
    return DeferredSegmentor.from_monai(
        cfg.backbone,
        num_classes=cfg.num_classes,
        num_experts=num_experts,
        spatial_dims=cfg.spatial_dims,
        in_channels=in_channels,
        features=cfg.features,
        heads=cfg.head_kind,
        head_channels=cfg.head_channels,
        detach_heads=cfg.training == "two-stage",
        num_siblings=cfg.num_siblings,
    )


def best_single_expert(dataset, num_experts: int, ignore_index: int = -100) -> int:
    """The expert that agrees most often with the target on ``dataset``."""
    hits = torch.zeros(num_experts)
    for i in range(len(dataset)):
        item = dataset[i]
        t, m = item["target"], item["expert_labels"]
        valid = t != ignore_index
        hits += ((m == t.unsqueeze(0)) & valid.unsqueeze(0)).flatten(1).sum(1).float()
    return int(hits.argmax())
