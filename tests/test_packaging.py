"""The release files: one version, a source distribution that holds every build file.

The wheel built from the sdist (the compile, the abi3 tag, the install into a fresh
environment) is checked by .ci/test_sdist.sh in CI; these tests are the fast part.
"""

import ast
import gzip
import io
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

import deferredseg
import deferredseg_kernels

ROOT = Path(__file__).resolve().parents[1]
CHECK_DIST = ROOT / ".ci" / "check_dist.py"


def _version_file_value():
    tree = ast.parse((ROOT / "deferredseg_kernels" / "_version.py").read_text())
    (assign,) = [n for n in tree.body if isinstance(n, ast.Assign)]
    return ast.literal_eval(assign.value)


def test_one_version_read_by_the_build():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in meta["project"] and "version" in meta["project"]["dynamic"]
    attr = meta["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "deferredseg_kernels._version.__version__"
    version = _version_file_value()
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]\d+|rc\d+)?(\.post\d+)?(\.dev\d+)?", version), version
    assert deferredseg.__version__ == deferredseg_kernels.__version__ == version
    # No second copy of the number anywhere in the packages.
    for pkg in ("deferredseg", "deferredseg_kernels"):
        for path in (ROOT / pkg).rglob("*.py"):
            if path.name != "_version.py":
                assert not re.search(r"^__version__\s*=", path.read_text(), re.M), path


def test_release_metadata():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["license"] == "Apache-2.0" and meta["license-files"] == ["LICENSE"]
    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]
    assert meta["urls"], "project URLs"
    classifiers = set(meta["classifiers"])
    assert "Programming Language :: Python :: 3.10" in classifiers
    assert "Environment :: GPU :: NVIDIA CUDA" in classifiers
    assert "Topic :: Scientific/Engineering :: Medical Science Apps." in classifiers


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--no-isolation",
            "--sdist",
            "--outdir",
            str(out),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = out.glob("deferredseg-*.tar.gz")
    return path


def _check(*args):
    return subprocess.run(
        [sys.executable, str(CHECK_DIST), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_sdist_holds_every_build_file(sdist):
    proc = _check("--sdist", sdist)
    assert proc.returncode == 0, proc.stderr
    with tarfile.open(sdist) as tar:
        names = {m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name}
    # The headers the CPU kernels include, which an earlier sdist lacked.
    assert {
        "csrc/dispatch.h",
        "csrc/common.h",
        "csrc/loss_pixel.h",
        "csrc/route_pixel.h",
        "csrc/cuda/cuda_compat.h",
        "README.md",
        "LICENSE",
    } <= names
    assert "tests/conftest.py" in names, "the test suite comes whole"
    assert not any(n.endswith((".so", ".pyc", ".o")) for n in names), "build products"


@pytest.mark.slow
def test_check_dist_names_a_missing_header(sdist, tmp_path):
    """The check itself fails on an sdist without a header, naming it."""
    broken = tmp_path / sdist.name
    buf = io.BytesIO()
    with tarfile.open(sdist) as src, tarfile.open(fileobj=buf, mode="w") as dst:
        for m in src.getmembers():
            if not m.name.endswith("csrc/dispatch.h"):
                dst.addfile(m, src.extractfile(m) if m.isfile() else None)
    broken.write_bytes(gzip.compress(buf.getvalue()))
    proc = _check("--sdist", broken)
    assert proc.returncode == 1 and "csrc/dispatch.h" in proc.stderr, proc.stderr
