"""The one encoding of the loss options for the fused kernels, and the stats layout.

The fused loss op of every backend (C++ CPU, C++ CUDA, Triton; the contract is in
:mod:`deferredseg_kernels.ops.fused`) takes the options of a :class:`LossOptions` as
two flat lists, ``fparams`` (floats) and ``iparams`` (ints). This module declares,
once, which field sits at which index of which list and how a string option is coded
as an int; the stats vector's layout and the length of ``terms`` are declared here
too. Everything else is read from these tables:

- :func:`encode` makes the two lists of a call, :func:`decode` turns them back into
  named values (the Triton launcher passes them to its kernels by these names);
- ``csrc/contract.h``, which the C++ CPU and CUDA kernels include, is generated from
  this module by ``python -m deferredseg_kernels.contract > csrc/contract.h``
  (tests/test_contract.py fails when the committed header is stale);
- the compiled extension reports the constants it was built with
  (``deferredseg_kernels._C.contract``, the table :func:`constants` makes), and
  importing the package compares them with this module (:func:`check_constants`).

Adding a float option: a :class:`LossOptions` field (options.py: name, default,
validation), a :data:`FLOAT_FIELDS` entry here, the header regenerated. An int
(coded) option: the same with an :data:`INT_FIELDS` entry and its :data:`CODES`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from .types import TERM_NAMES

HEADER_PATH = "csrc/contract.h"


@dataclass(frozen=True)
class Field:
    """One entry of ``fparams`` or ``iparams``.

    ``name``: the :class:`LossOptions` field it encodes (or, for ``source="call"``, a
    value of the call that is not an option); ``kind``: ``"float"`` or ``"int"``;
    ``index``: its position in its list; ``doc``: one line for the generated header.
    """

    name: str
    kind: str
    index: int
    doc: str
    source: str = "option"  # "option": getattr(opts, name); "call": passed to encode()


def _fields(kind: str, entries: Sequence[Tuple[str, str, str]]) -> Tuple[Field, ...]:
    return tuple(Field(n, kind, i, doc, src) for i, (n, src, doc) in enumerate(entries))


# fparams, in order (docs/objective.md sections 3 and 5).
FLOAT_FIELDS: Tuple[Field, ...] = _fields(
    "float",
    (
        ("lambda_seg", "option", "weight of the segmentation term"),
        ("lambda_collab", "option", "weight of the collaboration (surrogate) term"),
        ("lambda_gate", "option", "weight of the gate term"),
        ("lambda_coherence", "option", "weight of the coherence term"),
        ("lambda_balance", "option", "weight of the balance term"),
        ("paper_eps", "option", "eps of the paper surrogate, log(pi + eps)"),
        ("gate_mse", "option", "weight of (s - D)^2 in the gate term"),
        ("gate_sparsity", "option", "weight of s in the gate term"),
        (
            "balance_grad_scale",
            "call",
            "factor of the balance gradient only (the world size under sync_balance)",
        ),
    ),
)

# iparams, in order: each an option coded as CODES says.
INT_FIELDS: Tuple[Field, ...] = _fields(
    "int",
    (
        ("surrogate", "option", "collaboration surrogate (CODES['surrogate'])"),
        ("coherence", "option", "coherence penalty (CODES['coherence'])"),
        ("coherence_maps", "option", "coherence maps, OR of bits (CODES['coherence_maps'])"),
        ("balance", "option", "balance term (CODES['balance'])"),
        ("gate_target", "option", "target of the gate (CODES['gate_target'])"),
    ),
)

# The optional last entry of iparams (index len(INT_FIELDS)): 1 makes the C++ CPU loss
# op raise on expert labels out of range (the other kernels refuse 1).
CHECK_EXPERTS = Field(
    "check_experts",
    "int",
    len(INT_FIELDS),
    "optional: 1 = the loss pass checks the expert labels (C++ CPU only)",
    "call",
)

# The LossOptions fields that reach the ops otherwise: as op arguments (the counts,
# ignore_index), as tensors (class_weight, balance_low, balance_high) or in the driver
# only (sync_balance). Every other field must be in FLOAT_FIELDS or INT_FIELDS
# (tests/test_contract.py checks it).
NOT_ENCODED = (
    "num_classes",
    "num_experts",
    "ignore_index",
    "class_weight",
    "balance_low",
    "balance_high",
    "sync_balance",
)

# The int code of each value of a coded option. For a field in BIT_FIELDS the option is
# a tuple of values and its code is the OR of theirs.
CODES: Dict[str, Dict[str, int]] = {
    "surrogate": {"softmax": 0, "paper": 1, "ova": 2},
    "coherence": {"l1": 0, "l2": 1},
    "coherence_maps": {"router": 1, "gate": 2},
    "balance": {"cv2": 0, "band": 1},
    "gate_target": {"router": 0, "benefit": 1},
}
BIT_FIELDS = ("coherence_maps",)
# The prefix of a code's C++ constant (k<Prefix><Value>), where it is not the field's name.
_CPP_CODE_PREFIX = {"coherence_maps": "Map"}

# The stats vector of E experts (ops/fused.py): entries 0 .. E hold S_0 .. S_E, every
# other entry sits at E + its offset here.
MAX_SPATIAL = 3  # spatial axes a logits tensor may have
STAT_OFFSETS: Dict[str, int] = {
    "count": 1,  # N_V, the valid pixels of this call
    "weight": 2,  # W, the class-weight mass of the valid pixels
    "pairs": 3,  # + d: the valid neighbour pairs along spatial axis d < MAX_SPATIAL
    "bad": 3 + MAX_SPATIAL,  # the labels out of range
    "balance_count": 4 + MAX_SPATIAL,  # N_B, pbar's denominator: the optional last entry
}
_STAT_DOCS = {
    "count": "stats[E + kStatCount]: N_V, the valid pixels of this call",
    "weight": "stats[E + kStatWeight]: W, the class-weight mass of the valid pixels",
    "pairs": "stats[E + kStatPairs + d]: the valid neighbour pairs along spatial axis d",
    "bad": "stats[E + kStatBad]: the labels out of range",
    "balance_count": "stats[E + kStatBalanceCount]: N_B, pbar's denominator (optional)",
}
# terms = [loss, *TERM_NAMES]: the total loss, then the unweighted terms.
TERMS = ("loss",) + TERM_NAMES


# ------------------------------------------------------------------ encode / decode


def encode_int(name: str, value: Any) -> int:
    """The code of option ``name`` (a coded int field) for ``value``."""
    codes = CODES[name]
    if name in BIT_FIELDS:
        bits = 0
        for v in value:
            bits |= codes[v]
        return bits
    return codes[value]


def float_params(opts: Any, balance_grad_scale: float = 1.0) -> List[float]:
    """``fparams`` of a call with options ``opts`` (FLOAT_FIELDS order)."""
    call = {"balance_grad_scale": balance_grad_scale}
    return [
        float(getattr(opts, f.name) if f.source == "option" else call[f.name]) for f in FLOAT_FIELDS
    ]


def int_params(opts: Any, check_experts: Optional[bool] = None) -> List[int]:
    """``iparams`` of a call with options ``opts`` (INT_FIELDS order), with the optional
    CHECK_EXPERTS entry when ``check_experts`` is not None."""
    out = [encode_int(f.name, getattr(opts, f.name)) for f in INT_FIELDS]
    if check_experts is not None:
        out.append(int(bool(check_experts)))
    return out


def encode(
    opts: Any, balance_grad_scale: float = 1.0, check_experts: Optional[bool] = None
) -> Tuple[List[float], List[int]]:
    """``(fparams, iparams)`` of a call."""
    return float_params(opts, balance_grad_scale), int_params(opts, check_experts)


class Decoded(NamedTuple):
    """``fparams`` / ``iparams`` by name: ``floats`` and ``ints`` map each declared
    field's name to its value; ``check_experts`` is the optional last iparams entry."""

    floats: Dict[str, float]
    ints: Dict[str, int]
    check_experts: bool


