"""pytest-benchmark configuration of the kernel benchmarks (benchmarks/test_kernels.py).

    pytest benchmarks --benchmark-only                       # the full suite (make bench)
    pytest benchmarks --benchmark-only --bench-smoke         # tiny shapes: checks it still runs
    pytest benchmarks --benchmark-only --bench-device cpu    # only the CPU benchmarks

Only this folder's ``test_*.py`` files are collected: the CSV scripts beside them
(``bench_*.py``, ``evidence.py``) are programs run by hand and never imported here.
"""

from __future__ import annotations

import torch


def pytest_addoption(parser):
    group = parser.getgroup("deferredseg benchmarks")
    group.addoption(
        "--bench-smoke",
        action="store_true",
        help="tiny shapes only: checks that every benchmark still runs (CI)",
    )
    group.addoption(
        "--bench-device",
        choices=("all", "cpu", "cuda"),
        default="all",
        help="benchmark CPU tensors, CUDA tensors or both (default: every device present)",
    )


def pytest_benchmark_update_machine_info(config, machine_info):
    """Saved runs record the software and the device they measured."""
    machine_info["torch"] = torch.__version__
    machine_info["torch_cuda"] = torch.version.cuda or ""
    machine_info["torch_threads"] = torch.get_num_threads()
    try:
        import triton

        machine_info["triton"] = triton.__version__
    except ImportError:
        machine_info["triton"] = ""
    machine_info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    try:
        from deferredseg_kernels import __version__

        machine_info["deferredseg"] = __version__
    except ImportError:  # a benchmark of another checkout still records the rest
        machine_info["deferredseg"] = ""
    machine_info["bench_smoke"] = bool(config.getoption("--bench-smoke"))
