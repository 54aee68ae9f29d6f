"""The version of the ``deferredseg`` distribution: the one place it is written.

The build reads it (``[tool.setuptools.dynamic]`` in pyproject.toml) and both import
packages re-export it as ``__version__``. It lives in ``deferredseg_kernels`` because
that package must import without ``deferredseg``.
"""

__version__ = "0.1.0"
