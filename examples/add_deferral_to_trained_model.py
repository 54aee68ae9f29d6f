"""Add deferral to a segmentation network you already trained (bolt-on deferral).

1. writes a panel of the package's benchmark generator (panel C: three readers,
   each competent on different content) as a multi-rater folder;
2. trains a plain MONAI ``UNet`` (``out_channels=1``) on it with an ordinary
   Dice + cross-entropy loss: this stands for the network you already have;
3. ``add_deferral(...)``: freezes it, trains routing and gate heads on its features
   and logits, and calibrates the deferral policy for the budget on validation;
4. measures the test split: the network alone against the network with deferral at
   that budget, and the realised test deferral rate;
5. saves a checkpoint ``deferredseg predict --checkpoint`` reads (``--out``).

Run it with::

    python examples/add_deferral_to_trained_model.py            # a few minutes on a CPU
    python examples/add_deferral_to_trained_model.py --small    # seconds (what CI runs)
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from deferredseg.bolt_on import add_deferral
from deferredseg.data import build_dataloader, build_dataset
from deferredseg.data.benchmark import write_benchmark
from deferredseg.metrics import measure

UNET = "monai.networks.nets:UNet"


def unet_kwargs(channels: int) -> Dict[str, Any]:
    """The network's constructor arguments (JSON: the checkpoint records them)."""
    return {
        "spatial_dims": 2,
        "in_channels": 1,
        "out_channels": 1,
        "channels": [channels, channels * 2, channels * 4],
        "strides": [2, 2],
        "num_res_units": 1,
    }


def train_unet(net: torch.nn.Module, loader, epochs: int, lr: float, device) -> None:
    """An ordinary training loop: the network you already trained stands here."""
    from monai.losses import DiceCELoss

    loss_fn = DiceCELoss(sigmoid=True)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for epoch in range(epochs):
        total = 0.0
        for batch in loader:
            x = batch["image"].to(device)
            y = batch["target"].to(device).unsqueeze(1).float()
            loss = loss_fn(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        print(f"UNet epoch {epoch + 1}/{epochs}: loss {total / max(len(loader), 1):.4f}")
    net.eval()


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="tiny sizes, seconds on a CPU (CI)")
    p.add_argument(
        "--cases", type=int, default=None, help="benchmark cases (default 160; --small 48)"
    )
    p.add_argument("--size", type=int, default=None, help="image size (default 48; --small 24)")
    p.add_argument("--epochs", type=int, default=None, help="UNet epochs (default 30; --small 8)")
    p.add_argument(
        "--head-epochs", type=int, default=None, help="heads' epochs (default 30; --small 5)"
    )
    p.add_argument("--channels", type=int, default=None, help="UNet width (default 16; --small 8)")
    p.add_argument("--lr", type=float, default=1e-2, help="UNet learning rate")
    p.add_argument("--budget", type=float, default=0.1, help="share of pixels for the experts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None, help="where to write the benchmark (default: temp)")
    p.add_argument("--out", default=None, help="write the bolt-on checkpoint here (a .pt path)")
    args = p.parse_args(argv)

    small = args.small
    cases = args.cases or (48 if small else 160)
    size = args.size or (24 if small else 48)
    epochs = args.epochs or (8 if small else 30)
    head_epochs = args.head_epochs if args.head_epochs is not None else (5 if small else 30)
    channels = args.channels or (8 if small else 16)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    with tempfile.TemporaryDirectory(prefix="deferredseg-bolt-on-") as tmp:
        root = Path(args.data or tmp) / "C"
        # a quarter each for validation (calibration) and test: rates measured on more pixels
        write_benchmark(
            root, "C", num_cases=cases, size=size, seed=args.seed, fractions=(0.5, 0.25, 0.25)
        )
        split = dict(target="label", split_file=root / "split.json")
        data = {s: build_dataset("multirater", root, s, **split) for s in ("train", "val", "test")}
        names = list(data["train"].info.expert_names)
        loaders = {
            s: build_dataloader(ds, batch_size=4, shuffle=(s == "train")) for s, ds in data.items()
        }

        # 1. the network you already have
        from monai.networks.nets import UNet

        net = UNet(**unet_kwargs(channels)).to(device)
        train_unet(net, loaders["train"], epochs, args.lr, device)

        # 2. deferral added to it, calibrated at the budget on validation
        deferral = add_deferral(
            net,
            build_dataloader(data["train"], batch_size=4, shuffle=False),
            loaders["val"],
            num_classes=1,
            num_experts=len(names),
            expert_names=names,
            budget=args.budget,
            head_epochs=head_epochs,
            seed=args.seed,
            device=device,
            verbose=True,
        )
        policy = deferral.policy
        print(
            f"feature layer {deferral.feature_layer_name!r} ({deferral.feature_channels} "
            f"channels), expert choice {policy.chosen!r}, threshold {policy.threshold:.4f}, "
            f"validation deferral {policy.calibration['rate']:.3f}"
        )

        # 3. the test split at that budget
        res, _ = measure(policy, deferral.outputs(loaders["test"]))
        summary = {
            "budget": args.budget,
            "model_dice": res["model_dice"],
            "system_dice": res["system_dice"],
            "test_deferral_rate": res["deferral_rate"],
            "val_deferral_rate": policy.calibration["rate"],
            "expert_share": res["expert_share"],
            "auroc_model_wrong_score": res["auroc_model_wrong_score"],
            "auroc_model_wrong_uncertainty": res["auroc_model_wrong_uncertainty"],
            "expert_choice": policy.chosen,
            "feature_layer": deferral.feature_layer_name,
        }
        print(
            f"test: model alone Dice {res['model_dice']:.4f}; with deferral "
            f"Dice {res['system_dice']:.4f} at a realised deferral rate "
            f"{res['deferral_rate']:.3f} (budget {args.budget:g}); expert shares "
            f"{[round(s, 3) for s in res['expert_share']]}"
        )

        # 4. a checkpoint for `deferredseg predict --checkpoint OUT --images ... --out ...`
        if args.out:
            path = deferral.save(args.out, factory=UNET, factory_kwargs=unet_kwargs(channels))
            summary["checkpoint"] = str(path)
            print(f"wrote {path}")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
