"""DeferredSeg on SAM / MedSAM (the paper's construction), through ``segment-anything``.

Install with ``pip install deferredseg[sam]``. The construction:

- the image encoder and the prompt encoder are frozen (no gradients, eval mode);
- the mask decoder stays trainable; its first mask token (SAM's single-mask
  output, the one MedSAM uses) gives the segmentation logit (K = 1, binary);
- E + 1 extra *routing tokens* join the decoder's output tokens, each with its
  own hypernetwork MLP; a token's MLP output, dotted with the decoder's
  upscaled image embedding, is that routing channel's logit map (experts 0..E-1,
  then the model);
- the gate (conv 3x3, ReLU, conv 1x1) reads the upscaled image embedding;
- prompts are boxes: given, or the bounding box of the label's foreground, with
  a random outward shift of up to ``box_shift`` pixels per side in training
  (the released code's augmentation), none at evaluation;
- the packed logits are resized (bilinear) from the decoder's resolution
  (a quarter of the encoder's input size) to the input's size.

``build_sam(...)`` builds a SAM from ``segment_anything``'s own classes at any
size (``"vit_b"``, the MedSAM architecture, or tiny ones for tests);
``load_sam_checkpoint`` loads a user's SAM / MedSAM weights with
``torch.load(weights_only=True)``. No weights are downloaded, ever.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from functools import partial
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from deferredseg_kernels import RouteResult, route, split_logits

from .segmentor import GateHead

__all__ = [
    "SamDeferredSegmentor",
    "build_sam",
    "load_sam_checkpoint",
    "boxes_from_labels",
    "SAM_VARIANTS",
    "sam_modeling",
]

#: Image-encoder sizes of the public SAM models (MedSAM uses "vit_b").
SAM_VARIANTS: Dict[str, Dict[str, object]] = {
    "vit_b": dict(
        encoder_embed_dim=768,
        encoder_depth=12,
        encoder_num_heads=12,
        encoder_global_attn_indexes=(2, 5, 8, 11),
    ),
    "vit_l": dict(
        encoder_embed_dim=1024,
        encoder_depth=24,
        encoder_num_heads=16,
        encoder_global_attn_indexes=(5, 11, 17, 23),
    ),
    "vit_h": dict(
        encoder_embed_dim=1280,
        encoder_depth=32,
        encoder_num_heads=16,
        encoder_global_attn_indexes=(7, 15, 23, 31),
    ),
}


def sam_modeling() -> types.ModuleType:
    """``segment_anything.modeling``, with a clear error when the extra is missing.

    ``segment_anything/__init__.py`` imports torchvision for its predictor
    utilities, which the model classes do not need; without torchvision the
    ``modeling`` subpackage is loaded on its own (the top-level package is not
    left half-imported).
    """
    if importlib.util.find_spec("segment_anything") is None:
        raise ImportError(
            "the SAM / MedSAM backbone needs the segment-anything package: "
            "pip install 'deferredseg[sam]'"
        )
    try:
        return importlib.import_module("segment_anything.modeling")
    except ModuleNotFoundError as err:
        if err.name != "torchvision":
            raise
    spec = importlib.util.find_spec("segment_anything")
    stub = types.ModuleType("segment_anything")
    stub.__path__ = list(spec.submodule_search_locations or [])
    stub.__spec__ = spec
    sys.modules["segment_anything"] = stub
    try:
        return importlib.import_module("segment_anything.modeling")
    finally:
        if sys.modules.get("segment_anything") is stub:
            del sys.modules["segment_anything"]


def build_sam(
    variant: Optional[str] = "vit_b",
    checkpoint: Optional[str] = None,
    image_size: int = 1024,
    patch_size: int = 16,
    prompt_embed_dim: int = 256,
    window_size: int = 14,
    encoder_embed_dim: Optional[int] = None,
    encoder_depth: Optional[int] = None,
    encoder_num_heads: Optional[int] = None,
    encoder_global_attn_indexes: Optional[Sequence[int]] = None,
    decoder_depth: int = 2,
    decoder_num_heads: int = 8,
    decoder_mlp_dim: int = 2048,
    iou_head_hidden_dim: int = 256,
    mask_in_chans: int = 16,
) -> nn.Module:
    """A ``segment_anything.modeling.Sam`` built from the package's classes.

    ``variant`` ("vit_b", "vit_l", "vit_h") fills the encoder sizes; any of them can
    be overridden, and ``variant=None`` requires all four. The other defaults are
    the public SAM's, so ``build_sam("vit_b", checkpoint="medsam_vit_b.pth")``
    builds MedSAM. A tiny test model::

        build_sam(None, image_size=64, patch_size=16, prompt_embed_dim=32, window_size=2,
                  encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
                  encoder_global_attn_indexes=(1,), decoder_depth=1, decoder_num_heads=2,
                  decoder_mlp_dim=64, iou_head_hidden_dim=32, mask_in_chans=4)
    """
    if variant is not None and variant not in SAM_VARIANTS:
        raise ValueError(f"variant must be one of {sorted(SAM_VARIANTS)} or None, got {variant!r}")
    m = sam_modeling()
    enc: Dict[str, object] = dict(SAM_VARIANTS[variant]) if variant is not None else {}
    for key, val in (
        ("encoder_embed_dim", encoder_embed_dim),
        ("encoder_depth", encoder_depth),
        ("encoder_num_heads", encoder_num_heads),
        ("encoder_global_attn_indexes", encoder_global_attn_indexes),
    ):
        if val is not None:
            enc[key] = val
        elif key not in enc:
            raise ValueError(f"{key} is required with variant=None")
    if image_size % patch_size:
        raise ValueError(
            f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})"
        )
    if prompt_embed_dim % 8:
        raise ValueError(f"prompt_embed_dim must be a multiple of 8, got {prompt_embed_dim}")
    grid = image_size // patch_size
    image_encoder = m.ImageEncoderViT(
        depth=int(enc["encoder_depth"]),
        embed_dim=int(enc["encoder_embed_dim"]),
        img_size=image_size,
        mlp_ratio=4,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_heads=int(enc["encoder_num_heads"]),
        patch_size=patch_size,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=tuple(int(i) for i in enc["encoder_global_attn_indexes"]),
        window_size=window_size,
        out_chans=prompt_embed_dim,
    )
    prompt_encoder = m.PromptEncoder(
        embed_dim=prompt_embed_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(image_size, image_size),
        mask_in_chans=mask_in_chans,
    )
    transformer = m.TwoWayTransformer(
        depth=decoder_depth,
        embedding_dim=prompt_embed_dim,
        mlp_dim=decoder_mlp_dim,
        num_heads=decoder_num_heads,
    )
    mask_decoder = m.MaskDecoder(
        num_multimask_outputs=3,
        transformer=transformer,
        transformer_dim=prompt_embed_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=iou_head_hidden_dim,
    )
    sam = m.Sam(
        image_encoder=image_encoder,
        prompt_encoder=prompt_encoder,
        mask_decoder=mask_decoder,
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    if checkpoint is not None:
        load_sam_checkpoint(sam, checkpoint)
    return sam


def _unwrap_state(obj, path) -> Dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"{path}: expected a state dict (name -> tensor), or a dict holding one under "
            f"'model' / 'state_dict', got {type(obj).__name__}"
        )
    prefix = "module."
    if obj and all(k.startswith(prefix) for k in obj):  # saved from DataParallel / DDP
        obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return obj


def load_sam_checkpoint(model: nn.Module, path, strict: bool = True) -> nn.Module:
    """Load SAM / MedSAM weights from ``path`` into ``model`` (a ``Sam``) safely.

    The file is read with ``torch.load(path, map_location="cpu", weights_only=True)``:
    no code in the checkpoint runs. A state dict wrapped under ``"model"`` or
    ``"state_dict"`` and a ``module.`` prefix (DataParallel) are accepted.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SAM / MedSAM checkpoint {path} not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unreadable, or pickled objects other than tensors
        raise ValueError(
            f"{path}: cannot be read with torch.load(weights_only=True) ({err}); "
            "expected a PyTorch state dict of tensors"
        ) from err
    state = _unwrap_state(obj, path)
    model.load_state_dict(state, strict=strict)
    return model


