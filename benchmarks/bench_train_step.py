"""GPU benchmark: a training step with the fused DeferredSeg loss against the same step
with a trivial loss, side by side in one run; the target: the fused loss adds
at most 3% to the step.

The network is a MONAI UNet wrapped by DeferredSegmentor (K = 1, E = 3), bf16
autocast, AdamW; the "trivial" step replaces the loss by the mean of the packed
logits, so the difference is the loss's own cost. Medians and p20/p80 of CUDA-event
timings over interleaved repeats.

    python benchmarks/bench_train_step.py [--batch 16 --size 512 --repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--backends", nargs="+", default=["triton", "cuda", "reference"])
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_train_step.py needs a CUDA GPU; none is available here.")
        return 0
    from deferredseg.losses import DeferredSegLoss
    from deferredseg.models import DeferredSegmentor
    from deferredseg_kernels import available_backends

    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = DeferredSegmentor.from_monai("UNet", num_classes=1, num_experts=3, features=16).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(a.batch, 1, a.size, a.size, device=dev)
    t = (torch.rand(a.batch, a.size, a.size, device=dev) > 0.7).long()
    m = torch.where(
        torch.rand(a.batch, 3, a.size, a.size, device=dev) < 0.1, 1 - t[:, None], t[:, None]
    )

    def step(loss_fn):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
        loss_fn(out).backward()
        opt.step()

    losses = {"trivial": lambda out: out.float().mean()}
    for b in a.backends:
        if b in available_backends("loss"):
            crit = DeferredSegLoss(1, 3, backend=b)
            losses[b] = (lambda c: lambda out: c(out, t, m))(crit)
    times = {k: [] for k in losses}
    for name, fn in losses.items():
        for _ in range(a.warmup):
            step(fn)
    for _ in range(a.repeats):
        for name, fn in losses.items():
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            s.record()
            step(fn)
            e.record()
            torch.cuda.synchronize()
            times[name].append(s.elapsed_time(e))
    base = statistics.median(times["trivial"])
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}: UNet step, "
        f"batch {a.batch}x1x{a.size}x{a.size}, bf16 autocast"
    )
    print("| loss | median ms | p20 | p80 | vs trivial loss |")
    print("|---|---|---|---|---|")
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=5)
        print(
            f"| {name} | {statistics.median(ts):.3f} | {q[0]:.3f} | {q[3]:.3f} | "
            f"{100 * (statistics.median(ts) / base - 1):+.1f}% |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
