"""Bad input gets a ValueError / TypeError naming the argument (docs/objective.md section 6)."""

import pytest
import torch
from _inputs import make_inputs

from deferredseg_kernels import available_backends, deferredseg_loss, route

K, E = 3, 2
BACKENDS = available_backends("loss")


@pytest.fixture
def good():
    return make_inputs(2, K, E, (4, 5))


def call(logits, target, experts, backend="reference", **kw):
    return deferredseg_loss(logits, target, experts, K, E, backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "case,exc,words",
    [
        ("channels", ValueError, ["logits", "7 channels", "(2, 6, 4, 5)"]),
        ("spatial", ValueError, ["target", "(2, 4, 5)", "(2, 4, 6)"]),
        ("experts_shape", ValueError, ["expert_labels", "(2, 2, 4, 5)", "(2, 3, 4, 5)"]),
        ("float_target", TypeError, ["target", "torch.float32"]),
        ("int16_target", TypeError, ["target", "torch.int16"]),
        ("float_experts", TypeError, ["expert_labels", "torch.float32"]),
        ("int_logits", TypeError, ["logits", "torch.int64"]),
        ("logits_not_tensor", TypeError, ["logits", "list"]),
        ("logits_2d", ValueError, ["logits", "spatial"]),
        ("logits_6d", ValueError, ["logits", "spatial"]),
        ("target_device", ValueError, ["target", "meta"]),
    ],
)
def test_bad_tensors(good, backend, case, exc, words):
    logits, target, experts = good
    if case == "channels":
        logits = logits[:, :-1]
    elif case == "spatial":
        target = torch.zeros(2, 4, 6, dtype=torch.long)
    elif case == "experts_shape":
        experts = torch.zeros(2, 3, 4, 5, dtype=torch.long)
    elif case == "float_target":
        target = target.float()
    elif case == "int16_target":
        target = target.to(torch.int16)
    elif case == "float_experts":
        experts = experts.float()
    elif case == "int_logits":
        logits = logits.long()
    elif case == "logits_not_tensor":
        logits = logits.tolist()
    elif case == "logits_2d":
        logits = logits[..., 0, 0]
    elif case == "logits_6d":
        logits = logits[..., None, None]
    elif case == "target_device":
        target = target.to("meta")
    with pytest.raises(exc) as info:
        call(logits, target, experts, backend)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["target", "expert_labels"])
@pytest.mark.parametrize("value", [3, -1, 77])
def test_labels_out_of_range(good, backend, which, value):
    logits, target, experts = good
    if which == "target":
        target = target.clone()
        target[0, 0, 0] = value
    else:
        experts = experts.clone()
        experts[1, 1, 3, 4] = value
    with pytest.raises(ValueError) as info:
        call(logits, target, experts, backend)
    assert which in str(info.value) and str(value) in str(info.value)


@pytest.mark.parametrize(
    "opt,value,exc,words",
    [
        ("surrogate", "hinge", ValueError, ["surrogate", "hinge", "softmax"]),
        ("surrogate", "OVA", ValueError, ["surrogate", "OVA", "ova"]),
        ("gate_target", "model", ValueError, ["gate_target", "model", "router", "benefit"]),
        ("gate_target", 1, TypeError, ["gate_target", "int", "router"]),
        ("coherence", "l3", ValueError, ["coherence", "l3"]),
        ("coherence_maps", ("router", "entropy"), ValueError, ["coherence_maps", "entropy"]),
        ("coherence_maps", 3, TypeError, ["coherence_maps", "int"]),
        ("balance", "even", ValueError, ["balance", "even", "cv2"]),
        ("lambda_seg", -1.0, ValueError, ["lambda_seg", "-1.0"]),
        ("lambda_gate", float("nan"), ValueError, ["lambda_gate", "finite"]),
        ("lambda_balance", "0.1", TypeError, ["lambda_balance", "str"]),
        ("paper_eps", 0.0, ValueError, ["paper_eps", "> 0"]),
        ("class_weight", [1.0, 2.0], ValueError, ["class_weight", "length 3", "length 2"]),
        ("class_weight", [1.0, -2.0, 1.0], ValueError, ["class_weight[1]", ">= 0"]),
        ("ignore_index", 2.5, TypeError, ["ignore_index", "float"]),
        ("sync_balance", 1, TypeError, ["sync_balance", "bool"]),
        ("balance_low", [0.1, 0.2], ValueError, ["balance_low", "length 3"]),
        ("color", "red", TypeError, ["color", "unknown option"]),
    ],
)
def test_bad_options(good, opt, value, exc, words):
    with pytest.raises(exc) as info:
        call(*good, **{opt: value})
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_band_balance_needs_bounds(good):
    with pytest.raises(ValueError, match="balance_low is required with balance='band'"):
        call(*good, balance="band")


