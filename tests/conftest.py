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


def _sample_every():
    """DS_TEST_SAMPLE=N, or None when unset."""
    raw = os.environ.get("DS_TEST_SAMPLE", "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise pytest.UsageError(f"DS_TEST_SAMPLE must be a positive integer, got {raw!r}")
    return int(raw)


def pytest_report_header(config):
    every = _sample_every()
    if every is not None and every > 1:
        return (
            f"DS_TEST_SAMPLE={every}: 1 in {every} cases of each parametrized test and "
            "backend (first and last kept, the rest evenly spread)"
        )
    return None


def _sampled(items, every):
    """(kept, dropped): of the cases of each parametrized test and backend, ceil(n / every)
    evenly spread ones, the first and the last among them. Used where the same kernels and
    tests already run whole on another stack (the older stacks and the CPU-only one in CI,
    see the Makefile): there every test function still runs, on a third of its cases."""
    groups = {}
    for item in items:
        spec = getattr(item, "callspec", None)
        if spec is None:
            continue
        key = (item.path, item.originalname, spec.params.get("backend"))
        groups.setdefault(key, []).append(item)
    dropped = set()
    for group in groups.values():
        n = len(group)
        k = -(-n // every)
        keep = {0} if k == 1 else {round(j * (n - 1) / (k - 1)) for j in range(k)}
        dropped.update(id(item) for i, item in enumerate(group) if i not in keep)
    return (
        [item for item in items if id(item) not in dropped],
        [item for item in items if id(item) in dropped],
    )


def pytest_collection_modifyitems(config, items):
    """Tests skipped for want of CUDA carry the `gpu` marker: `pytest -m gpu` runs them all
    on a GPU machine (benchmarks/gpu_check.sh), whichever file they are in. With
    DS_TEST_SAMPLE=N, a sample of the parametrized cases runs (_sampled)."""
    for item in items:
        for mark in item.iter_markers("skipif"):
            if "CUDA" in str(mark.kwargs.get("reason", "")):
                item.add_marker(pytest.mark.gpu)
                break
    every = _sample_every()
    if every is not None and every > 1:
        kept, dropped = _sampled(items, every)
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = kept


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
