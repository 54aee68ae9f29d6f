"""Bolt-on deferral: deferral added to a trained segmentation network (deferredseg.bolt_on)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from deferredseg.bolt_on import (
    NO_VALIDATION_DATA,
    DeferralNetwork,
    add_deferral,
    find_feature_layer,
    load_deferral_network,
)
from deferredseg.policy import DeferralPolicy

ROOT = Path(__file__).resolve().parents[1]
UNET = "monai.networks.nets:UNet"
UNET_KW = {
    "spatial_dims": 2,
    "in_channels": 1,
    "out_channels": 1,
    "channels": [4, 8],
    "strides": [2],
    "num_res_units": 1,
}


class HandMade(nn.Module):
    """An encoder, a classifier to K = 2 classes and an auxiliary head after it."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(6, 2, 1)
        self.aux = nn.Conv2d(6, 3, 1)  # out_channels != K: never the classifier

    def forward(self, x):
        return self.head(self.enc(x))


def _unet():
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    return UNet(**UNET_KW)


def _batches(n=2, b=2, size=16, experts=3, seed=0):
    """Batches (image, target, expert labels): the target is a bright square, the experts
    are the target with their own pixel flips."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        y = torch.zeros(b, size, size, dtype=torch.long)
        y[:, 4:11, 5:12] = 1
        x = (y.float() + 0.8 * torch.randn(b, size, size, generator=g)).unsqueeze(1)
        flips = torch.rand(b, experts, size, size, generator=g) < torch.tensor(
            [0.02, 0.1, 0.3][:experts]
        ).view(1, -1, 1, 1)
        e = torch.where(flips, 1 - y.unsqueeze(1), y.unsqueeze(1))
        out.append((x, y, e))
    return out


@pytest.fixture(scope="module")
def bolted():
    """A tiny MONAI UNet with deferral added (heads trained one epoch)."""
    return add_deferral(
        _unet(),
        _batches(seed=0),
        _batches(seed=1),
        num_classes=1,
        num_experts=3,
        expert_names=["ann", "bob", "cy"],
        head_channels=4,
        head_epochs=1,
        budget=0.2,
        device="cpu",
        backend="reference",
    )


# ------------------------------------------------------------------------------ feature layers
def test_feature_layer_found_on_monai_unet_basicunet_and_a_hand_made_net():
    from monai.networks.nets import AttentionUnet, BasicUNet, SegResNet

    unet = _unet()
    name = find_feature_layer(unet, 1)
    layer = unet.get_submodule(name)
    # the top decoder's transposed conv to K = 1, not the K -> K residual unit after it
    assert isinstance(layer, nn.ConvTranspose2d) and layer.in_channels == 12  # skip 4 + bottom 8
    basic = BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=(4, 4, 4, 4, 4, 4))
    assert find_feature_layer(basic, 2) == "final_conv"
    att = AttentionUnet(2, 1, 1, channels=(4, 8), strides=(2,))
    assert find_feature_layer(att, 1) == "model.2.conv"  # its final 1x1 conv
    seg = SegResNet(2, init_filters=8, in_channels=1, out_channels=2)
    assert find_feature_layer(seg, 2) == "conv_final.2.conv"
    assert find_feature_layer(HandMade(), 2) == "head"
    with pytest.raises(ValueError, match=r"feature_layer=None.*num_classes=4"):
        find_feature_layer(HandMade(), 4)


def test_found_feature_layer_gives_the_classifier_input(bolted):
    assert isinstance(bolted, DeferralNetwork)
    assert bolted.take == "input" and bolted.feature_channels == 12  # skip + bottom
    x = _batches()[0][0]
    seg, feats = bolted.backbone(x)
    assert seg.shape == (2, 1, 16, 16) and feats.shape[1] == 12
    assert torch.equal(seg, bolted.network(x))  # the network's own logits, unchanged


def test_named_feature_layer_reads_that_layers_output():
    net = HandMade()
    d = add_deferral(
        net,
        [(x, y, e) for x, y, e in _batches()],
        _batches(seed=1),
        num_classes=2,
        num_experts=3,
        feature_layer="enc",
        head_channels=4,
        head_epochs=0,
        device="cpu",
        backend="reference",
    )
    assert d.feature_layer_name == "enc" and d.take == "output" and d.feature_channels == 6
    assert d(_batches()[0][0]).shape == (2, 2 + 3 + 2, 16, 16)
    assert all(not p.requires_grad for p in net.parameters())  # the network is frozen


def test_a_one_pass_generator_gives_the_same_heads_as_a_list():
    """The first training batch checks the network; a generator still trains on it."""
    args = dict(num_classes=2, num_experts=3, head_channels=4, head_epochs=1, device="cpu")
    args.update(backend="reference", batch_size=2)
    torch.manual_seed(0)
    a = add_deferral(HandMade(), _batches(n=3), _batches(seed=1), **args)
    torch.manual_seed(0)
    b = add_deferral(HandMade(), iter(_batches(n=3)), iter(_batches(seed=1)), **args)
    x = _batches(seed=5)[0][0]
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    assert a.policy == b.policy


@pytest.mark.parametrize(
    "kwargs,words",
    [
        (dict(feature_layer="decoder.9"), r"feature_layer='decoder.9' is not a submodule"),
        (dict(feature_layer="aux"), r"feature_layer 'aux' did not run"),
        (dict(num_classes=3), r"network: expected segmentation logits of shape .*num_classes=3"),
        (dict(num_experts=2), r"num_experts=2 but train_data's expert_labels have 3"),
        (dict(budget=1.5), r"budget must be in \[0, 1\], got 1.5"),
        (dict(head_channels=0), r"head_channels must be an integer >= 1, got 0"),
        (dict(head_epochs=-1), r"head_epochs must be an integer >= 0, got -1"),
        (dict(head_lr=0.0), r"head_lr must be a finite number > 0, got 0.0"),
    ],
)
def test_bad_arguments_are_named(kwargs, words):
    args = dict(num_classes=2, num_experts=3, head_epochs=0, device="cpu", backend="reference")
    args.update(kwargs)
    with pytest.raises((ValueError, RuntimeError), match=words):
        add_deferral(HandMade(), _batches(), _batches(seed=1), **args)


def test_bad_batches_are_named():
    y = torch.zeros(2, 8, 8, dtype=torch.long)
    bad = [(torch.zeros(2, 1, 16, 16), y, torch.zeros(2, 3, 16, 16, dtype=torch.long))]
    with pytest.raises(ValueError, match=r"train_data: target must have shape \(B, \*S\)"):
        add_deferral(HandMade(), bad, _batches(), num_classes=2, device="cpu")
    with pytest.raises(ValueError, match=r"train_data: a batch given as a dict needs"):
        add_deferral(HandMade(), [{"image": 1}], _batches(), num_classes=2, device="cpu")


# ------------------------------------------------------------------------------ the policy
def test_policy_is_calibrated_on_validation_at_the_budget(bolted):
    p = bolted.policy
    assert isinstance(p, DeferralPolicy) and p.budget == 0.2 and p.scores == "sigmoid"
    assert abs(p.calibration["rate"] - 0.2) < 0.01
    # epoch 0: the untrained heads, a candidate
    assert [h["epoch"] for h in bolted.history] == [0, 1]
    out = bolted.route(_batches(seed=1)[0][0])
    assert out.assignment.shape == (2, 16, 16)


def test_recalibrating_at_another_budget(bolted):
    import copy

    d = copy.deepcopy(bolted)
    p = d.calibrate(_batches(seed=1), budget=0.3)
    assert d.policy is p and p.budget == 0.3 and abs(p.calibration["rate"] - 0.3) < 0.01
    assert bolted.policy.budget == 0.2  # the copy's policy only


# ------------------------------------------------------------------------------ checkpoints
def test_save_and_load_trained_give_identical_packed_logits(bolted, tmp_path):
    from deferredseg.train.checkpoint import load_checkpoint
    from deferredseg.train.methods import checkpoint_policy
    from deferredseg.train.runtime import load_trained

    path = bolted.save(tmp_path / "d.pt", factory=UNET, factory_kwargs=UNET_KW)
    torch.load(path, weights_only=True)  # nothing but tensors and containers
    model, cfg, ck = load_trained(path, torch.device("cpu"))
    x = _batches(seed=3)[0][0]
    with torch.no_grad():
        assert torch.equal(model(x), bolted.eval()(x))
    assert cfg.method == "deferredseg" and cfg.num_classes == 1 and cfg.spatial_dims == 2
    assert cfg.spatial_size == [16, 16] and ck["in_channels"] == 1
    assert ck["expert_names"] == ["ann", "bob", "cy"]
    assert checkpoint_policy(ck, cfg) == bolted.policy
    again = load_deferral_network(load_checkpoint(path))
    assert again.policy == bolted.policy and again.feature_layer_name == bolted.feature_layer_name


@pytest.mark.parametrize(
    "factory,kwargs,words",
    [
        ("monai.networks.nets.UNet", UNET_KW, r"factory must be an importable 'package.module"),
        ("no_such_module_x:Net", {}, r"factory 'no_such_module_x:Net': cannot import"),
        (UNET, dict(UNET_KW, channels=[4, 16]), r"does not build the trained network"),
        (UNET, {"spatial_dims": 2, "bad": object()}, r"factory_kwargs must hold JSON values"),
    ],
)
def test_save_errors_name_the_argument(bolted, tmp_path, factory, kwargs, words):
    with pytest.raises(ValueError, match=words):
        bolted.save(tmp_path / "x.pt", factory=factory, factory_kwargs=kwargs)
    assert not (tmp_path / "x.pt").exists()


def test_predict_reads_a_bolt_on_checkpoint(bolted, tmp_path):
    from PIL import Image

    from deferredseg.review.db import ReviewDB
    from deferredseg.review.intake import predict

    ck = bolted.save(tmp_path / "d.pt", factory=UNET, factory_kwargs=UNET_KW)
    images = tmp_path / "new"
    images.mkdir()
    x = _batches(seed=4)[0][0]
    png = (x[0, 0].clamp(-1, 2).add(1).div(3).mul(255)).to(torch.uint8).numpy()
    Image.fromarray(png).save(images / "a.png")
    np.save(images / "b.npy", x[1, 0].numpy())
    np.save(images / "c.npy", np.random.default_rng(0).random((24, 20)).astype(np.float32))
    s = predict(ck, images, tmp_path / "review", device="cpu", progress=False)
    assert sorted(s.done) == ["a", "b", "c"] and not s.failed
    assert s.routing["source"] == "checkpoint"
    assert s.routing["threshold"] == bolted.policy.threshold
    assert (tmp_path / "review" / "assignment" / "a.png").exists()
    assert np.load(tmp_path / "review" / "regions" / "c.npy").shape == (24, 20)
    assert [e["name"] for e in ReviewDB(tmp_path / "review").experts()] == ["ann", "bob", "cy"]
    with pytest.raises(ValueError, match="budget=0.3: .*records no validation data"):
        predict(ck, images, tmp_path / "r2", budget=0.3, device="cpu", progress=False)
    assert "add_deferral" in NO_VALIDATION_DATA


def test_evaluate_needs_data_for_a_bolt_on_checkpoint_and_reads_it_given(tmp_path):
    """Datasets of the package work as train and val data; evaluate reads the checkpoint
    on a data folder given to it, refuses it without one."""
    from deferredseg.data import build_dataset
    from deferredseg.data.benchmark import write_benchmark
    from deferredseg.train.evaluation import evaluate

    root = tmp_path / "C"
    write_benchmark(root, "C", num_cases=12, size=16, seed=0)
    data = dict(target="label", split_file=str(root / "split.json"))
    ds = {s: build_dataset("multirater", root, s, **data) for s in ("train", "val")}
    d = add_deferral(
        _unet(),
        ds["train"],
        ds["val"],
        num_experts=3,
        expert_names=ds["train"].info.expert_names,
        head_channels=4,
        head_epochs=1,
        device="cpu",
        backend="reference",
    )
    ck = d.save(tmp_path / "d.pt", factory=UNET, factory_kwargs=UNET_KW)
    with pytest.raises(ValueError, match=r"records no data to evaluate on; give the data"):
        evaluate(ck, figures=False, device="cpu")
    m = evaluate(
        ck,
        figures=False,
        device="cpu",
        with_hd95=False,
        overrides={"layout": "multirater", "data": str(root), **data},
    )
    assert m["budget"] == 0.1 and 0.0 < m["deferral_rate"] < 0.3
    assert m["system_dice"] is not None and m["model_dice"] is not None


# ------------------------------------------------------------------------------ the example
def test_example_adds_deferral_that_pays_off_at_the_budget(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "bolt_on_example", ROOT / "examples" / "add_deferral_to_trained_model.py"
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    res = example.main(["--small", "--data", str(tmp_path), "--out", str(tmp_path / "d.pt")])
    b = res["budget"]
    assert 0.5 * b <= res["test_deferral_rate"] <= 1.5 * b, res
    assert abs(res["val_deferral_rate"] - b) <= 0.005, res
    assert res["system_dice"] > res["model_dice"], res
    assert Path(res["checkpoint"]).is_file()
    assert "test: model alone Dice" in capsys.readouterr().out


def test_3d_network_round_trips(tmp_path):
    from monai.networks.nets import UNet

    from deferredseg.train.runtime import load_trained

    kw = dict(UNET_KW, spatial_dims=3, channels=[2, 4])
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(2, 1, 8, 8, 8, generator=g),
            torch.randint(0, 2, (2, 8, 8, 8), generator=g),
            torch.randint(0, 2, (2, 3, 8, 8, 8), generator=g),
        )
    ]
    d = add_deferral(UNet(**kw), batches, batches, head_channels=2, head_epochs=1, device="cpu")
    assert d.spatial_dims == 3 and d(batches[0][0]).shape == (2, 1 + 3 + 2, 8, 8, 8)
    model, cfg, _ = load_trained(d.save(tmp_path / "d3.pt", UNET, kw), torch.device("cpu"))
    assert cfg.spatial_dims == 3 and cfg.spatial_size == [8, 8, 8]
    with torch.no_grad():
        assert torch.equal(model(batches[0][0]), d(batches[0][0]))
