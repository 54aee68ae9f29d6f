"""What the Triton kernels of ``triton_loss`` and ``triton_route`` share.

- per-pixel helpers written once (``@triton.jit`` functions inlined into each kernel):
  loading a block of channels, the router softmax and deferral mass D, the gate
  sigmoid, a stable softplus, an argmax with ``torch.argmax``'s rules, rounding to
  bfloat16;
- how an op is registered: ``torch.library.triton_op`` + ``wrap_triton`` when the
  kernels are compiled (GPU), so ``torch.compile`` sees and schedules the kernels;
  ``torch.library.custom_op`` with an explicit fake kernel when Triton runs in
  interpreter mode (``TRITON_INTERPRET=1``, CPU tensors in CI). ``triton_op``'s
  fake kernel *is* the Python launcher, which cannot run on fake tensors when the
  kernels are interpreted (they read real memory), and ``wrap_triton`` leaves an
  interpreted kernel unwrapped; an opaque custom op runs exactly the same
  kernels and still traces under ``torch.compile(fullgraph=True)``;
- block-size heuristics: big blocks in interpreter mode (each program costs
  milliseconds there), register-sized blocks on a GPU.

Conventions of every kernel here: ``tl.program_id`` is cast to int64 before any
offset is computed, every load is converted to the accumulation type (float32, or
float64 for float64 logits) before arithmetic, features are ``tl.constexpr``
switches, and every load is masked (an out-of-bounds unmasked load would corrupt
the heap in interpreter mode and fault on a GPU).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..types import compute_dtype as acc_dtype  # noqa: F401  (the kernels' accumulation dtype)


@triton.jit
def _probe_kernel(x_ptr):  # only used to learn whether @triton.jit interprets
    tl.store(x_ptr, tl.load(x_ptr))


def _interpreted(kernel) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - layout of older/newer triton
        return type(kernel).__name__ == "InterpretedFunction"
    return isinstance(kernel, InterpretedFunction)


# Decided once, when this module is imported: @triton.jit reads TRITON_INTERPRET
# at decoration time, so every kernel of the package is interpreted or none is.
INTERPRET: bool = _interpreted(_probe_kernel)


def launcher(kernel):
    """``kernel`` ready for ``[grid](...)`` inside an op body (see module docstring)."""
    if INTERPRET:
        return kernel
    return torch.library.wrap_triton(kernel)


def define_op(name: str, schema: str, fn: Callable, fake: Callable):
    """Register ``fn`` (which launches Triton kernels) as the PyTorch op ``name``.

    The op's schema is the one torch infers from ``fn``'s annotations, on every torch:
    ``torch.library.triton_op`` of some versions (2.11 among them) accepts ``schema=``
    but ignores it and infers the schema instead. ``schema`` is that inferred schema
    written out (ints are SymInt, results unnamed); it is checked here, so annotations
    that drift from it fail at import on every torch, not only on the ones that infer.
    Older torch (2.6) evaluates string annotations in its own namespace, which knows
    ``torch``, ``Optional``, ``Sequence``, ``List`` and ``Union`` only: results are
    annotated with the builtin ``tuple``.
    """
    inferred = torch.library.infer_schema(fn, mutates_args=())
    if inferred != schema:
        raise TypeError(
            f"op {name}: the annotations of {fn.__qualname__} give the schema "
            f"{inferred}, not the declared {schema}"
        )
    if INTERPRET:
        op = torch.library.custom_op(name, fn, mutates_args=(), schema=schema)
        op.register_fake(fake)
    else:
        # The launcher itself serves as the fake kernel: it only allocates and
        # launches through wrap_triton, which traces on fake tensors.
        op = torch.library.triton_op(name, fn, mutates_args=(), schema=schema)
    return op


def next_pow2(n: int) -> int:
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def pixel_block(num_pixels: int, widest: int) -> Tuple[int, int]:
    """(BLOCK_P, num_warps): pixels per program for tiles of ``widest`` channels."""
    if INTERPRET:
        # numpy evaluates a whole block per op; the per-op overhead dominates.
        return max(16, min(next_pow2(num_pixels), 4096)), 4
    # 256 pixels (fewer for wide channel tiles) over 8 warps: about one pixel per
    # thread; ptxas (sm_90) reports 70-140 registers and no spills for K <= 32, E <= 16.
    block = max(32, min(256, 4096 // max(widest, 1)))
    return block, 8


def can_merge(t: torch.Tensor, start: int) -> bool:
    """Whether dims ``start:`` of ``t`` can be merged into one strided dim (a view)."""
    expected: Optional[int] = None
    for size, stride in zip(reversed(t.shape[start:]), reversed(t.stride()[start:])):
        if size == 1:
            continue
        if expected is not None and stride != expected:
            return False
        expected = stride * size
    return True


def flat(t: torch.Tensor, lead: int) -> torch.Tensor:
    """``t`` viewed as (*t.shape[:lead], prod(rest)): a view when the strides allow, else a copy."""
    rest = 1
    for s in t.shape[lead:]:
        rest = rest * s
    return t.reshape(tuple(t.shape[:lead]) + (rest,))


# ----------------------------------------------------------------------------------
# Per-pixel helpers (inlined into the kernels)
# ----------------------------------------------------------------------------------


@triton.jit
def to_acc(x, IS_FP64: tl.constexpr):
    """Convert a loaded block to the accumulation type (never compute in bf16/fp16)."""
    if IS_FP64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def load_channels(row_ptr, ch0, ch, n_ch, off_p, pix_mask, stride_c, IS_FP64: tl.constexpr):
    """Channels ``ch0 + ch`` (``ch`` an int64 arange, the first ``n_ch`` real) of the
    pixels at element offsets ``off_p`` as a [len(ch), BLOCK] block, 0 where masked."""
    cmask = ch < n_ch
    ptrs = row_ptr + (ch0 + ch)[:, None] * stride_c + off_p[None, :]
    v = tl.load(ptrs, mask=cmask[:, None] & pix_mask[None, :], other=0.0)
    return to_acc(v, IS_FP64)


@triton.jit
def argmax_first(x, ch, cmask, CP: tl.constexpr):
    """Per column, the index of the maximum over the rows where ``cmask``, with
    ``torch.argmax``'s rules: the first NaN if there is one, else the first maximum."""
    isnan = (x != x) & cmask[:, None]
    nan_idx = tl.min(tl.where(isnan, ch[:, None], CP), axis=0)
    xv = tl.where(cmask[:, None] & (x == x), x, float("-inf"))
    mx = tl.max(xv, axis=0)
    max_idx = tl.min(tl.where(cmask[:, None] & (xv == mx[None, :]), ch[:, None], CP), axis=0)
    return tl.where(nan_idx < CP, nan_idx, max_idx)


