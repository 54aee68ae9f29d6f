"""The fused backends under test, and the run-and-compare helpers of their tests.

``BACKENDS`` lists one :class:`Backend` per implementation of the fused objective
(docs/objective.md sections 3 and 5): the C++ CPU kernels, the C++ CUDA kernels,
those CUDA kernels compiled for the CPU through the emulation of
csrc/cuda/emulation.h, and the Triton kernels. tests/test_conformance.py runs every
check of the shared contract on each of them; a new backend gets the whole suite by
adding one entry here.

An entry says how to drive the backend (``load``: the loss call and its two ops,
``torch.ops.<ns>.loss_stats`` / ``loss_fused``), whether it can run here
(``unavailable``: the reason it cannot, which becomes the skip reason), what it
does with bad labels (``checks_labels_eagerly``), the capabilities it lacks
(``lacks``: capability -> reason, reported as a skip) and its :class:`Plan`: the
sizes of the parametrized checks, smaller for a slow backend (the Triton
interpreter) so that the suite's run time stays reasonable.

The private names of deferredseg_kernels that the op-level checks need (the option
encoding of the fused ops, the driver that the emulated ops share with the real
ones) are imported here only, so that a move inside the package is one edit.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from _inputs import TERMS, assert_results_close, option_id, option_matrix

from deferredseg_kernels import available_backends, check_inputs, deferredseg_loss, make_options
from deferredseg_kernels.ops import fused

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HAS_CUDA = torch.cuda.is_available()

float_params = fused.float_params
int_params = fused.int_params

# --------------------------------------------------------------------------- plans


@dataclasses.dataclass(frozen=True)
class Case:
    """One parametrized case: ``name`` is its test id (after the backend's name);
    ``opts`` the loss options; ``extra`` what else the test reads (batch size ``B``,
    the option sets ``runs`` of one case, the input ``scale``, ``rtol`` / ``atol``)."""

    name: str
    K: int = 3
    E: int = 3
    spatial: Tuple[int, ...] = (7, 13)
    opts: Dict = dataclasses.field(default_factory=dict)
    extra: Dict = dataclasses.field(default_factory=dict)


def _band(E: int) -> Dict:
    n = E + 1
    return dict(balance="band", balance_low=[0.5 / n] * n, balance_high=[1.5 / n] * n)


def _wide_cases():
    out = []
    for K, E in ((2, 16), (12, 1)):
        for i in (5, 10, 32, 37):
            opts = dict(option_matrix(16)[i])
            if "balance_low" in opts:  # option_matrix(16) sized them for E = 16
                opts.update(_band(E))
            out.append(
                Case(
                    f"K{K}-E{E}-{option_id(opts)}", K, E, (3, 9, 10), extra=dict(B=1, runs=(opts,))
                )
            )
    return tuple(out)


def _triton_wide_cases():
    out = []
    for K, E, spatial in ((32, 3, (5, 6)), (3, 16, (4, 7)), (32, 16, (3, 2, 4))):
        # "random": class weights drawn when the case runs
        runs = (dict(class_weight="random"), dict(surrogate="ova", gate_target="benefit"))
        out.append(
            Case(
                f"K{K}-E{E}-{'x'.join(map(str, spatial))}",
                K,
                E,
                spatial,
                extra=dict(B=2, runs=runs),
            )
        )
    return tuple(out)


# gradcheck cases: K, E, spatial and options; extra["atol"]: gradcheck's atol (else 1e-6);
# extra["fast_mode"], extra["rtol"]: gradcheck's fast mode and rtol (see _fast_gradcheck)
_GC_COMMON = dict(lambda_coherence=0.7, gate_mse=0.0, coherence="l2")
_W3 = [0.5, 1.0, 2.0]
_GRADCHECK = (
    Case("binary", 1, 2, (3, 4), dict(_GC_COMMON, lambda_balance=0.9)),
    Case(
        "multiclass-paper-band",
        3,
        2,
        (3, 4),
        dict(
            _GC_COMMON,
            lambda_balance=0.9,
            surrogate="paper",
            balance="band",
            balance_low=[0.2, 0.1, 0.3],
            balance_high=[0.3, 0.5, 0.6],
            class_weight=_W3,
        ),
    ),
    Case(
        "binary-ova-benefit",
        1,
        2,
        (3, 4),
        dict(_GC_COMMON, lambda_balance=0.9, surrogate="ova", gate_target="benefit"),
    ),
    Case(
        "multiclass-ova-benefit",
        3,
        2,
        (3, 4),
        dict(
            _GC_COMMON,
            lambda_balance=0.9,
            surrogate="ova",
            coherence_maps=("router",),
            gate_target="benefit",
            class_weight=_W3,
        ),
    ),
    Case("multiclass", 3, 2, (3, 4), dict(_GC_COMMON)),
    Case(
        "multiclass-paper-benefit",
        3,
        2,
        (3, 4),
        dict(_GC_COMMON, surrogate="paper", gate_target="benefit"),
    ),
    Case(
        "multiclass-ova-benefit-maps",
        3,
        2,
        (3, 4),
        dict(_GC_COMMON, surrogate="ova", gate_target="benefit"),
    ),
)


def _fast_gradcheck(cases):
    """The cases with gradcheck's fast mode, for a backend whose evaluation costs tens of
    milliseconds (the Triton interpreter, the CUDA emulation): instead of the whole
    Jacobian (2 evaluations per input), one central difference along a random direction u
    of the input space, compared with v^T J u from the backward pass for a random v. One
    number instead of a matrix, so the tolerances are those a float64 difference with
    eps = 1e-6 allows (atol 1e-8, rtol 1e-7) instead of the per-entry 1e-6 / 1e-5: on
    these cases it fails when any single gradient entry is off by 2e-6 (checked by
    perturbing 8 entries of each case), where the full check's atol lets 1e-6 (1e-5 for
    Triton) through."""
    fast = dict(fast_mode=True, atol=1e-8, rtol=1e-7)
    return tuple(dataclasses.replace(c, extra={**c.extra, **fast}) for c in cases)


_GC_TRITON = dict(
    coherence="l2", lambda_coherence=1.0, lambda_balance=1.0, lambda_seg=0.5, gate_mse=0.0
)
_TRITON_GRADCHECK = _fast_gradcheck(
    (
        Case("binary-paper-2x3", 1, 2, (2, 3), dict(_GC_TRITON, surrogate="paper")),
        Case(
            "binary-ova-benefit-2x3",
            1,
            2,
            (2, 3),
            dict(_GC_TRITON, surrogate="ova", gate_target="benefit"),
        ),
    )
)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The sizes of a backend's parametrized checks (defaults: the compiled kernels').

    Each field is a tuple of :class:`Case` (or of plain values, see the field).
    """

    # option matrix: K, E, spatial; extra["varied"]: odd combinations also with class
    # weights and other lambdas (a backend that runs the matrix for one K only)
    matrix: Tuple[Case, ...] = (Case("K1", 1, 3, (7, 13)), Case("K3", 3, 3, (7, 13)))
    # odd shapes: spatial shapes (iter_shapes() and these), (K, E) pairs, options
    shape_extra: Tuple[Tuple[int, ...], ...] = ()
    shape_KE: Tuple[Tuple[int, int], ...] = ((1, 1), (3, 3), (1, 16), (12, 3))
    shape_opts: Tuple[Tuple[str, object], ...] = ()
    wide: Tuple[Case, ...] = (
        _wide_cases()
        + _triton_wide_cases()
        + (
            Case(
                "K2-E127-most-experts",
                2,
                127,
                (9, 11),
                extra=dict(B=1, runs=({},), scale=1.0, rtol=2e-5),
            ),
        )
    )
    # benefit target at ties: K, E, spatial, opts["coherence_maps"]
    ties: Tuple[Case, ...] = tuple(
        Case(f"K{K}-E{E}-{mname}", K, E, (9, 31), dict(coherence_maps=maps))
        for K, E in ((1, 3), (3, 2), (2, 6))
        for mname, maps in (("nomaps", ()), ("gatemap", ("gate",)))
    )
    label_cases: Tuple[Tuple[torch.dtype, int], ...] = (
        (torch.uint8, 255),
        (torch.int32, -100),
        (torch.int64, -1),
        (torch.int64, 2**40),
    )
    label_spatial: Tuple[int, ...] = (6, 9)
    low_precision: Tuple[Case, ...] = (Case("K1-E3", 1, 3, (9, 11)), Case("K3-E3", 3, 3, (9, 11)))
    layout_spatial: Tuple[int, int] = (7, 9)
    determinism_spatial: Tuple[int, ...] = (8, 32, 40)
    stats_spatial: Tuple[int, int] = (4, 6)
    sync_spatial: Tuple[int, int] = (5, 6)
    gradcheck: Tuple[Case, ...] = _GRADCHECK


