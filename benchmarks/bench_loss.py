"""GPU benchmark of the DeferredSeg objective: reference, compiled reference, Triton, CUDA.

For every shape and provider, four modes are timed with ``triton.testing.do_bench``
(20th / 50th / 80th percentiles, in ms):

- ``forward``        loss with ``logits.requires_grad`` (the fused kernels also make the
                     gradient here; the reference builds its autograd graph);
- ``backward``       ``loss.backward()`` on a graph made once (the fused kernels only
                     rescale the stored gradient);
- ``full``           forward + backward;
- ``nograd_forward`` loss under ``torch.no_grad()``.

Also recorded: peak extra memory (``torch.cuda.max_memory_allocated`` minus what was
allocated before the call) and the percentage of the bandwidth floor. The floor of a
mode is the bytes it must move at least: every input read once (logits, target,
expert labels) for the modes that compute the loss, plus the logits' gradient written
once for the modes that produce it; divided by the device-to-device copy bandwidth
measured in the same run (a large ``copy_``, read + write counted). 100% means "as
fast as a copy of the same bytes".

Providers: ``reference`` (eager PyTorch), ``compiled`` (``torch.compile`` of the
reference), ``triton``, ``cuda`` (the C++ CUDA kernels, when built with a loss).
The reference providers call ``deferredseg_loss_reference`` directly, so they do not
pay for the label-range check (a device sync) that ``backend="reference"`` runs.

Rows are appended to ``benchmarks/results/loss_gpu.csv``, keyed by GPU name and torch,
triton and CUDA versions; a markdown table is printed (and written with
``--markdown``); a plot is saved when matplotlib is installed.

Usage: ``python benchmarks/bench_loss.py [--shapes ...] [--providers ...] [--modes ...]
[--budget-s 240] [--markdown out.md]``. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
CSV_PATH = os.path.join(RESULTS, "loss_gpu.csv")

# (name, logits shape, dtype, K, E)
SHAPES = [
    ("2d-16x512", (16, 6, 512, 512), torch.bfloat16, 1, 3),
    ("2d-16x1024", (16, 6, 1024, 1024), torch.bfloat16, 1, 3),
    ("3d-2x256", (2, 6, 256, 256, 256), torch.bfloat16, 1, 3),
    ("2d-8x512-K4", (8, 4 + 3 + 2, 512, 512), torch.bfloat16, 4, 3),
]
PROVIDERS = ("reference", "compiled", "triton", "cuda")
MODES = ("forward", "backward", "full", "nograd_forward")
FIELDS = ["gpu", "torch", "triton", "cuda", "shape_name", "shape", "dtype", "K", "E", "provider",
          "mode", "p20_ms", "p50_ms", "p80_ms", "peak_extra_mib", "floor_bytes", "copy_gbps",
          "pct_of_floor", "status", "timestamp"]


def _die_without_gpu() -> None:
    if not torch.cuda.is_available():
        sys.exit("bench_loss.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                 "the CPU kernels have their own benchmark in benchmarks/")
    try:
        import triton.testing  # noqa: F401
    except ImportError as exc:
        sys.exit(f"bench_loss.py needs triton for triton.testing.do_bench: {exc}")


def make_inputs(shape: Tuple[int, ...], dtype: torch.dtype, K: int, E: int, seed: int = 0):
    """Random packed logits, targets (10% ignored) and expert labels, made on the GPU."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    B, S = shape[0], shape[2:]
    logits = (torch.randn(shape, device="cuda", generator=g) * 2).to(dtype)
    nlab = max(K, 2)
    target = torch.randint(0, nlab, (B,) + tuple(S), device="cuda", generator=g)
    target = torch.where(torch.rand(target.shape, device="cuda", generator=g) < 0.1,
                         torch.full_like(target, -100), target)
    experts = torch.randint(0, nlab, (B, E) + tuple(S), device="cuda", generator=g)
    return logits, target, experts


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written)."""
    from triton.testing import do_bench

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3)


def floor_bytes(mode: str, logits, target, experts) -> int:
    inputs = sum(t.numel() * t.element_size() for t in (logits, target, experts))
    grad = logits.numel() * logits.element_size()
    return {"forward": inputs + grad, "backward": grad, "full": inputs + grad,
            "nograd_forward": inputs}[mode]


def loss_fn(provider: str, K: int, E: int) -> Callable:
    import deferredseg_kernels as dk
    from deferredseg_kernels import make_options
    from deferredseg_kernels.reference import deferredseg_loss_reference

    if provider in ("reference", "compiled"):
        opts = make_options(K, E)

        def ref(x, t, l):
            return deferredseg_loss_reference(x, t, l, opts)

        return torch.compile(ref, fullgraph=True, dynamic=False) if provider == "compiled" else ref

    def fused(x, t, l):
        return dk.deferredseg_loss(x, t, l, K, E, backend=provider)

    return fused


def provider_unavailable(provider: str) -> Optional[str]:
    import deferredseg_kernels as dk

    if provider in ("reference", "compiled"):
        return None
    if provider not in dk.available_backends("loss"):
        from deferredseg_kernels import _dispatch

        return _dispatch.why_unavailable(provider) or "does not implement the loss"
    return None


def bench_mode(fn: Callable, mode: str, logits, target, experts, warmup: int, rep: int):
    """(p20, p50, p80) in ms and the peak extra memory in MiB of one mode."""
    from triton.testing import do_bench

    x = logits.detach().requires_grad_(mode != "nograd_forward")
    if mode == "forward":
        call = lambda: fn(x, target, experts)  # noqa: E731
    elif mode == "nograd_forward":
        def call():
            with torch.no_grad():
                return fn(x, target, experts)
    elif mode == "full":
        def call():
            fn(x, target, experts).backward()
    else:  # backward on a graph made once
        loss = fn(x, target, experts)

        def call():
            loss.backward(retain_graph=True)

    call()  # compile / autotune / first-touch outside the timing
    torch.cuda.synchronize()
    x.grad = None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    call()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    x.grad = None
    q = do_bench(call, warmup=warmup, rep=rep, grad_to_none=[x], quantiles=[0.2, 0.5, 0.8])
    return tuple(float(v) for v in q), peak


def versions() -> Dict[str, str]:
    import triton

    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda or ""}


def append_csv(rows: List[Dict]) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    new = not os.path.exists(CSV_PATH)
    with open(CSV_PATH, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in FIELDS})


def markdown(rows: List[Dict]) -> str:
    ver = versions()
    out = [f"Loss benchmark on {ver['gpu']} (torch {ver['torch']}, triton {ver['triton']}, "
           f"CUDA {ver['cuda']}); p50 ms [p20-p80], % of the copy-bandwidth floor, peak extra MiB",
           "", "| shape | provider | mode | p50 ms | p20-p80 | % floor | peak MiB | note |",
           "|---|---|---|---:|---|---:|---:|---|"]
    for r in rows:
        if r["status"] != "ok":
            note = r["status"].replace("|", "/").replace("\n", " ")[:80]
            out.append(f"| {r['shape_name']} | {r['provider']} | {r['mode']} | - | - | - | - | "
                       f"{note} |")
            continue
        out.append(f"| {r['shape_name']} | {r['provider']} | {r['mode']} | {r['p50_ms']:.3f} | "
                   f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f} | {r['pct_of_floor']:.0f} | "
                   f"{r['peak_extra_mib']:.0f} | |")
    return "\n".join(out)


def plot(rows: List[Dict], path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return None
    modes = [m for m in MODES if any(r["mode"] == m for r in ok)]
    shapes = list(dict.fromkeys(r["shape_name"] for r in ok))
    providers = list(dict.fromkeys(r["provider"] for r in ok))
    fig, axes = plt.subplots(1, len(modes), figsize=(4.5 * len(modes), 4), squeeze=False)
    width = 0.8 / max(len(providers), 1)
    for ax, mode in zip(axes[0], modes):
        for i, prov in enumerate(providers):
            vals = []
            for s in shapes:
                hit = [r for r in ok if r["mode"] == mode and r["provider"] == prov
                       and r["shape_name"] == s]
                vals.append(hit[0]["p50_ms"] if hit else 0.0)
            ax.bar([j + i * width for j in range(len(shapes))], vals, width, label=prov)
        ax.set_title(mode)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
        ax.set_xticklabels(shapes, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("p50 ms")
        ax.set_yscale("log")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"DeferredSeg loss on {versions()['gpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="*", default=[s[0] for s in SHAPES],
                    help=f"subset of {[s[0] for s in SHAPES]}")
    ap.add_argument("--providers", nargs="*", default=list(PROVIDERS))
    ap.add_argument("--modes", nargs="*", default=list(MODES))
    ap.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    ap.add_argument("--rep", type=int, default=100, help="do_bench repetition time (ms)")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="stop starting new measurements after this many seconds (0: no limit)")
    ap.add_argument("--markdown", default=None, help="also write the markdown table here")
    ap.add_argument("--no-csv", action="store_true", help="do not append to the CSV")
    args = ap.parse_args(argv)
    _die_without_gpu()
    sys.path.insert(0, ROOT)

    t0 = time.time()
    ver = versions()
    bw = copy_bandwidth()
    print(f"# {ver['gpu']}: copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    rows: List[Dict] = []
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    for name, shape, dtype, K, E in SHAPES:
        if name not in args.shapes:
            continue
        logits, target, experts = make_inputs(shape, dtype, K, E)
        for provider in args.providers:
            reason = provider_unavailable(provider)
            fn = loss_fn(provider, K, E) if reason is None else None
            for mode in args.modes:
                row = dict(ver, shape_name=name, shape="x".join(map(str, shape)),
                           dtype=str(dtype).replace("torch.", ""), K=K, E=E, provider=provider,
                           mode=mode, copy_gbps=round(bw / 1e9, 1), timestamp=stamp,
                           floor_bytes=floor_bytes(mode, logits, target, experts))
                if reason is not None:
                    row["status"] = f"unavailable: {reason}"
                elif args.budget_s and time.time() - t0 > args.budget_s:
                    row["status"] = "skipped: time budget"
                else:
                    try:
                        (p20, p50, p80), peak = bench_mode(fn, mode, logits, target, experts,
                                                           args.warmup, args.rep)
                        row.update(p20_ms=p20, p50_ms=p50, p80_ms=p80, peak_extra_mib=peak,
                                   pct_of_floor=100.0 * row["floor_bytes"] / bw / (p50 * 1e-3),
                                   status="ok")
                    except torch.cuda.OutOfMemoryError:
                        row["status"] = "out of memory"
                    except Exception as exc:  # keep benchmarking the other providers
                        row["status"] = f"error: {type(exc).__name__}: {str(exc)[:200]}"
                    torch.cuda.empty_cache()
                rows.append(row)
                msg = (f"{name:12s} {provider:9s} {mode:14s} "
                       + (f"p50 {row['p50_ms']:8.3f} ms  {row['pct_of_floor']:5.0f}% floor  "
                          f"peak {row['peak_extra_mib']:7.0f} MiB" if row["status"] == "ok"
                          else row["status"]))
                print(msg, flush=True)
                # Written row by row: a run stopped by a time limit keeps what it measured.
                if not args.no_csv:
                    append_csv([row])
                if args.markdown:
                    with open(args.markdown, "w") as f:
                        f.write(markdown(rows) + "\n")
        del logits, target, experts
        torch.cuda.empty_cache()
    table = markdown(rows)
    print()
    print(table)
    gpu_tag = "".join(c if c.isalnum() else "_" for c in ver["gpu"])
    png = plot(rows, os.path.join(RESULTS, f"loss_gpu_{gpu_tag}.png"))
    print(f"\nCSV: {CSV_PATH}" + (f"\nplot: {png}" if png else "\n(matplotlib missing: no plot)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
