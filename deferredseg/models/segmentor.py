"""The model-agnostic DeferredSeg wrapper: any backbone plus routing and gate heads."""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from deferredseg_kernels import RouteResult, route, split_logits

from .backbones import build_backbone

__all__ = ["DeferredSegmentor", "GateHead", "RoutingHeads", "conv_nd"]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_INTERP = {1: "linear", 2: "bilinear", 3: "trilinear"}


def conv_nd(spatial_dims: int):
    """``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` for 1, 2 or 3 spatial dims."""
    if spatial_dims not in _CONV:
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
    return _CONV[spatial_dims]


class GateHead(nn.Module):
    """The aggregated deferral predictor: conv 3x3, ReLU, conv 1x1 -> one gate logit channel."""

    def __init__(self, in_channels: int, hidden_channels: int, spatial_dims: int = 2):
        super().__init__()
        conv = conv_nd(spatial_dims)
        self.conv1 = conv(in_channels, hidden_channels, kernel_size=3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = conv(hidden_channels, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.conv1(x)))


class RoutingHeads(nn.Module):
    """Routing and gate heads with conv layers of their own.

    Reads the backbone's features concatenated with the K segmentation logits
    (its last K channels), through two conv 3x3 + ReLU layers of
    ``hidden_channels``, and a conv 1x1 to E + 1 routing logits and one gate logit.

    With ``uncertainty_prior=True`` (the default) the heads start from what the
    segmentation head already knows: the gate logit is ``s_g * logit(u)`` and the
    model's routing logit ``s_m * logit(1 - u)`` plus what the layers add, with u
    the segmentation's uncertainty (1 - max class probability), ``s_g``, ``s_m``
    learnable scales starting at 1 and the last layer starting at zero. Before any
    training the gate ranks pixels exactly as confidence deferral does; training
    moves it from there. With ``detach=True`` (two-stage training) no gradient
    reaches the backbone or the segmentation head through these heads.

    With ``num_siblings`` S > 0 the heads also read the segmentation logits of S
    sibling networks (the same architecture trained from other seeds; their S * K
    channels come just before the model's own K logits in the head input), and the
    prior becomes a mix of two scores of the model being wrong at a pixel:
    ``a_u * logit(u) + a_e * logit(e)``, with e the ensemble's probability that the
    model's label is wrong (1 - the mean over the model and its siblings of each
    one's probability of the model's label). Where the model alone is confidently
    wrong its siblings often disagree, so e ranks the model's errors where u cannot.
    :meth:`use_prior` sets ``(a_u, a_e)`` to one of :attr:`PRIORS`: two-stage
    training validates both starts and trains from the better one.
    """

    PRIORS = {"uncertainty": (1.0, 0.0), "ensemble": (0.0, 1.0)}

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int,
        num_experts: int,
        spatial_dims: int = 2,
        detach: bool = True,
        num_classes: int = 1,
        uncertainty_prior: bool = True,
        num_siblings: int = 0,
    ):
        super().__init__()
        conv = conv_nd(spatial_dims)
        self.detach = bool(detach)
        self.num_classes = int(num_classes)
        self.num_experts = int(num_experts)
        self.uncertainty_prior = bool(uncertainty_prior)
        self.num_siblings = _positive_int("num_siblings", num_siblings, 0)
        in_channels = in_channels + self.num_siblings * self.num_classes
        self.body = nn.Sequential(
            conv(in_channels, hidden_channels, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            conv(hidden_channels, hidden_channels, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            conv(hidden_channels, num_experts + 2, kernel_size=1),
        )
        if self.uncertainty_prior:
            nn.init.zeros_(self.body[-1].weight)
            nn.init.zeros_(self.body[-1].bias)
            self.prior_scale = nn.Parameter(torch.ones(2))  # gate, model's routing logit
            # (a_u, a_e): the weights of the uncertainty and of the ensemble's error score
            start = torch.tensor(self.PRIORS["ensemble" if self.num_siblings else "uncertainty"])
            if self.num_siblings:  # learnt with the heads
                self.prior_mix = nn.Parameter(start)
            else:  # the uncertainty alone: fixed (its scale is prior_scale)
                self.register_buffer("prior_mix", start)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "prior_mix"
        if (
            self.uncertainty_prior
            and key not in state_dict
            and prefix + "prior_scale" in state_dict
        ):
            # heads saved before the ensemble prior existed: the uncertainty prior alone
            state_dict[key] = torch.tensor(self.PRIORS["uncertainty"])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def use_prior(self, name: str) -> None:
        """Start from one of :attr:`PRIORS` (``"ensemble"`` needs siblings)."""
        if name not in self.PRIORS:
            raise ValueError(f"name must be one of {list(self.PRIORS)}, got {name!r}")
        if not self.uncertainty_prior:
            raise ValueError("use_prior needs heads built with uncertainty_prior=True")
        if name == "ensemble" and not self.num_siblings:
            raise ValueError("the 'ensemble' prior needs num_siblings >= 1, got 0")
        self.prior_mix.copy_(torch.tensor(self.PRIORS[name]))
        self.prior_scale.fill_(1.0)

    def prior_names(self) -> List[str]:
        """The starts :meth:`use_prior` accepts for these heads."""
        if not self.uncertainty_prior:
            return []
        return list(self.PRIORS) if self.num_siblings else ["uncertainty"]

    def _unsure(self, head_input: torch.Tensor) -> torch.Tensor:
        """``a_u * logit(u) + a_e * logit(e)`` (see the class docstring)."""
        K = self.num_classes
        z = head_input[:, -K:].float()
        if K == 1:
            unsure = -z[:, 0].abs()  # logit(u) for a sigmoid: u = sigmoid(-|z|)
        else:
            logp = torch.log_softmax(z, dim=1)
            top = logp.amax(dim=1)  # log max p
            unsure = torch.log(-torch.expm1(top).clamp_max(-1e-12)) - top  # log(1 - p) - log p
        a_u, a_e = self.prior_mix[0], self.prior_mix[1]
        if not self.num_siblings:
            return a_u * unsure
        S = self.num_siblings
        sib = head_input[:, -(S + 1) * K : -K].float()
        if K == 1:
            label = z[:, 0] > 0
            members = torch.cat([z, sib], dim=1)  # (B, S + 1, *S): each one's logit
            p_label = torch.where(
                label.unsqueeze(1), torch.sigmoid(members), torch.sigmoid(-members)
            )
        else:
            label = z.argmax(dim=1, keepdim=True)  # (B, 1, *S)
            members = torch.stack([z] + list(sib.split(K, dim=1)), dim=1)  # (B, S + 1, K, *S)
            probs = torch.softmax(members, dim=2)
            index = label.unsqueeze(1).expand(-1, S + 1, *([-1] * (probs.dim() - 2)))
            p_label = probs.gather(2, index).squeeze(2)
        wrong = (1.0 - p_label.mean(dim=1)).clamp(1e-6, 1 - 1e-6)
        return a_u * unsure + a_e * torch.logit(wrong)

    def forward(self, head_input: torch.Tensor) -> torch.Tensor:
        if self.detach:
            head_input = head_input.detach()
        out = self.body(head_input)
        if not self.uncertainty_prior:
            return out
        unsure = self._unsure(head_input)
        E = self.num_experts
        prior = torch.zeros_like(out)
        prior[:, E] = -unsure * self.prior_scale[1]
        prior[:, E + 1] = unsure * self.prior_scale[0]
        return out + prior.to(out.dtype)


def forward_capturing(
    network: nn.Module, layer: str, x: torch.Tensor, take: str = "output"
) -> Tuple[Any, Any]:
    """``(network(x), what its submodule ``layer`` returned)`` (``take="output"``) or what
    that submodule received as its first input (``take="input"``), captured by a hook
    that is removed afterwards."""
    captured: List[Any] = []
    module = network.get_submodule(layer)
    if take == "input":
        handle = module.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    else:
        handle = module.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        out = network(x)
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(
            f"feature_layer {layer!r} did not run during the network's forward pass: name a "
            "layer the forward pass uses"
        )
    return out, captured[-1]


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class DeferredSegmentor(nn.Module):
    """Wraps a segmentation backbone into a DeferredSeg network.

    The forward pass returns the packed logits of docs/objective.md section 1,
    ``(B, K + E + 2, *S)``: K segmentation logits, E + 1 routing logits (experts
    0..E-1, then the model, "keep"), 1 gate logit. :meth:`predict` turns them into
    the routing of docs/objective.md section 4.

    Two ways to plug a backbone in:

    1. **Features** (default, ``keep_backbone_seg=False``): ``backbone(x)`` returns a
       feature map (B, F, *S) at input resolution, with F = ``feature_channels``.
       Three heads are added: the segmentation head (1x1 conv, K channels), the
       routing head (1x1 conv, E + 1 channels) and the gate (conv 3x3, ReLU,
       conv 1x1 -> 1 channel).
    2. **Pretrained segmentation kept** (``keep_backbone_seg=True``): the backbone's
       own segmentation logits (B, K, *S) become the segmentation channels
       unchanged; only the routing head and the gate are added, on features
       taken either from the backbone's output, when it returns
       ``(seg_logits, features)``, or, with ``feature_layer="name"``, from the
       output of the submodule of that name (``backbone.get_submodule(name)``,
       captured by a forward hook while the wrapper runs) while ``backbone(x)``
       returns the segmentation logits alone. Features at another resolution
       than the segmentation logits are resized to it (linear interpolation).
       ``freeze_backbone=True`` keeps the pretrained weights fixed.

    Args:
        backbone: any ``nn.Module``.
        feature_channels: F, the channel count of the features the heads read.
        num_classes: K (1: binary with a sigmoid).
        num_experts: E >= 1.
        spatial_dims: 1, 2 or 3.
        gate_channels: hidden channels of the gate (default F).
        keep_backbone_seg: mode 2 above.
        feature_layer: in mode 2, the name of the submodule whose output is the feature map.
        freeze_backbone: set ``requires_grad=False`` on every backbone parameter
            (and keep the backbone in eval mode).
        resize_features: in mode 1, resize features that come at another spatial
            size than the input to the input's size instead of raising an error.
        heads: ``"linear"`` (the routing head a 1x1 conv and the gate conv 3x3, ReLU,
            conv 1x1, both on the features, trained jointly with the backbone) or
            ``"conv"`` (:class:`RoutingHeads`: conv layers of their own on the
            features and the segmentation logits; see ``detach_heads``).
        head_channels: hidden channels of the ``"conv"`` heads (default F).
        detach_heads: with ``heads="conv"``, stop the heads' gradient at their input
            (the default: the routing cannot degrade the segmentation).
        siblings: frozen networks of the same task (e.g. the same architecture trained
            from other seeds), each mapping the input to segmentation logits (B, K, *S);
            the ``"conv"`` heads read them and start from the ensemble's probability
            that the model is wrong (:class:`RoutingHeads`).

    Raises:
        TypeError: ``backbone`` or an entry of ``siblings`` is not an ``nn.Module``.
        ValueError: ``heads`` not ``"linear"`` or ``"conv"``; ``feature_channels``,
            ``num_classes``, ``num_experts``, ``gate_channels`` or ``head_channels`` not
            an integer >= 1; ``num_experts`` > 127; ``spatial_dims`` not 1, 2 or 3;
            ``feature_layer`` without ``keep_backbone_seg=True``, or not a submodule of
            the backbone; ``siblings`` with ``heads="linear"``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_channels: int,
        num_classes: int,
        num_experts: int,
        spatial_dims: int = 2,
        gate_channels: Optional[int] = None,
        keep_backbone_seg: bool = False,
        feature_layer: Optional[str] = None,
        freeze_backbone: bool = False,
        resize_features: bool = False,
        heads: str = "linear",
        head_channels: Optional[int] = None,
        detach_heads: bool = True,
        siblings: Optional[List[nn.Module]] = None,
    ):
        super().__init__()
        if heads not in ("linear", "conv"):
            raise ValueError(f"heads must be 'linear' or 'conv', got {heads!r}")
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
        self.feature_channels = _positive_int("feature_channels", feature_channels)
        self.num_classes = _positive_int("num_classes", num_classes)
        self.num_experts = _positive_int("num_experts", num_experts)
        if self.num_experts > 127:
            raise ValueError(
                f"num_experts must be <= 127 (route's int8 assignment), got {num_experts}"
            )
        conv = conv_nd(spatial_dims)
        self.spatial_dims = int(spatial_dims)
        if feature_layer is not None and not keep_backbone_seg:
            raise ValueError(
                "feature_layer is only used with keep_backbone_seg=True (the backbone's own "
                "segmentation output is kept and features are read from that layer)"
            )
        if feature_layer is not None:
            try:
                backbone.get_submodule(feature_layer)
            except AttributeError:
                names = [n for n, _ in backbone.named_modules() if n][:20]
                raise ValueError(
                    f"feature_layer={feature_layer!r} is not a submodule of the backbone; "
                    f"some of its submodules: {names}"
                ) from None
        self.backbone = backbone
        self.keep_backbone_seg = bool(keep_backbone_seg)
        self.feature_layer = feature_layer
        self.freeze_backbone = bool(freeze_backbone)
        self.resize_features = bool(resize_features)
        F_ = self.feature_channels
        hidden = _positive_int("gate_channels", gate_channels) if gate_channels is not None else F_
        self.seg_head = (
            None if self.keep_backbone_seg else conv(F_, self.num_classes, kernel_size=1)
        )
        self.heads = heads
        if heads == "linear":
            self.route_head = conv(F_, self.num_experts + 1, kernel_size=1)
            self.gate_head = GateHead(F_, hidden, self.spatial_dims)
        else:
            h = _positive_int("head_channels", head_channels) if head_channels is not None else F_
            self.routing_heads = RoutingHeads(
                F_ + self.num_classes,
                h,
                self.num_experts,
                self.spatial_dims,
                detach=detach_heads,
                num_classes=self.num_classes,
                num_siblings=len(siblings or ()),
            )
        if siblings and heads != "conv":
            raise ValueError(
                f"siblings are read by the 'conv' routing heads only; got heads={heads!r} "
                f"with {len(siblings)} siblings"
            )
        for i, net in enumerate(siblings or ()):
            if not isinstance(net, nn.Module):
                raise TypeError(f"siblings[{i}] must be an nn.Module, got {type(net).__name__}")
        # frozen networks of the same task (other seeds): what the ensemble prior reads
        self.siblings = nn.ModuleList(siblings or ())
        for p in self.siblings.parameters():
            p.requires_grad_(False)
        if self.freeze_backbone:
            for p in self.backbone.parameters():
                p.requires_grad_(False)
            self.backbone.eval()

    @property
    def out_channels(self) -> int:
        """K + E + 2, the channel count of the packed logits."""
        return self.num_classes + self.num_experts + 2

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()  # a frozen backbone keeps its normalisation statistics
        self.siblings.eval()  # frozen: always in inference mode
        return self

    @property
    def num_siblings(self) -> int:
        """How many sibling networks the routing heads read (0: none)."""
        return len(self.siblings)

    @torch.no_grad()
    def sibling_logits(self, x: torch.Tensor, size) -> torch.Tensor:
        """The siblings' segmentation logits (B, S * K, *size), one block of K per sibling."""
        B = x.shape[0]
        outs = []
        for i, net in enumerate(self.siblings):
            z = self._check_map(f"sibling {i}'s output", net(x), self.num_classes, B)
            outs.append(self._resize(z, size))
        return torch.cat(outs, dim=1)

    # -- forward -----------------------------------------------------------------------------
    def _check_map(self, name: str, t: Any, channels: int, batch: int) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"the backbone's {name} must be a tensor (B, C, *S), got {type(t).__name__}; "
                "a network returning a list (e.g. deep supervision) needs it switched off "
                "or a wrapper that returns one tensor"
            )
        if t.dim() != self.spatial_dims + 2 or t.shape[0] != batch or t.shape[1] != channels:
            raise ValueError(
                f"the backbone's {name} must have shape (B={batch}, {channels}, *S) with "
                f"{self.spatial_dims} spatial dims, got {tuple(t.shape)}"
            )
        return t

    def _resize(self, t: torch.Tensor, size) -> torch.Tensor:
        if tuple(t.shape[2:]) == tuple(size):
            return t
        return F.interpolate(
            t, size=tuple(size), mode=_INTERP[self.spatial_dims], align_corners=False
        )

    def _backbone_outputs(self, x: torch.Tensor) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        B = x.shape[0]
        if not self.keep_backbone_seg:
            feats = self._check_map("output (features)", self.backbone(x), self.feature_channels, B)
            if tuple(feats.shape[2:]) != tuple(x.shape[2:]):
                if not self.resize_features:
                    raise ValueError(
                        f"the backbone's features have spatial shape {tuple(feats.shape[2:])}, "
                        f"the input {tuple(x.shape[2:])}; pass resize_features=True to "
                        "resize them to the input"
                    )
                feats = self._resize(feats, x.shape[2:])
            return None, feats
        if self.feature_layer is None:
            out = self.backbone(x)
            if not isinstance(out, (tuple, list)) or len(out) != 2:
                raise TypeError(
                    "with keep_backbone_seg=True and no feature_layer the backbone must return "
                    f"(seg_logits, features), got {type(out).__name__}"
                )
            seg, feats = out
        else:
            seg, feats = forward_capturing(self.backbone, self.feature_layer, x, "output")
        seg = self._check_map("segmentation logits", seg, self.num_classes, B)
        feats = self._check_map("features", feats, self.feature_channels, B)
        return seg, self._resize(feats, seg.shape[2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The packed logits of a batch.

        Args:
            x: images (B, C_in, *S).

        Returns:
            Packed logits (B, K + E + 2, *S): segmentation, routing (experts, model), gate.

        Raises:
            ValueError: ``x`` without ``spatial_dims`` spatial dims; backbone outputs of
                the wrong shape (features at another size than the input, without
                ``resize_features``).
            TypeError: a backbone output that is not a tensor (or, with
                ``keep_backbone_seg=True`` and no ``feature_layer``, not a pair).
            RuntimeError: ``feature_layer`` did not run in the backbone's forward pass.
        """
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(
                f"input must be (B, C_in, *S) with {self.spatial_dims} spatial dims, "
                f"got shape {tuple(x.shape)}"
            )
        seg, head_input = self.head_inputs(x)
        return self.heads_forward(seg, head_input)

    def head_inputs(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(segmentation logits, what the routing heads read) of a batch.

        With ``heads="conv"`` the heads read the features and the segmentation
        logits; two-stage training caches this pair once for a frozen backbone.

        Args:
            x: images (B, C_in, *S).

        Returns:
            ``(seg, head_input)``: the segmentation logits (B, K, *S) and the features
            (with the logits appended for ``heads="conv"``).

        Raises:
            ValueError, TypeError, RuntimeError: backbone outputs that do not fit, as
                in :meth:`forward`.
        """
        seg, feats = self._backbone_outputs(x)
        if seg is None:
            seg = self.seg_head(feats)
        seg = seg.to(feats.dtype)
        if self.heads == "conv":
            if self.siblings:
                sib = self.sibling_logits(x, seg.shape[2:]).to(feats.dtype)
                return seg, torch.cat([feats, sib, seg], dim=1)
            return seg, torch.cat([feats, seg], dim=1)
        return seg, feats

    def heads_forward(self, seg: torch.Tensor, head_input: torch.Tensor) -> torch.Tensor:
        """Packed logits from the segmentation logits and the heads' input.

        Args:
            seg: segmentation logits (B, K, *S).
            head_input: what :meth:`head_inputs` returned second.

        Returns:
            Packed logits (B, K + E + 2, *S).
        """
        if self.heads == "conv":
            return torch.cat([seg, self.routing_heads(head_input).to(seg.dtype)], dim=1)
        return torch.cat([seg, self.route_head(head_input), self.gate_head(head_input)], dim=1)

    @torch.no_grad()
    def load_sibling(self, index: int, source: Any) -> None:
        """Copy a trained network's backbone and segmentation head into sibling ``index``
        (built by :meth:`from_monai` with ``num_siblings``).

        Args:
            index: which sibling, in [0, S).
            source: a network of this architecture with its own segmentation head (e.g.
                the base segmentor of another seed), or its state dict (the ``"model"``
                of a training checkpoint): its ``backbone.*`` and ``seg_head.*`` entries.

        Raises:
            ValueError: ``index`` out of range; ``source`` without the entries of this
                architecture's backbone or segmentation head.
            TypeError: siblings not built by :meth:`from_monai`.
        """
        if not 0 <= index < len(self.siblings):
            raise ValueError(f"index must be in [0, {len(self.siblings)}), got {index!r}")
        target = self.siblings[index]
        if not (isinstance(target, nn.Sequential) and len(target) == 2):
            raise TypeError("load_sibling needs siblings built by from_monai(num_siblings=...)")
        state = source.state_dict() if isinstance(source, nn.Module) else source
        for prefix, part in (("backbone.", target[0]), ("seg_head.", target[1])):
            own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            missing = [prefix + k for k in part.state_dict() if k not in own]
            if missing:
                raise ValueError(
                    f"source does not match sibling {index}: missing {missing[:5]} (same "
                    "backbone, features and number of classes, and its own segmentation head, "
                    "are needed)"
                )
            part.load_state_dict(own)

    def head_parameters(self):
        """The parameters of the routing and gate heads (what two-stage training trains).

        Returns:
            A list of parameters.
        """
        if self.heads == "conv":
            return list(self.routing_heads.parameters())
        return list(self.route_head.parameters()) + list(self.gate_head.parameters())

    # -- inference ---------------------------------------------------------------------------
    def split(self, logits: torch.Tensor):
        """The parts of packed logits.

        Args:
            logits: packed logits (B, K + E + 2, *S).

        Returns:
            ``(z, r, a)`` views: segmentation (B, K, *S), routing (B, E + 1, *S), gate
            (B, *S).

        Raises:
            ValueError: ``logits`` without K + E + 2 channels.
        """
        return split_logits(logits, self.num_classes, self.num_experts)

    @torch.no_grad()
    def predict(
        self,
        x: torch.Tensor,
        threshold: float = 0.5,
        mode: str = "gate",
        expert_labels: Optional[torch.Tensor] = None,
        backend: str = "auto",
    ) -> RouteResult:
        """Who labels each pixel: :func:`deferredseg_kernels.route` of the forward pass.

        Runs in eval mode (restoring the previous mode afterwards) without gradients.
        ``mode="gate"`` defers where sigmoid(gate) > ``threshold``; ``mode="router"``
        where the router's argmax is an expert. With ``expert_labels`` (B, E, *S)
        the result's ``final`` holds the combined segmentation.

        Args:
            x: images (B, C_in, *S).
            threshold: the gate's threshold, in [0, 1].
            mode: ``"gate"``, ``"router"`` or ``"gain"`` (see
                :func:`deferredseg_kernels.route`).
            expert_labels: None, or the experts' labels (B, E, *S), integer.
            backend: the route kernel's backend.

        Returns:
            A :class:`~deferredseg_kernels.RouteResult` ``(assignment, defer_prob,
            model_pred, final)``.

        Raises:
            ValueError: a threshold out of range, an unknown ``mode`` or ``backend``,
                ``expert_labels`` of the wrong shape, or what :meth:`forward` raises.
            TypeError: ``expert_labels`` not an integer tensor.
            RuntimeError: ``backend`` cannot run here.
        """
        was_training = self.training
        self.eval()
        try:
            logits = self(x)
        finally:
            self.train(was_training)
        return route(
            logits,
            self.num_classes,
            self.num_experts,
            threshold=threshold,
            mode=mode,
            expert_labels=expert_labels,
            backend=backend,
        )

    # -- construction helpers ----------------------------------------------------------------
    @classmethod
    def from_monai(
        cls,
        name: str = "UNet",
        num_classes: int = 1,
        num_experts: int = 3,
        spatial_dims: int = 2,
        in_channels: int = 1,
        features: int = 32,
        gate_channels: Optional[int] = None,
        net_kwargs: Optional[dict] = None,
        heads: str = "linear",
        head_channels: Optional[int] = None,
        detach_heads: bool = True,
        num_siblings: int = 0,
        **backbone_kwargs,
    ) -> "DeferredSegmentor":
        """A DeferredSegmentor on
        ``build_backbone(name, spatial_dims, in_channels, features, ...)``.

        ``features`` is F (the MONAI network's ``out_channels``); ``net_kwargs`` and
        ``backbone_kwargs`` go to the MONAI constructor (see :func:`build_backbone`).

        Args:
            name: the class name in ``monai.networks.nets`` (case-insensitive).
            num_classes, num_experts, spatial_dims, gate_channels, heads, head_channels,
                detach_heads: as for the constructor.
            in_channels: input channels C_in.
            features: F.
            net_kwargs, **backbone_kwargs: the MONAI constructor's other arguments.
            num_siblings: sibling networks of the same architecture (backbone and a 1x1
                segmentation head each, untrained here: load them with the checkpoint or
                :meth:`load_sibling`) that the ``"conv"`` heads read.

        Returns:
            The DeferredSegmentor (features mode) on that network.

        Raises:
            ValueError: an unknown network name, or one without ``in_channels`` /
                ``out_channels``; ``num_siblings`` below 0; what the constructor raises.
            TypeError: an argument the MONAI network does not take.
        """

        def backbone():
            return build_backbone(
                name,
                spatial_dims=spatial_dims,
                in_channels=in_channels,
                features=features,
                net_kwargs=net_kwargs,
                **backbone_kwargs,
            )

        net = backbone()
        siblings = [
            nn.Sequential(backbone(), conv_nd(spatial_dims)(features, num_classes, kernel_size=1))
            for _ in range(_positive_int("num_siblings", num_siblings, 0))
        ]
        return cls(
            net,
            feature_channels=features,
            num_classes=num_classes,
            num_experts=num_experts,
            spatial_dims=spatial_dims,
            gate_channels=gate_channels,
            heads=heads,
            head_channels=head_channels,
            detach_heads=detach_heads,
            siblings=siblings,
        )
