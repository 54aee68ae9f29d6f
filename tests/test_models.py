"""DeferredSegmentor, MONAI backbones, the SAM / MedSAM construction, checkpoints, the example."""

import runpy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from deferredseg.models import DeferredSegmentor, build_backbone
from deferredseg_kernels import deferredseg_loss, route, split_logits

ROOT = Path(__file__).resolve().parents[1]
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class TinyNet(nn.Module):
    """Features at input resolution (B, F, *S); optionally also its own segmentation logits."""

    def __init__(self, dims=2, cin=1, feat=5, num_classes=None, mode="features"):
        super().__init__()
        conv = CONV[dims]
        self.body = nn.Sequential(
            conv(cin, 8, 3, padding=1), nn.ReLU(), conv(8, feat, 3, padding=1)
        )
        self.head = conv(feat, num_classes, 1) if num_classes else None
        self.mode = mode

    def forward(self, x):
        f = self.body(x)
        if self.mode == "features":
            return f
        if self.mode == "tuple":
            return self.head(f), f
        return self.head(f)  # "seg": the segmentation alone; features through a hook on "body"


def make_batch(K, E, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = max(K, 2)
    target = torch.randint(0, L, shape, generator=g)
    experts = torch.randint(0, L, (shape[0], E) + tuple(shape[1:]), generator=g)
    return target, experts


@pytest.mark.parametrize("dims,K,E", [(2, 1, 3), (2, 4, 2), (3, 2, 5), (1, 3, 1)])
def test_output_shape_and_channel_order(dims, K, E):
    size = {1: (40,), 2: (12, 10), 3: (6, 5, 4)}[dims]
    net = TinyNet(dims, cin=2, feat=5)
    model = DeferredSegmentor(
        net, feature_channels=5, num_classes=K, num_experts=E, spatial_dims=dims
    )
    x = torch.randn(3, 2, *size)
    out = model(x)
    assert out.shape == (3, K + E + 2) + size and model.out_channels == K + E + 2
    feats = net(x)
    z, r, a = split_logits(out, K, E)
    torch.testing.assert_close(z, model.seg_head(feats))
    torch.testing.assert_close(r, model.route_head(feats))  # experts 0..E-1, then the model
    torch.testing.assert_close(a, model.gate_head(feats)[:, 0])
    zz, rr, aa = model.split(out)
    assert torch.equal(zz, z) and torch.equal(rr, r) and torch.equal(aa, a)


def _assert_all_heads_get_gradients(model, x, K, E, frozen=()):
    target, experts = make_batch(K, E, (x.shape[0],) + tuple(x.shape[2:]))
    out = model(x)
    loss = deferredseg_loss(out, target, experts, num_classes=K, num_experts=E, backend="reference")
    loss.backward()
    for name, p in model.named_parameters():
        if name.startswith(frozen):
            assert p.grad is None and not p.requires_grad, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("dims,K", [(2, 1), (3, 3)])
def test_gradients_reach_every_head(dims, K):
    E = 3
    size = (10, 12) if dims == 2 else (6, 6, 5)
    model = DeferredSegmentor(TinyNet(dims, feat=6), 6, K, E, spatial_dims=dims, gate_channels=4)
    _assert_all_heads_get_gradients(model, torch.randn(2, 1, *size), K, E)


MONAI_CASES = [
    ("UNet", 2, 32, dict(channels=(4, 8, 8), strides=(2, 2), num_res_units=1)),
    ("UNet", 3, 16, dict(channels=(4, 8), strides=(2,), num_res_units=1)),
    ("BasicUNet", 2, 32, dict(net_kwargs=dict(features=(4, 4, 8, 8, 8, 4)))),
    ("BasicUNet", 3, 32, dict(net_kwargs=dict(features=(2, 2, 2, 2, 2, 2)))),
    ("SwinUNETR", 2, 64, dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))),
    ("AttentionUnet", 2, 32, dict(channels=(4, 8), strides=(2,))),
    ("AttentionUnet", 3, 16, dict(channels=(4, 8), strides=(2,))),
]


