"""Smoke test of an installed deferredseg, run from outside the source tree.

Checks what a user gets from `pip install --no-build-isolation .`: both import
packages, the compiled extension, and one loss + route call per backend.
"""

import argparse
import importlib.metadata
import os
import sys

import torch

p = argparse.ArgumentParser()
p.add_argument("--expect-backend", action="append", default=[])
p.add_argument("--no-cuda", action="store_true", help="the build must not contain CUDA kernels")
p.add_argument(
    "--expect-abi3",
    action="store_true",
    help="the extension must be the limited-API build (_C.abi3.so)",
)
args = p.parse_args()

import deferredseg  # noqa: E402
import deferredseg_kernels as dk  # noqa: E402
from deferredseg.losses import DeferredSegLoss  # noqa: E402

here = os.path.dirname(os.path.abspath(dk.__file__))
assert "site-packages" in here, f"imported from the source tree, not the install: {here}"
print(
    f"deferredseg {deferredseg.__version__} from {here}; torch {torch.__version__}; "
    f"backends {dk.available_backends()}"
)
installed = importlib.metadata.version("deferredseg")
assert deferredseg.__version__ == dk.__version__ == installed, (
    f"versions differ: deferredseg {deferredseg.__version__}, deferredseg_kernels "
    f"{dk.__version__}, installed distribution {installed}"
)
if args.expect_abi3:
    import deferredseg_kernels._C as ext

    assert ext.__file__.endswith(".abi3.so"), f"not the limited-API build: {ext.__file__}"
    print(f"extension {os.path.basename(ext.__file__)}")
for name in args.expect_backend:
    assert name in dk.available_backends(), f"backend {name!r} missing: {dk.available_backends()}"
if args.no_cuda:
    from deferredseg_kernels._ext import has_cuda_kernels

    assert not has_cuda_kernels(), "a CPU-only torch build must not report CUDA kernels"

K, E = 1, 3
x = torch.randn(2, K + E + 2, 16, 16, requires_grad=True)
y = torch.randint(0, 2, (2, 16, 16))
m = torch.randint(0, 2, (2, E, 16, 16))
ref = DeferredSegLoss(K, E, backend="reference")(x, y, m)
for backend in dk.available_backends("loss"):
    val = DeferredSegLoss(K, E, backend=backend)(x, y, m)
    val.backward()
    assert torch.allclose(val, ref, rtol=1e-5), (backend, val.item(), ref.item())
for backend in dk.available_backends("route"):
    out = dk.route(x, K, E, expert_labels=m, backend=backend)
    assert torch.equal(
        out.assignment, dk.route(x, K, E, expert_labels=m, backend="reference").assignment
    )
from deferredseg.review.server import STATIC  # noqa: E402

for page in ("review.html", "review.js", "overview.html", "overview.js", "style.css"):
    assert (STATIC / page).is_file(), (
        f"the review page {page} is missing from the install: {STATIC}"
    )
print("installed package OK")
sys.exit(0)