def decode(fparams: Sequence[float], iparams: Sequence[int]) -> Decoded:
    """Name the values of ``fparams`` / ``iparams`` by the declaration; ValueError names
    the list and the field that does not fit."""
    if len(fparams) != len(FLOAT_FIELDS):
        raise ValueError(
            f"fparams must have {len(FLOAT_FIELDS)} values "
            f"{[f.name for f in FLOAT_FIELDS]}, got {len(fparams)}: {list(fparams)}"
        )
    n = len(INT_FIELDS)
    if len(iparams) not in (n, n + 1):
        raise ValueError(
            f"iparams must have {n} or {n + 1} values {[f.name for f in INT_FIELDS]} "
            f"(+ {CHECK_EXPERTS.name}), got {len(iparams)}: {list(iparams)}"
        )
    floats = {f.name: float(fparams[f.index]) for f in FLOAT_FIELDS}
    ints = {f.name: int(iparams[f.index]) for f in INT_FIELDS}
    for name, code in ints.items():
        if not valid_code(name, code):
            raise ValueError(f"iparams: unknown {name} code {code}; expected {CODES[name]}")
    check = len(iparams) > n and int(iparams[CHECK_EXPERTS.index]) != 0
    return Decoded(floats, ints, check)


def valid_code(name: str, code: int) -> bool:
    """Whether ``code`` is a code of option ``name``."""
    values = CODES[name].values()
    if name in BIT_FIELDS:
        return 0 <= code <= _all_bits(name)
    return code in values


