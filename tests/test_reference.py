"""The PyTorch reference against hand-worked values, a scalar oracle, gradcheck and invariants."""

import math

import pytest
import torch
from _inputs import make_inputs, option_id, option_matrix
from naive_oracle import naive_loss

from deferredseg_kernels import PRESETS, deferredseg_loss, split_logits

LN2 = math.log(2.0)


def ref(logits, target, experts, K, E, **kw):
    """The reference with the paper's defaults (docs/objective.md section 3 states them, and
    the by-hand values and the scalar oracle use them), unless ``preset`` says otherwise."""
    kw.setdefault("preset", "paper")
    return deferredseg_loss(
        logits, target, experts, K, E, backend="reference", return_terms=True, **kw
    )


def test_the_default_preset_is_the_paper_objective_with_its_options():
    """deferredseg_loss's default preset: the paper's objective with PRESETS["default"]'s
    options (docs/objective.md section 5), so the oracle checks it through them."""
    K, E = 1, 3
    logits, target, experts = make_inputs(2, K, E, (3, 4), dtype=torch.float64)
    got = deferredseg_loss(logits, target, experts, K, E, backend="reference", return_terms=True)
    _, want = ref(logits, target, experts, K, E, **PRESETS["default"])
    oracle = naive_loss(logits, target, experts, K, E, **PRESETS["default"])
    for name in ("seg", "collab", "gate", "coherence", "balance"):
        assert got[1][name].item() == want[name].item(), name
        assert got[1][name].item() == pytest.approx(oracle[name], rel=1e-9, abs=1e-12), name
    assert PRESETS["default"]["surrogate"] == "ova" and PRESETS["paper"] == {}


# --------------------------------------------------------------------------- by hand


def test_single_pixel_all_zero_logits_by_hand():
    # K=1, E=1, one pixel, every logit 0, target 1, expert says 1.
    # seg = softplus(0) = ln2; model predicts 0 (z = 0), so c0 = 0; expert correct.
    # pi = (1/2, 1/2): collab = -log(1/2) = ln2. Router tie -> expert, h = 1:
    # gate = softplus(0) - 0 + 0.5 * (1/2 - 1/2)^2 + 0.1 * 1/2 = ln2 + 0.05.
    # One pixel: no neighbour pairs, coherence 0; E = 1: balance 0.
    logits = torch.zeros(1, 4, 1, dtype=torch.float64)
    loss, t = ref(
        logits, torch.ones(1, 1, dtype=torch.long), torch.ones(1, 1, 1, dtype=torch.long), 1, 1
    )
    assert t["seg"].item() == pytest.approx(LN2)
    assert t["collab"].item() == pytest.approx(LN2)
    assert t["gate"].item() == pytest.approx(LN2 + 0.05)
    assert t["coherence"].item() == 0.0
    assert t["balance"].item() == 0.0
    assert loss.item() == pytest.approx(3 * LN2 + 0.05)
    assert t["pbar"].tolist() == pytest.approx([0.5, 0.5])


def test_two_pixels_multiclass_by_hand():
    # K=3, E=1, 1D with two pixels; z = (2, 0, 0) at both, targets 0 and 1.
    # softmax(z)[0] = e^2 / (e^2 + 2). Pixel 0: model right; pixel 1: wrong.
    K, E = 3, 1
    logits = torch.zeros(1, K + E + 2, 2, dtype=torch.float64)
    logits[0, 0, :] = 2.0
    logits[0, K, 0] = math.log(3.0)  # expert routing logit: pi = (3/4, 1/4) at pixel 0
    logits[0, K + E + 1, :] = 0.0
    target = torch.tensor([[0, 1]])
    experts = torch.tensor([[[1, 1]]])  # expert wrong at pixel 0, right at pixel 1
    loss, t = ref(logits, target, experts, K, E, lambda_coherence=1.0)
    Z = math.exp(2) + 2
    seg = 0.5 * (-(2 - math.log(Z)) - (0 - math.log(Z)))
    assert t["seg"].item() == pytest.approx(seg)
    # pixel 0: c0 = 1 -> -log pi_model = -log(1/4); pixel 1: c1 = 1 -> -log pi_expert = -log(1/2)
    assert t["collab"].item() == pytest.approx(0.5 * (math.log(4) + math.log(2)))
    # D = (3/4, 1/2): |3/4 - 1/2| = 1/4 on the router map; gate map constant: 0.
    assert t["coherence"].item() == pytest.approx(0.25)
    # h = (1, 1) (pixel 1 ties -> expert); s = 1/2: BCE = ln2 each.
    gate = LN2 + 0.5 * 0.5 * ((0.5 - 0.75) ** 2 + 0.0) + 0.1 * 0.5
    assert t["gate"].item() == pytest.approx(gate)