@triton.jit
def router_softmax(r, kr, E: tl.constexpr):
    """Router block r [RP, BLOCK] (rows >= E + 1 are padding) -> (shifted, exps, total, D).

    ``shifted = r - max`` (-inf on padding), ``exps = exp(shifted)``, ``total`` their sum
    and ``D = sum_{j<E} exps_j / total``, the soft deferral mass. Every kernel computes
    D of any pixel with this one function, so a pixel's D and the D its neighbour
    recomputes for it are the same bits.
    """
    rm = tl.where((kr < E + 1)[:, None], r, float("-inf"))
    mx = tl.max(rm, axis=0)
    shifted = rm - mx[None, :]
    ex = tl.exp(shifted)
    total = tl.sum(ex, axis=0)
    experts = tl.sum(tl.where((kr < E)[:, None], ex, 0.0), axis=0)
    return shifted, ex, total, experts / total


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def softplus(x):
    """log(1 + exp(x)) without overflow; log1p by its series where exp(-|x|) is tiny."""
    t = tl.exp(-tl.abs(x))
    log1p_t = tl.where(t < 1e-4, t * (1.0 - t * (0.5 - t * (1.0 / 3.0))), tl.log(1.0 + t))
    return tl.maximum(x, 0.0) + log1p_t


@triton.jit
def to_bf16_rtne(x):
    """float32 -> bfloat16 rounded to nearest even, with integer ops.

    The interpreter's own float32 -> bfloat16 cast truncates; this gives the same
    bits as a GPU's ``cvt.rn.bf16.f32`` (and torch) everywhere. NaN stays NaN.
    """
    bits = x.to(tl.uint32, bitcast=True)
    lsb = (bits >> 16) & 1
    rounded = ((bits + 0x7FFF + lsb) >> 16).to(tl.uint16)
    rounded = tl.where(x != x, 0x7FC0, rounded).to(tl.uint16)
    return rounded.to(tl.bfloat16, bitcast=True)


@triton.jit
def store_as(ptrs, value, mask, BF16_BY_HAND: tl.constexpr):
    """Store ``value`` (accumulation type) into ``ptrs``, converting to their dtype."""
    if BF16_BY_HAND:
        tl.store(ptrs, to_bf16_rtne(value.to(tl.float32)), mask=mask)
    else:
        tl.store(ptrs, value.to(ptrs.dtype.element_ty), mask=mask)
