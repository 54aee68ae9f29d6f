"""deferredseg: learning to defer ambiguous pixels of medical segmentation to human experts.

The user layer of the distribution: drop-in loss modules (``deferredseg.losses``)
and the deferral policy (:class:`DeferralPolicy`: calibrate for a budget, route)
now; models, experts, data, training and the command line in their own
subpackages, imported on demand so that ``import deferredseg`` stays light (it
imports no torch: the names below come from ``deferredseg_kernels`` on first use,
so that ``deferredseg --help`` starts fast). The tensor ops live in
``deferredseg_kernels``.
"""

_KERNEL_NAMES = ("available_backends", "deferredseg_loss", "route", "split_logits", "__version__")
_POLICY_NAMES = ("DeferralPolicy", "channel_layout")
__all__ = [*_KERNEL_NAMES, *_POLICY_NAMES]


def __getattr__(name: str):
    if name in _KERNEL_NAMES:
        import deferredseg_kernels

        return getattr(deferredseg_kernels, name)
    if name in _POLICY_NAMES:
        from . import policy

        return getattr(policy, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
