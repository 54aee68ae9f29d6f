"""Plug any segmentation architecture into DeferredSeg (here a small CENet stand-in).

CENet (Gu et al., "CE-Net: Context Encoder Network for 2D Medical Image
Segmentation", IEEE TMI 2019) is not published as a package. This example
writes a *small stand-in* with the same overall shape (a convolutional encoder,
a dense atrous convolution block, a residual multi-kernel pooling block and a
decoder with skip connections) and shows the two ways of wrapping a network:

1. features mode: the network returns a feature map (B, F, H, W) at input
   resolution, and DeferredSegmentor adds the segmentation, routing and gate heads;
2. pretrained mode: the network keeps its own segmentation head, and
   DeferredSegmentor reads features from one of its layers (``feature_layer``) and
   adds only the routing and gate heads.

Then it trains a few steps on the built-in synthetic multi-rater data and
prints the deferral statistics. Run it with::

    python examples/custom_backbone.py --steps 20

Replace ``TinyCENet`` with the real CENet (or any nn.Module) and the same code works.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from deferredseg.data import build_dataloader, build_dataset
from deferredseg.models import DeferredSegmentor
from deferredseg_kernels import deferredseg_loss


def conv_bn_relu(cin: int, cout: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class DenseAtrousBlock(nn.Module):
    """CENet's DAC idea: parallel cascades of atrous convolutions, summed with the input."""

    def __init__(self, ch: int):
        super().__init__()
        self.b1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.b2 = nn.Sequential(nn.Conv2d(ch, ch, 3, padding=3, dilation=3), nn.Conv2d(ch, ch, 1))
        self.b3 = nn.Sequential(
            nn.Conv2d(ch, ch, 3, padding=1),
            nn.Conv2d(ch, ch, 3, padding=3, dilation=3),
            nn.Conv2d(ch, ch, 1),
        )

    def forward(self, x):
        return x + F.relu(self.b1(x)) + F.relu(self.b2(x)) + F.relu(self.b3(x))


class MultiKernelPooling(nn.Module):
    """CENet's RMP idea: max-pool at several sizes, 1x1 conv, upsample, concatenate."""

    def __init__(self, ch: int, sizes=(2, 3, 5)):
        super().__init__()
        self.sizes = sizes
        self.conv = nn.Conv2d(ch, 1, 1)

    def forward(self, x):
        h, w = x.shape[2:]
        maps = [
            F.interpolate(
                self.conv(F.max_pool2d(x, k, stride=k, ceil_mode=True)),
                size=(h, w),
                mode="bilinear",
                align_corners=False,
            )
            for k in self.sizes
        ]
        return torch.cat([x] + maps, dim=1)


class TinyCENet(nn.Module):
    """A small CENet-shaped network.

    ``return_features=True``: returns the decoder's last feature map (B, width, H, W)
    (features mode). ``False``: returns its own segmentation logits (B, K, H, W)
    from ``self.head`` (a "pretrained" segmentor); its features are the output of
    the submodule named ``"decoder.1"``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 1,
        width: int = 8,
        return_features: bool = True,
    ):
        super().__init__()
        w = width
        self.enc1 = conv_bn_relu(in_channels, w)
        self.enc2 = conv_bn_relu(w, 2 * w)
        self.dac = DenseAtrousBlock(2 * w)
        self.rmp = MultiKernelPooling(2 * w)
        self.up = nn.ConvTranspose2d(2 * w + 3, w, 2, stride=2)
        self.decoder = nn.Sequential(conv_bn_relu(2 * w, w), conv_bn_relu(w, w))
        self.head = nn.Conv2d(w, num_classes, 1)
        self.return_features = return_features
        self.width = w

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        c = self.rmp(self.dac(e2))
        d = self.decoder(torch.cat([self.up(c), e1], dim=1))
        return d if self.return_features else self.head(d)


def train(model: nn.Module, steps: int, num_classes: int, num_experts: int, seed: int = 0) -> None:
    data = build_dataset(
        "synthetic",
        split="train",
        num_classes=num_classes,
        experts="same-accuracy",
        num_images=16,
        image_size=32,
        seed=seed,
    )
    loader = build_dataloader(data, batch_size=4)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3)
    step = 0
    while step < steps:
        for batch in loader:
            logits = model(batch["image"])
            loss, terms = deferredseg_loss(
                logits,
                batch["target"],
                batch["expert_labels"],
                num_classes=num_classes,
                num_experts=num_experts,
                backend="reference",
                return_terms=True,
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step % max(1, steps // 4) == 0 or step == steps:
                print(
                    f"  step {step:3d}  loss {loss.item():.4f}  seg {terms['seg'].item():.4f}  "
                    f"collab {terms['collab'].item():.4f}  pbar "
                    f"{[round(v, 3) for v in terms['pbar'].tolist()]}"
                )
            if step >= steps:
                break
    batch = next(iter(build_dataloader(data, batch_size=4, shuffle=False)))
    result = model.predict(batch["image"], threshold=0.5, expert_labels=batch["expert_labels"])
    deferred = (result.assignment >= 0).float().mean().item()
    acc = (result.final == batch["target"]).float().mean().item()
    print(f"  deferred {deferred:.1%} of pixels; combined accuracy {acc:.3f}")


def pretrain(net: nn.Module, steps: int, seed: int = 0) -> None:
    """Stands in for loading published weights: a few steps of plain binary segmentation
    training."""
    data = build_dataset(
        "synthetic", split="train", num_classes=1, num_images=16, image_size=32, seed=seed
    )
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    step = 0
    while step < steps:
        for batch in build_dataloader(data, batch_size=4):
            loss = F.binary_cross_entropy_with_logits(
                net(batch["image"])[:, 0], batch["target"].float()
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step >= steps:
                break
    print(f"  pretrained the stand-in for {steps} steps (BCE {loss.item():.4f})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    K, E = 1, 3

    print("1. features mode: TinyCENet returns features; DeferredSegmentor adds all three heads")
    net = TinyCENet(in_channels=1, width=8, return_features=True)
    model = DeferredSegmentor(
        net, feature_channels=net.width, num_classes=K, num_experts=E, spatial_dims=2
    )
    train(model, args.steps, K, E, args.seed)

    print(
        "2. pretrained mode: TinyCENet keeps its own segmentation head; features from layer "
        "'decoder.1'"
    )
    net = TinyCENet(in_channels=1, num_classes=K, width=8, return_features=False)
    pretrain(
        net, 2 * args.steps, args.seed
    )  # with the real CENet: net.load_state_dict(torch.load(...))
    model = DeferredSegmentor(
        net,
        feature_channels=net.width,
        num_classes=K,
        num_experts=E,
        spatial_dims=2,
        keep_backbone_seg=True,
        feature_layer="decoder.1",
        freeze_backbone=True,
    )
    train(model, args.steps, K, E, args.seed)


if __name__ == "__main__":
    main()