def test_cv2_balance_by_hand():
    # E=2, loads P = (pbar_0, pbar_1). cv2 = 2 (P0^2 + P1^2) / (P0 + P1)^2 - 1.
    K, E = 1, 2
    logits = torch.zeros(1, K + E + 2, 1, dtype=torch.float64)
    logits[0, K : K + 3, 0] = torch.log(torch.tensor([0.6, 0.2, 0.2], dtype=torch.float64))
    _, t = ref(
        logits, torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 2, 1, dtype=torch.long), K, E
    )
    assert t["balance"].item() == pytest.approx(2 * (0.36 + 0.04) / 0.64 - 1)


def test_band_balance_by_hand():
    K, E = 1, 2
    logits = torch.zeros(1, K + E + 2, 1, dtype=torch.float64)
    logits[0, K : K + 3, 0] = torch.log(torch.tensor([0.6, 0.1, 0.3], dtype=torch.float64))
    _, t = ref(
        logits,
        torch.zeros(1, 1, dtype=torch.long),
        torch.zeros(1, 2, 1, dtype=torch.long),
        K,
        E,
        balance="band",
        balance_low=[0.2, 0.2, 0.0],
        balance_high=[0.5, 0.4, 1.0],
    )
    # 0.6 > 0.5 by 0.1; 0.1 < 0.2 by 0.1; 0.3 inside its band.
    assert t["balance"].item() == pytest.approx(0.2)


def test_paper_surrogate_by_hand():
    K, E = 1, 1
    logits = torch.zeros(1, K + E + 2, 1, dtype=torch.float64)
    logits[0, 0, 0] = 1.0  # model predicts 1, target 1: c0 = 1
    _, t = ref(
        logits,
        torch.ones(1, 1, dtype=torch.long),
        torch.zeros(1, 1, 1, dtype=torch.long),
        K,
        E,
        surrogate="paper",
    )
    # expert wrong: + (1 - 0) log(1/2 + eps); model right: - log(1/2 + eps)
    eps = 1e-8
    assert t["collab"].item() == pytest.approx(-math.log(0.5 + eps) + math.log(0.5 + eps))


def test_ova_surrogate_by_hand():
    # K=1, E=2, one pixel: z = 1 predicts 1, target 1 (c0 = 1); experts say (1, 0): c = (1, 0).
    # r = (0, ln 3, -1): COLLAB = sum_k softplus(r_k) - c_k r_k over experts then the model
    # = [softplus(0) - 0] + [softplus(ln 3)] + [softplus(-1) + 1] = ln2 + ln4 + ln(1 + 1/e) + 1.
    K, E = 1, 2
    logits = torch.zeros(1, K + E + 2, 1, dtype=torch.float64)
    logits[0, 0, 0] = 1.0
    logits[0, K : K + E + 1, 0] = torch.tensor([0.0, math.log(3.0), -1.0], dtype=torch.float64)
    logits.requires_grad_(True)
    target = torch.ones(1, 1, dtype=torch.long)
    experts = torch.tensor([[[1], [0]]])
    loss, t = ref(
        logits,
        target,
        experts,
        K,
        E,
        surrogate="ova",
        lambda_seg=0.0,
        lambda_gate=0.0,
        lambda_coherence=0.0,
        lambda_balance=0.0,
    )
    want = LN2 + 2 * LN2 + math.log1p(math.exp(-1.0)) + 1.0
    assert t["collab"].item() == pytest.approx(want)
    assert loss.item() == pytest.approx(want)
    # d/dr_k = sigmoid(r_k) - c_k: (1/2 - 1, 3/4 - 0, sigmoid(-1) - 1); nothing reaches z or a.
    (g,) = torch.autograd.grad(loss, logits)
    sig = 1.0 / (1.0 + math.exp(1.0))
    assert g[0, K : K + E + 1, 0].tolist() == pytest.approx([-0.5, 0.75, sig - 1.0])
    assert g[0, 0, 0].item() == 0.0 and g[0, -1, 0].item() == 0.0
    # The other terms still use pi = softmax(r): the same D, pbar and gate as "softmax".
    _, ts = ref(logits.detach(), target, experts, K, E)
    _, to = ref(logits.detach(), target, experts, K, E, surrogate="ova")
    for name in ("seg", "gate", "coherence", "balance", "pbar"):
        assert torch.equal(ts[name], to[name]), name