def _all_bits(name: str) -> int:
    bits = 0
    for v in CODES[name].values():
        bits |= v
    return bits


# ------------------------------------------------------------------ constants table


def constants() -> Dict[str, int]:
    """Every constant the compiled kernels must agree on, by a dotted name: the index of
    each field, the list lengths, the codes, the stats offsets and the terms' count. The
    extension reports the same table (``_C.contract``, from csrc/contract.h)."""
    out: Dict[str, int] = {}
    for f in FLOAT_FIELDS:
        out[f"fparams.{f.name}"] = f.index
    out["fparams.count"] = len(FLOAT_FIELDS)
    for f in INT_FIELDS:
        out[f"iparams.{f.name}"] = f.index
    out[f"iparams.{CHECK_EXPERTS.name}"] = CHECK_EXPERTS.index
    out["iparams.count"] = len(INT_FIELDS)
    for name, codes in CODES.items():
        for value, code in codes.items():
            out[f"codes.{name}.{value}"] = code
    for name, offset in STAT_OFFSETS.items():
        out[f"stats.{name}"] = offset
    out["stats.max_spatial"] = MAX_SPATIAL
    out["terms.count"] = len(TERMS)
    return out


def check_constants(built: Optional[Mapping[str, Any]], where: str) -> None:
    """Raise RuntimeError naming the first constant in which ``built`` (the table of a
    compiled extension, ``where`` names it) differs from :func:`constants`."""
    if built is None:
        raise RuntimeError(
            f"{where} reports no option contract (it predates deferredseg_kernels/contract.py)"
        )
    want = constants()
    for name, value in want.items():
        if name not in built:
            raise RuntimeError(
                f"{where} lacks the contract field {name!r} "
                f"(deferredseg_kernels/contract.py has {name} = {value})"
            )
        if int(built[name]) != value:
            raise RuntimeError(
                f"{where} disagrees with deferredseg_kernels/contract.py on the contract field "
                f"{name!r}: the extension has {built[name]}, the Python declaration {value}"
            )
    extra = sorted(set(built) - set(want))
    if extra:
        raise RuntimeError(
            f"{where} has contract field(s) {extra} that deferredseg_kernels/contract.py "
            f"does not declare"
        )


# ------------------------------------------------------------------ C++ header


def _camel(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.split("_"))


def _cpp_lines() -> List[Tuple[str, str, int, str]]:
    """(C++ name, dotted name of constants(), value, comment) for every constant."""
    rows = []
    for f in FLOAT_FIELDS:
        rows.append((f"kF{_camel(f.name)}", f"fparams.{f.name}", f.index, f.doc))
    rows.append(("kNumFParams", "fparams.count", len(FLOAT_FIELDS), "length of fparams"))
    for f in INT_FIELDS + (CHECK_EXPERTS,):
        rows.append((f"kI{_camel(f.name)}", f"iparams.{f.name}", f.index, f.doc))
    rows.append(
        ("kNumIParams", "iparams.count", len(INT_FIELDS), "length of iparams (+1 optional)")
    )
    for name, codes in CODES.items():
        prefix = _CPP_CODE_PREFIX.get(name, _camel(name))
        kind = "bit" if name in BIT_FIELDS else "code"
        for value, code in codes.items():
            rows.append(
                (f"k{prefix}{_camel(value)}", f"codes.{name}.{value}", code, f"{name} {kind}")
            )
    for name, offset in STAT_OFFSETS.items():
        rows.append((f"kStat{_camel(name)}", f"stats.{name}", offset, _STAT_DOCS[name]))
    rows.append(
        ("kMaxSpatial", "stats.max_spatial", MAX_SPATIAL, "spatial axes of a logits tensor")
    )
    rows.append(("kTermsLen", "terms.count", len(TERMS), ", ".join(TERMS)))
    return rows


