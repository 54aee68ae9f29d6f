"""The objective's presets side by side on the CPU: does the new default cost time?

``deferredseg_loss`` used to default to the paper's objective; it now defaults to the
training system's (``preset="default"``: one-vs-all surrogate, "benefit" gate target,
no gate MSE or sparsity). This script times the C++ CPU kernel (forward + backward,
and forward alone) with each preset, interleaved call by call so that machine load
affects both alike, and prints the medians and the ratio default / paper.

    python benchmarks/bench_presets.py                 # both default shapes, 30 repeats
    python benchmarks/bench_presets.py --shape 4,6,256,256 --repeats 50
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_loss_cpu import DEFAULT_SHAPES, make_inputs  # noqa: E402

from deferredseg_kernels import PRESETS, deferredseg_loss  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", action="append", help="B,C,*S (default: both default shapes)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    K, E = 1, 3
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, C++ CPU kernel")
    print("| shape | mode | preset paper | preset default | default / paper |")
    print("|---|---|---|---|---|")
    for text in args.shape or DEFAULT_SHAPES:
        shape = [int(v) for v in text.split(",")]
        logits, target, experts = make_inputs(shape, K, E)
        for mode in ("fwd+bwd", "fwd"):
            times = {p: [] for p in PRESETS}

            def call(preset):
                x = logits.detach().requires_grad_(mode == "fwd+bwd")
                with torch.set_grad_enabled(mode == "fwd+bwd"):
                    loss = deferredseg_loss(x, target, experts, K, E, backend="cpu", preset=preset)
                    if mode == "fwd+bwd":
                        loss.backward()

            for i in range(args.warmup + args.repeats):
                for preset in PRESETS:  # interleaved
                    t0 = time.perf_counter()
                    call(preset)
                    if i >= args.warmup:
                        times[preset].append(time.perf_counter() - t0)
            med = {p: statistics.median(v) * 1e3 for p, v in times.items()}
            print(
                f"| {tuple(shape)} | {mode} | {med['paper']:.2f} ms | {med['default']:.2f} ms | "
                f"{med['default'] / med['paper']:.2f} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