EMULATION_PLAN = Plan(
    # 2 x 23 x 29 = 1334 pixels: 3 blocks of 256 threads, two grid-stride steps each.
    matrix=(Case("K1", 1, 3, (23, 29)), Case("K3", 3, 3, (23, 29))),
    # E + 1 <= 4 and <= 8 take the one-pass stats kernel (4 and 8 sums in registers),
    # more experts the three-kernel path. l2: with l1 the derivative at two neighbours
    # whose D agree to the last bit (D saturated at 1 in float32) is a sign that
    # rounding decides (see test_cpu_kernel.test_neighbour_masks_every_path).
    shape_extra=((9, 40, 7),),
    shape_KE=((1, 1), (3, 3), (2, 5), (1, 16), (12, 3)),
    shape_opts=(("coherence", "l2"), ("lambda_coherence", 0.8)),
    # 2 x 29 x 31 pixels take several grid-stride steps.
    ties=tuple(
        Case(f"K{K}-E{E}-gatemap", K, E, (29, 31), dict(coherence_maps=("gate",)))
        for K, E in ((1, 3), (3, 2), (2, 9), (2, 6))
    )
    + tuple(
        Case(f"K{K}-E{E}-nomaps", K, E, (9, 31), dict(coherence_maps=()))
        for K, E in ((1, 3), (3, 2), (2, 6))
    ),
    label_spatial=(26, 19),
    low_precision=(Case("K3-E3", 3, 3, (29, 31)), Case("K1-E3", 1, 3, (9, 11))),
    layout_spatial=(21, 33),
    determinism_spatial=(8, 12, 10),
    stats_spatial=(24, 26),
    sync_spatial=(25, 22),
    # (every evaluation runs 3 blocks of 256 fibers: about 12 s each without the fast mode)
    gradcheck=_fast_gradcheck(
        c
        for c in _GRADCHECK
        if c.name in ("multiclass", "multiclass-ova-benefit-maps", "multiclass-paper-benefit")
    ),
)