@pytest.mark.parametrize(
    "name,dims,size,kw", MONAI_CASES, ids=[f"{c[0]}-{c[1]}d" for c in MONAI_CASES]
)
def test_monai_backbones(name, dims, size, kw):
    K, E, F = 2, 3, 6
    model = DeferredSegmentor.from_monai(
        name, num_classes=K, num_experts=E, spatial_dims=dims, in_channels=1, features=F, **kw
    )
    assert type(model.backbone).__name__ == name
    x = torch.randn(2, 1, *([size] * dims))
    out = model(x)
    assert out.shape == (2, K + E + 2) + (size,) * dims
    feats = model.backbone(x)
    assert feats.shape == (2, F) + (size,) * dims  # the MONAI net's out_channels are the features
    if name == "UNet" and dims == 2:
        _assert_all_heads_get_gradients(model, x, K, E)


def test_build_backbone_defaults_and_errors():
    net = build_backbone(
        "unet", spatial_dims=2, in_channels=3, features=7
    )  # case-insensitive, UNet defaults
    assert net(torch.randn(1, 3, 16, 16)).shape == (1, 7, 16, 16)
    with pytest.raises(ValueError, match="unknown MONAI network 'NoSuchNet'"):
        build_backbone("NoSuchNet")
    with pytest.raises(TypeError, match="no argument"):
        build_backbone("UNet", bogus=1)


def test_keep_backbone_seg_tuple_and_hook():
    K, E = 2, 3
    x = torch.randn(2, 1, 12, 12)
    for mode, layer in (("tuple", None), ("seg", "body")):
        net = TinyNet(2, feat=5, num_classes=K, mode=mode)
        model = DeferredSegmentor(net, 5, K, E, keep_backbone_seg=True, feature_layer=layer)
        assert model.seg_head is None
        out = model(x)
        seg = net(x)[0] if mode == "tuple" else net(x)
        torch.testing.assert_close(out[:, :K], seg)  # the pretrained segmentation is kept as is
        torch.testing.assert_close(out[:, K : K + E + 1], model.route_head(net.body(x)))
        _assert_all_heads_get_gradients(model, x, K, E)
    frozen = DeferredSegmentor(
        TinyNet(2, feat=5, num_classes=K, mode="seg"),
        5,
        K,
        E,
        keep_backbone_seg=True,
        feature_layer="body.2",
        freeze_backbone=True,
    )
    frozen.train()
    assert not frozen.backbone.training
    _assert_all_heads_get_gradients(frozen, x, K, E, frozen=("backbone.",))


def test_keep_backbone_seg_resizes_low_resolution_features():
    class Pyramid(nn.Module):
        def __init__(self):
            super().__init__()
            self.down = nn.Conv2d(1, 4, 3, stride=2, padding=1)
            self.up = nn.Upsample(scale_factor=2)
            self.head = nn.Conv2d(4, 1, 1)

        def forward(self, x):
            return self.head(self.up(self.down(x)))

    model = DeferredSegmentor(Pyramid(), 4, 1, 2, keep_backbone_seg=True, feature_layer="down")
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 1 + 2 + 2, 16, 16)


def test_wrapper_errors():
    with pytest.raises(ValueError, match="feature_layer"):
        DeferredSegmentor(TinyNet(), 5, 1, 2, feature_layer="body")
    with pytest.raises(ValueError, match="not a submodule"):
        DeferredSegmentor(
            TinyNet(num_classes=1, mode="seg"),
            5,
            1,
            2,
            keep_backbone_seg=True,
            feature_layer="nope",
        )
    model = DeferredSegmentor(TinyNet(feat=5), 4, 1, 2)  # wrong feature_channels
    with pytest.raises(ValueError, match=r"\(B=1, 4, \*S\)"):
        model(torch.randn(1, 1, 8, 8))
    with pytest.raises(TypeError, match=r"\(seg_logits, features\)"):
        DeferredSegmentor(TinyNet(feat=5), 5, 1, 2, keep_backbone_seg=True)(torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="spatial dims"):
        DeferredSegmentor(TinyNet(feat=5), 5, 1, 2)(torch.randn(1, 1, 8, 8, 8))


