"""Benchmark of the DeferredSeg objective on the CPU: eager reference, torch.compile of
the reference and the C++ CPU kernel, side by side in one run.

Modes: ``fwd+bwd`` (loss and its gradient with respect to the logits) and ``fwd``
(forward only, no autograd graph). Each measurement is the median with the 20th and
80th percentiles of ``--repeats`` timed calls (``time.perf_counter``) after
``--warmup`` untimed ones; the three implementations are interleaved call by call,
so that a change in machine load affects them alike. Rows are appended to a CSV keyed
by machine, CPU name, torch version and thread count.

    python benchmarks/bench_loss_cpu.py                       # both default shapes
    python benchmarks/bench_loss_cpu.py --threads 1 --repeats 30
    python benchmarks/bench_loss_cpu.py --shape 2,6,128,128 --no-compile
    python benchmarks/bench_loss_cpu.py --loss-option surrogate=ova \
        --loss-option gate_target=benefit
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Sequence, Tuple

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from deferredseg_kernels import available_backends, deferredseg_loss  # noqa: E402

DEFAULT_SHAPES = ("4,6,256,256", "1,6,64,64,64")
IMPLS = ("eager", "compile", "cpu_kernel")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_inputs(
    shape: Sequence[int], K: int, E: int, seed: int = 0
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed logits (B, K + E + 2, *S) float32, target with 10 % ignored, expert labels."""
    g = torch.Generator().manual_seed(seed)
    B, C, S = shape[0], shape[1], tuple(shape[2:])
    if C != K + E + 2:
        raise SystemExit(f"--shape has {C} channels; K={K}, E={E} needs {K + E + 2}")
    logits = torch.randn((B, C) + S, generator=g) * 2.0
    nlab = max(K, 2)
    target = torch.randint(0, nlab, (B,) + S, generator=g)
    target[torch.rand(target.shape, generator=g) < 0.1] = -100
    experts = torch.randint(0, nlab, (B, E) + S, generator=g)
    return logits, target, experts


def percentiles(ts: List[float]) -> Tuple[float, float, float]:
    q = statistics.quantiles(ts, n=10, method="inclusive")  # deciles
    return statistics.median(ts), q[1], q[7]  # median, p20, p80


def make_step(fn: Callable, x: torch.Tensor, mode: str) -> Callable[[], None]:
    if mode == "fwd+bwd":

        def step():
            x.grad = None
            fn(x).backward()
    else:

        def step():
            with torch.no_grad():
                fn(x)

    return step


def parse_loss_options(items: Sequence[str]) -> Dict[str, object]:
    """NAME=VALUE pairs of loss options; a VALUE that reads as a number is one."""
    out: Dict[str, object] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"--loss-option: expected NAME=VALUE, got {item!r}")
        try:
            out[name] = float(value)
        except ValueError:
            out[name] = value
    return out


def bench_shape(
    shape: Sequence[int],
    K: int,
    E: int,
    modes: Sequence[str],
    warmup: int,
    repeats: int,
    use_compile: bool,
    options: Dict[str, object],
) -> List[Dict]:
    logits, target, experts = make_inputs(shape, K, E)
    x = logits.clone().requires_grad_(True)

    def eager(v):
        return deferredseg_loss(v, target, experts, K, E, backend="reference", **options)

    def kernel(v):
        return deferredseg_loss(v, target, experts, K, E, backend="cpu", **options)

    impls: Dict[str, Callable] = {"eager": eager, "cpu_kernel": kernel}
    if use_compile:
        torch._dynamo.reset()
        impls["compile"] = torch.compile(eager, dynamic=False)

    rows = []
    for mode in modes:
        steps = {name: make_step(fn, x, mode) for name, fn in impls.items()}
        t0 = time.perf_counter()
        for step in steps.values():  # includes compilation for "compile"
            for _ in range(warmup):
                step()
        warm_s = time.perf_counter() - t0
        times: Dict[str, List[float]] = {name: [] for name in steps}
        for _ in range(repeats):
            for name, step in steps.items():
                t = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t)
        res = {name: percentiles(ts) for name, ts in times.items()}
        kern = res["cpu_kernel"][0]
        opt_text = " ".join(f"{k}={v}" for k, v in options.items()) or "default options"
        print(
            f"\nshape {tuple(shape)} fp32 K={K} E={E}  {opt_text}  mode {mode}  "
            f"(threads {torch.get_num_threads()}, warm-up {warm_s:.1f} s)"
        )
        print(f"  {'impl':<12}{'median ms':>11}{'p20 ms':>10}{'p80 ms':>10}{'vs kernel':>11}")
        for name in IMPLS:
            if name not in res:
                continue
            med, p20, p80 = res[name]
            print(
                f"  {name:<12}{med * 1e3:>11.3f}{p20 * 1e3:>10.3f}{p80 * 1e3:>10.3f}"
                f"{med / kern:>10.1f}x"
            )
            row = dict(shape="x".join(map(str, shape)), dtype="float32", K=K, E=E)
            if options:  # (the default options' CSV keeps its columns)
                row["options"] = opt_text
            rows.append(
                dict(
                    row,
                    mode=mode,
                    impl=name,
                    median_ms=round(med * 1e3, 4),
                    p20_ms=round(p20 * 1e3, 4),
                    p80_ms=round(p80 * 1e3, 4),
                    speedup_of_kernel=round(med / kern, 2),
                )
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--shape",
        action="append",
        help="B,C,*S (repeatable); default: " + " and ".join(DEFAULT_SHAPES),
    )
    ap.add_argument("--num-classes", type=int, default=1)
    ap.add_argument("--num-experts", type=int, default=3)
    ap.add_argument("--modes", default="fwd+bwd,fwd")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument(
        "--loss-option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a loss option for every implementation (repeatable), e.g. "
        "surrogate=ova or gate_target=benefit",
    )
    ap.add_argument(
        "--csv",
        default=None,
        help="CSV to append to; default results/loss_cpu.csv, or "
        "results/loss_cpu_options.csv (one more column) with --loss-option",
    )
    args = ap.parse_args()
    if args.csv is None:
        name = "loss_cpu_options.csv" if args.loss_option else "loss_cpu.csv"
        args.csv = os.path.join(HERE, "results", name)

    if "cpu" not in available_backends("loss"):
        raise SystemExit("the C++ CPU kernels are not available here: build the extension first")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = [tuple(int(v) for v in s.split(",")) for s in (args.shape or DEFAULT_SHAPES)]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in ("fwd+bwd", "fwd"):
            raise SystemExit(f"--modes: unknown mode {m!r} (fwd+bwd, fwd)")

    key = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        machine=platform.node(),
        cpu=cpu_name(),
        cores=os.cpu_count(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
    )
    print(f"{key['cpu']} ({key['cores']} cores, {key['threads']} threads), torch {key['torch']}")
    rows = []
    for shape in shapes:
        rows += bench_shape(
            shape,
            args.num_classes,
            args.num_experts,
            modes,
            args.warmup,
            args.repeats,
            not args.no_compile,
            parse_loss_options(args.loss_option),
        )

    os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
    fields = list(key) + list(rows[0]) if rows else list(key)
    new = not os.path.exists(args.csv)
    with open(args.csv, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({**key, **r})
    print(f"\nappended {len(rows)} rows to {args.csv}")


if __name__ == "__main__":
    main()
