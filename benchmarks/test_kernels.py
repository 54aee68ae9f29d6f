"""Benchmarks of the DeferredSeg objective and the routing, with pytest-benchmark.

Every benchmark is one (op, shape, mode, impl); the benchmarks of one (op, shape,
mode) form a group, so the table compares the implementations side by side and
prints each one's multiple of the fastest:

- ``eager``    the plain-PyTorch reference (``deferredseg_loss_reference`` and
               ``route_reference`` called directly, without the label-range check that
               ``backend="reference"`` adds);
- ``compiled`` ``torch.compile`` of that reference (compiled before the timing);
- ``cpu``, ``cuda``, ``triton``: the fused kernels through the public functions
               (``deferredseg_loss`` / ``route`` with that ``backend``).

Loss modes: ``full`` (forward + backward), ``forward`` (loss of logits that require
grad: the fused kernels also make the gradient here, the reference builds its graph),
``nograd_forward`` (under ``torch.no_grad()``) and ``backward`` (``loss.backward()``
on a graph made once). Route modes: ``assign`` (who labels each pixel) and
``fuse`` (also the fused prediction from the experts' labels).

CPU tensors (float32) are benchmarked everywhere; CUDA tensors (bfloat16) when a GPU
is present, timed with a timer that synchronizes the device. Each benchmark's
``extra_info`` has the bytes it must move at least (inputs read once, gradient or
outputs written once), the copy bandwidth of the device measured in the same run and
``pct_of_floor``: 100 means "as fast as a copy of the same bytes"; on CUDA also the
peak extra memory of one call. Each implementation's result is checked against the
eager reference once before it is timed.

See benchmarks/conftest.py for the options (``--bench-smoke``, ``--bench-device``)
and the README for comparing two commits.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import pytest
import torch

import deferredseg_kernels as dk
from deferredseg_kernels import (
    deferredseg_loss_reference,
    make_options,
    route_reference,
    threshold_logit,
    why_unavailable,
)


class Shape(NamedTuple):
    name: str
    size: Tuple[int, ...]  # logits (B, K + E + 2, *S)
    dtype: torch.dtype
    K: int
    E: int


SHAPES = {
    # (device, smoke): shapes
    ("cpu", False): [
        Shape("2d-4x256", (4, 6, 256, 256), torch.float32, 1, 3),
        Shape("3d-1x64", (1, 6, 64, 64, 64), torch.float32, 1, 3),
    ],
    ("cpu", True): [
        Shape("2d-1x32", (1, 6, 32, 32), torch.float32, 1, 3),
        Shape("3d-1x8-K3", (1, 3 + 3 + 2, 8, 8, 8), torch.float32, 3, 3),
    ],
    ("cuda", False): [
        Shape("2d-16x512", (16, 6, 512, 512), torch.bfloat16, 1, 3),
        Shape("2d-16x1024", (16, 6, 1024, 1024), torch.bfloat16, 1, 3),
        Shape("3d-2x256", (2, 6, 256, 256, 256), torch.bfloat16, 1, 3),
        Shape("2d-8x512-K4", (8, 4 + 3 + 2, 512, 512), torch.bfloat16, 4, 3),
    ],
    ("cuda", True): [
        Shape("2d-1x64", (1, 6, 64, 64), torch.bfloat16, 1, 3),
        Shape("3d-1x16-K3", (1, 3 + 3 + 2, 16, 16, 16), torch.bfloat16, 3, 3),
    ],
}
IMPLS = {"cpu": ("eager", "compiled", "cpu"), "cuda": ("eager", "compiled", "cuda", "triton")}
# "backward" last: for torch.compile it needs its own compilation (see test_loss), and the
# modes of one shape run in this order, so the others share one.
MODES = {"loss": ("full", "forward", "nograd_forward", "backward"), "route": ("assign", "fuse")}
THRESHOLD = 0.5


def cuda_sync_timer() -> float:
    """perf_counter after the device has finished the work queued so far."""
    torch.cuda.synchronize()
    return time.perf_counter()


def _devices(config) -> Tuple[str, ...]:
    wanted = config.getoption("--bench-device")
    devices = []
    if wanted in ("all", "cpu"):
        devices.append("cpu")
    if wanted in ("all", "cuda") and torch.cuda.is_available():
        devices.append("cuda")
    return tuple(devices)


def pytest_generate_tests(metafunc):
    op = metafunc.function.__name__.split("_")[-1]  # test_loss, test_route
    smoke = metafunc.config.getoption("--bench-smoke")
    params = []
    for device in _devices(metafunc.config):
        # On CUDA the timer synchronizes, so a kernel is timed to its end, not its launch.
        marks = [pytest.mark.benchmark(timer=cuda_sync_timer)] if device == "cuda" else []
        for shape in SHAPES[(device, smoke)]:
            for mode in MODES[op]:
                for impl in IMPLS[device]:
                    params.append(
                        pytest.param(
                            device,
                            shape,
                            mode,
                            impl,
                            marks=marks,
                            id=f"{device}-{shape.name}-{mode}-{impl}",
                        )
                    )
    metafunc.parametrize("device,shape,mode,impl", params)


# ---------------------------------------------------------------------------- inputs


@functools.lru_cache(maxsize=2)
def make_inputs(device: str, shape: Shape):
    """Random packed logits, targets (10% ignored) and expert labels; made once per shape."""
    g = torch.Generator(device=device).manual_seed(0)
    B, S = shape.size[0], shape.size[2:]
    logits = (torch.randn(shape.size, device=device, generator=g) * 2).to(shape.dtype)
    nlab = max(shape.K, 2)
    target = torch.randint(0, nlab, (B,) + S, device=device, generator=g)
    target = torch.where(
        torch.rand(target.shape, device=device, generator=g) < 0.1,
        torch.full_like(target, -100),
        target,
    )
    experts = torch.randint(0, nlab, (B, shape.E) + S, device=device, generator=g)
    return logits, target, experts


@functools.lru_cache(maxsize=None)
def copy_bandwidth(device: str, nbytes: int) -> float:
    """Bytes per second of a large ``copy_`` on ``device`` (bytes read + bytes written)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for i in range(12):
        sync()
        t = time.perf_counter()
        dst.copy_(src)
        sync()
        if i >= 2:  # the first copies fault the pages in
            times.append(time.perf_counter() - t)
    return 2 * nbytes / statistics.median(times)


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def skip_unless_available(impl: str) -> None:
    if impl in ("eager", "compiled"):
        return
    reason = why_unavailable(impl)
    if reason is not None:
        pytest.skip(f"backend {impl!r} is not available: {reason}")


