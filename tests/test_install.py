"""What a pure-Python install (no compiled extension) still offers."""

import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_missing_extension_leaves_reference_working_and_backends_truthful():
    code = textwrap.dedent("""
        import sys
        sys.modules["deferredseg_kernels._C"] = None   # as if the extension was never built
        import torch
        import deferredseg_kernels as dk
        from deferredseg_kernels import _dispatch
        names = dk.available_backends()
        assert "reference" in names and "cpu" not in names and "cuda" not in names, names
        assert "not built" in _dispatch.why_unavailable("cpu")
        x = torch.randn(1, 6, 4, 4, requires_grad=True)
        y = torch.randint(0, 2, (1, 4, 4)); m = torch.randint(0, 2, (1, 3, 4, 4))
        dk.deferredseg_loss(x, y, m, 1, 3).backward()        # auto falls back to the reference
        dk.route(x, 1, 3)
        try:
            dk.deferredseg_loss(x, y, m, 1, 3, backend="cpu")
        except RuntimeError as e:
            assert "not built" in str(e), e
        else:
            raise AssertionError("backend='cpu' must fail without the extension")
        print("ok")
    """)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
