"""DeferredSeg in your own training loop: the drop-in loss, a budget, routing.

A plain PyTorch loop, no training framework: a MONAI UNet whose output has the
``K + E + 2`` channels of the packed logits, trained with ``DeferredSegLoss`` at its
defaults; then the loss's deferral policy is calibrated on the validation split for
a budget (the share of pixels the experts can label) and routes the test split.
The data are a panel of the package's hard synthetic benchmark: three readers, each
competent on different content. Run it with::

    python examples/own_training_loop.py              # about a minute on a laptop CPU
    python examples/own_training_loop.py --small      # seconds: what the tests run

It prints the realised test deferral rate and the system Dice (the model's labels
where it keeps a pixel, the chosen reader's where it defers) against the model alone.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from monai.networks.nets import UNet
from torch.utils.data import DataLoader

from deferredseg.data import build_dataset
from deferredseg.data.benchmark import write_benchmark
from deferredseg.losses import DeferredSegLoss
from deferredseg.metrics import measure
from deferredseg.policy import channel_layout


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--panel", default="C", help="expert panel of the benchmark (A, B, C, D)")
    ap.add_argument("--cases", type=int, default=120)
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--budget", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--small", action="store_true", help="a tiny run (tests)")
    ap.add_argument("--data", help="where to write the benchmark (default: a temporary folder)")
    args = ap.parse_args(argv)
    if args.small:
        args.cases, args.size, args.steps = 40, 32, 120
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data or tmp) / args.panel
        if not (root / "split.json").exists():
            write_benchmark(root, args.panel, num_cases=args.cases, size=args.size, seed=args.seed)
        return run(root, args)


def splits(root: Path):
    """The benchmark's train, validation and test splits, and the number of experts."""

    def split(name):
        return build_dataset(
            "multirater", root, name, target="label", split_file=root / "split.json"
        )

    train_ds = split("train")
    return train_ds, split("val"), split("test"), train_ds.info.num_experts


def train_plain_loop(train_ds, num_experts: int, steps: int, seed: int = 0, **loss_options):
    """A MONAI UNet with the packed logits' channels, trained with ``DeferredSegLoss``
    (its defaults unless ``loss_options``) in an ordinary loop; returns (model, criterion)."""
    torch.manual_seed(seed)
    K = 1  # binary segmentation: one logit
    layout = channel_layout(K, num_experts)  # K segmentation, E + 1 routing, 1 gate
    print(f"network output: {layout.describe()}")
    model = UNet(2, 1, layout.channels, channels=(16, 32, 64), strides=(2, 2))
    criterion = DeferredSegLoss(num_classes=K, num_experts=num_experts, **loss_options)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loader = DataLoader(train_ds, batch_size=8, shuffle=True)
    step = 0
    while step < steps:
        for batch in loader:
            loss = criterion(model(batch["image"]), batch["target"], batch["expert_labels"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step % 100 == 0 or step == steps:
                print(f"step {step}: loss {loss.item():.3f}")
            if step == steps:
                break
    model.eval()
    return model, criterion


def outputs(model, ds):
    """A function returning a new pass of (packed logits, target, expert labels) batches."""

    def batches():
        with torch.no_grad():
            for b in DataLoader(ds, batch_size=8):
                yield model(b["image"]), b["target"], b["expert_labels"]

    return batches


def run(root: Path, args) -> dict:
    train_ds, val_ds, test_ds, E = splits(root)
    model, criterion = train_plain_loop(train_ds, E, args.steps, args.seed)

    # calibrate the deferral policy for the budget on the validation split
    policy = criterion.policy().calibrate(outputs(model, val_ds), budget=args.budget)
    print(
        f"calibrated: threshold {policy.threshold:.4f}, validation deferral "
        f"{policy.calibration['rate']:.1%}, deferred pixels go to "
        f"{'the heads' if policy.chosen == 'heads' else 'the best single reader'}"
    )

    # route the test split (policy.route(logits, expert_labels) per batch) and measure it
    m, _ = measure(policy, outputs(model, test_ds))
    print(
        f"test: deferral {m['deferral_rate']:.1%} (budget {args.budget:.0%}), system Dice "
        f"{m['system_dice']:.3f} against {m['model_dice']:.3f} for the model alone"
    )
    return {
        "deferral_rate": m["deferral_rate"],
        "system_dice": m["system_dice"],
        "model_dice": m["model_dice"],
        "policy": policy.to_dict(),
    }


if __name__ == "__main__":
    main()
