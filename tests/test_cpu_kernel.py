"""What only the C++ CPU kernels (backend="cpu") have, against the reference.

The checks every backend must pass (option matrix, shapes, labels, low precision,
layouts, NaN, the ops' contract, gradcheck, opcheck, torch.compile) are in
tests/test_conformance.py, which runs them on this backend as ``[cpu-...]``. Here:
the kernel's tiles and neighbour-mask paths and its map window, determinism across
thread counts, the instruction-set variants, the label check of the loss pass, the
streamed and cached gradient buffer, the stats over many tiles, sync_balance over
two processes, and the option codes of the loss op.
"""

import gc
import os
import subprocess
import sys
import textwrap

import _backends
import pytest
import torch
from _backends import float_params, int_params, run
from _inputs import TERMS, make_inputs

from deferredseg_kernels import available_backends, deferredseg_loss, make_options

pytestmark = pytest.mark.skipif(
    "cpu" not in available_backends("loss"), reason="the C++ CPU kernels are not built"
)


def assert_matches(logits, target, experts, K, E, rtol=1e-5, grad_scale=1.0, **opts):
    """The CPU kernels vs the reference (_backends.check_results); returns the kernel's."""
    return _backends.assert_matches(
        _backends.load("cpu"), logits, target, experts, K, E, rtol, grad_scale, **opts
    )


# --------------------------------------------------------------------------- values and gradients


def test_many_tiles_and_options():
    # More pixels than one tile, both coherence maps, 3D, and non-default weights.
    logits, target, experts = make_inputs(2, 3, 3, (6, 17, 21), ignore_frac=0.3)
    assert_matches(
        logits,
        target,
        experts,
        3,
        3,
        grad_scale=-0.7,
        lambda_seg=0.3,
        lambda_collab=1.7,
        lambda_gate=0.9,
        lambda_coherence=0.8,
        lambda_balance=1.3,
        gate_mse=0.2,
        gate_sparsity=0.05,
        paper_eps=1e-4,
        surrogate="paper",
    )
    assert_matches(
        logits,
        target,
        experts,
        3,
        3,
        grad_scale=1.3,
        lambda_collab=0.6,
        lambda_coherence=0.8,
        surrogate="ova",
        gate_target="benefit",
    )


@pytest.mark.parametrize("spatial", [(40, 300), (8, 32, 40)], ids=str)
def test_map_window_slides(spatial):
    # Volumes larger than a thread's map window (about 3 (2 ahead + 1) tiles, ahead =
    # ceil(prod(S[1:]) / 256)), so the window compacts while a thread walks its tiles.
    logits, target, experts = make_inputs(1, 1, 2, spatial, ignore_frac=0.2)
    assert_matches(logits, target, experts, 1, 2, lambda_coherence=1.0)
    assert_matches(
        logits,
        target,
        experts,
        1,
        2,
        lambda_coherence=1.0,
        coherence="l2",
        coherence_maps=("gate",),
    )


@pytest.mark.parametrize(
    "spatial",
    [(20000,), (3, 9000), (5, 3, 700), (2, 130, 64), (2, 40, 300), (2, 10, 1024)],
    ids=str,
)
def test_neighbour_masks_every_path(spatial):
    # The kernel takes a tile's neighbour masks along an axis from a table (period
    # S[d] * st[d] of at most 8192 pixels), as a row of ones or zeros (every pixel of
    # the tile has one coordinate along the axis) or computes them (any other tile):
    # these shapes have axes of each kind, with tiles that cut rows and slabs.
    # coherence="l2": which pairs count shows in its values and gradients just as with
    # "l1", without l1's kink (two neighbours whose D is equal to within a float32 ulp
    # give either sign; on (2, 40, 300) one such pair made the gradient differ).
    logits, target, experts = make_inputs(1, 1, 2, spatial, ignore_frac=0.2)
    assert_matches(logits, target, experts, 1, 2, lambda_coherence=1.0, coherence="l2")
    assert_matches(
        logits,
        target,
        experts,
        1,
        2,
        lambda_coherence=1.0,
        coherence="l2",
        coherence_maps=("gate",),
    )


# --------------------------------------------------------------------------- determinism


def _kernel_run(logits, target, experts, K, E, **opts):
    loss, terms, grad = run(_backends.load("cpu"), logits, target, experts, K, E, **opts)
    return loss, torch.stack([terms[n] for n in TERMS[:-1]]), grad