# The interpreter runs a program in numpy: small shapes, the option matrix for one K
# (with class weights and lambdas varied instead), the shapes on fewer (K, E).
TRITON_PLAN = Plan(
    matrix=(Case("K3", 3, 2, (6, 7), extra=dict(varied=True)),),
    shape_KE=((1, 1), (3, 3), (2, 1), (1, 3)),
    shape_opts=(("lambda_coherence", 1.0),),
    wide=_triton_wide_cases(),
    ties=tuple(
        Case(f"K{K}-E{E}-gatemap", K, E, (9, 11), dict(coherence_maps=("gate",)))
        for K, E in ((1, 3), (3, 2), (2, 6))
    ),
    label_spatial=(5, 6),
    low_precision=(
        Case("K3-E2", 3, 2, (9, 10), dict(lambda_coherence=1.0)),
        Case("K1-E3", 1, 3, (2, 3, 5), dict(lambda_coherence=1.0)),
    ),
    layout_spatial=(5, 7),
    determinism_spatial=(6, 7),
    stats_spatial=(4, 6),
    sync_spatial=(5, 6),
    gradcheck=_TRITON_GRADCHECK,
)

CUDA_PLAN = dataclasses.replace(
    Plan(),
    ties=Plan().ties
    + tuple(
        Case(f"K{K}-E{E}-gatemap-29x31", K, E, (29, 31), dict(coherence_maps=("gate",)))
        for K, E in ((1, 3), (3, 2), (2, 9))
    ),
)

