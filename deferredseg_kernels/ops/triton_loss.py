"""The Triton backend of the DeferredSeg objective (docs/objective.md section 3): its two ops.

The two ops implement the contract of :mod:`deferredseg_kernels.ops.fused` (read it
first: the layout of ``stats``, ``fparams``, ``iparams`` and ``terms``). The launcher
names ``fparams`` / ``iparams`` by :func:`deferredseg_kernels.contract.decode` and passes
them on by those names, so a new option reaches the kernels without an edit here:

``deferredseg_triton::loss_stats``
    ``_stats_kernel``: one program per block of pixels of one image reads the
    routing channels and the labels and writes its partial sums (sum of pi_k over
    valid pixels, N_V, the class-weight mass W, valid neighbour pairs per axis,
    out-of-range labels) to its own slot of a buffer; ``_chunk_sum_kernel`` (many
    programs, each a fixed run of slots) and ``_reduce_kernel`` (one program) then
    add the slots in a fixed order in float64. No atomics: the same inputs give the
    same bits.

``deferredseg_triton::loss_fused``
    ``_loss_kernel``: one pass computing every term of docs/objective.md section 3 per pixel and,
    when ``COMPUTE_GRAD``, the gradient of the total loss with respect to every
    packed channel, written once per pixel into its own buffer (in the logits'
    memory format). Spatial coherence pairs a pixel with its neighbours: the
    gradient is computed in *gather* form, each pixel recomputing the deferral
    mass D and gate probability s of its (up to 6) neighbours from their logits, so
    no pixel is written by two programs and no halo exchange is needed. The
    normalisers (1/N_V, 1/W, 1/pairs) and the balance gradient come from ``stats``
    and are recomputed by every program (a few scalar operations). Per-program
    partial sums of the terms are reduced in a fixed order by ``_chunk_sum_kernel``
    and ``_finalize_kernel``, which also forms ``terms``.

Spatial shapes of 1 to 3 dims are flattened to P pixels (``(B, C, P)`` views when
the strides allow, one contiguous copy otherwise); the kernels get the strides, so
channel slices and channels-last inputs are read in place. All index arithmetic
is int64. Accumulation is float32 (float64 for float64 logits).

The kernels themselves (device code) are in :mod:`deferredseg_kernels.ops.triton_loss_kernels`;
this module holds the host side: flattened views, launches and the op registration.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import triton

from .. import contract
from ..types import LOGITS_DTYPES
from . import fused
from .triton_common import (
    INTERPRET,
    acc_dtype,
    can_merge,
    define_op,
    flat,
    launcher,
    next_pow2,
    pixel_block,
)
from .triton_loss_kernels import (
    N_PART,
    _chunk_sum_kernel,
    _finalize_kernel,
    _loss_kernel,
    _reduce_kernel,
    _stats_kernel,
)

STATS_OP = "deferredseg_triton::loss_stats"
LOSS_OP = "deferredseg_triton::loss_fused"
_REDUCE_ROWS = 4096  # elements of a reduction tile
_CHUNK_ITERS = 16  # tiles per program of the first reduction level


# ----------------------------------------------------------------------------------
# Launchers (the bodies of the ops)
# ----------------------------------------------------------------------------------


def _check_dtype(logits: torch.Tensor) -> None:
    if logits.dtype not in LOGITS_DTYPES:
        raise TypeError(
            "deferredseg triton kernels: logits must be float32, bfloat16, float16 "
            f"or float64, got dtype {logits.dtype}"
        )


class _Problem:
    """Flattened views and launch geometry shared by the two loss ops."""

    def __init__(self, logits, target, expert_labels, num_classes, num_experts):
        _check_dtype(logits)
        K, E = int(num_classes), int(num_experts)
        if logits.dim() < 3 or logits.dim() > 5 or logits.shape[1] != K + E + 2:
            raise ValueError(
                f"logits must have shape (B, {K + E + 2}, *S) with 1 to 3 spatial "
                f"dims, got shape {tuple(logits.shape)}"
            )
        self.K, self.E = K, E
        self.B = logits.shape[0]
        self.spatial = tuple(logits.shape[2:])
        self.ndim = len(self.spatial)
        self.S = self.spatial + (1,) * (3 - self.ndim)
        self.x = flat(logits, 2)
        self.P = self.x.shape[2]
        self.t = flat(target.reshape((self.B,) + self.spatial), 1)
        self.lab = flat(expert_labels, 2)
        self.nlab = max(K, 2)
        self.KP = next_pow2(max(K, 2))
        self.RP = next_pow2(E + 1)
        self.block, self.warps = pixel_block(self.P, max(self.KP, self.RP))
        self.n_tiles = triton.cdiv(self.P, self.block) if self.P > 0 else 0
        self.n_prog = self.B * self.n_tiles
        self.is_fp64 = logits.dtype == torch.float64

    def tile_args(self, ignore_index: int) -> tuple:
        """The arguments both loss kernels take after their pointers, in their order: the
        geometry, ``ignore_index``, and the strides of the logits, target and labels."""
        geometry = (self.P, *self.S, self.n_tiles, self.n_prog, self.nlab, ignore_index)
        return geometry + self.x.stride() + self.t.stride() + self.lab.stride()


def _reduce_block(ncols_pow2: int) -> int:
    return max(16, _REDUCE_ROWS // ncols_pow2)


def _chunk_sums(part: torch.Tensor, n_rows: int) -> torch.Tensor:
    """[n_cols, n_rows] partial sums -> [n_cols, n_chunks] float64 chunk sums (level 1)."""
    n_cols = part.shape[0]
    ncp = next_pow2(n_cols)
    block = _reduce_block(ncp)
    rows_per_chunk = block * _CHUNK_ITERS
    n_chunks = max(1, triton.cdiv(n_rows, rows_per_chunk))
    out = torch.empty((n_cols, n_chunks), dtype=torch.float64, device=part.device)
    launcher(_chunk_sum_kernel)[(n_chunks,)](
        part, out, n_rows, n_chunks, n_cols, NCP=ncp, BLOCK_R=block, ITERS=_CHUNK_ITERS, num_warps=4
    )
    return out


def _loss_stats_impl(
    logits: torch.Tensor,
    target: torch.Tensor,
    expert_labels: torch.Tensor,
    class_weight: Optional[torch.Tensor],
    num_classes: int,
    num_experts: int,
    ignore_index: int,
    check_expert_labels: bool,
) -> torch.Tensor:
    pb = _Problem(logits, target, expert_labels, num_classes, num_experts)
    ncols = fused.stats_len(pb.E)
    part = torch.empty(
        (ncols, max(pb.n_prog, 1)), dtype=acc_dtype(logits.dtype), device=logits.device
    )
    if pb.n_prog > 0:
        launcher(_stats_kernel)[(pb.n_prog,)](
            pb.x,
            pb.t,
            pb.lab,
            class_weight if class_weight is not None else pb.x,
            part,
            *pb.tile_args(ignore_index),
            K=pb.K,
            E=pb.E,
            RP=pb.RP,
            NDIM=pb.ndim,
            HAS_WEIGHT=class_weight is not None,
            CHECK_EXPERTS=bool(check_expert_labels),
            IS_FP64=pb.is_fp64,
            BLOCK_P=pb.block,
            num_warps=pb.warps,
        )
    chunks = _chunk_sums(part, pb.n_prog)
    stats = torch.empty((ncols,), dtype=torch.float64, device=logits.device)
    ncp = next_pow2(ncols)
    launcher(_reduce_kernel)[(1,)](
        chunks, stats, chunks.shape[1], ncols, NCP=ncp, BLOCK_R=_reduce_block(ncp), num_warps=4
    )
    return stats


def _loss_fused_impl(
    logits: torch.Tensor,
    target: torch.Tensor,
    expert_labels: torch.Tensor,
    class_weight: Optional[torch.Tensor],
    stats: torch.Tensor,
    balance_low: Optional[torch.Tensor],
    balance_high: Optional[torch.Tensor],
    num_classes: int,
    num_experts: int,
    ignore_index: int,
    fparams: Sequence[float],
    iparams: Sequence[int],
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    pb = _Problem(logits, target, expert_labels, num_classes, num_experts)
    # The options by the names of contract.py: the kernels take the floats by those names
    # and the ints, upper-cased, as compile-time codes (they decode them themselves).
    options = contract.decode(fparams, iparams)
    if options.check_experts or len(iparams) != len(contract.INT_FIELDS):
        raise ValueError(
            f"iparams must have {len(contract.INT_FIELDS)} values {fused.IPARAMS}, got "
            f"{list(iparams)} (checking expert labels in the loss pass is a "
            "C++ CPU kernel option)"
        )
    floats = options.floats
    codes = {name.upper(): code for name, code in options.ints.items()}
    band = options.ints["balance"] == contract.CODES["balance"]["band"]
    if band and (balance_low is None or balance_high is None):
        raise ValueError("balance='band' needs balance_low and balance_high")
    E = pb.E
    if (
        stats.dim() != 1
        or stats.numel() not in (fused.stats_len(E), fused.stats_len(E) + 1)
        or stats.dtype != torch.float64
    ):
        raise ValueError(
            f"stats must be a float64 vector of {fused.stats_len(E) + 1} values "
            f"(or {fused.stats_len(E)}), got {stats.dtype} of shape {tuple(stats.shape)}"
        )
    if stats.numel() == fused.stats_len(E):  # no N_B entry: pbar over this call's N_V
        at_count = fused.stat_count(E)
        stats = torch.cat([stats, stats[at_count : at_count + 1]])
    cdt = acc_dtype(logits.dtype)
    dummy = stats
    low = balance_low if balance_low is not None else dummy
    high = balance_high if balance_high is not None else dummy

    if compute_grad:
        grad = fused.grad_buffer(logits)
        direct = can_merge(grad, 2)
        gflat = (
            grad.view(pb.x.shape)
            if direct
            else torch.empty(pb.x.shape, dtype=logits.dtype, device=logits.device)
        )
    else:
        grad = logits.new_empty((0,))
        gflat = pb.x  # never written: COMPUTE_GRAD is a constexpr False
    part = torch.empty((N_PART, max(pb.n_prog, 1)), dtype=cdt, device=logits.device)
    if pb.n_prog > 0:
        launcher(_loss_kernel)[(pb.n_prog,)](
            pb.x,
            pb.t,
            pb.lab,
            class_weight if class_weight is not None else dummy,
            stats,
            low,
            high,
            gflat,
            part,
            *pb.tile_args(ignore_index),
            gflat.stride(0),
            gflat.stride(1),
            gflat.stride(2),
            **floats,
            K=pb.K,
            E=pb.E,
            KP=pb.KP,
            RP=pb.RP,
            NDIM=pb.ndim,
            HAS_WEIGHT=class_weight is not None,
            **codes,
            COMPUTE_GRAD=bool(compute_grad),
            IS_FP64=pb.is_fp64,
            BF16_BY_HAND=INTERPRET and logits.dtype == torch.bfloat16,
            BLOCK_P=pb.block,
            num_warps=pb.warps,
        )
    if compute_grad and not direct:
        grad.copy_(gflat.view(grad.shape))
    chunks = _chunk_sums(part, pb.n_prog)
    terms = torch.empty((fused.TERMS_LEN,), dtype=cdt, device=logits.device)
    launcher(_finalize_kernel)[(1,)](
        chunks,
        stats,
        low,
        high,
        terms,
        chunks.shape[1],
        **{name: v for name, v in floats.items() if name.startswith("lambda_")},
        E=pb.E,
        RP=pb.RP,
        BALANCE=codes["BALANCE"],
        BLOCK_R=_reduce_block(16),
        num_warps=4,
    )
    return terms, grad


# The schemas torch infers from the annotations of the two functions above (see
# define_op): ints are SymInt, results are unnamed.
_STATS_SCHEMA = (
    "(Tensor logits, Tensor target, Tensor expert_labels, Tensor? class_weight, "
    "SymInt num_classes, SymInt num_experts, SymInt ignore_index, "
    "bool check_expert_labels) -> Tensor"
)
_LOSS_SCHEMA = (
    "(Tensor logits, Tensor target, Tensor expert_labels, Tensor? class_weight, "
    "Tensor stats, Tensor? balance_low, Tensor? balance_high, SymInt num_classes, "
    "SymInt num_experts, SymInt ignore_index, float[] fparams, SymInt[] iparams, "
    "bool compute_grad) -> (Tensor, Tensor)"
)

loss_stats = define_op(STATS_OP, _STATS_SCHEMA, _loss_stats_impl, fused.fake_stats)
loss_fused = define_op(LOSS_OP, _LOSS_SCHEMA, _loss_fused_impl, fused.fake_loss)
fused.register_loss_autograd(LOSS_OP)


def loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    expert_labels: torch.Tensor,
    opts,
    return_terms: bool,
):
    """The ``"triton"`` backend of :func:`deferredseg_kernels.deferredseg_loss`."""
    _check_dtype(logits)
    return fused.fused_loss(
        loss_stats,
        loss_fused,
        logits,
        target,
        expert_labels,
        opts,
        return_terms,
        check_labels_eagerly=(logits.device.type == "cpu"),
    )


__all__: List[str] = ["loss", "loss_stats", "loss_fused", "STATS_OP", "LOSS_OP"]
