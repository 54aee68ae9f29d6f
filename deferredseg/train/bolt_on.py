"""Add deferral to a segmentation network you already trained (public as
:mod:`deferredseg.bolt_on`; it lives in the train layer because it trains heads with
:mod:`.two_stage` and its checkpoints are read by :func:`.runtime.load_trained`).

:func:`add_deferral` takes any trained ``nn.Module`` that maps images ``(B, C, *S)`` to
segmentation logits ``(B, K, *S)`` (a MONAI network, an nnU-Net-style network, your
own) and gives a :class:`DeferralNetwork`: the network, frozen and unchanged, plus
routing and gate heads with conv layers of their own
(:class:`~deferredseg.models.segmentor.RoutingHeads`) that read one of its feature
maps and its segmentation logits. The heads are trained as the second stage of
``deferredseg train`` trains them, by the same code
(:func:`deferredseg.train.two_stage.fit_routing`): the network's features and logits
on the training and validation data are computed once, the heads train on them with
the DeferredSeg objective, the epoch kept (the untrained heads, which defer as
confidence deferral does, among the candidates) is the one with the best validation
system Dice at the deferral budget, and the deferral policy is calibrated at that
budget on the validation data.

The forward pass gives the packed logits ``(B, K + E + 2, *S)``
(:func:`deferredseg.policy.channel_layout`); ``.policy`` routes them. ``save`` writes a
checkpoint that ``deferredseg predict`` (and so ``serve`` and ``merge``) reads: it
records how to rebuild your network, an importable factory ``"package.module:callable"``
and its keyword arguments (JSON), never pickled code.

Example::

    from deferredseg.bolt_on import add_deferral

    deferral = add_deferral(unet, train_loader, val_loader, num_classes=1, num_experts=3)
    out = deferral.route(images)  # out.assignment: -1 the model keeps the pixel, j expert j
    deferral.save("deferral.pt", factory="monai.networks.nets:UNet", factory_kwargs={...})
"""

from __future__ import annotations

import importlib
import itertools
import json
import math
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..losses import DeferredSegLoss
from ..models.segmentor import DeferredSegmentor, forward_capturing
from ..policy import DeferralPolicy, Routing
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .two_stage import HeadSchedule, batch_parts, fit_routing, iter_batches

__all__ = [
    "add_deferral",
    "DeferralNetwork",
    "SegmentationWithFeatures",
    "find_feature_layer",
    "load_deferral_network",
    "NO_VALIDATION_DATA",
]

#: Why a bolt-on checkpoint cannot be calibrated for another budget by ``predict``.
NO_VALIDATION_DATA = (
    "this checkpoint was written by deferredseg.bolt_on (add_deferral) and records no "
    "validation data to calibrate another budget on; use the budget it was calibrated for "
    "(leave budget out), give a threshold, or recalibrate in Python with "
    "DeferralNetwork.calibrate(val_data, budget) and save it again"
)

_CONVS = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
_FACTORY = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


# ----------------------------------------------------------------------------- the features


def find_feature_layer(network: nn.Module, num_classes: int) -> str:
    """The segmentation classifier of ``network``: the layer whose *input* is the feature map.

    The last ``Conv{1,2,3}d`` / ``ConvTranspose{1,2,3}d`` (in registration order) with
    ``out_channels == num_classes``. A K -> K conv after the classifier (MONAI
    ``UNet``'s last residual unit) is passed over for the classifier before it, whose
    input has more than the K logits; only when every candidate is K -> K is the last
    one taken.

    Args:
        network: the trained segmentation network.
        num_classes: K, its output channels.

    Returns:
        The layer's name in ``network.named_modules()``.

    Raises:
        TypeError: ``network`` is not an ``nn.Module``.
        ValueError: no conv layer has ``out_channels == num_classes`` (the message lists
            the network's last conv layers, to name ``feature_layer`` by hand).
    """
    if not isinstance(network, nn.Module):
        raise TypeError(f"network must be an nn.Module, got {type(network).__name__}")
    convs = [
        (name, m)
        for name, m in network.named_modules()
        if name and isinstance(m, _CONVS) and m.out_channels == num_classes
    ]
    if not convs:
        kinds = [
            f"{n} ({m.in_channels}->{m.out_channels})"
            for n, m in network.named_modules()
            if isinstance(m, _CONVS)
        ][-8:]
        raise ValueError(
            f"feature_layer=None: no Conv1d/2d/3d or ConvTranspose1d/2d/3d layer of the network "
            f"has out_channels == num_classes={num_classes}, so the layer before the classifier "
            f"cannot be found; name the layer whose output is the feature map with "
            f"feature_layer='...' (a name of network.named_modules()). Its last conv layers: "
            f"{kinds or 'none'}"
        )
    wider = [(n, m) for n, m in convs if m.in_channels != num_classes]
    return (wider or convs)[-1][0]


