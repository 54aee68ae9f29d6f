"""sync_balance: two gloo ranks on the CPU equal one process on the concatenated batch."""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _inputs import make_inputs

from deferredseg_kernels import available_backends, deferredseg_loss

K, E = 2, 3
WORLD = 2


def _data():
    g = torch.Generator().manual_seed(123)
    return make_inputs(4, K, E, (5, 6), dtype=torch.float64, generator=g)


# Every (backend, balance) pair the test below checks, computed by one pair of ranks: a
# spawned rank costs seconds to start (torch's import), the losses milliseconds.
CASES = [(b, bal) for b in available_backends("loss") if b != "triton" for bal in ("cv2", "band")]


def _case_loss(x, target, experts, backend, balance, **kw):
    return deferredseg_loss(
        x,
        target,
        experts,
        K,
        E,
        backend=backend,
        balance=balance,
        balance_low=[0.1] * (E + 1),
        balance_high=[0.2] * (E + 1),
        lambda_seg=0,
        lambda_collab=0,
        lambda_gate=0,
        lambda_coherence=0,
        lambda_balance=1,
        return_terms=True,
        **kw,
    )


def _worker(rank, init_file, out_dir, cases):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        logits, target, experts = _data()
        sl = slice(2 * rank, 2 * rank + 2)
        for backend, balance in cases:
            x = logits[sl].clone().requires_grad_(True)
            loss, terms = _case_loss(
                x, target[sl], experts[sl], backend, balance, sync_balance=True
            )
            (g,) = torch.autograd.grad(loss, x)
            torch.save(
                {"loss": loss.detach(), "pbar": terms["pbar"], "grad": g},
                os.path.join(out_dir, f"{backend}-{balance}-rank{rank}.pt"),
            )
        dist.barrier()  # both ranks done with the group before either tears it down
    finally:
        dist.destroy_process_group()
    # Results are on disk: skip the interpreter's teardown, where a gloo rank can abort
    # after its work is done (see _ddp_worker in test_cli.py).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """The folder of every case's results from two spawned gloo ranks."""
    out = tmp_path_factory.mktemp("sync_balance")
    mp.spawn(_worker, args=(str(out / "init"), str(out), CASES), nprocs=WORLD, join=True)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("balance", ["cv2", "band"])
@pytest.mark.parametrize("backend", available_backends("loss"))
def test_two_ranks_equal_one_process(backend, balance, request):
    if backend == "triton":
        pytest.skip("the Triton interpreter in spawned CPU ranks is covered by the reference path")
    out = request.getfixturevalue("ranks")  # spawned only when a case runs
    logits, target, experts = _data()
    x = logits.clone().requires_grad_(True)
    loss, terms = _case_loss(x, target, experts, "reference", balance)
    (g,) = torch.autograd.grad(loss, x)
    for rank in range(WORLD):
        got = torch.load(out / f"{backend}-{balance}-rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["loss"], loss.detach().to(got["loss"].dtype))
        torch.testing.assert_close(got["pbar"], terms["pbar"].to(got["pbar"].dtype))
        # DistributedDataParallel averages over ranks, so each rank carries world x its share.
        torch.testing.assert_close(got["grad"] / WORLD, g[2 * rank : 2 * rank + 2])


def test_sync_balance_is_a_no_op_without_a_process_group():
    assert not dist.is_initialized()
    logits, target, experts = _data()
    a = deferredseg_loss(logits, target, experts, K, E, backend="reference", sync_balance=True)
    b = deferredseg_loss(logits, target, experts, K, E, backend="reference")
    assert torch.equal(a, b)
