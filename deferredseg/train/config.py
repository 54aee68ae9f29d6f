"""The training configuration: one dataclass, settable from a YAML/JSON file and the CLI.

Every field is a command-line option of the same name (``--batch-size`` for
``batch_size``) and a key of the config file; the command line wins over the
file, the file over the defaults.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from deferredseg_kernels import default_option as _default

from ..metrics import SELECTIONS
from ..policy import EXPERT_CHOICES
from ..policy import MODES as ROUTE_MODES
from .methods import METHODS  # one record per method (methods.py); its names are the choices

LAYOUTS = ("synthetic", "medsam-npy", "multirater")
PROFILES = ("same-accuracy", "complementary", "structured")
SCHEDULES = ("cosine", "step", "constant")
TRAININGS = ("two-stage", "joint")
HEADS = ("conv", "linear")
SURROGATES = ("ova", "softmax", "paper")
GATE_TARGETS = ("benefit", "router")
BALANCES = ("cv2", "band")


@dataclass
class TrainConfig:
    # data
    layout: str = "synthetic"
    data: Optional[str] = None
    target: Optional[Union[str, int]] = None  # label / majority / staple / a rater name or index
    experts: Optional[int] = None  # use the first N experts of the profile (or raters)
    expert_profile: Optional[str] = None  # simulated experts (synthetic, medsam-npy)
    resample_experts: bool = False
    num_classes: int = 1
    spatial_dims: int = 2
    image_size: int = 64
    num_images: int = 48
    spatial_size: Optional[List[int]] = None  # resize file data to this size
    spacing: Optional[List[float]] = None  # voxel size in mm (default: the NIfTI header)
    split_file: Optional[str] = None
    split_seed: Optional[int] = None  # seed of the train/val/test split (default: seed)
    label_map: Optional[str] = None  # mask values to labels: "binary" or "0:0,128:1"
    # model
    backbone: str = "UNet"
    features: int = 16
    # method and loss
    method: str = "deferredseg"
    backend: str = "auto"
    # How the network is trained (docs/training.md, "Training schedules"): "two-stage"
    # trains the base segmentor (or takes base_checkpoint), then the routing and gate
    # heads, with conv layers of their own, on its frozen features; "joint" trains
    # everything at once with the whole objective.
    training: str = "two-stage"
    head_epochs: int = 30  # epochs of the second stage
    head_lr: float = 1e-2  # learning rate of the second stage (the heads alone)
    base_checkpoint: Optional[str] = None  # a trained checkpoint whose backbone and seg head to use
    heads: Optional[str] = (
        None  # "conv" or "linear" (default: conv for two-stage, linear for joint)
    )
    head_channels: int = 16
    # Sibling networks: the base segmentor's architecture trained again from other seeds
    # (same data and split) in stage 1; the conv heads read their segmentation logits and
    # start from the ensemble's probability that the model is wrong (docs/training.md,
    # "Sibling networks"). 0: the heads read the model alone.
    siblings: int = 2
    sibling_checkpoints: Optional[List[str]] = None  # trained siblings to use instead
    model_seed: Optional[int] = None  # seeds the network's initialisation and batch order
    # The loss options: the objective's "default" preset (deferredseg_kernels.PRESETS,
    # chosen by the evidence in the README: one-vs-all correctness heads, a gate trained on
    # "the model is wrong and the chosen expert is right", no pull of the gate towards D).
    lambda_seg: float = _default("lambda_seg")
    lambda_collab: float = _default("lambda_collab")
    lambda_gate: float = _default("lambda_gate")
    lambda_coherence: float = _default("lambda_coherence")
    lambda_balance: float = _default("lambda_balance")
    surrogate: str = _default("surrogate")
    gate_target: str = _default("gate_target")
    gate_mse: float = _default("gate_mse")
    gate_sparsity: float = _default("gate_sparsity")
    coherence: str = _default("coherence")
    balance: str = _default("balance")
    balance_low: Optional[List[float]] = None
    balance_high: Optional[List[float]] = None
    # optimisation
    epochs: int = 20
    batch_size: int = 4
    lr: float = 3e-3
    weight_decay: float = 1e-4
    grad_accum: int = 1
    schedule: str = "cosine"
    step_size: int = 10
    gamma: float = 0.5
    amp: Optional[bool] = None  # default: bf16 autocast on CUDA, off on CPU
    patience: int = 0  # early stopping after this many epochs without a better val Dice (0: off)
    checkpoint_every: int = 0  # also write last.pt every N optimiser steps (0: once per epoch)
    # routing and evaluation
    budget: float = 0.1  # deferral budget: checkpoint selection and evaluation
    selection: str = "budget-dice"  # val system Dice at the budget, or the risk-coverage AUC
    route_mode: str = "gate"  # gate / gain at the budget, router (its own rate), uncertainty
    expert_cost: Optional[List[float]] = None  # per-expert cost of asking (routing)
    # who gets a deferred pixel: the heads' choice, the best single expert, or (auto)
    # whichever gives the higher validation system Dice at the budget
    expert_choice: str = "auto"
    threshold: float = 0.5
    val_hd95: bool = False
    # run
    device: str = "auto"
    seed: int = 0
    seeds: Optional[List[int]] = None
    workers: int = 0
    progress: bool = True
    out: Optional[str] = None
    resume: bool = False
    max_steps: int = 0  # stop after this many optimiser steps in total (0: no limit)
    overwrite: bool = False  # move a previous run in out aside (out.old-<date>-<time>)
    resume_with_changes: bool = False  # resume although settings differ from the checkpoint's

    @property
    def head_kind(self) -> str:
        """The routing heads this configuration builds."""
        if self.heads is not None:
            return self.heads
        return "conv" if self.training == "two-stage" else "linear"

    @property
    def num_siblings(self) -> int:
        """The sibling networks this configuration's model reads (only two-stage conv heads
        read siblings)."""
        if self.training != "two-stage" or self.head_kind != "conv":
            return 0
        return int(self.siblings)

    @property
    def data_split_seed(self) -> int:
        """The seed that draws the train/val/test split (``split_seed``, else ``seed``)."""
        return self.seed if self.split_seed is None else self.split_seed

    @property
    def route_scores(self) -> str:
        """How route() reads correctness estimates from the routing logits."""
        return "sigmoid" if self.surrogate == "ova" else "softmax"

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any], source: str = "config") -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"{source}: unknown option(s) {unknown}; known: {sorted(names)}")
        from .validate import validate_types

        validate_types(cls, values, source)  # types from the field hints (pydantic, strict)
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def choice(name, allowed):
            v = getattr(self, name)
            if v not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {v!r}")

        choice("layout", LAYOUTS)
        choice("method", METHODS)
        choice("schedule", SCHEDULES)
        choice("training", TRAININGS)
        if self.heads is not None:
            choice("heads", HEADS)
        choice("surrogate", SURROGATES)
        choice("gate_target", GATE_TARGETS)
        choice("balance", BALANCES)
        choice("route_mode", ROUTE_MODES)
        choice("selection", SELECTIONS)
        choice("expert_choice", EXPERT_CHOICES)
        if not 0.0 <= float(self.budget) <= 1.0:
            raise ValueError(f"budget must be in [0, 1], got {self.budget}")
        if not float(self.head_lr) > 0:
            raise ValueError(f"head_lr must be > 0, got {self.head_lr}")
        if int(self.head_epochs) < 0:
            raise ValueError(f"head_epochs must be >= 0, got {self.head_epochs}")
        if (
            isinstance(self.siblings, bool)
            or int(self.siblings) != self.siblings
            or self.siblings < 0
        ):
            raise ValueError(f"siblings must be an integer >= 0, got {self.siblings!r}")
        if self.sibling_checkpoints is not None:
            if len(self.sibling_checkpoints) != int(self.siblings):
                raise ValueError(
                    f"sibling_checkpoints must name siblings={self.siblings} checkpoints, got "
                    f"{len(self.sibling_checkpoints)}"
                )
            for path in self.sibling_checkpoints:
                if not Path(path).is_file():
                    raise FileNotFoundError(f"sibling_checkpoints: {path!r} does not exist")
        if self.base_checkpoint is not None and not Path(self.base_checkpoint).is_file():
            raise FileNotFoundError(f"base_checkpoint {self.base_checkpoint!r} does not exist")
        if self.expert_profile is not None:
            choice("expert_profile", PROFILES)
        if self.layout != "synthetic" and not self.data:
            raise ValueError(f"layout {self.layout!r} needs --data DIR")
        for name in (
            "epochs",
            "batch_size",
            "grad_accum",
            "num_classes",
            "features",
            "image_size",
            "num_images",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if self.experts is not None and self.experts < 1:
            raise ValueError(f"experts must be >= 1, got {self.experts}")
        if not (0.0 <= self.threshold <= 1.0):
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.spacing is not None and (
            not self.spacing or any(not float(v) > 0 for v in self.spacing)
        ):
            raise ValueError(
                f"spacing must be positive voxel sizes in mm, one per axis, got {self.spacing}"
            )
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def load_config_file(path: str) -> Dict[str, Any]:
    """Read a YAML or JSON config file into a dict (keys with '-' or '_' both work)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {str(p)!r} does not exist")
    text = p.read_text()
    from .validate import parse_config_text

    values = parse_config_text(text, p)  # syntax errors as file:line:column
    if not isinstance(values, dict):
        raise ValueError(
            f"config file {str(p)!r} must hold a mapping of option: value, "
            f"got {type(values).__name__}"
        )
    return {str(k).replace("-", "_"): v for k, v in values.items()}
