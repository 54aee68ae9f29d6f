"""deferredseg: learning to defer ambiguous pixels of medical segmentation to human experts.

The user layer of the distribution: drop-in loss modules (``deferredseg.losses``)
and the deferral policy (:class:`DeferralPolicy`: calibrate for a budget, route)
now; models, experts, data, training and the command line in their own
subpackages, imported on demand so that ``import deferredseg`` stays light.
The tensor ops live in ``deferredseg_kernels``.
"""

from deferredseg_kernels import (
    __version__,
    available_backends,
    deferredseg_loss,
    route,
    split_logits,
)

from .policy import DeferralPolicy, channel_layout

__all__ = [
    "available_backends",
    "channel_layout",
    "DeferralPolicy",
    "deferredseg_loss",
    "route",
    "split_logits",
    "__version__",
]
