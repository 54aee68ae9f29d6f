"""Add deferral to a segmentation network you already trained.

The public names of :mod:`deferredseg.train.bolt_on`, where the code lives (it trains
routing heads with the second stage of ``deferredseg train``, and training's
evaluation reads its checkpoints, so it belongs to the train layer). Example::

    from deferredseg.bolt_on import add_deferral

    deferral = add_deferral(unet, train_loader, val_loader, num_classes=1, num_experts=3)
    out = deferral.route(images)  # out.assignment: -1 the model keeps the pixel, j expert j
    deferral.save("deferral.pt", factory="monai.networks.nets:UNet", factory_kwargs={...})
"""

from .train.bolt_on import (
    NO_VALIDATION_DATA,
    DeferralNetwork,
    SegmentationWithFeatures,
    add_deferral,
    find_feature_layer,
    load_deferral_network,
)

__all__ = [
    "add_deferral",
    "DeferralNetwork",
    "SegmentationWithFeatures",
    "find_feature_layer",
    "load_deferral_network",
    "NO_VALIDATION_DATA",
]
