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


# ---------------------------------------------------------------- trained runs, shared
# Runs that several tests only read, trained once per session (tests/_runs.py).


@pytest.fixture(scope="session")
def two_stage_run(tmp_path_factory):
    """A two-stage run of the command line on TINY: 2 epochs of the base segmentor, 3 of
    the routing heads. (run folder, stdout, stderr); read it, never change it."""
    from _runs import TINY, train_once

    out = tmp_path_factory.mktemp("two_stage") / "run"
    return train_once(out, ["--epochs", "2", *TINY, "--head-epochs", "3"])


@pytest.fixture(scope="session")
def joint_reference(tmp_path_factory):
    """The resume tests' uninterrupted run: _runs.STEPS on one thread; its folder."""
    from _runs import STEPS, one_thread, train_once

    with one_thread():
        return train_once(tmp_path_factory.mktemp("joint_reference") / "run", STEPS)[0]