# --------------------------------------------------------------------------- backends


@dataclasses.dataclass(frozen=True)
class Ops:
    """A loaded backend: the loss call and its ops (``loss_stats``, ``loss_fused``)."""

    spec: "Backend"
    loss: Callable
    stats_op: Callable
    loss_op: Callable

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def device(self) -> str:
        return self.spec.device

    def __str__(self) -> str:
        return self.spec.name


@dataclasses.dataclass(frozen=True)
class Backend:
    """One entry of BACKENDS (see the module docstring).

    ``load(spec)`` returns the :class:`Ops`; ``unavailable()`` the reason it cannot
    run here, or None; ``lacks``: (capability, reason) pairs, the capabilities being
    "opcheck" and "compile" (the ops can be traced: fake kernels, registered autograd).
    """

    name: str
    device: str
    unavailable: Callable[[], Optional[str]]
    load: Callable[["Backend"], Ops]
    checks_labels_eagerly: bool
    lacks: Tuple[Tuple[str, str], ...] = ()
    plan: Plan = Plan()

    def lacking(self, capability: str) -> Optional[str]:
        return dict(self.lacks).get(capability)


def _api_backend(name: str, namespace: str):
    """A backend reached as ``deferredseg_loss(..., backend=name)``."""

    def load(spec: Backend) -> Ops:
        ns = getattr(torch.ops, namespace)

        def loss(logits, target, experts, K, E, return_terms=False, **opts):
            return deferredseg_loss(
                logits, target, experts, K, E, backend=name, return_terms=return_terms, **opts
            )

        return Ops(spec, loss, ns.loss_stats.default, ns.loss_fused.default)

    return load


EMU_MAX_BLOCKS = 3


@functools.lru_cache(maxsize=None)
def emulation_ops():
    """torch.ops.deferredseg_cuda_emu: csrc/cuda compiled as plain C++ with
    -DDS_CUDA_EMULATION (tests/cuda_emu/emu_ops.cpp), built on first use (about 15 s;
    ninja keeps it). The grid is capped at EMU_MAX_BLOCKS blocks of 256 threads, so
    grid-stride loops take several steps on inputs of a few thousand pixels.
    """
    from torch.utils.cpp_extension import load

    build = os.path.join(ROOT, "build", f"cuda_emu-torch{torch.__version__}")
    os.makedirs(build, exist_ok=True)
    load(
        name="deferredseg_cuda_emu",
        sources=[os.path.join(HERE, "cuda_emu", "emu_ops.cpp")],
        extra_cflags=[
            "-O2",
            "-DDS_CUDA_EMULATION",
            f"-DDS_CUDA_EMU_MAX_BLOCKS={EMU_MAX_BLOCKS}",
            "-fvisibility=hidden",
        ],
        build_directory=build,
        is_python_module=False,
        verbose=False,
    )
    return torch.ops.deferredseg_cuda_emu


def emulation_loss(ops, logits, target, experts, K, E, return_terms=False, **options):
    """The objective through the emulated CUDA kernels, driven as backend="cuda" drives
    the real ones (labels not checked eagerly: a bad target makes the loss NaN)."""
    opts = make_options(K, E, **options)
    target, experts = check_inputs(logits, target, experts, opts)
    return fused.fused_loss(
        ops.loss_stats,
        ops.loss_fused,
        logits,
        target,
        experts,
        opts,
        return_terms,
        check_labels_eagerly=False,
    )


def route_with(op, *args, **kwargs):
    """A compiled route op's outputs as a RouteResult (see deferredseg_kernels.route)."""
    return fused.route_with(op, *args, **kwargs)