class SegmentationWithFeatures(nn.Module):
    """``network`` returning ``(segmentation logits, features)``: the features are the
    output (``take="output"``) or the input (``take="input"``) of its submodule
    ``layer``, captured by a hook registered only while this forward runs."""

    def __init__(self, network: nn.Module, layer: str, take: str = "output"):
        super().__init__()
        if take not in ("input", "output"):
            raise ValueError(f"take must be 'input' or 'output', got {take!r}")
        self.network = network
        self.layer = str(layer)
        self.take = take
        _submodule(network, self.layer)

    def forward(self, x: torch.Tensor) -> Tuple[Any, Any]:
        seg, feats = forward_capturing(self.network, self.layer, x, self.take)
        if hasattr(seg, "as_tensor"):  # MONAI MetaTensor
            seg = seg.as_tensor()
        if hasattr(feats, "as_tensor"):
            feats = feats.as_tensor()
        return seg, feats


def _submodule(network: nn.Module, name: str) -> nn.Module:
    try:
        return network.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in network.named_modules() if n]
        raise ValueError(
            f"feature_layer={name!r} is not a submodule of the network; expected a name of "
            f"network.named_modules(), e.g. one of {names[-12:]}"
        ) from None


# ----------------------------------------------------------------------------- the network


class DeferralNetwork(DeferredSegmentor):
    """A trained segmentation network (frozen, its own logits kept) with routing and gate
    heads on one of its feature maps: ``forward(x)`` gives the packed logits
    ``(B, K + E + 2, *S)``; ``policy`` (a calibrated :class:`~deferredseg.policy.
    DeferralPolicy`) routes them; :meth:`route` does both; :meth:`save` writes a
    checkpoint ``deferredseg predict`` reads. Built by :func:`add_deferral` or
    :func:`load_deferral_network`.

    Args:
        network: the trained segmentation network (frozen here).
        feature_layer: the submodule whose input or output is the feature map.
        feature_channels: F, the feature map's channels.
        num_classes: K.
        num_experts: E.
        spatial_dims: 2 or 3.
        take: ``"input"`` or ``"output"`` of ``feature_layer``.
        head_channels: the conv channels of the routing and gate heads.
        policy: the deferral policy (None until calibrated).
        expert_names: the experts' names (default ``expert0``, ``expert1``, ...).
        in_channels, spatial_size: the images' channels and size (needed by
            :meth:`save`).

    Raises:
        ValueError: ``take`` not ``"input"`` or ``"output"``; ``feature_layer`` not a
            submodule of ``network``; a count that is not an integer >= 1.
    """

    def __init__(
        self,
        network: nn.Module,
        feature_layer: str,
        feature_channels: int,
        num_classes: int,
        num_experts: int,
        spatial_dims: int,
        take: str = "input",
        head_channels: int = 16,
        policy: Optional[DeferralPolicy] = None,
        expert_names: Optional[Sequence[str]] = None,
        in_channels: Optional[int] = None,
        spatial_size: Optional[Sequence[int]] = None,
    ):
        super().__init__(
            SegmentationWithFeatures(network, feature_layer, take),
            feature_channels=feature_channels,
            num_classes=num_classes,
            num_experts=num_experts,
            spatial_dims=spatial_dims,
            keep_backbone_seg=True,
            freeze_backbone=True,
            heads="conv",
            head_channels=head_channels,
        )
        self.feature_layer_name = str(feature_layer)
        self.take = take
        self.head_channels = int(head_channels)
        self.policy = policy
        self.expert_names = list(expert_names or [f"expert{j}" for j in range(num_experts)])
        self.in_channels = None if in_channels is None else int(in_channels)
        self.spatial_size = None if spatial_size is None else [int(s) for s in spatial_size]
        self.validation: Dict[str, Any] = {}
        self.history: List[Dict[str, Any]] = []

    @property
    def network(self) -> nn.Module:
        """The user's network (frozen)."""
        return self.backbone.network

    @torch.no_grad()
    def route(
        self, x: torch.Tensor, expert_labels: Optional[torch.Tensor] = None, backend: str = "auto"
    ) -> Routing:
        """Who labels each pixel of ``x`` under :attr:`policy` (eval mode, no gradients).

        Args:
            x: images (B, C, *S).
            expert_labels: None, or the experts' labels (B, E, *S): then ``final``
                holds the combined labels.
            backend: the route kernel's backend.

        Returns:
            A :class:`~deferredseg.policy.Routing`.

        Raises:
            ValueError: no policy, or one that cannot route (as
                :meth:`~deferredseg.policy.DeferralPolicy.route`); shapes that do not fit.
            TypeError: labels that are not an integer tensor.
            RuntimeError: ``backend`` cannot run here.
        """
        if self.policy is None:
            raise ValueError("policy is None: calibrate(val_data, budget) this network first")
        was = self.training
        self.eval()
        try:
            logits = self(x)
        finally:
            self.train(was)
        return self.policy.route(logits, expert_labels, backend=backend)

    def outputs(self, data, batch_size: int = 4, where: str = "data"):
        """The network's outputs on ``data``, as calibration and evaluation read them.

        Args:
            data: a dataset or an iterable of batches, as :func:`add_deferral` takes them.
            batch_size: images per batch of a dataset.
            where: the argument's name in errors.

        Returns:
            A function returning a new pass of ``(packed logits, target, expert
            labels)`` batches: what :meth:`~deferredseg.policy.DeferralPolicy.calibrate`
            and :func:`deferredseg.metrics.measure` read. Batches are checked as they
            are read (``ValueError`` / ``TypeError`` naming ``where``).

        Raises:
            ValueError: ``batch_size`` not an integer >= 1.
        """
        device = next(self.parameters()).device
        settings = HeadSchedule(batch_size=int(batch_size))

        def batches():
            was = self.training
            self.eval()
            try:
                with torch.no_grad():
                    for batch in iter_batches(data, settings):
                        x, t, e = batch_parts(batch, where)
                        yield self(x.to(device)).float(), t.to(device), e.to(device)
            finally:
                self.train(was)

        return batches

    def calibrate(self, val_data, budget: float, batch_size: int = 4) -> DeferralPolicy:
        """Calibrate :attr:`policy` for ``budget`` on ``val_data`` (and keep it).

        Args:
            val_data: a dataset or an iterable of batches, as :func:`add_deferral` takes.
            budget: the share of valid pixels to defer, in [0, 1].
            batch_size: images per batch of a dataset.

        Returns:
            The calibrated policy (also the new :attr:`policy`).

        Raises:
            ValueError: no policy; a budget outside [0, 1]; batches that do not fit.
            TypeError: a budget that is not a number; batches of another form.
        """
        if self.policy is None:
            raise ValueError("policy is None: this network has no policy to calibrate")
        self.policy = self.policy.calibrate(self.outputs(val_data, batch_size, "val_data"), budget)
        return self.policy

    # -- checkpoints ------------------------------------------------------------------------------
    def checkpoint(
        self, factory: str, factory_kwargs: Optional[Dict[str, Any]] = None
    ) -> Dict[str, Any]:
        """The checkpoint dict :meth:`save` writes (tensors and JSON-like values only).

        Args:
            factory, factory_kwargs: as for :meth:`save`.

        Returns:
            The checkpoint: the weights, the ``bolt_on`` record (factory, feature layer),
            the configuration, the policy and the experts.

        Raises:
            ValueError: ``factory`` not an importable ``"package.module:callable"`` that
                builds the same network (parameter names and shapes), or it fails;
                ``factory_kwargs`` not JSON values; no policy; ``in_channels`` or
                ``spatial_size`` unknown.
            TypeError: ``factory_kwargs`` not a dict, or the factory returns something
                other than an ``nn.Module``.
        """
        kwargs = _check_factory(factory, factory_kwargs)
        rebuilt = _build_network(factory, kwargs)
        _check_same_network(self.network, rebuilt, factory)
        if self.policy is None:
            raise ValueError("policy is None: calibrate the network before saving it")
        if self.in_channels is None or self.spatial_size is None:
            raise ValueError(
                "in_channels and spatial_size are unknown (a network built without data): "
                "give them to DeferralNetwork(...)"
            )
        size = list(self.spatial_size)
        cfg = TrainConfig(
            method="deferredseg",
            num_classes=self.num_classes,
            spatial_dims=self.spatial_dims,
            image_size=int(size[0]),
            spatial_size=size,
            head_channels=self.head_channels,
            heads="conv",
            budget=float(self.policy.budget if self.policy.budget is not None else 0.1),
            route_mode=self.policy.mode,
            expert_choice=self.policy.expert_choice,
            surrogate="ova" if self.policy.scores == "sigmoid" else "softmax",
            progress=False,
        )
        return {
            "model": {k: v.detach().cpu() for k, v in self.state_dict().items()},
            "bolt_on": {
                "format": 1,
                "factory": factory,
                "factory_kwargs": kwargs,
                "feature_layer": self.feature_layer_name,
                "take": self.take,
                "feature_channels": self.feature_channels,
                "head_channels": self.head_channels,
            },
            "config": cfg.to_dict(),
            "policy": self.policy.to_dict(),
            "num_experts": self.num_experts,
            "expert_names": list(self.expert_names),
            "in_channels": self.in_channels,
            "best_expert": int(self.policy.best_expert or 0),
            "val": {k: v for k, v in self.validation.items() if isinstance(v, (int, float))},
        }

    def save(
        self,
        path: Union[str, Path],
        factory: str,
        factory_kwargs: Optional[Dict[str, Any]] = None,
    ) -> Path:
        """Write a checkpoint ``deferredseg predict --checkpoint`` reads (atomically; it loads
        with ``weights_only=True``).

        ``factory``: ``"package.module:callable"`` that builds your network, called as
        ``callable(**factory_kwargs)`` (``factory_kwargs`` JSON values) when the checkpoint
        is loaded; e.g. ``"monai.networks.nets:UNet"`` with its keyword arguments. It is
        called once now to check that it builds the same network (same parameter names
        and shapes).

        Args:
            path: the checkpoint file to write.
            factory: ``"package.module:callable"``.
            factory_kwargs: its keyword arguments, JSON values (default none).

        Returns:
            ``path`` as a ``Path``.

        Raises:
            ValueError, TypeError: as :meth:`checkpoint`.
            OSError: the file cannot be written (the old file, if any, is kept).
        """
        state = self.checkpoint(factory, factory_kwargs)
        save_checkpoint(path, state)
        return Path(path)