@pytest.mark.parametrize("spatial", [(64, 80), (8, 32, 40)], ids=str)
def test_deterministic_across_runs_and_threads(spatial):
    # Enough tiles that two threads split them (and, in 3D, the neighbour windows
    # of the coherence term cross the split).
    K, E = 1, 3
    logits, target, experts = make_inputs(2, K, E, spatial)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a = _kernel_run(logits, target, experts, K, E)
        b = _kernel_run(logits, target, experts, K, E)
        torch.set_num_threads(1)
        c = _kernel_run(logits, target, experts, K, E)
    finally:
        torch.set_num_threads(before)
    for u, v, w in zip(a, b, c):
        assert torch.equal(u, v) and torch.equal(u, w)


_ISA_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from _inputs import make_inputs
    from deferredseg_kernels import deferredseg_loss
    torch.manual_seed(0)
    worst = 0.0
    for K, E, S, kw in [(1, 3, (9, 10), dict()), (3, 2, (4, 5, 6), dict(surrogate="paper",
                        coherence="l2", balance="band", balance_low=[0.1] * 3,
                        balance_high=[0.5] * 3)), (1, 1, (33,), dict(surrogate="paper")),
                        (2, 4, (5, 7), dict(coherence_maps=("gate",))), (1, 5, (6, 6), dict()),
                        (3, 3, (6, 7), dict(surrogate="ova", gate_target="benefit")),
                        (1, 2, (5, 9), dict(surrogate="ova", coherence_maps=("router",))),
                        (2, 5, (4, 7), dict(surrogate="ova", gate_target="benefit",
                                            coherence_maps=()))]:
        for dtype in (torch.float32, torch.bfloat16):
            x, t, e = make_inputs(2, K, E, S, dtype=dtype)
            out = []
            for backend in ("cpu", "reference"):
                leaf = x.clone().requires_grad_(True)
                loss = deferredseg_loss(leaf, t, e, K, E, backend=backend, **kw)
                loss.backward()
                out.append((loss.double(), leaf.grad.double()))
            (l1, g1), (l2, g2) = out
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            worst = max(worst, float((l1 - l2).abs() / l2.abs()) / tol,
                        float((g1 - g2).abs().max() / g2.abs().max()) / tol)
    print("WORST", worst)
