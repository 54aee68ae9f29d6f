"""What running a trained model needs: the device (:func:`resolve_device`) and the trained
network of a checkpoint with its configuration (:func:`load_trained`).

Used by training (:mod:`.loop`), evaluation (:mod:`.evaluation`), ``deferredseg predict``
(:mod:`deferredseg.predict`) and the review demo; it reads both kinds of checkpoint: a
training run's, and one of a network with deferral added by :mod:`deferredseg.bolt_on`.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch

from .bolt_on import load_deferral_network
from .builders import build_model
from .checkpoint import load_checkpoint
from .config import TrainConfig

__all__ = ["resolve_device", "load_trained"]


def resolve_device(name: str) -> torch.device:
    """``name`` as a device: ``auto`` is CUDA when there is one; under torchrun, this
    rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but no CUDA device is available")
    if name == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return torch.device(name)


def load_trained(checkpoint_path, device: torch.device, overrides: Optional[Dict[str, Any]] = None):
    """(model, config, checkpoint dict) of a checkpoint written by training, or by
    :meth:`deferredseg.bolt_on.DeferralNetwork.save` (a trained network with deferral
    added: its configuration holds the classes, dimensions and image size, no data)."""
    ck = load_checkpoint(checkpoint_path, map_location=device)
    if "bolt_on" in ck:
        values = dict(ck["config"])
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        values["resume"] = False
        cfg = TrainConfig.from_dict(values, source=str(checkpoint_path))
        return load_deferral_network(ck, device), cfg, ck
    values = dict(ck["config"])
    if "training" not in values:  # written before two-stage training existed
        values.update(
            training="joint",
            surrogate="softmax",
            gate_target="router",
            gate_mse=0.5,
            gate_sparsity=0.1,
        )
    values.setdefault("siblings", 0)  # written before sibling networks existed
    values["sibling_checkpoints"] = None  # their weights are in the checkpoint
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    values["resume"] = False
    cfg = TrainConfig.from_dict(values, source=str(checkpoint_path))
    model = build_model(cfg, ck["in_channels"], ck["num_experts"]).to(device)
    model.load_state_dict(ck["model"])
    model.eval()
    return model, cfg, ck