def test_predict_matches_route_and_restores_mode():
    K, E = 1, 3
    model = DeferredSegmentor(TinyNet(feat=5), 5, K, E)
    x = torch.randn(2, 1, 9, 11)
    _, experts = make_batch(K, E, (2, 9, 11))
    model.train()
    res = model.predict(x, threshold=0.3, mode="router", expert_labels=experts, backend="reference")
    assert model.training
    with torch.no_grad():
        ref = route(
            model.eval()(x),
            K,
            E,
            threshold=0.3,
            mode="router",
            expert_labels=experts,
            backend="reference",
        )
    for a, b in zip(res, ref):
        assert torch.equal(a, b)
    assert res.assignment.dtype == torch.int8 and res.final.shape == (2, 9, 11)


def test_checkpoint_round_trip(tmp_path):
    K, E = 2, 3
    model = DeferredSegmentor.from_monai(
        "UNet",
        num_classes=K,
        num_experts=E,
        features=4,
        channels=(4, 8),
        strides=(2,),
        num_res_units=1,
    )
    x = torch.randn(2, 1, 16, 16)
    _assert_all_heads_get_gradients(model, x, K, E)  # then move every weight a little
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * p.grad.sign())
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    clone = DeferredSegmentor.from_monai(
        "UNet",
        num_classes=K,
        num_experts=E,
        features=4,
        channels=(4, 8),
        strides=(2,),
        num_res_units=1,
    )
    clone.load_state_dict(torch.load(path, weights_only=True))
    model.eval(), clone.eval()
    with torch.no_grad():
        assert torch.equal(model(x), clone(x))


# --- SAM / MedSAM ------------------------------------------------------------------------------

import importlib.util  # noqa: E402

from deferredseg.models import sam as sam_mod  # noqa: E402

requires_sam = pytest.mark.skipif(
    importlib.util.find_spec("segment_anything") is None,
    reason="segment-anything is not installed (pip install 'deferredseg[sam]')",
)
TINY_SAM = dict(
    image_size=64,
    patch_size=16,
    prompt_embed_dim=32,
    window_size=2,
    encoder_embed_dim=32,
    encoder_depth=2,
    encoder_num_heads=2,
    encoder_global_attn_indexes=(1,),
    decoder_depth=1,
    decoder_num_heads=2,
    decoder_mlp_dim=64,
    iou_head_hidden_dim=32,
    mask_in_chans=4,
)


@pytest.fixture(scope="module")
def tiny_sam_state():
    torch.manual_seed(0)
    return sam_mod.build_sam(None, **TINY_SAM).state_dict()


def tiny_sam(state):
    sam = sam_mod.build_sam(None, **TINY_SAM)
    sam.load_state_dict(state)
    return sam


@requires_sam
def test_sam_classes_load_without_leaving_a_stub():
    m = sam_mod.sam_modeling()
    assert m.Sam.__module__.startswith("segment_anything.modeling")
    pkg = sys.modules.get("segment_anything")
    assert pkg is None or hasattr(pkg, "build_sam")  # never a half-imported package


def test_boxes_from_labels():
    t = torch.zeros(3, 20, 30, dtype=torch.int64)
    t[0, 4:9, 10:21] = 1
    t[1, 0:3, 0:2] = 2
    boxes = sam_mod.boxes_from_labels(t)
    assert boxes.tolist() == [
        [10, 4, 20, 8],
        [0, 0, 1, 2],
        [0, 0, 29, 19],
    ]  # empty label: the whole image
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        s = sam_mod.boxes_from_labels(t[:1].expand(50, -1, -1), shift=3, generator=g)
        assert (s[:, :2] <= torch.tensor([10.0, 4.0])).all() and (
            s[:, :2] >= torch.tensor([7.0, 1.0])
        ).all()
        assert (s[:, 2:] >= torch.tensor([20.0, 8.0])).all() and (
            s[:, 2:] <= torch.tensor([23.0, 11.0])
        ).all()
    assert len(set(map(tuple, s.tolist()))) > 1