""")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="x86-64 Linux variants only")
def test_every_instruction_set_variant():
    """The baseline and AVX2 builds of the kernels (picked by DEFERREDSEG_CPU_ISA) match too,
    and so does the generic any-E path (DEFERREDSEG_CPU_GENERIC=1) that E <= 4 skips."""
    tests = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(tests)
    script = _ISA_SCRIPT.format(tests=tests)
    procs = {}
    variants = {
        "base": dict(DEFERREDSEG_CPU_ISA="base"),
        "v3": dict(DEFERREDSEG_CPU_ISA="v3"),
        "generic": dict(DEFERREDSEG_CPU_GENERIC="1"),
    }
    for isa, extra in variants.items():
        env = dict(
            os.environ,
            OMP_NUM_THREADS="1",
            **extra,
            PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
        )
        procs[isa] = subprocess.Popen(
            [sys.executable, "-c", script],
            env=env,
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    for isa, p in procs.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, f"{isa}: {err[-2000:]}"
        worst = float(out.split("WORST")[1])
        assert worst <= 1.0, f"{isa}: error {worst} x tolerance"


# --------------------------------------------------------------------------- labels, buffers, stats


def test_loss_op_checks_expert_labels_when_asked():
    # iparams[5] = 1: the loss pass (which reads the expert labels anyway) raises on one
    # out of range; without it (torch.compile, direct calls) it computes as before.
    K, E = 2, 3
    logits, target, experts = make_inputs(1, K, E, (5, 6))
    opts = make_options(K, E)
    stats = torch.ops.deferredseg.loss_stats(logits, target, experts, None, K, E, -100, False)
    stats = torch.cat([stats, stats[E + 1 : E + 2]])
    args = (logits, target, experts, None, stats, None, None, K, E, -100, float_params(opts, 1.0))
    bad = experts.clone()
    bad[0, 2, 4, 5] = 2  # K' = 2 labels
    with pytest.raises(ValueError, match=r"expert_labels must hold labels in \[0, 2\)"):
        torch.ops.deferredseg.loss_fused(*args[:2], bad, *args[3:], int_params(opts) + [1], True)
    terms, grad = torch.ops.deferredseg.loss_fused(
        *args[:2], bad, *args[3:], int_params(opts), True
    )
    assert torch.isfinite(terms).all() and torch.isfinite(grad).all()
    torch.ops.deferredseg.loss_fused(*args, int_params(opts) + [1], True)  # good labels pass
    with pytest.raises(RuntimeError, match="iparams must have 5 or 6 values"):
        torch.ops.deferredseg.loss_fused(*args, int_params(opts) + [1, 0], True)
    # Through the public call the message names the values, as the reference's does.
    with pytest.raises(ValueError, match=r"expert_labels .* got value\(s\) \[2\]"):
        deferredseg_loss(logits, target, bad, K, E, backend="cpu")


def test_large_gradient_streamed():
    # A gradient of >= 4 MiB is written with non-temporal stores; odd sizes make the
    # rows start unaligned, so the aligned body and both unaligned ends are used.
    K, E = 1, 3
    logits, target, experts = make_inputs(1, K, E, (509, 419))
    assert logits.numel() * 4 >= 4 << 20
    assert_matches(logits, target, experts, K, E, grad_scale=0.7)


def test_gradient_buffer_reused_only_when_free():
    # Large gradients come from one cached buffer, reused only when nothing of the
    # caller's still refers to its storage (a tensor, a view or the storage itself).
    from deferredseg_kernels import empty_cache

    K, E = 1, 3
    logits, target, experts = make_inputs(1, K, E, (430, 430))
    assert logits.numel() * 4 >= 4 << 20
    empty_cache()

    def grad_of(x):
        leaf = x.detach().clone().requires_grad_(True)
        deferredseg_loss(leaf, target, experts, K, E, backend="cpu").backward()
        return leaf.grad

    expected = grad_of(logits).clone()
    for kind in ("tensor", "view", "storage"):
        g1 = grad_of(logits)
        ptr = g1.data_ptr()
        if kind == "tensor":
            held = g1
        elif kind == "view":
            held = g1[0, 2]
        else:
            held = g1.untyped_storage()
        del g1
        gc.collect()
        g2 = grad_of(logits * 0.5)  # must not be written into what is held
        assert g2.data_ptr() != ptr, kind
        if kind == "storage":
            held = torch.empty(0).set_(held).view(expected.shape)
        assert torch.equal(held, expected[0, 2] if kind == "view" else expected), kind
        last = g2.data_ptr()
        del g2, held
        gc.collect()
        g3 = grad_of(logits)  # nothing holds the cached buffer: reused
        assert g3.data_ptr() == last, kind
        torch.testing.assert_close(g3, expected, rtol=0, atol=0)
        del g3
    assert empty_cache() == logits.numel() * 4
    assert empty_cache() == 0


@pytest.mark.parametrize("spatial", [(1000,), (37, 29), (9, 70, 13), (5, 3, 300)], ids=str)
@pytest.mark.parametrize("E", [3, 6])  # the unrolled path (rows read in place) and the generic one
def test_stats_over_many_tiles(spatial, E):
    """Sums and neighbour pairs of the stats op over tiles that cut rows and slabs."""
    K = 1
    logits, target, experts = make_inputs(2, K, E, spatial)
    stats = torch.ops.deferredseg.loss_stats(logits, target, experts, None, K, E, -100, False)
    valid = target != -100
    pi = torch.softmax(logits[:, K : K + E + 1].double(), 1)
    valid_c = valid.unsqueeze(1)
    torch.testing.assert_close(
        stats[: E + 1], (pi * valid_c).sum([0] + list(range(2, pi.dim()))), rtol=1e-5, atol=1e-5
    )
    assert stats[E + 1].item() == valid.sum().item() == stats[E + 2].item()
    pairs = []
    for d in range(3):
        if d < len(spatial):
            a = valid.narrow(d + 1, 1, spatial[d] - 1)
            b = valid.narrow(d + 1, 0, spatial[d] - 1)
            pairs.append(float((a & b).sum()))
        else:
            pairs.append(0.0)
    assert stats[E + 3 : E + 6].tolist() == pairs
    assert stats[E + 6].item() == 0


_SYNC_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    sys.path.insert(0, {tests!r})
    from _inputs import make_inputs
    from deferredseg_kernels import deferredseg_loss
    rank = int(sys.argv[1])
    dist.init_process_group("gloo", init_method="file://" + {store!r}, rank=rank, world_size=2)
    torch.manual_seed(0)
    K, E = 2, 3
    x, t, e = make_inputs(4, K, E, (5, 6), ignore_frac=0.3)
    # Unequal shares of valid pixels, so that per-rank and global counts differ.
    t[0] = -100
    sl = slice(2 * rank, 2 * rank + 2)
    worst = 0.0
    for kw in (dict(), dict(balance="band", balance_low=[0.2] * 4, balance_high=[0.3] * 4)):
        out = []
        for backend in ("cpu", "reference"):
            leaf = x[sl].clone().requires_grad_(True)
            loss, terms = deferredseg_loss(leaf, t[sl], e[sl], K, E, backend=backend,
                                           sync_balance=True, lambda_balance=2.0,
                                           return_terms=True, **kw)
            loss.backward()
            out.append((loss.detach().double(), terms["pbar"].double(), leaf.grad.double()))
        (l1, p1, g1), (l2, p2, g2) = out
        worst = max(worst, float((l1 - l2).abs() / l2.abs()), float((p1 - p2).abs().max()),
                    float((g1 - g2).abs().max() / g2.abs().max()))
    print("WORST", worst)
    dist.barrier()  # both ranks done with the group before either tears it down
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_sync_balance_two_processes(tmp_path):
    """sync_balance over a real 2-rank gloo group: the kernel matches the reference on every
    rank."""
    tests = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(tests)
    script = _SYNC_SCRIPT.format(tests=tests, store=str(tmp_path / "store"))
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(r)],
            env=env,
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    for r, p in enumerate(procs):
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, f"rank {r}: {err[-2000:]}"
        assert float(out.split("WORST")[1]) < 1e-5, f"rank {r}: {out}"


# --------------------------------------------------------------------------- the op's contract


def test_loss_op_rejects_unknown_option_codes():
    K, E = 2, 3
    logits, target, experts = make_inputs(1, K, E, (4, 5))
    opts = make_options(K, E)
    stats = torch.ops.deferredseg.loss_stats(logits, target, experts, None, K, E, -100, False)
    args = (logits, target, experts, None, stats, None, None, K, E, -100, float_params(opts, 1.0))
    ip = int_params(opts)
    for index, code, words in ((0, 3, "surrogate code 3"), (4, 2, "gate_target code 2")):
        bad = list(ip)
        bad[index] = code
        with pytest.raises(RuntimeError, match=words):
            torch.ops.deferredseg.loss_fused(*args, bad, True)


def test_loss_op_names_an_unknown_option_code():
    """The C++ op decodes iparams by contract.h and names the field of a bad code."""
    from deferredseg_kernels import contract

    K, E = 2, 3
    logits, target, experts = make_inputs(1, K, E, (5, 6))
    opts = make_options(K, E)
    stats = torch.ops.deferredseg.loss_stats(logits, target, experts, None, K, E, -100, False)
    args = (logits, target, experts, None, stats, None, None, K, E, -100, float_params(opts, 1.0))
    for field, code in (("surrogate", 3), ("coherence_maps", 4), ("gate_target", -1)):
        ip = int_params(opts)
        at = next(f.index for f in contract.INT_FIELDS if f.name == field)
        ip[at] = code
        with pytest.raises(RuntimeError, match=rf"iparams\[{at}\] holds an unknown {field} code"):
            torch.ops.deferredseg.loss_fused(*args, ip, False)
    with pytest.raises(RuntimeError, match="fparams must have 9 values, got 8"):
        torch.ops.deferredseg.loss_fused(*args[:-1], args[-1][:-1], int_params(opts), False)


def test_opcheck_with_the_cached_gradient_buffer():
    # A gradient of >= 4 MiB comes from the kernel's reused buffer; the op's contract
    # (schema, fake kernel, autograd, repeated calls under AOT dispatch) still holds.
    K, E = 1, 3
    logits, target, experts = make_inputs(1, K, E, (430, 430))
    opts = make_options(K, E)
    stats = torch.ops.deferredseg.loss_stats(logits, target, experts, None, K, E, -100, False)
    x = logits.clone().requires_grad_(True)
    torch.library.opcheck(
        torch.ops.deferredseg.loss_fused.default,
        (
            x,
            target,
            experts,
            None,
            torch.cat([stats, stats[E + 1 : E + 2]]),
            None,
            None,
            K,
            E,
            -100,
            float_params(opts, 1.0),
            int_params(opts),
            True,
        ),
    )