def boxes_from_labels(
    target: torch.Tensor,
    shift: int = 0,
    generator: Optional[torch.Generator] = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Bounding boxes (B, 4) float ``[x_min, y_min, x_max, y_max]`` of each label's foreground.

    ``target`` is (B, H, W) or (B, 1, H, W); foreground is every value other than
    0 and ``ignore_index``. Coordinates are pixel indices (inclusive). ``shift > 0``
    moves each side outwards by an independent random integer in [0, shift]
    (clamped to the image). An image without foreground gets the whole image.
    """
    if target.dim() == 4 and target.shape[1] == 1:
        target = target[:, 0]
    if target.dim() != 3:
        raise ValueError(
            f"target must be (B, H, W) or (B, 1, H, W), got shape {tuple(target.shape)}"
        )
    B, H, W = target.shape
    fg = (target != 0) & (target != ignore_index)
    rows, cols = fg.any(dim=2), fg.any(dim=1)  # (B, H), (B, W)
    has = rows.any(dim=1)
    y0 = rows.int().argmax(dim=1)
    y1 = H - 1 - rows.flip(1).int().argmax(dim=1)
    x0 = cols.int().argmax(dim=1)
    x1 = W - 1 - cols.flip(1).int().argmax(dim=1)
    box = torch.stack([x0, y0, x1, y1], dim=1)
    full = torch.tensor([0, 0, W - 1, H - 1], device=target.device).expand(B, 4)
    box = torch.where(has.unsqueeze(1), box, full)
    if shift > 0:
        jitter = torch.randint(0, int(shift) + 1, (B, 4), generator=generator, device=target.device)
        sign = torch.tensor([-1, -1, 1, 1], device=target.device)
        box = box + sign * jitter
        lo = torch.zeros(4, dtype=box.dtype, device=box.device)
        hi = torch.tensor([W - 1, H - 1, W - 1, H - 1], dtype=box.dtype, device=box.device)
        box = torch.maximum(torch.minimum(box, hi), lo)
    return box.float()


class _HyperMLP(nn.Module):
    """The hypernetwork of a routing token: Linear-ReLU-Linear-ReLU-Linear."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, dim),
            nn.ReLU(inplace=True),
            nn.Linear(dim, dim),
            nn.ReLU(inplace=True),
            nn.Linear(dim, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SamDeferredSegmentor(nn.Module):
    """DeferredSeg on a SAM / MedSAM (see the module docstring).

    Args:
        sam: a ``segment_anything.modeling.Sam`` (e.g. from :func:`build_sam`).
        num_experts: E >= 1.
        num_classes: must be 1 (SAM predicts one binary mask per box).
        gate_channels: hidden channels of the gate (default: the upscaled embedding's).
        box_shift: the largest random outward shift of each box side in training, in
            input pixels (the released code used 20 at 256 x 256).
        pixel_normalize: apply SAM's pixel mean / std to the input (for 0..255
            images); False (default, as MedSAM) feeds the input as given (MedSAM
            feeds images scaled to [0, 1]).
        freeze_decoder: also freeze SAM's mask decoder (train only the new tokens and heads).

    ``forward(image, boxes=None, target=None)`` takes (B, 1 or 3, H, W) images,
    resized to the encoder's input size when they differ, and returns the packed
    logits (B, 1 + E + 2, H, W).
    """

    def __init__(
        self,
        sam: nn.Module,
        num_experts: int,
        num_classes: int = 1,
        gate_channels: Optional[int] = None,
        box_shift: int = 20,
        pixel_normalize: bool = False,
        freeze_decoder: bool = False,
    ):
        super().__init__()
        for part in ("image_encoder", "prompt_encoder", "mask_decoder"):
            if not hasattr(sam, part):
                raise TypeError(
                    f"sam must be a segment_anything Sam (with .{part}), got {type(sam).__name__}"
                )
        if num_classes != 1:
            raise ValueError(
                "SAM predicts one binary mask per box prompt: num_classes must be 1, got "
                f"{num_classes}"
            )
        if (
            isinstance(num_experts, bool)
            or int(num_experts) != num_experts
            or not 1 <= num_experts <= 127
        ):
            raise ValueError(f"num_experts must be an integer in [1, 127], got {num_experts!r}")
        self.sam = sam
        self.num_classes = 1
        self.num_experts = int(num_experts)
        self.box_shift = int(box_shift)
        self.pixel_normalize = bool(pixel_normalize)
        self.freeze_decoder = bool(freeze_decoder)
        dec = sam.mask_decoder
        dim = int(dec.transformer_dim)
        up_dim = dim // 8
        self.route_tokens = nn.Embedding(self.num_experts + 1, dim)
        self.route_mlps = nn.ModuleList(_HyperMLP(dim, up_dim) for _ in range(self.num_experts + 1))
        self.gate_head = GateHead(
            up_dim, int(gate_channels) if gate_channels else up_dim, spatial_dims=2
        )
        frozen = [sam.image_encoder, sam.prompt_encoder] + ([dec] if self.freeze_decoder else [])
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)
        self.train(True)

    @property
    def out_channels(self) -> int:
        return self.num_classes + self.num_experts + 2

    @property
    def image_size(self) -> int:
        return int(self.sam.image_encoder.img_size)

    def train(self, mode: bool = True):
        super().train(mode)
        self.sam.image_encoder.eval()
        self.sam.prompt_encoder.eval()
        if self.freeze_decoder:
            self.sam.mask_decoder.eval()
        return self

    def _prepare(self, image: torch.Tensor) -> torch.Tensor:
        if image.dim() != 4 or image.shape[1] not in (1, 3):
            raise ValueError(f"image must be (B, 1 or 3, H, W), got shape {tuple(image.shape)}")
        x = image.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        size = self.image_size
        if tuple(x.shape[2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        if self.pixel_normalize:
            x = (x - self.sam.pixel_mean) / self.sam.pixel_std
        return x

    def _boxes(
        self, image: torch.Tensor, boxes: Optional[torch.Tensor], target: Optional[torch.Tensor]
    ) -> torch.Tensor:
        B, _, H, W = image.shape
        if boxes is None:
            if target is not None:
                boxes = boxes_from_labels(target, shift=self.box_shift if self.training else 0)
            else:
                boxes = torch.tensor([0.0, 0.0, W - 1.0, H - 1.0], device=image.device).expand(B, 4)
        boxes = torch.as_tensor(boxes, dtype=torch.float32, device=image.device)
        if boxes.shape != (B, 4):
            raise ValueError(
                f"boxes must be (B={B}, 4) [x_min, y_min, x_max, y_max], got {tuple(boxes.shape)}"
            )
        # Input pixel centres to the encoder frame (the prompt encoder adds the half pixel back).
        scale = torch.tensor([self.image_size / W, self.image_size / H] * 2, device=image.device)
        return (boxes + 0.5) * scale - 0.5

    def forward(
        self,
        image: torch.Tensor,
        boxes: Optional[torch.Tensor] = None,
        target: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Packed logits (B, 1 + E + 2, H, W) for images (B, 1 or 3, H, W).

        Box prompts: ``boxes`` (B, 4) in input pixels, else the bounding box of
        ``target``'s foreground (randomly enlarged in training), else the whole image.
        """
        B, _, H, W = image.shape
        x = self._prepare(image)
        prompt_boxes = self._boxes(image, boxes, target)
        sam, dec = self.sam, self.sam.mask_decoder
        encoder_trainable = any(p.requires_grad for p in sam.image_encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and encoder_trainable):
            embedding = sam.image_encoder(x)
        with torch.no_grad():
            sparse, dense = sam.prompt_encoder(points=None, boxes=prompt_boxes, masks=None)
            pos = sam.prompt_encoder.get_dense_pe()
        n_mask = int(dec.num_mask_tokens)
        tokens = torch.cat(
            [dec.iou_token.weight, dec.mask_tokens.weight, self.route_tokens.weight], dim=0
        )
        tokens = torch.cat([tokens.unsqueeze(0).expand(B, -1, -1), sparse.to(tokens.dtype)], dim=1)
        src = embedding + dense
        hs, keys = dec.transformer(src, pos.expand(B, -1, -1, -1), tokens)
        c, h, w = src.shape[1:]
        upscaled = dec.output_upscaling(
            keys.transpose(1, 2).reshape(B, c, h, w)
        )  # (B, c/8, 4h, 4w)
        seg_w = dec.output_hypernetworks_mlps[0](hs[:, 1])  # the single-mask output token
        seg = torch.einsum("bc,bchw->bhw", seg_w, upscaled).unsqueeze(1)
        first = 1 + n_mask
        route_w = torch.stack(
            [mlp(hs[:, first + j]) for j, mlp in enumerate(self.route_mlps)], dim=1
        )
        routing = torch.einsum("bjc,bchw->bjhw", route_w, upscaled)
        gate = self.gate_head(upscaled)
        logits = torch.cat([seg, routing, gate], dim=1)
        if tuple(logits.shape[2:]) != (H, W):
            logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
        return logits

    def split(self, logits: torch.Tensor):
        return split_logits(logits, self.num_classes, self.num_experts)

    @torch.no_grad()
    def predict(
        self,
        image: torch.Tensor,
        boxes: Optional[torch.Tensor] = None,
        threshold: float = 0.5,
        mode: str = "gate",
        expert_labels: Optional[torch.Tensor] = None,
        backend: str = "auto",
    ) -> RouteResult:
        """Routing (docs/objective.md section 4) in eval mode; ``boxes`` (B, 4) or the whole
        image."""
        was_training = self.training
        self.train(False)
        try:
            logits = self(image, boxes=boxes)
        finally:
            self.train(was_training)
        return route(
            logits,
            1,
            self.num_experts,
            threshold=threshold,
            mode=mode,
            expert_labels=expert_labels,
            backend=backend,
        )

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint,
        num_experts: int,
        variant: str = "vit_b",
        sam_kwargs: Optional[dict] = None,
        **kwargs,
    ) -> "SamDeferredSegmentor":
        """Build SAM ``variant``, load the user's SAM / MedSAM ``checkpoint``, and wrap it."""
        sam = build_sam(variant, checkpoint=checkpoint, **(sam_kwargs or {}))
        return cls(sam, num_experts=num_experts, **kwargs)
