"""Backends of the DeferredSeg ops: one module per implementation.

- ``cpp``: the compiled C++ CPU and CUDA kernels (``torch.ops.deferredseg``), with
  their fake kernels and autograd registered from Python.
"""
