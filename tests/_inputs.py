"""Random inputs and the option matrix shared by the backend tests.

Every kernel test draws fresh inputs from here and compares with the reference,
so all backends are checked on the same kinds of data.
"""

from __future__ import annotations

import itertools
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch


def make_inputs(
    B: int,
    K: int,
    E: int,
    spatial: Sequence[int],
    dtype=torch.float32,
    label_dtype=torch.int64,
    ignore_frac: float = 0.1,
    ignore_index: int = -100,
    expert_ignore_frac: float = 0.05,
    device="cpu",
    scale: float = 2.0,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, target, expert_labels) with some ignored pixels.

    With uint8 labels, ``ignore_index`` must be representable (pass 255).
    """
    g = generator
    C = K + E + 2
    logits = torch.randn((B, C, *spatial), generator=g, dtype=torch.float64) * scale
    logits = logits.to(dtype).to(device)
    nlab = max(K, 2)
    target = torch.randint(0, nlab, (B, *spatial), generator=g)
    # Experts mostly agree with the target, so every correctness branch is exercised.
    experts = target.unsqueeze(1).repeat(1, E, *([1] * len(spatial)))
    flip = torch.rand(experts.shape, generator=g) < 0.3
    experts = torch.where(flip, torch.randint(0, nlab, experts.shape, generator=g), experts)
    if ignore_frac > 0:
        target = torch.where(
            torch.rand(target.shape, generator=g) < ignore_frac,
            torch.full_like(target, ignore_index),
            target,
        )
    if expert_ignore_frac > 0:
        experts = torch.where(
            torch.rand(experts.shape, generator=g) < expert_ignore_frac,
            torch.full_like(experts, ignore_index),
            experts,
        )
    return logits, target.to(label_dtype).to(device), experts.to(label_dtype).to(device)


def option_matrix(E: int) -> List[Dict]:
    """One dict per combination of the loss's discrete options (docs/objective.md section 3).

    Every combination of surrogate, coherence, coherence_maps and balance; gate_target
    alternates with (coherence, balance), "benefit" where exactly one of them is not the
    default, so that every pair of gate_target and one other option occurs.
    """
    low = [0.5 / (E + 1)] * (E + 1)
    high = [1.5 / (E + 1)] * (E + 1)
    out = []
    for surrogate, coherence, maps, balance in itertools.product(
        ("softmax", "paper", "ova"),
        ("l1", "l2"),
        (("router", "gate"), ("router",), ("gate",), ()),
        ("cv2", "band"),
    ):
        gate_target = "benefit" if (coherence == "l2") != (balance == "band") else "router"
        opts = dict(
            surrogate=surrogate,
            coherence=coherence,
            coherence_maps=maps,
            balance=balance,
            gate_target=gate_target,
        )
        if balance == "band":
            opts.update(balance_low=low, balance_high=high)
        out.append(opts)
    return out


def option_id(opts: Dict) -> str:
    maps = "+".join(opts["coherence_maps"]) or "nomaps"
    return (
        f"{opts['surrogate']}-{opts['coherence']}-{maps}-{opts['balance']}"
        f"-{opts.get('gate_target', 'router')}"
    )


def iter_shapes() -> Iterator[Tuple[int, ...]]:
    """Odd spatial shapes: primes, axes of length 1, 1D / 2D / 3D."""
    yield (37,)
    yield (1,)
    yield (7, 13)
    yield (1, 11)
    yield (5, 1)
    yield (3, 5, 7)
    yield (2, 1, 9)


TERMS = ("seg", "collab", "gate", "coherence", "balance", "pbar")


def assert_results_close(got, want, rtol: float = 1e-5):
    """A kernel's (loss, terms, grad) against the reference's: loss and terms within
    rtol, the gradient within rtol of its largest magnitude.

    Terms get an absolute floor of rtol / 10 (times the loss when larger than 1): the
    reference computes cv2 balance as E sum P^2 / T^2 - 1 in float32, whose cancellation
    alone costs ~1e-7 absolute (the kernels assemble the terms in float64).
    """
    (loss, terms, grad), (rloss, rterms, rgrad) = got, want
    assert loss.dtype == rloss.dtype
    floor = rtol * 0.1 * max(1.0, float(rloss.abs()))
    torch.testing.assert_close(loss, rloss, rtol=rtol, atol=floor)
    for name in TERMS:
        torch.testing.assert_close(
            terms[name], rterms[name], rtol=rtol, atol=floor, msg=lambda m: f"term {name}: {m}"
        )
    assert grad.shape == rgrad.shape and grad.dtype == rgrad.dtype
    scale = float(rgrad.abs().max()) if rgrad.numel() else 0.0
    torch.testing.assert_close(
        grad, rgrad, rtol=rtol, atol=rtol * max(scale, 1e-12), msg=lambda m: f"gradient: {m}"
    )
