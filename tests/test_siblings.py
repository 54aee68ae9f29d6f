"""Sibling networks: the routing heads read networks of the same task trained from other
seeds, and start from the ensemble's probability that the model is wrong."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from deferredseg.metrics import measure
from deferredseg.models import DeferredSegmentor
from deferredseg.models.segmentor import RoutingHeads
from deferredseg.policy import DeferralPolicy
from deferredseg.train.config import TrainConfig
from deferredseg.train.loop import train
from deferredseg.train.runtime import load_trained


def _heads(K: int, S: int, E: int = 2) -> RoutingHeads:
    torch.manual_seed(0)
    return RoutingHeads(5 + K, 8, E, 2, num_classes=K, num_siblings=S)


def _head_input(K: int, S: int, B: int = 2, size: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(K * 10 + S)
    return torch.randn(B, 5 + (S + 1) * K, size, size, generator=g) * 3


@pytest.mark.parametrize("K", [1, 3])
def test_the_ensemble_start_is_the_logit_of_the_ensembles_error_probability(K):
    S, E = 2, 2
    heads = _heads(K, S, E)
    x = _head_input(K, S)
    gate = heads(x)[:, E + 1]
    z = x[:, -K:]
    members = [z] + list(x[:, -(S + 1) * K : -K].split(K, dim=1))
    if K == 1:
        label = z[:, 0] > 0
        p_label = [
            torch.where(label, torch.sigmoid(m[:, 0]), torch.sigmoid(-m[:, 0])) for m in members
        ]
    else:
        label = z.argmax(1, keepdim=True)
        p_label = [torch.softmax(m, 1).gather(1, label)[:, 0] for m in members]
    wrong = (1 - torch.stack(p_label).mean(0)).clamp(1e-6, 1 - 1e-6)
    torch.testing.assert_close(gate, torch.logit(wrong), rtol=1e-4, atol=1e-4)
    # the model's routing logit is its negative: "keep" where the ensemble agrees with it
    torch.testing.assert_close(heads(x)[:, E], -torch.logit(wrong), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("K", [1, 3])
def test_the_uncertainty_start_ignores_the_siblings_and_equals_the_solo_heads(K):
    S, E = 2, 2
    heads = _heads(K, S, E)
    solo = _heads(K, 0, E)
    x = _head_input(K, S)
    heads.use_prior("uncertainty")
    solo_in = torch.cat([x[:, :5], x[:, -K:]], dim=1)
    torch.testing.assert_close(heads(x)[:, E:], solo(solo_in)[:, E:])
    assert heads.prior_names() == ["uncertainty", "ensemble"]
    assert solo.prior_names() == ["uncertainty"]
    # the solo heads' mix is fixed (a buffer), the siblings' mix is learnt
    assert "prior_mix" not in dict(solo.named_parameters())
    assert "prior_mix" in dict(heads.named_parameters())


def test_prior_errors_name_the_argument():
    heads = _heads(1, 1)
    with pytest.raises(ValueError, match="name must be one of"):
        heads.use_prior("gain")
    with pytest.raises(ValueError, match="needs num_siblings >= 1"):
        _heads(1, 0).use_prior("ensemble")
    with pytest.raises(ValueError, match="num_siblings must be an integer >= 0"):
        RoutingHeads(6, 8, 2, 2, num_siblings=-1)


def test_heads_saved_before_the_ensemble_prior_still_load():
    heads = _heads(1, 0)
    state = heads.state_dict()
    state.pop("prior_mix")
    fresh = _heads(1, 0)
    fresh.load_state_dict(state)  # strict: the missing mix is the uncertainty's
    assert fresh.prior_mix.tolist() == [1.0, 0.0]


def test_a_segmentor_with_siblings_reads_them_frozen_and_checks_them():
    torch.manual_seed(0)
    m = DeferredSegmentor.from_monai(
        "UNet", num_classes=1, num_experts=2, features=4, heads="conv", num_siblings=2
    )
    assert m.num_siblings == 2
    assert all(not p.requires_grad for p in m.siblings.parameters())
    x = torch.randn(2, 1, 16, 16)
    seg, head_in = m.head_inputs(x)
    sib = torch.cat([net(x) for net in m.siblings], dim=1)
    torch.testing.assert_close(head_in[:, -3:-1], sib)
    torch.testing.assert_close(head_in[:, -1:], seg)
    m.train()
    assert not any(net.training for net in m.siblings)  # always in inference mode
    # load_sibling copies a trained base's backbone and segmentation head
    other = DeferredSegmentor.from_monai("UNet", num_classes=1, num_experts=2, features=4)
    m.load_sibling(1, other)
    torch.testing.assert_close(m.siblings[1](x), other.seg_head(other.backbone(x)))
    with pytest.raises(ValueError, match=r"index must be in \[0, 2\)"):
        m.load_sibling(2, other)
    with pytest.raises(ValueError, match="siblings are read by the 'conv' routing heads only"):
        DeferredSegmentor(
            nn.Conv2d(1, 4, 1), 4, 1, 2, heads="linear", siblings=[nn.Conv2d(1, 1, 1)]
        )
    with pytest.raises(TypeError, match=r"siblings\[0\] must be an nn.Module"):
        DeferredSegmentor(nn.Conv2d(1, 4, 1), 4, 1, 2, heads="conv", siblings=["net"])
    bad = DeferredSegmentor(
        nn.Conv2d(1, 4, 1), 4, 1, 2, heads="conv", siblings=[nn.Conv2d(1, 2, 1)]
    )
    with pytest.raises(ValueError, match="sibling 0's output"):
        bad(x)


def test_config_checks_the_siblings():
    with pytest.raises(ValueError, match="siblings must be >= 0, got -1"):
        TrainConfig(siblings=-1).validate()
    with pytest.raises(ValueError, match="sibling_checkpoints must name siblings=2 checkpoints"):
        TrainConfig(sibling_checkpoints=["a.pt"]).validate()
    with pytest.raises(FileNotFoundError, match="sibling_checkpoints: 'missing.pt'"):
        TrainConfig(siblings=1, sibling_checkpoints=["missing.pt"]).validate()
    assert TrainConfig().num_siblings == 2
    assert TrainConfig(training="joint").num_siblings == 0  # joint: linear heads, no siblings


def test_two_stage_training_trains_the_siblings_and_validates_both_starts(tmp_path):
    cfg = TrainConfig(
        layout="synthetic",
        num_images=12,
        image_size=24,
        features=4,
        epochs=1,
        head_epochs=1,
        batch_size=4,
        progress=False,
        backend="reference",
        out=str(tmp_path / "run"),
    )
    train(cfg)
    run = tmp_path / "run"
    for k in (1, 2):
        assert (run / f"sibling{k}" / "best.pt").is_file()
    model, loaded, ck = load_trained(run / "best.pt", torch.device("cpu"))
    assert model.num_siblings == 2 and loaded.siblings == 2
    assert ck["sibling_checkpoints"] == [str(run / f"sibling{k}" / "best.pt") for k in (1, 2)]
    # the siblings are other networks (other seeds), loaded from their checkpoints
    base = torch.load(run / "base" / "best.pt", map_location="cpu", weights_only=False)["model"]
    first = next(k for k in base if k.startswith("backbone."))
    sib0 = model.siblings[0][0].state_dict()[first[len("backbone.") :]]
    assert not torch.equal(sib0, base[first])
    events = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    starts = [e for e in events if e.get("event") == "start"]
    assert len(starts) == 1 and starts[0]["prior"] in ("uncertainty", "ensemble")
    scores = starts[0]["val_selection_scores"]  # both starts validated, the better kept
    assert set(scores) == {"uncertainty", "ensemble"}
    assert scores[starts[0]["prior"]] == max(scores.values())
    # training again from the trained siblings (no stage 1 for them)
    again = TrainConfig(
        **{
            **cfg.to_dict(),
            "out": str(tmp_path / "again"),
            "base_checkpoint": str(run / "base" / "best.pt"),
            "sibling_checkpoints": ck["sibling_checkpoints"],
        }
    )
    train(again)
    assert not (tmp_path / "again" / "sibling1").exists()
    m2, _, _ = load_trained(tmp_path / "again" / "best.pt", torch.device("cpu"))
    for a, b in zip(model.siblings.parameters(), m2.siblings.parameters()):
        assert torch.equal(a, b)


def test_measure_reports_how_many_confidently_wrong_pixels_are_deferred():
    # binary, 1 image of 4 pixels; the model says 1 everywhere
    z = torch.tensor([3.0, 0.2, 3.0, 0.2]).view(1, 1, 1, 4)  # p = 0.95, 0.55, 0.95, 0.55
    target = torch.tensor([0, 0, 1, 1]).view(1, 1, 4)  # wrong at pixels 0 (confident), 1
    experts = target.view(1, 1, 1, 4).clone()
    gate = torch.tensor([5.0, -5.0, -5.0, -5.0]).view(1, 1, 1, 4)  # defers pixel 0 only
    logits = torch.cat([z, torch.zeros(1, 2, 1, 4), gate], dim=1)
    policy = DeferralPolicy(num_classes=1, num_experts=1, threshold=0.5, expert_choice="heads")
    res, _ = measure(policy, lambda: [(logits, target, experts)])
    assert res["confident_wrong_share"] == 0.5
    assert res["confident_wrong_deferred"] == 1.0
    assert res["model_wrong_deferred"] == 0.5
