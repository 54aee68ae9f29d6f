"""DeferredSeg networks.

- :class:`DeferredSegmentor`: wraps any backbone (an ``nn.Module`` returning a
  feature map, or a pretrained segmentor whose own output is kept) and adds the
  segmentation, routing and gate heads; returns the packed logits of docs/objective.md section 1.
- :func:`build_backbone`: any ``monai.networks.nets`` network by name.
- :class:`SamDeferredSegmentor`, :func:`build_sam`, :func:`load_sam_checkpoint`:
  the paper's SAM / MedSAM construction (``pip install deferredseg[sam]``);
  imported lazily, so this package works without segment-anything.

See docs/models.md.
"""

from .backbones import MONAI_DEFAULTS, build_backbone, monai_network_names
from .segmentor import DeferredSegmentor, GateHead, conv_nd

__all__ = [
    "DeferredSegmentor",
    "GateHead",
    "conv_nd",
    "build_backbone",
    "MONAI_DEFAULTS",
    "monai_network_names",
    "SamDeferredSegmentor",
    "build_sam",
    "load_sam_checkpoint",
    "boxes_from_labels",
    "SAM_VARIANTS",
]

_SAM_NAMES = {
    "SamDeferredSegmentor",
    "build_sam",
    "load_sam_checkpoint",
    "boxes_from_labels",
    "SAM_VARIANTS",
    "sam_modeling",
}


def __getattr__(name):
    if name in _SAM_NAMES:
        from . import sam

        return getattr(sam, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