@pytest.mark.parametrize(
    "name,value,exc",
    [
        ("num_classes", 0, ValueError),
        ("num_experts", 0, ValueError),
        ("num_experts", 128, ValueError),
        ("num_classes", 2.0, TypeError),
    ],
)
def test_bad_counts(good, name, value, exc):
    kw = dict(num_classes=K, num_experts=E)
    kw[name] = value
    with pytest.raises(exc, match=name):
        deferredseg_loss(*good, backend="reference", **kw)


def test_unknown_backend_and_unavailable_backend(good):
    with pytest.raises(ValueError, match="backend must be one of"):
        call(*good, backend="tpu")
    if "cuda" not in available_backends():
        with pytest.raises(RuntimeError, match="backend='cuda' cannot run here"):
            call(*good, backend="cuda")


@pytest.mark.parametrize(
    "kw,exc,words",
    [
        (dict(mode="soft"), ValueError, ["mode", "soft"]),
        (dict(threshold=1.5), ValueError, ["threshold", "[0, 1]"]),
        (dict(threshold="high"), TypeError, ["threshold", "str"]),
        (
            dict(expert_labels=torch.zeros(2, 3, 4, 5, dtype=torch.long)),
            ValueError,
            ["expert_labels", "(2, 2, 4, 5)"],
        ),
        (dict(expert_labels=torch.zeros(2, 2, 4, 5)), TypeError, ["expert_labels", "float32"]),
    ],
)
def test_route_bad_arguments(good, kw, exc, words):
    with pytest.raises(exc) as info:
        route(good[0], K, E, **kw)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_cached_options_still_reject_what_differs_only_in_type():
    """make_options keeps validated option sets; a cached valid set must not let an
    invalid one that compares equal to it (True == 1 == 1.0) through."""
    from deferredseg_kernels import make_options

    ok = make_options(1, 3, ignore_index=1, sync_balance=False)
    assert make_options(1, 3, ignore_index=1, sync_balance=False) is ok  # looked up
    with pytest.raises(TypeError, match="ignore_index"):
        make_options(1, 3, ignore_index=True, sync_balance=False)
    with pytest.raises(TypeError, match="sync_balance"):
        make_options(1, 3, ignore_index=1, sync_balance=0)
    with pytest.raises(TypeError, match="num_classes"):
        make_options(True, 3, ignore_index=1, sync_balance=False)
    with pytest.raises(TypeError, match="num_experts"):
        make_options(1, 3.0, ignore_index=1, sync_balance=False)
    # An error is never kept: the same bad call raises again.
    for _ in range(2):
        with pytest.raises(ValueError, match="lambda_seg"):
            make_options(1, 3, lambda_seg=-1.0)
    # Tensor-valued options are validated on every call (not cached) and still work.
    w = make_options(1, 3, class_weight=torch.tensor([1.0, 2.0]))
    assert w.class_weight == (1.0, 2.0)
    with pytest.raises(ValueError, match="class_weight"):
        make_options(1, 3, class_weight=torch.tensor([1.0, -2.0]))


def test_backend_choice_follows_registrations():
    """select() keeps its answer, but registering an implementation replaces it."""
    from deferredseg_kernels import _dispatch

    dev = torch.device("cpu")
    before = _dispatch.select("reference", "loss", dev)
    assert _dispatch.select("reference", "loss", dev) is before

    def stand_in(*args, **kwargs):
        raise AssertionError("not called")

    try:
        _dispatch.register("reference", "loss", stand_in)
        assert _dispatch.select("reference", "loss", dev) is stand_in
    finally:
        _dispatch.register("reference", "loss", before)
    assert _dispatch.select("reference", "loss", dev) is before
    with pytest.raises(ValueError, match="backend"):
        _dispatch.select("nope", "loss", dev)