def _check_factory(factory: Any, factory_kwargs: Any) -> Dict[str, Any]:
    if not isinstance(factory, str) or not _FACTORY.match(factory):
        raise ValueError(
            f"factory must be an importable 'package.module:callable' string (e.g. "
            f"'monai.networks.nets:UNet'), got {factory!r}"
        )
    kwargs = {} if factory_kwargs is None else factory_kwargs
    if not isinstance(kwargs, dict):
        raise TypeError(
            f"factory_kwargs must be a dict of JSON values, got {type(kwargs).__name__}"
        )
    try:
        return json.loads(json.dumps(kwargs, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"factory_kwargs must hold JSON values only (numbers, strings, lists, dicts, "
            f"true/false/null): {exc}"
        ) from None


def _build_network(factory: str, kwargs: Dict[str, Any]) -> nn.Module:
    module_name, attr = factory.split(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"factory {factory!r}: cannot import {module_name!r}: {exc}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"factory {factory!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"factory {factory!r}: {attr!r} is not callable")
    try:
        net = obj(**kwargs)
    except Exception as exc:
        raise ValueError(
            f"factory {factory!r} failed with factory_kwargs {kwargs}: {type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(net, nn.Module):
        raise TypeError(f"factory {factory!r} must return an nn.Module, got {type(net).__name__}")
    return net


def _check_same_network(network: nn.Module, rebuilt: nn.Module, factory: str) -> None:
    want = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    if want != got:
        missing = sorted(set(want) - set(got))[:5]
        extra = sorted(set(got) - set(want))[:5]
        shapes = [k for k in set(want) & set(got) if want[k] != got[k]][:5]
        raise ValueError(
            f"factory {factory!r} with these factory_kwargs does not build the trained network: "
            f"missing parameters {missing}, unexpected {extra}, other shapes {shapes}"
        )


def load_deferral_network(
    checkpoint: Union[str, Path, Dict[str, Any]], device: Union[str, torch.device] = "cpu"
) -> DeferralNetwork:
    """The :class:`DeferralNetwork` of a checkpoint written by :meth:`DeferralNetwork.save`.

    Args:
        checkpoint: its path, or the checkpoint dict.
        device: where to put the network.

    Returns:
        The network in eval mode on ``device``, with its policy and validation metrics.

    Raises:
        ValueError: a file that cannot be read safely or is not a training checkpoint;
            a checkpoint without the ``bolt_on`` record (not written by
            :meth:`DeferralNetwork.save`), or whose factory cannot build the network.
        TypeError: the factory returns something other than an ``nn.Module``.
        FileNotFoundError: no file at ``checkpoint``.
    """
    ck = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint, device)
    rec = ck.get("bolt_on")
    if not isinstance(rec, dict):
        raise ValueError(
            "checkpoint: not written by DeferralNetwork.save (it has no 'bolt_on' record)"
        )
    cfg = ck["config"]
    network = _build_network(rec["factory"], dict(rec.get("factory_kwargs") or {}))
    model = DeferralNetwork(
        network,
        rec["feature_layer"],
        int(rec["feature_channels"]),
        int(cfg["num_classes"]),
        int(ck["num_experts"]),
        int(cfg["spatial_dims"]),
        take=rec.get("take", "input"),
        head_channels=int(rec["head_channels"]),
        policy=DeferralPolicy.from_dict(ck["policy"]),
        expert_names=ck.get("expert_names"),
        in_channels=int(ck["in_channels"]),
        spatial_size=cfg.get("spatial_size"),
    )
    model.load_state_dict(ck["model"])
    model.validation = dict(ck.get("val") or {})
    return model.to(device).eval()


# ----------------------------------------------------------------------------- add_deferral


def _first_batch(data, where: str, batch_size: int):
    """``(first batch's parts, data)``: a one-pass iterator is given back with its first
    batch put in front again, so that every batch is still cached."""
    batches = iter_batches(data, HeadSchedule(batch_size=batch_size))
    it = iter(batches)
    try:
        first = next(it)
    except StopIteration:
        raise ValueError(f"{where}: holds no batches") from None
    if it is batches:  # a generator or iterator: read once, so keep what was read
        data = itertools.chain([first], it)
    return batch_parts(first, where), data


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _probe(
    network: nn.Module,
    feature_layer: Optional[str],
    num_classes: int,
    num_experts: int,
    image: torch.Tensor,
    experts: torch.Tensor,
    device: torch.device,
) -> Tuple[str, str, int]:
    """(layer, "input"/"output", feature channels), checked on one training batch."""
    if feature_layer is None:
        layer, take = find_feature_layer(network, num_classes), "input"
    else:
        if not isinstance(feature_layer, str) or not feature_layer:
            raise TypeError(
                f"feature_layer must be None or a submodule name (str), got {feature_layer!r}"
            )
        layer, take = feature_layer, "output"
    if experts.shape[1] != num_experts:
        raise ValueError(
            f"num_experts={num_experts} but train_data's expert_labels have "
            f"{experts.shape[1]} experts (shape {tuple(experts.shape)})"
        )
    x = image[:1].to(device)
    with torch.no_grad():
        seg = network(x)
    if hasattr(seg, "as_tensor"):  # MONAI MetaTensor
        seg = seg.as_tensor()
    dims = image.dim() - 2
    want = (1, num_classes) + tuple(image.shape[2:])
    if not isinstance(seg, torch.Tensor) or tuple(seg.shape) != want:
        got = tuple(seg.shape) if isinstance(seg, torch.Tensor) else type(seg).__name__
        raise ValueError(
            f"network: expected segmentation logits of shape (B, num_classes={num_classes}, "
            f"*S) = {want} for an input of shape {tuple(x.shape)}, got {got}; the network "
            "must return one tensor of logits at the input's size (switch deep supervision "
            "off; num_classes is the network's output channel count)"
        )
    with torch.no_grad():
        _, feats = SegmentationWithFeatures(network, layer, take)(x)
    what = f"feature_layer={layer!r}" + (" (found automatically)" if feature_layer is None else "")
    if not isinstance(feats, torch.Tensor) or feats.dim() != dims + 2:
        got = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
        raise ValueError(
            f"{what}: its {take} must be a feature map (B, F, *S) with {dims} spatial dims, "
            f"got {got}"
        )
    return layer, take, int(feats.shape[1])


def add_deferral(
    network: nn.Module,
    train_data,
    val_data,
    num_classes: int = 1,
    num_experts: int = 3,
    feature_layer: Optional[str] = None,
    budget: float = 0.1,
    mode: str = "gate",
    expert_choice: str = "auto",
    expert_cost: Optional[Sequence[float]] = None,
    expert_names: Optional[Sequence[str]] = None,
    head_channels: int = 16,
    head_epochs: int = 30,
    head_lr: float = 1e-2,
    weight_decay: float = 1e-4,
    batch_size: int = 4,
    selection: str = "budget-dice",
    seed: int = 0,
    device: Union[str, torch.device, None] = None,
    backend: str = "auto",
    loss_preset: str = "default",
    loss_options: Optional[Dict[str, Any]] = None,
    verbose: bool = False,
) -> DeferralNetwork:
    """Add deferral to a trained segmentation ``network``; see the module docstring.

    Args:
        network: your trained ``nn.Module``, ``x (B, C, *S) -> logits (B, K, *S)``; it is
            frozen (``requires_grad=False``, eval mode) and never changed.
        train_data, val_data: iterables of batches (DataLoaders, lists), a batch a dict
            with "image", "target", "expert_labels" or a tuple ``(image, target,
            expert_labels)``: images (B, C, *S), targets (B, *S) (or (B, 1, *S)), expert
            labels (B, E, *S); or a dataset of such items (read in ``batch_size``). Each
            is read once (the network's outputs are cached): a generator works too.
        num_classes: K, the network's output channels (1: binary with a sigmoid).
        num_experts: E, the experts of ``expert_labels``.
        feature_layer: the name (``network.named_modules()``) of the submodule whose
            output is the feature map the heads read; ``None``: the input of the
            segmentation classifier, found by :func:`find_feature_layer`.
        budget: the share of pixels the experts label; the epoch is selected and the
            policy calibrated at it on ``val_data``.
        mode, expert_choice, expert_cost: of the :class:`~deferredseg.policy.DeferralPolicy`.
        expert_names: the experts' names (for ``predict``'s review tasks).
        head_channels, head_epochs, head_lr, weight_decay, batch_size, selection, seed:
            the heads and their training (as ``deferredseg train``'s second stage).
        device: where to run (default: CUDA when available, else the CPU).
        backend: the loss and routing kernels (``deferredseg_kernels.BACKENDS``).
        loss_preset, loss_options: the objective, ``DeferredSegLoss(K, E, preset=...,
            **loss_options)``; the default is the "default" preset, what ``deferredseg
            train`` uses. ``lambda_seg`` is 0 (the segmentation is frozen).
        verbose: print one line per epoch of the heads.

    Returns:
        a :class:`DeferralNetwork` on ``device`` in eval mode, with ``policy`` calibrated
        at ``budget`` on ``val_data``, ``validation`` (the selected epoch's validation
        metrics) and ``history`` (every epoch's).

    Raises:
        TypeError: ``network`` is not an ``nn.Module``; ``feature_layer`` neither None
            nor a string; a batch that is neither a dict nor a 3-tuple, or whose parts
            are not tensors; an unknown loss option name.
        ValueError: a count (``num_classes``, ``num_experts``, ``head_channels``,
            ``head_epochs``, ``batch_size``) not an integer in range; ``head_lr`` not a
            finite number > 0; ``budget`` outside [0, 1]; an unknown ``selection``,
            ``mode``, ``expert_choice``, ``backend`` or ``loss_preset``; bad
            ``expert_cost``; ``lambda_seg`` in ``loss_options``; ``expert_names`` not
            E names; data with no batches; images not 2D or 3D; expert labels that
            are not E; a network whose output is not (B, K, *S) logits at the input's
            size; a ``feature_layer`` that is not a submodule or whose output is not a
            feature map (or none found by :func:`find_feature_layer`).
    """
    if not isinstance(network, nn.Module):
        raise TypeError(f"network must be an nn.Module, got {type(network).__name__}")
    for name, value, low in (
        ("num_classes", num_classes, 1),
        ("num_experts", num_experts, 1),
        ("head_channels", head_channels, 1),
        ("head_epochs", head_epochs, 0),
        ("batch_size", batch_size, 1),
    ):
        _check_int(name, value, low)
    if not (isinstance(head_lr, (int, float)) and math.isfinite(head_lr) and head_lr > 0):
        raise ValueError(f"head_lr must be a finite number > 0, got {head_lr!r}")
    if mode == "router" and expert_choice == "auto":
        expert_choice = "heads"  # the router's argmax has no budget to compare the two at
    options = dict(loss_options or {})
    if "lambda_seg" in options:
        raise ValueError("loss_options: lambda_seg cannot be set (the segmentation is frozen)")
    criterion = DeferredSegLoss(
        num_classes, num_experts, backend=backend, preset=loss_preset, lambda_seg=0.0, **options
    )
    policy = DeferralPolicy.for_loss(
        criterion, mode=mode, expert_choice=expert_choice, expert_cost=expert_cost
    )
    settings = HeadSchedule(
        epochs=head_epochs,
        lr=head_lr,
        weight_decay=weight_decay,
        batch_size=batch_size,
        seed=seed,
        budget=budget,
        selection=selection,
        backend=backend,
    )
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if expert_names is not None and len(expert_names) != num_experts:
        raise ValueError(
            f"expert_names must name the {num_experts} experts, got {len(expert_names)} names"
        )

    network = network.to(dev).eval()
    (image, _, experts), train_data = _first_batch(train_data, "train_data", batch_size)
    if image.dim() not in (4, 5):
        raise ValueError(
            f"train_data: images must be (B, C, H, W) or (B, C, D, H, W), got shape "
            f"{tuple(image.shape)}"
        )
    layer, take, channels = _probe(
        network, feature_layer, num_classes, num_experts, image, experts, dev
    )
    with torch.random.fork_rng(devices=[]):  # the heads' start, seeded, the caller's RNG kept
        torch.manual_seed(seed)
        model = DeferralNetwork(
            network,
            layer,
            channels,
            num_classes,
            num_experts,
            image.dim() - 2,
            take=take,
            head_channels=head_channels,
            expert_names=expert_names,
            in_channels=int(image.shape[1]),
            spatial_size=list(image.shape[2:]),
        ).to(dev)

    def loss_fn(out, target, expert_labels):
        loss = criterion(out, target, expert_labels)
        return loss, dict(criterion.last_terms)

    fit = fit_routing(
        model,
        train_data,
        val_data,
        settings,
        loss_fn,
        policy,
        dev,
        log=_EpochPrinter() if verbose else None,
    )
    model.policy = fit.policy
    model.validation = fit.metrics
    model.history = fit.history
    return model.eval()


class _EpochPrinter:
    """One line per validated epoch of the heads (``verbose=True``)."""

    def write(self, **record: Any) -> None:
        if record.get("event") != "epoch":
            return
        e = record["epoch"]
        label = "untrained heads" if e < 0 else f"heads epoch {e + 1}"

        def num(key: str, digits: int) -> str:
            v = record.get(key)
            return "n/a" if v is None else f"{v:.{digits}f}"

        print(
            f"{label}: val system Dice {num('val_system_dice', 4)} "
            f"(model {num('val_model_dice', 4)}) at deferral {num('val_deferral_rate', 3)}",
            flush=True,
        )