@requires_sam
def test_sam_end_to_end_only_decoder_and_heads_train(tiny_sam_state):
    E = 3
    model = sam_mod.SamDeferredSegmentor(tiny_sam(tiny_sam_state), num_experts=E, box_shift=4)
    x = torch.rand(2, 1, 48, 48)
    target, experts = make_batch(1, E, (2, 48, 48))
    target.zero_()
    target[:, 10:30, 15:35] = 1
    out = model(x, target=target)
    assert out.shape == (2, 1 + E + 2, 48, 48)
    loss = deferredseg_loss(out, target, experts, num_classes=1, num_experts=E, backend="reference")
    loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(
        n.startswith(("sam.mask_decoder.", "route_tokens", "route_mlps", "gate_head"))
        for n in trainable
    )
    for n, p in model.named_parameters():
        if n.startswith(("sam.image_encoder.", "sam.prompt_encoder.")):
            assert not p.requires_grad and p.grad is None, n
        if n.startswith(
            (
                "route_tokens",
                "route_mlps",
                "gate_head",
                "sam.mask_decoder.output_upscaling",
                "sam.mask_decoder.transformer",
                "sam.mask_decoder.output_hypernetworks_mlps.0",
            )
        ):
            assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert not model.sam.image_encoder.training
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    res = model.predict(
        x, boxes=sam_mod.boxes_from_labels(target), expert_labels=experts, backend="reference"
    )
    assert res.assignment.shape == (2, 48, 48) and res.final.shape == (2, 48, 48)
    with pytest.raises(ValueError, match="num_classes must be 1"):
        sam_mod.SamDeferredSegmentor(tiny_sam(tiny_sam_state), num_experts=E, num_classes=2)


@requires_sam
def test_sam_checkpoint_loading_and_round_trip(tmp_path, tiny_sam_state):
    # A user's MedSAM-style checkpoint: a state dict, possibly wrapped and DataParallel-prefixed.
    wrapped = {"model": {f"module.{k}": v for k, v in tiny_sam_state.items()}, "epoch": 3}
    path = tmp_path / "medsam_tiny.pth"
    torch.save(wrapped, path)
    torch.manual_seed(1)
    model = sam_mod.SamDeferredSegmentor.from_checkpoint(
        path, num_experts=2, variant=None, sam_kwargs=TINY_SAM
    )
    for k, v in model.sam.state_dict().items():
        assert torch.equal(v, tiny_sam_state[k]), k
    # The whole DeferredSeg model round-trips through weights_only loading.
    full = tmp_path / "deferredseg_sam.pt"
    torch.save(model.state_dict(), full)
    clone = sam_mod.SamDeferredSegmentor(tiny_sam(tiny_sam_state), num_experts=2)
    clone.load_state_dict(torch.load(full, weights_only=True))
    x, boxes = torch.rand(1, 3, 64, 64), torch.tensor([[5.0, 6.0, 40.0, 50.0]])
    model.eval(), clone.eval()
    with torch.no_grad():
        assert torch.equal(model(x, boxes=boxes), clone(x, boxes=boxes))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        sam_mod.load_sam_checkpoint(clone.sam, tmp_path / "missing.pth")
    evil = tmp_path / "pickled.pth"
    torch.save({"model": TinyNet()}, evil)  # a pickled module: refused by weights_only loading
    with pytest.raises(ValueError, match="pickled.pth"):
        sam_mod.load_sam_checkpoint(clone.sam, evil)


def test_custom_backbone_example_runs(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["custom_backbone.py", "--steps", "2"])
    runpy.run_path(str(ROOT / "examples" / "custom_backbone.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "features mode" in out and "pretrained mode" in out and out.count("deferred") == 2