def render_header() -> str:
    """The text of csrc/contract.h."""
    out = [
        "// GENERATED by `python -m deferredseg_kernels.contract > csrc/contract.h` from",
        "// deferredseg_kernels/contract.py, the one declaration of the options' encoding",
        "// (fparams / iparams), their codes and the stats layout. Do not edit: change the",
        "// declaration and regenerate (tests/test_contract.py fails on a stale header).",
        "#pragma once",
        "",
        "#include <cstdint>",
        "",
        "namespace deferredseg {",
        "namespace contract {",
        "",
    ]
    for cpp, _, value, doc in _cpp_lines():
        out.append(f"// {doc}")
        out.append(f"constexpr int {cpp} = {value};")
    out += [
        "",
        "// fparams / iparams decoded, one member per declared field.",
        "struct Options {",
    ]
    for f in FLOAT_FIELDS:
        out.append(f"  double {f.name};")
    for f in INT_FIELDS:
        out.append(f"  int {f.name};")
    out += [
        f"  bool {CHECK_EXPERTS.name};",
        "};",
        "",
        "// Reads fparams (kNumFParams values) and iparams (kNumIParams, or one more).",
        "inline Options decode(const double* fparams, const int64_t* iparams, int64_t n_iparams) {",
        "  Options o;",
    ]
    for f in FLOAT_FIELDS:
        out.append(f"  o.{f.name} = fparams[kF{_camel(f.name)}];")
    for f in INT_FIELDS:
        out.append(f"  o.{f.name} = static_cast<int>(iparams[kI{_camel(f.name)}]);")
    ce = f"kI{_camel(CHECK_EXPERTS.name)}"
    out += [
        f"  o.{CHECK_EXPERTS.name} = n_iparams > {ce} && iparams[{ce}] != 0;",
        "  return o;",
        "}",
        "",
        "// The index of the first iparams entry that is not a code of its field, or -1.",
        "inline int invalid_iparam(const int64_t* iparams) {",
    ]
    for f in INT_FIELDS:
        prefix = _CPP_CODE_PREFIX.get(f.name, _camel(f.name))
        names = [f"k{prefix}{_camel(value)}" for value in CODES[f.name]]
        out += ["  {", f"    const int64_t v = iparams[kI{_camel(f.name)}];"]
        if f.name in BIT_FIELDS:
            out.append("    int bits = 0;")
            out += [f"    bits |= {n};" for n in names]
            out.append("    const bool ok = v >= 0 && v <= bits;")
        else:
            out.append("    bool ok = false;")
            out += [f"    ok = ok || v == {n};" for n in names]
        out += ["    if (!ok) {", f"      return kI{_camel(f.name)};", "    }", "  }"]
    out += [
        "  return -1;",
        "}",
        "",
        "// The name of iparams entry i.",
        "inline const char* iparam_name(int i) {",
        "  switch (i) {",
    ]
    for f in INT_FIELDS + (CHECK_EXPERTS,):
        out += [f"    case kI{_camel(f.name)}:", f'      return "{f.name}";']
    out += [
        "    default:",
        '      return "?";',
        "  }",
        "}",
        "",
        "// Every constant above by the dotted name of deferredseg_kernels.contract.constants():",
        "// the compiled extension reports this table and the package compares it at import.",
        "struct Constant {",
        "  const char* name;",
        "  int value;",
        "};",
        "constexpr Constant kConstants[] = {",
    ]
    for cpp, dotted, _, _ in _cpp_lines():
        out.append(f'    {{"{dotted}", {cpp}}},')
    out += [
        "};",
        "",
        "}  // namespace contract",
        "}  // namespace deferredseg",
        "",
    ]
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(render_header())