# ------------------------------------------------------------------------ the runner


_COMPILED: Dict[tuple, Callable] = {}


def compiled(fn: Callable, key: tuple) -> Callable:
    """``torch.compile(fn)``, made once per ``key`` (op, device, shape[, mode]).

    The benchmarks of one key run one after the other and share the compiled code;
    a new key starts from a clean dynamo cache, so the recompile limit is never hit
    (past it dynamo would silently run the eager function instead).
    """
    if key not in _COMPILED:
        _COMPILED.clear()
        torch._dynamo.reset()
        _COMPILED[key] = torch.compile(fn, fullgraph=True, dynamic=False)
    return _COMPILED[key]


def run_benchmark(
    benchmark,
    request,
    device: str,
    op: str,
    shape: Shape,
    mode: str,
    impl: str,
    step: Callable[[], None],
    floor: int,
) -> None:
    """Warm ``step`` up, record its peak memory, time it and fill ``extra_info``."""
    benchmark.group = f"{op} {device} {shape.name} {mode}"
    for _ in range(2 if impl != "compiled" else 3):  # compile, autotune, first touch
        step()
    extra = dict(
        op=op,
        device=device,
        shape=list(shape.size),
        dtype=str(shape.dtype)[6:],
        K=shape.K,
        E=shape.E,
        mode=mode,
        impl=impl,
        floor_bytes=floor,
    )
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        extra["peak_extra_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
    smoke = request.config.getoption("--bench-smoke")
    bandwidth = copy_bandwidth(device, (64 if smoke else (1024 if device == "cuda" else 256)) << 20)
    extra["copy_gbps"] = round(bandwidth / 1e9, 2)
    benchmark.extra_info.update(extra)
    benchmark(step)
    if benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        benchmark.extra_info["pct_of_floor"] = round(100.0 * floor / bandwidth / median, 2)


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-3 if dtype in (torch.float32, torch.float64) else 2e-2


# ----------------------------------------------------------------------- benchmarks


def test_loss(benchmark, request, device, shape, mode, impl):
    skip_unless_available(impl)
    logits, target, experts = make_inputs(device, shape)
    K, E = shape.K, shape.E
    opts = make_options(K, E)

    def reference(x, t, m):
        return deferredseg_loss_reference(x, t, m, opts)

    if impl == "eager":
        fn = reference
    elif impl == "compiled":
        # Timing backward() alone needs retain_graph=True, which a compiled graph allows
        # only without donated buffers: that mode gets its own compilation without them.
        key = ("loss", device, shape, "no-donation" if mode == "backward" else "")
        fn = compiled(reference, key)
    else:

        def fn(x, t, m):
            return dk.deferredseg_loss(x, t, m, K, E, backend=impl)

    no_donation = impl == "compiled" and mode == "backward"
    patch = torch._functorch.config.patch(donated_buffer=False)
    with patch if no_donation else contextlib.nullcontext():
        _bench_loss(
            benchmark, request, device, shape, mode, impl, fn, reference, logits, target, experts
        )


def _bench_loss(
    benchmark, request, device, shape, mode, impl, fn, reference, logits, target, experts
):
    x = logits.detach().requires_grad_(mode != "nograd_forward")
    expected = reference(logits.detach(), target, experts)
    got = fn(x.detach(), target, experts)
    torch.testing.assert_close(
        got.float(),
        expected.float(),
        rtol=_tolerance(shape.dtype),
        atol=1e-5,
        msg=lambda m: f"{impl} disagrees with the eager reference: {m}",
    )

    if mode == "full":

        def step():
            x.grad = None
            fn(x, target, experts).backward()
    elif mode == "forward":

        def step():
            fn(x, target, experts)
    elif mode == "backward":
        loss = fn(x, target, experts)

        def step():
            x.grad = None
            loss.backward(retain_graph=True)
    else:

        def step():
            with torch.no_grad():
                fn(x, target, experts)

    inputs, grad = nbytes(logits, target, experts), nbytes(logits)
    floor = {
        "full": inputs + grad,
        "forward": inputs + grad,
        "backward": grad,
        "nograd_forward": inputs,
    }[mode]
    run_benchmark(benchmark, request, device, "loss", shape, mode, impl, step, floor)


def test_route(benchmark, request, device, shape, mode, impl):
    skip_unless_available(impl)
    logits, _, experts = make_inputs(device, shape)
    K, E = shape.K, shape.E
    thr = threshold_logit(THRESHOLD)
    labels: Optional[torch.Tensor] = experts if mode == "fuse" else None

    def reference(x, m):
        return route_reference(x, K, E, thr, "gate", m)

    if impl == "eager":
        fn = reference
    elif impl == "compiled":
        fn = compiled(reference, ("route", device, shape, mode))
    else:

        def fn(x, m):
            return dk.route(x, K, E, threshold=THRESHOLD, expert_labels=m, backend=impl)

    expected, got = reference(logits, labels), fn(logits, labels)
    assert torch.equal(got.assignment, expected.assignment), f"{impl}: assignment differs"
    if labels is not None:
        assert torch.equal(got.final, expected.final), f"{impl}: final prediction differs"

    def step():
        fn(logits, labels)

    outputs: Dict[str, torch.Tensor] = {k: v for k, v in got._asdict().items() if v is not None}
    floor = nbytes(logits, labels) + nbytes(*outputs.values())
    run_benchmark(benchmark, request, device, "route", shape, mode, impl, step, floor)