def test_benefit_gate_target_by_hand():
    # K=2, E=2, three pixels, gate_mse = gate_sparsity = 0: GATE = mean BCE(a, t).
    # p0: model wrong, r = (2, 1, 0): jhat = 0, expert 0 right -> t = 1 (router h = 1 too).
    # p1: model wrong, experts tie r = (0, 0, 5): jhat = 0 (lowest index), expert 0 wrong,
    #     expert 1 right -> t = 0 (h = 0: the model's logit is largest).
    # p2: model right, r = (3, 0, 0): t = 0 (h = 1).
    K, E = 2, 2
    logits = torch.zeros(1, K + E + 2, 3, dtype=torch.float64)
    logits[0, 0] = torch.tensor([0.0, 0.0, 1.0])  # z = (0, 1) at p0, p1: predicts 1
    logits[0, 1] = torch.tensor([1.0, 1.0, 0.0])  # z = (1, 0) at p2: predicts 0
    logits[0, K : K + E + 1] = torch.tensor([[2.0, 0.0, 3.0], [1.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    a = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    logits[0, -1] = a
    logits.requires_grad_(True)
    target = torch.tensor([[0, 0, 0]])
    experts = torch.tensor([[[0, 1, 1], [1, 0, 1]]])
    kw = dict(
        gate_mse=0.0,
        gate_sparsity=0.0,
        lambda_seg=0.0,
        lambda_collab=0.0,
        lambda_coherence=0.0,
        lambda_balance=0.0,
    )
    t_benefit = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    t_router = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    for name, tgt in (("benefit", t_benefit), ("router", t_router)):
        loss, t = ref(logits, target, experts, K, E, gate_target=name, **kw)
        want = sum(math.log1p(math.exp(float(v))) - float(h) * float(v) for v, h in zip(a, tgt)) / 3
        assert t["gate"].item() == pytest.approx(want), name
        (g,) = torch.autograd.grad(loss, logits)
        assert g[0, -1].tolist() == pytest.approx(((torch.sigmoid(a) - tgt) / 3).tolist()), name
    # The target is a constant: with the mse term on, still no gradient reaches z or r.
    loss = deferredseg_loss(
        logits,
        target,
        experts,
        K,
        E,
        backend="reference",
        gate_target="benefit",
        **dict(kw, gate_mse=0.5, gate_sparsity=0.1),
    )
    (g,) = torch.autograd.grad(loss, logits)
    assert torch.count_nonzero(g[0, :-1]).item() == 0


def test_class_weight_by_hand():
    K, E = 2, 1
    logits = torch.zeros(1, K + E + 2, 2, dtype=torch.float64)
    logits[0, 0, 0] = 1.0  # pixel 0: z = (1, 0), target 0; pixel 1: z = (0, 0), target 1
    target = torch.tensor([[0, 1]])
    _, t = ref(
        logits, target, torch.zeros(1, 1, 2, dtype=torch.long), K, E, class_weight=[1.0, 3.0]
    )
    l0 = -(1 - math.log(math.e + 1))
    l1 = LN2
    assert t["seg"].item() == pytest.approx((1 * l0 + 3 * l1) / 4)


def test_l2_coherence_and_gate_map_by_hand():
    K, E = 1, 1
    logits = torch.zeros(1, K + E + 2, 3, dtype=torch.float64)
    logits[0, K + E + 1] = torch.tensor([0.0, math.log(3.0), 0.0])  # s = (1/2, 3/4, 1/2)
    target = torch.tensor([[0, 0, 0]])
    _, t = ref(
        logits,
        target,
        torch.zeros(1, 1, 3, dtype=torch.long),
        K,
        E,
        coherence="l2",
        coherence_maps=("gate",),
    )
    assert t["coherence"].item() == pytest.approx(((0.25) ** 2 + (0.25) ** 2) / 2)


def test_coherence_only_counts_pairs_of_valid_pixels():
    K, E = 1, 1
    logits = torch.zeros(1, K + E + 2, 3, dtype=torch.float64)
    logits[0, K + E + 1] = torch.tensor([0.0, math.log(3.0), 5.0])
    target = torch.tensor([[0, 0, -100]])  # pixel 2 ignored: only the pair (0, 1) counts
    _, t = ref(
        logits, target, torch.zeros(1, 1, 3, dtype=torch.long), K, E, coherence_maps=("gate",)
    )
    assert t["coherence"].item() == pytest.approx(0.25)


# --------------------------------------------------------------------------- oracle


@pytest.mark.parametrize("opts", option_matrix(3), ids=option_id)
@pytest.mark.parametrize("K", [1, 3])
def test_matches_scalar_oracle_over_options(opts, K):
    E = 3
    logits, target, experts = make_inputs(2, K, E, (3, 4), dtype=torch.float64)
    _, t = ref(logits, target, experts, K, E, **opts)
    want = naive_loss(logits, target, experts, K, E, **opts)
    for name in ("seg", "collab", "gate", "coherence", "balance"):
        assert t[name].item() == pytest.approx(want[name], rel=1e-9, abs=1e-12), name


@pytest.mark.parametrize("spatial", [(11,), (3, 4), (2, 3, 3)], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("K,E", [(1, 1), (3, 1), (1, 3), (4, 2)])
def test_matches_scalar_oracle_shapes_and_weights(spatial, K, E):
    logits, target, experts = make_inputs(2, K, E, spatial, dtype=torch.float64)
    cw = [0.5 + i for i in range(max(K, 2))]
    kw = dict(
        class_weight=cw,
        lambda_seg=0.7,
        lambda_collab=1.3,
        lambda_gate=0.4,
        lambda_coherence=0.9,
        lambda_balance=2.0,
        gate_mse=0.3,
        gate_sparsity=0.2,
    )
    loss, t = ref(logits, target, experts, K, E, **kw)
    want = naive_loss(logits, target, experts, K, E, **kw)
    assert loss.item() == pytest.approx(want["loss"], rel=1e-9)


@pytest.mark.parametrize(
    "label_dtype,ignore", [(torch.uint8, 255), (torch.int32, -1), (torch.int64, -100)]
)
def test_label_dtypes_and_singleton_channel_target(label_dtype, ignore):
    K, E = 3, 2
    logits, target, experts = make_inputs(
        2, K, E, (4, 5), dtype=torch.float64, label_dtype=label_dtype, ignore_index=ignore
    )
    loss = deferredseg_loss(logits, target, experts, K, E, backend="reference", ignore_index=ignore)
    loss1 = deferredseg_loss(
        logits, target.unsqueeze(1), experts, K, E, backend="reference", ignore_index=ignore
    )
    want = naive_loss(  # the default preset, through its options
        logits, target.long(), experts.long(), K, E, ignore_index=ignore, **PRESETS["default"]
    )
    assert loss.item() == pytest.approx(want["loss"], rel=1e-9)
    assert loss1.item() == loss.item()


def test_all_pixels_ignored_gives_zero_loss_and_zero_gradient():
    K, E = 3, 3
    logits, _, experts = make_inputs(2, K, E, (4, 4), dtype=torch.float64)
    logits.requires_grad_(True)
    target = torch.full((2, 4, 4), -100)
    for balance in ("cv2", "band"):
        loss, t = ref(
            logits,
            target,
            experts,
            K,
            E,
            balance=balance,
            balance_low=[0.3] * 4,
            balance_high=[0.5] * 4,
        )
        assert loss.item() == 0.0
        assert all(v.abs().sum().item() == 0.0 for k, v in t.items() if k != "pbar")
        (g,) = torch.autograd.grad(loss, logits)
        assert torch.count_nonzero(g).item() == 0
        assert not torch.isnan(g).any()


def test_float32_input_returns_float32_and_matches_float64():
    K, E = 3, 3
    logits, target, experts = make_inputs(2, K, E, (6, 7), dtype=torch.float64)
    l64 = deferredseg_loss(logits, target, experts, K, E, backend="reference")
    l32 = deferredseg_loss(logits.float(), target, experts, K, E, backend="reference")
    assert l64.dtype == torch.float64 and l32.dtype == torch.float32
    assert l32.item() == pytest.approx(l64.item(), rel=1e-5)


# --------------------------------------------------------------------------- gradcheck


def _separated_inputs(K, E, spatial, seed):
    """Random inputs away from argmax ties and l1 kinks (for gradcheck)."""
    g = torch.Generator().manual_seed(seed)
    logits, target, experts = make_inputs(1, K, E, spatial, dtype=torch.float64, generator=g)
    return logits.requires_grad_(True), target, experts


# The gate's mse term holds D constant (stopgrad), which finite differences cannot
# see; the full gradient is checked with gate_mse = 0, and the mse term's gradient
# with respect to the gate logit alone (router fixed) in its own test.


@pytest.mark.parametrize("opts", option_matrix(2), ids=option_id)
def test_gradcheck_over_options(opts):
    K, E = 3, 2
    logits, target, experts = _separated_inputs(K, E, (3, 4), seed=1)

    def f(x):
        return deferredseg_loss(
            x,
            target,
            experts,
            K,
            E,
            backend="reference",
            class_weight=[1.0, 2.0, 0.5],
            gate_mse=0.0,
            **opts,
        )

    assert torch.autograd.gradcheck(f, (logits,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("K,E,spatial", [(1, 1, (7,)), (1, 3, (3, 4)), (4, 1, (2, 2, 3))])
def test_gradcheck_shapes(K, E, spatial):
    logits, target, experts = _separated_inputs(K, E, spatial, seed=2)

    def f(x):
        return deferredseg_loss(x, target, experts, K, E, backend="reference", gate_mse=0.0)

    assert torch.autograd.gradcheck(f, (logits,), eps=1e-6, atol=1e-6)


def test_gradcheck_gate_mse_through_gate_logit():
    K, E = 2, 3
    logits, target, experts = _separated_inputs(K, E, (4, 5), seed=4)
    fixed = logits[:, :-1].detach()
    gate = logits[:, -1:].detach().clone().requires_grad_(True)

    def f(a):
        return deferredseg_loss(
            torch.cat([fixed, a], dim=1), target, experts, K, E, backend="reference", gate_mse=0.7
        )

    assert torch.autograd.gradcheck(f, (gate,), eps=1e-6, atol=1e-6)


def test_no_gradient_reaches_router_through_the_gate_term():
    K, E = 1, 2
    logits, target, experts = _separated_inputs(K, E, (4, 4), seed=3)
    loss = deferredseg_loss(
        logits,
        target,
        experts,
        K,
        E,
        backend="reference",
        lambda_seg=0,
        lambda_collab=0,
        lambda_coherence=0,
        lambda_balance=0,
    )
    (g,) = torch.autograd.grad(loss, logits)
    _, gr, ga = split_logits(g, K, E)
    assert torch.count_nonzero(gr).item() == 0
    assert torch.count_nonzero(ga).item() > 0


# --------------------------------------------------------------------------- invariants


def test_coherence_is_zero_on_constant_maps():
    K, E = 2, 3
    logits, target, experts = make_inputs(2, K, E, (5, 6), dtype=torch.float64)
    logits[:, K:] = torch.randn(1, E + 2, 1, 1, dtype=torch.float64)  # same routing everywhere
    _, t = ref(logits, target, experts, K, E)
    assert t["coherence"].item() == pytest.approx(0.0, abs=1e-15)


def test_cv2_balance_zero_at_equal_loads_and_positive_otherwise():
    K, E = 1, 4
    logits, target, experts = make_inputs(2, K, E, (5, 6), dtype=torch.float64)
    logits[:, K : K + E] = 0.3  # every expert equally likely at every pixel
    _, t = ref(logits, target, experts, K, E)
    assert t["balance"].item() == pytest.approx(0.0, abs=1e-14)
    logits[:, K] += 1.0
    _, t = ref(logits, target, experts, K, E)
    assert t["balance"].item() > 1e-3


def test_terms_are_detached_and_pbar_sums_to_one():
    K, E = 3, 3
    logits, target, experts = make_inputs(2, K, E, (5, 6))
    logits.requires_grad_(True)
    loss, t = deferredseg_loss(
        logits, target, experts, K, E, backend="reference", return_terms=True
    )
    assert loss.requires_grad
    assert set(t) == {"seg", "collab", "gate", "coherence", "balance", "pbar"}
    assert not any(v.requires_grad for v in t.values())
    assert t["pbar"].shape == (E + 1,)
    assert t["pbar"].sum().item() == pytest.approx(1.0, rel=1e-6)


def test_nan_in_logits_propagates_to_loss():
    K, E = 3, 2
    logits, target, experts = make_inputs(1, K, E, (4, 4))
    target[0, 1, 1] = 1
    logits[0, 0, 1, 1] = float("nan")
    loss = deferredseg_loss(logits, target, experts, K, E, backend="reference")
    assert torch.isnan(loss)


def test_split_logits_views():
    K, E = 3, 2
    x = torch.arange(2 * 7 * 3, dtype=torch.float32).reshape(2, 7, 3)
    z, r, a = split_logits(x, K, E)
    assert z.shape == (2, 3, 3) and r.shape == (2, 3, 3) and a.shape == (2, 3)
    assert z.data_ptr() == x.data_ptr()
    assert torch.equal(a, x[:, 6])
