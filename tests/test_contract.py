"""The option encoding of the fused ops, declared once in deferredseg_kernels/contract.py:
the generated csrc/contract.h is current, the compiled extension reports the same
constants, the import check names a field that differs, and encode / decode agree."""

from __future__ import annotations

import os

import pytest

from deferredseg_kernels import _ext, contract, make_options
from deferredseg_kernels.ops import fused

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_committed_header_is_generated_from_the_declaration():
    with open(os.path.join(ROOT, contract.HEADER_PATH), encoding="utf-8") as f:
        committed = f.read()
    assert committed == contract.render_header(), (
        f"{contract.HEADER_PATH} is stale: regenerate it with "
        f"`python -m deferredseg_kernels.contract > {contract.HEADER_PATH}`"
    )


def test_header_changes_with_the_declaration(monkeypatch):
    """A new field in the declaration changes the generated header (so the committed one
    is then stale): its index, its Options member, its decoding and its table entry."""
    before = contract.render_header()
    extra = contract.Field("new_weight", "float", len(contract.FLOAT_FIELDS), "a new option")
    monkeypatch.setattr(contract, "FLOAT_FIELDS", contract.FLOAT_FIELDS + (extra,))
    after = contract.render_header()
    assert after != before
    for text in (
        "constexpr int kFNewWeight = 9;",
        "constexpr int kNumFParams = 10;",
        "double new_weight;",
        "o.new_weight = fparams[kFNewWeight];",
        '{"fparams.new_weight", kFNewWeight},',
    ):
        assert text in after and text not in before, text


def test_header_names_every_constant():
    header = contract.render_header()
    for name in contract.constants():
        assert f'{{"{name}", ' in header


@pytest.mark.skipif(_ext.EXT is None, reason="the C++ extension is not built")
def test_extension_reports_the_declared_constants():
    assert dict(_ext.EXT.contract) == contract.constants()
    _ext.check_contract(_ext.EXT.contract)  # what the import ran


def test_import_check_names_the_mismatching_field():
    built = contract.constants()
    built["fparams.gate_mse"] += 1
    with pytest.raises(_ext.ExtensionMismatchError, match=r"'fparams\.gate_mse'.*rebuild"):
        _ext.check_contract(built)
    built = contract.constants()
    del built["stats.bad"]
    with pytest.raises(_ext.ExtensionMismatchError, match=r"lacks the contract field 'stats\.bad'"):
        _ext.check_contract(built)
    built = dict(contract.constants(), **{"fparams.new_option": 9})
    with pytest.raises(_ext.ExtensionMismatchError, match=r"fparams\.new_option"):
        _ext.check_contract(built)
    with pytest.raises(_ext.ExtensionMismatchError, match="reports no option contract"):
        _ext.check_contract(None)


def test_indices_are_dense_and_distinct():
    for fields in (contract.FLOAT_FIELDS, contract.INT_FIELDS):
        assert [f.index for f in fields] == list(range(len(fields)))
        assert len({f.name for f in fields}) == len(fields)
    assert contract.CHECK_EXPERTS.index == len(contract.INT_FIELDS)
    assert set(contract.CODES) == {f.name for f in contract.INT_FIELDS}
    offsets = contract.STAT_OFFSETS
    assert offsets["bad"] == offsets["pairs"] + contract.MAX_SPATIAL
    assert offsets["balance_count"] == offsets["bad"] + 1


def test_every_loss_option_is_encoded_or_passed_otherwise():
    from deferredseg_kernels.options import LossOptions

    names = set(LossOptions.__dataclass_fields__)
    encoded = {f.name for f in contract.FLOAT_FIELDS + contract.INT_FIELDS if f.source == "option"}
    for f in contract.FLOAT_FIELDS + contract.INT_FIELDS:
        assert f.source == "call" or f.name in names, f.name
    assert names == encoded | set(contract.NOT_ENCODED), (
        "a LossOptions field is neither encoded in contract.py nor listed in NOT_ENCODED: "
        f"{sorted(names - encoded - set(contract.NOT_ENCODED))}"
    )


@pytest.mark.parametrize("preset", ["default", "paper"])
def test_encode_decode_round_trip(preset):
    opts = make_options(
        3,
        2,
        preset=preset,
        coherence_maps=("gate",),
        balance="band",
        balance_low=[0.0] * 3,
        balance_high=[1.0] * 3,
        lambda_gate=0.7,
    )
    fparams, iparams = contract.encode(opts, 4.0)
    assert fparams == fused.float_params(opts, 4.0)
    assert iparams == fused.int_params(opts)
    decoded = contract.decode(fparams, iparams)
    for f in contract.FLOAT_FIELDS:
        want = 4.0 if f.name == "balance_grad_scale" else getattr(opts, f.name)
        assert decoded.floats[f.name] == want
    assert decoded.ints["surrogate"] == contract.CODES["surrogate"][opts.surrogate]
    assert decoded.ints["coherence_maps"] == contract.CODES["coherence_maps"]["gate"]
    assert decoded.ints["balance"] == contract.CODES["balance"]["band"]
    assert decoded.check_experts is False
    assert contract.decode(fparams, contract.int_params(opts, check_experts=True)).check_experts


def test_decode_names_what_does_not_fit():
    opts = make_options(3, 2)
    fparams, iparams = contract.encode(opts)
    with pytest.raises(ValueError, match=r"fparams must have 9 values .*lambda_seg"):
        contract.decode(fparams[:-1], iparams)
    with pytest.raises(ValueError, match="iparams must have 5 or 6 values"):
        contract.decode(fparams, iparams + [0, 0])
    bad = list(iparams)
    bad[contract.INT_FIELDS[3].index] = 7
    with pytest.raises(ValueError, match="unknown balance code 7"):
        contract.decode(fparams, bad)


def test_loading_an_extension_with_another_contract_raises(monkeypatch):
    """_ext._load, which the package import runs, refuses an extension whose reported
    constants differ from the declaration, naming the field."""
    import types

    import torch

    built = contract.constants()
    built["codes.surrogate.ova"] = 5
    fake = types.SimpleNamespace(
        torch_version=torch.__version__,
        cuda_version=torch.version.cuda or "",
        with_cuda=0,
        contract=built,
    )
    monkeypatch.setattr(_ext.importlib, "import_module", lambda name: fake)
    with pytest.raises(_ext.ExtensionMismatchError, match=r"'codes\.surrogate\.ova'.*has 5"):
        _ext._load()
    del fake.contract  # an extension built before the contract existed
    with pytest.raises(_ext.ExtensionMismatchError, match="reports no option contract"):
        _ext._load()
