"""Test configuration shared by the whole suite.

Triton runs on the CPU in interpreter mode in CI: TRITON_INTERPRET=1 must be set
before anything imports triton, so it is set here, first, when no GPU is present.
"""

import os
import warnings

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# The interpreter evaluates kernels with numpy, which warns on inf/nan arithmetic
# that the kernels handle on purpose (masked lanes, -inf maxima).
warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\..*")
warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"numpy\..*")

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    """Tests skipped for want of CUDA carry the `gpu` marker: `pytest -m gpu` runs them all
    on a GPU machine (benchmarks/gpu_check.sh), whichever file they are in."""
    for item in items:
        for mark in item.iter_markers("skipif"):
            if "CUDA" in str(mark.kwargs.get("reason", "")):
                item.add_marker(pytest.mark.gpu)
                break