def _load_emulation(spec: Backend) -> Ops:
    ops = emulation_ops()
    return Ops(
        spec, functools.partial(emulation_loss, ops), ops.loss_stats.default, ops.loss_fused.default
    )


def _cpu_unavailable():
    return None if "cpu" in available_backends("loss") else "the C++ CPU kernels are not built"


def _cuda_unavailable():
    if "cuda" in available_backends("loss"):
        return None
    return "the C++ CUDA kernels cannot run here: needs a CUDA device and a CUDA build"


def _triton_unavailable():
    if "triton" in available_backends("loss"):
        return None
    from deferredseg_kernels import _dispatch

    return f"triton backend unavailable: {_dispatch.why_unavailable('triton')}"


def _emulation_unavailable():
    return None  # built from source on first use; a build failure fails the tests


TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"

# emu_ops.cpp defines each op with its kernel (m.def(schema, fn)): a
# CompositeImplicitAutograd kernel, for which torch.library refuses a fake kernel, so
# the ops cannot be traced. (The real CUDA ops are checked on a GPU.)
_NO_FAKE = (
    "the emulated ops have no fake kernel (emu_ops.cpp registers them as "
    "CompositeImplicitAutograd), so they cannot be traced"
)

BACKENDS: Tuple[Backend, ...] = (
    Backend(
        "cpu",
        "cpu",
        _cpu_unavailable,
        _api_backend("cpu", "deferredseg"),
        checks_labels_eagerly=True,
    ),
    Backend(
        "cuda",
        "cuda",
        _cuda_unavailable,
        _api_backend("cuda", "deferredseg"),
        checks_labels_eagerly=False,
        plan=CUDA_PLAN,
    ),
    Backend(
        "cuda_emu",
        "cpu",
        _emulation_unavailable,
        _load_emulation,
        checks_labels_eagerly=False,
        plan=EMULATION_PLAN,
        lacks=(("opcheck", _NO_FAKE), ("compile", _NO_FAKE)),
    ),
    # On a machine without a GPU, Triton runs its kernels on CPU tensors in the
    # interpreter (tests/conftest.py sets TRITON_INTERPRET=1); labels on the CPU are
    # range-checked eagerly, with the reference's message.
    Backend(
        "triton",
        TRITON_DEVICE,
        _triton_unavailable,
        _api_backend("triton", "deferredseg_triton"),
        checks_labels_eagerly=TRITON_DEVICE == "cpu",
        plan=TRITON_PLAN,
    ),
)

BY_NAME = {b.name: b for b in BACKENDS}


@functools.lru_cache(maxsize=None)
def load(name: str) -> Ops:
    spec = BY_NAME[name]
    return spec.load(spec)


# --------------------------------------------------------------------------- run and compare


def run(backend, logits, target, experts, K, E, grad_scale=1.0, **opts):
    """(loss, terms, gradient of grad_scale * loss) of one backend (an :class:`Ops`, or
    a name for ``deferredseg_loss``, e.g. "reference") on a leaf that shares the
    logits' memory and strides (views reach the kernels as they are)."""
    x = logits.detach().requires_grad_(True)
    if isinstance(backend, str):
        loss, terms = deferredseg_loss(
            x, target, experts, K, E, backend=backend, return_terms=True, **opts
        )
    else:
        loss, terms = backend.loss(x, target, experts, K, E, True, **opts)
    go = torch.as_tensor(grad_scale, dtype=loss.dtype, device=loss.device)
    (grad,) = torch.autograd.grad(loss, x, grad_outputs=go)
    return loss.detach(), terms, grad


def assert_close_to_max(actual, expected, what, rtol=1e-5, atol_rel=1e-5, atol_abs=1e-7):
    """rtol relative, with an absolute floor of atol_rel times the largest expected
    magnitude plus atol_abs; NaN equals NaN."""
    expected = expected.to(actual.dtype) if actual.dtype != expected.dtype else expected
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    if not math.isfinite(scale):
        scale = 0.0
    torch.testing.assert_close(
        actual,
        expected,
        rtol=rtol,
        atol=atol_rel * scale + atol_abs,
        equal_nan=True,
        msg=lambda m: f"{what}: {m}",
    )


