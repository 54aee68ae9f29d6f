"""deferredseg: learning to defer ambiguous pixels of medical segmentation to human experts.

The user layer of the distribution: drop-in loss modules (``deferredseg.losses``)
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

__all__ = ["available_backends", "deferredseg_loss", "route", "split_logits", "__version__"]
