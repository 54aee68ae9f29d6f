"""Backends of the DeferredSeg ops: one module per implementation.

- ``fused``: the contract shared by the fused backends (stats and loss ops, their
  fake kernels, autograd, the driver) and the route ops' shared pieces;
- ``cpp``: the compiled C++ CPU and CUDA kernels (``torch.ops.deferredseg``);
- ``triton_loss`` / ``triton_route``: the Triton kernels (``torch.ops.deferredseg_triton``),
  with ``triton_common`` and ``triton_support``.
"""
