"""`python -m deferredseg.backends_demo`: the objective and the routing on every backend.

Builds a synthetic multi-rater batch (blobs as ground truth, simulated experts
that disagree near boundaries, and the packed output a network would give),
evaluates the DeferredSeg objective and the routing with every backend that can
run here, and prints the terms, how closely the backends agree with the
reference, and their forward + backward timings on this machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

import deferredseg_kernels as dk


def synthetic_batch(
    batch: int, size: int, num_experts: int, seed: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, target, expert_labels) for K = 1: blobs, boundary-noisy experts, a noisy model."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    field = torch.full((batch, size, size), -1.0)
    for _ in range(3):  # three soft blobs per image
        c = torch.rand(batch, 2, 1, 1, generator=g) * 1.2 - 0.6
        r = torch.rand(batch, 1, 1, generator=g) * 0.25 + 0.15
        field = torch.maximum(field, 1 - ((xx - c[:, 0]) ** 2 + (yy - c[:, 1]) ** 2) / r**2)
    target = (field > 0).long()
    # Boundary band: where experts and the model are unsure.
    pooled = F.max_pool2d(target[:, None].float(), 7, 1, 3)[:, 0]
    eroded = -F.max_pool2d(-target[:, None].float(), 7, 1, 3)[:, 0]
    band = pooled != eroded
    experts = []
    for j in range(num_experts):
        flip_p = 0.01 + 0.1 * band.float() * (j + 1) / num_experts
        flip = torch.rand(target.shape, generator=g) < flip_p
        experts.append(torch.where(flip, 1 - target, target))
    expert_labels = torch.stack(experts, 1)
    # A model that is confident inside regions and unsure on the band.
    z = 8 * field.clamp(-1, 1) + torch.randn(target.shape, generator=g) * (0.3 + 1.5 * band.float())
    r = torch.randn(batch, num_experts + 1, size, size, generator=g) * 0.5
    r[:, num_experts] += 2.0 - 3.0 * band.float()  # keep the pixel unless it is on the band
    a = 3.0 * band.float() - 1.5 + torch.randn(target.shape, generator=g) * 0.3
    logits = torch.cat([z[:, None], r, a[:, None]], dim=1)
    return logits, target, expert_labels


def _time(fn, repeats: int) -> List[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def run(batch: int, size: int, num_experts: int, repeats: int, seed: int) -> Dict[str, Dict]:
    K, E = 1, num_experts
    logits, target, experts = synthetic_batch(batch, size, E, seed)
    device_backends = [b for b in dk.available_backends("loss") if dk.runs_on(b, logits.device)]
    print(
        f"synthetic multi-rater batch: logits {tuple(logits.shape)} (K={K}, E={E}), "
        f"{int((target == 1).sum())} foreground pixels; backends here: "
        f"{dk.available_backends()}"
    )
    for b in dk.BACKENDS[1:]:
        reason = dk.why_unavailable(b)
        if reason:
            print(f"  {b}: not available: {reason}")

    results: Dict[str, Dict] = {}
    for backend in device_backends:
        x = logits.clone().requires_grad_(True)
        loss, terms = dk.deferredseg_loss(
            x, target, experts, K, E, backend=backend, return_terms=True
        )
        (grad,) = torch.autograd.grad(loss, x)

        def step():
            y = logits.clone().requires_grad_(True)
            torch.autograd.grad(dk.deferredseg_loss(y, target, experts, K, E, backend=backend), y)

        times = _time(step, repeats)
        results[backend] = dict(
            loss=loss.detach(),
            terms=terms,
            grad=grad,
            route=dk.route(logits, K, E, expert_labels=experts, backend=backend)
            if backend in dk.available_backends("route")
            else None,
            ms=statistics.median(times),
        )

    ref = results["reference"]
    t = ref["terms"]
    print(
        "\nobjective (reference): loss {:.5f} = seg {:.4f} + collab {:.4f} + gate {:.4f} "
        "+ 0.1 * coherence {:.4f} + 0.1 * balance {:.4f}".format(
            ref["loss"].item(),
            t["seg"].item(),
            t["collab"].item(),
            t["gate"].item(),
            t["coherence"].item(),
            t["balance"].item(),
        )
    )
    print(
        "mean routing load pbar (experts..., model):",
        ", ".join(f"{v:.3f}" for v in t["pbar"].tolist()),
    )
    r = ref["route"]
    deferred = (r.assignment >= 0).float().mean().item()
    model_dice = _dice(r.model_pred, target)
    system_dice = _dice(r.final, target)
    print(
        f"routing (gate, threshold 0.5): {deferred:.1%} of pixels deferred; Dice of the model "
        f"alone {model_dice:.4f}, of model + experts {system_dice:.4f}"
    )

    print(
        "\n| backend | loss | max rel. diff of terms | max abs. diff of gradient | "
        "routing equal | fwd+bwd ms (median) |"
    )
    print("|---|---|---|---|---|---|")
    for name, res in results.items():
        dterm = max(
            abs(res["terms"][k].item() - t[k].item()) / max(abs(t[k].item()), 1e-12)
            for k in ("seg", "collab", "gate", "coherence", "balance")
        )
        dgrad = (res["grad"] - ref["grad"]).abs().max().item()
        same = (
            "-"
            if res["route"] is None
            else (
                "yes"
                if torch.equal(res["route"].assignment, r.assignment)
                and torch.equal(res["route"].final, r.final)
                else "NO"
            )
        )
        print(
            f"| {name} | {res['loss'].item():.6f} | {dterm:.2e} | {dgrad:.2e} | {same} | "
            f"{res['ms']:.2f} |"
        )
    return results


def _dice(pred: torch.Tensor, target: torch.Tensor) -> float:
    inter = ((pred == 1) & (target == 1)).sum().item()
    return 2 * inter / max((pred == 1).sum().item() + (target == 1).sum().item(), 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m deferredseg.backends_demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--experts", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    run(a.batch, a.size, a.experts, a.repeats, a.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
