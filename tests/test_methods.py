"""The method registry: one consistent record for every method the configuration accepts."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from deferredseg.train.builders import build_model
from deferredseg.train.config import TrainConfig
from deferredseg.train.methods import (
    BASE_METHOD,
    HEADS,
    METHODS,
    REGISTRY,
    ROUTING_WEIGHTS,
    method_of,
    packed_logits,
    route_mode,
)
from deferredseg.train.two_stage import base_config

LAMBDAS = {f.name for f in dataclasses.fields(TrainConfig) if f.name.startswith("lambda_")}


def test_the_registry_covers_exactly_the_methods_the_configuration_accepts():
    assert tuple(REGISTRY) == METHODS
    for name in METHODS:
        TrainConfig(method=name).validate()
        assert method_of(TrainConfig(method=name)).name == name
    with pytest.raises(ValueError, match="method must be one of"):
        TrainConfig(method="nobody").validate()


@pytest.mark.parametrize("name", METHODS)
def test_each_record_is_consistent(name):
    m = REGISTRY[name]
    assert m.name == name and m.summary
    assert m.head in HEADS
    assert set(m.zero_weights) <= LAMBDAS and "lambda_seg" not in m.zero_weights
    assert m.learns_routing == (m.head != "none")
    if m.head == "none":  # the routing heads are never trained: their terms weigh nothing
        assert set(ROUTING_WEIGHTS) <= set(m.zero_weights) and m.single_expert
    if not m.defers:
        assert m.head == "none"
    if m.single_expert:
        assert route_mode(TrainConfig(method=name, route_mode="gain")) == "gate"
    else:
        assert route_mode(TrainConfig(method=name, route_mode="gain")) == "gain"


def test_the_base_method_is_the_segmentor_alone():
    base = REGISTRY[BASE_METHOD]
    assert base.head == "none" and not base.defers
    assert base_config(TrainConfig(method="deferredseg")).method == BASE_METHOD


@pytest.mark.parametrize("training", ["joint", "two-stage"])
@pytest.mark.parametrize("name", METHODS)
def test_every_method_packs_its_output_into_the_packed_logits(name, training):
    K, E, best = 1, 3, 2
    cfg = TrainConfig(
        method=name, training=training, features=4, head_channels=4, image_size=16, num_classes=K
    )
    torch.manual_seed(0)
    model = build_model(cfg, 1, E).eval()
    with torch.no_grad():
        logits = packed_logits(cfg, model(torch.randn(2, 1, 16, 16)), E, best)
    assert logits.shape == (2, K + E + 2, 16, 16) and logits.dtype == torch.float32
    r, gate = logits[:, K : K + E + 1], logits[:, -1]
    if REGISTRY[name].single_expert:  # routing allows the best expert (and the model) only
        others = [j for j in range(E) if j != best]
        assert (r[:, others] <= -1e3).all() and (r[:, best] > -1e3).all()
    if not REGISTRY[name].defers:
        assert (torch.sigmoid(gate) == 0).all()


@pytest.mark.parametrize("name", METHODS)
def test_every_method_has_a_loss_that_trains(name):
    K, E = 1, 3
    cfg = TrainConfig(method=name, training="joint", features=4, image_size=16, num_classes=K)
    torch.manual_seed(0)
    model = build_model(cfg, 1, E)
    loss_fn = REGISTRY[name].loss(cfg, E, 1, False)
    target = torch.randint(0, 2, (2, 16, 16))
    experts = torch.randint(0, 2, (2, E, 16, 16))
    loss, terms = loss_fn(model(torch.randn(2, 1, 16, 16)), target, experts)
    assert loss.dim() == 0 and torch.isfinite(loss) and "deferral" in terms
    loss.backward()
    assert any(p.grad is not None for p in model.parameters())


def test_the_configuration_reference_names_every_method():
    """docs/configuration.md's ``method`` row lists the methods by hand: a new record must
    appear there too."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    row = next(line for line in doc.splitlines() if line.startswith("| `method` |"))
    missing = [name for name in REGISTRY if name not in row]
    assert not missing, f"docs/configuration.md's method row does not name {missing}"


def test_a_method_reads_only_the_settings_of_its_view():
    """The methods take a MethodConfig (the settings a method reads), not the whole
    TrainConfig: a small object with those settings routes and trains the same."""
    from deferredseg.train.methods import policy_for

    @dataclasses.dataclass
    class View:
        method: str = "deferredseg"
        num_classes: int = 1
        training: str = "joint"
        route_mode: str = "gain"
        expert_choice: str = "heads"
        expert_cost: object = None
        route_scores: str = "sigmoid"

        def loss_options(self):
            return TrainConfig().loss_options()

    cfg = TrainConfig(route_mode="gain", expert_choice="heads", training="joint")
    assert policy_for(View(), 3, 1) == policy_for(cfg, 3, 1)
    out = torch.randn(2, 1 + 3 + 2, 8, 8)
    target = torch.randint(0, 2, (2, 8, 8))
    experts = torch.randint(0, 2, (2, 3, 8, 8))
    a = REGISTRY["deferredseg"].loss(View(), 3, 1, False)(out, target, experts)[0]
    b = REGISTRY["deferredseg"].loss(cfg, 3, 1, False)(out, target, experts)[0]
    assert torch.equal(a, b)
