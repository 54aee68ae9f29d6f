"""The package imports as a user with a CUDA build of torch gets it: Triton compiles
its kernels (no TRITON_INTERPRET), so the ops register through torch.library.triton_op.

Usage: python .ci/import_check.py [--expect-ext]   (checks the tree the script is in)
Exits non-zero, naming what failed, when the import or a registration fails.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the tree

p = argparse.ArgumentParser()
p.add_argument("--expect-ext", action="store_true", help="the compiled extension must load")
args = p.parse_args()

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("import_check: TRITON_INTERPRET is set; this check is about the compiled path")

import torch  # noqa: E402

try:
    import triton  # noqa: E402
except ImportError as exc:
    sys.exit(f"import_check: triton does not import ({exc}); this check needs it")

import deferredseg_kernels as dk  # noqa: E402  (registers every op, or raises)
from deferredseg_kernels.ops import triton_support  # noqa: E402

print(
    f"torch {torch.__version__}, triton {triton.__version__}, deferredseg_kernels "
    f"{dk.__version__} from {os.path.dirname(dk.__file__)}"
)
reason = triton_support.why_unavailable()
if reason is not None:
    sys.exit(f"import_check: the Triton backend is unavailable: {reason}")

from deferredseg_kernels.ops import triton_common, triton_loss, triton_route  # noqa: E402

if triton_common.INTERPRET:
    sys.exit("import_check: the kernels are interpreted; expected compiled kernels")
declared = {
    "loss_stats": triton_loss._STATS_SCHEMA,
    "loss_fused": triton_loss._LOSS_SCHEMA,
    "route": triton_route._ROUTE_SCHEMA,
}
for name, schema in declared.items():
    registered = str(getattr(torch.ops.deferredseg_triton, name).default._schema)
    expected = f"deferredseg_triton::{name}{schema}"
    if registered != expected:
        sys.exit(
            f"import_check: deferredseg_triton::{name} is registered as {registered}, "
            f"expected {expected}"
        )
    print(f"  {registered}")
if args.expect_ext:
    from deferredseg_kernels._ext import EXT, EXT_MISSING_REASON

    if EXT is None:
        sys.exit(f"import_check: the compiled extension did not load: {EXT_MISSING_REASON}")
    print(f"  extension: {os.path.basename(EXT.__file__)}; backends {dk.available_backends()}")
print("import_check OK")