def check_results_to_max(got, want, rtol=1e-5, logits: Optional[torch.Tensor] = None):
    """A backend's (loss, terms, grad) against the reference's by assert_close_to_max:
    each within rtol with an absolute floor of 1e-5 times its largest magnitude, plus
    1e-7 (loss, gradient) or 1e-6 (terms, whose cv2 balance the float32 reference
    computes with a cancellation; 1e-12 in float64). With ``logits``: a gradient of
    contiguous logits is contiguous too."""
    floor = 1e-6 if got[2].dtype != torch.float64 else 1e-12
    assert_close_to_max(got[0], want[0], "loss", rtol=rtol)
    for name in TERMS:
        assert_close_to_max(got[1][name], want[1][name], f"term {name}", rtol=rtol, atol_abs=floor)
    assert_close_to_max(got[2], want[2], "grad", rtol=rtol)
    if logits is not None and logits.is_contiguous():
        assert got[2].stride() == logits.stride()


def check_results(got, want, rtol=1e-5, logits: Optional[torch.Tensor] = None):
    """A backend's (loss, terms, grad) against the reference's, by both rules that the
    backend tests have used (each applies; neither relaxes the other):
    _inputs.assert_results_close (loss and terms within rtol, terms with an absolute
    floor of rtol / 10 times max(1, |loss|), the gradient within rtol of its largest
    magnitude) and check_results_to_max."""
    assert_results_close(got, want, rtol)
    check_results_to_max(got, want, rtol, logits)


def assert_matches(backend, logits, target, experts, K, E, rtol=1e-5, grad_scale=1.0, **opts):
    """Backend vs reference (check_results); returns the backend's results."""
    got = run(backend, logits, target, experts, K, E, grad_scale, **opts)
    want = run("reference", logits, target, experts, K, E, grad_scale, **opts)
    check_results(got, want, rtol, logits)
    return got


def unchecked_loss(backend: Ops, logits, target, experts, opts, return_terms=False):
    """The backend's two ops driven as under torch.compile or on a GPU: labels are not
    range-checked eagerly (a bad target makes the loss NaN)."""
    return fused.fused_loss(
        backend.stats_op,
        backend.loss_op,
        logits,
        target,
        experts,
        opts,
        return_terms,
        check_labels_eagerly=False,
    )


def layouts(K: int, E: int, spatial: Sequence[int], device) -> Dict[str, torch.Tensor]:
    """Logits in every memory layout the kernels must read in place or copy."""
    C = K + E + 2
    H, W = spatial
    base = (torch.randn(3, C + 4, H, W, dtype=torch.float64) * 2).float().to(device)
    return {
        "channel_slice": base[:2, 2 : 2 + C],  # not dense
        "channels_last": base[:2, :C].contiguous(memory_format=torch.channels_last),
        "permuted_batch": base[:2, :C].transpose(0, 1).contiguous().transpose(0, 1),
        # dense, but the spatial dims cannot be flattened as a view
        "transposed_spatial": base[:2, :C].transpose(2, 3).contiguous().transpose(2, 3),
        "strided_pixels": torch.randn(2, C, H, 2 * W, device=device)[..., ::2],
        "batch_stride": torch.randn(4, C, H, W, device=device)[::2],
        "expanded_batch": (torch.randn(1, C, H, W, device=device) * 2).expand(2, C, H, W),
        "channels_last_3d": (torch.randn(2, C, 3, 4, 5, device=device) * 2).to(
            memory_format=torch.channels_last_3d
        ),
    }


LAYOUTS = (
    "channel_slice",
    "channels_last",
    "permuted_batch",
    "transposed_spatial",
    "strided_pixels",
    "batch_stride",
    "expanded_batch",
    "channels_last_3d",
)
