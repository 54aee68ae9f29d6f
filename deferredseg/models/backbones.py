"""Backbones from ``monai.networks.nets`` by name.

``build_backbone("UNet", spatial_dims=2, in_channels=1, features=32)`` builds the
MONAI network with ``out_channels=features``: its output, at input resolution,
is the feature map (B, F, *S) that :class:`DeferredSegmentor` puts its heads on.
Any network of ``monai.networks.nets`` that takes ``in_channels`` and
``out_channels`` works; networks whose constructor needs more (``UNet``'s
``channels`` and ``strides``, ...) get small defaults from :data:`MONAI_DEFAULTS`
that keyword arguments override.
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, Optional

import torch.nn as nn

__all__ = ["build_backbone", "MONAI_DEFAULTS", "monai_network_names"]

#: Constructor defaults for networks whose required arguments have no MONAI default.
MONAI_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "UNet": {"channels": (16, 32, 64, 128), "strides": (2, 2, 2), "num_res_units": 2},
    "AttentionUnet": {"channels": (16, 32, 64, 128), "strides": (2, 2, 2)},
    "DynUNet": {
        "kernel_size": (3, 3, 3, 3),
        "strides": (1, 2, 2, 2),
        "upsample_kernel_size": (2, 2, 2),
    },
}


def _nets():
    try:
        from monai.networks import nets
    except ImportError as err:  # pragma: no cover - monai is a dependency
        raise ImportError("build_backbone needs MONAI: pip install monai") from err
    return nets


def monai_network_names():
    """The names of the ``nn.Module`` classes in ``monai.networks.nets``."""
    nets = _nets()
    return sorted(
        n
        for n in dir(nets)
        if inspect.isclass(getattr(nets, n)) and issubclass(getattr(nets, n), nn.Module)
    )


def build_backbone(
    name: str = "UNet",
    spatial_dims: int = 2,
    in_channels: int = 1,
    features: int = 32,
    net_kwargs: Optional[Dict[str, Any]] = None,
    **kwargs: Any,
) -> nn.Module:
    """A ``monai.networks.nets`` network whose ``out_channels`` are the feature channels F.

    Args:
        name: the class name in ``monai.networks.nets`` (``"UNet"``, ``"BasicUNet"``,
            ``"SwinUNETR"``, ``"AttentionUnet"``, ...); matched case-insensitively.
        spatial_dims: 2 or 3 (1 where the network supports it).
        in_channels: input channels C_in.
        features: F, the network's ``out_channels``.
        net_kwargs: constructor arguments whose names clash with this function's
            (``BasicUNet``'s own ``features`` tuple: ``net_kwargs={"features": (...)}``).
        **kwargs: further constructor arguments. Both override :data:`MONAI_DEFAULTS`.

    Returns:
        The MONAI network.

    Raises:
        ValueError: an unknown network name; a network without ``in_channels`` /
            ``out_channels``; ``spatial_dims`` not 2 or 3 for a network that takes none.
        TypeError: an argument the network does not take.
        ImportError: MONAI is not installed.
    """
    nets = _nets()
    names = monai_network_names()
    cls_name = (
        name if name in names else next((n for n in names if n.lower() == str(name).lower()), None)
    )
    if cls_name is None:
        raise ValueError(
            f"unknown MONAI network {name!r}; monai.networks.nets has: {', '.join(names)}"
        )
    cls = getattr(nets, cls_name)
    params = inspect.signature(cls.__init__).parameters
    if "in_channels" not in params or "out_channels" not in params:
        raise ValueError(
            f"monai.networks.nets.{cls_name} takes no in_channels / out_channels: it cannot "
            "serve as a DeferredSeg backbone through build_backbone; wrap it yourself "
            "(see docs/models.md)"
        )
    args: Dict[str, Any] = dict(MONAI_DEFAULTS.get(cls_name, {}))
    args.update(in_channels=int(in_channels), out_channels=int(features))
    if "spatial_dims" in params:
        args["spatial_dims"] = int(spatial_dims)
    elif spatial_dims != 2 and spatial_dims != 3:
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    args.update(kwargs)
    args.update(net_kwargs or {})
    unknown = [
        k
        for k in args
        if k not in params
        and not any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())
    ]
    if unknown:
        raise TypeError(f"monai.networks.nets.{cls_name} takes no argument(s) {unknown}")
    return cls(**args)
