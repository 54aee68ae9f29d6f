"""Checks of the release files: what the sdist and the wheel must hold.

    python .ci/check_dist.py --sdist dist/deferredseg-0.1.0.tar.gz --wheel dist/deferredseg-...whl

sdist: every file of csrc/ (the build compiles the sources, which include the headers
beside them), README.md (the long description), LICENSE, the build files and the
version file; its version is the one in deferredseg_kernels/_version.py.
wheel: tagged cp310-abi3 (one wheel for Python 3.10 and later), holding the extension
as _C.abi3.so and the license; same version. Exits non-zero, naming what is wrong.
"""

from __future__ import annotations

import argparse
import ast
import email.parser
import os
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parents[1]
BUILD_FILES = (
    "README.md",
    "LICENSE",
    "pyproject.toml",
    "setup.py",
    "MANIFEST.in",
    "deferredseg_kernels/_version.py",
)
SKIP_SUFFIXES = (".o", ".so", ".pyc")


def source_version(root: Path) -> str:
    tree = ast.parse((root / "deferredseg_kernels" / "_version.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            getattr(t, "id", "") == "__version__" for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise SystemExit("deferredseg_kernels/_version.py does not assign __version__")


def expected_sdist_files(root: Path) -> List[str]:
    files = list(BUILD_FILES)
    for dirpath, dirnames, filenames in os.walk(root / "csrc"):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in filenames:
            if not name.endswith(SKIP_SUFFIXES):
                files.append(str((Path(dirpath) / name).relative_to(root)))
    return sorted(files)


def check_sdist(path: Path, root: Path, version: str) -> List[str]:
    errors = []
    top = f"deferredseg-{version}"
    with tarfile.open(path) as tar:
        names = {m.name for m in tar.getmembers() if m.isfile()}
        pkg_info = tar.extractfile(f"{top}/PKG-INFO") if f"{top}/PKG-INFO" in names else None
        meta = email.parser.Parser().parsestr(pkg_info.read().decode()) if pkg_info else None
    if not path.name.startswith(top + "."):
        errors.append(
            f"sdist {path.name}: expected version {version} (deferredseg_kernels/_version.py)"
        )
    missing = [f for f in expected_sdist_files(root) if f"{top}/{f}" not in names]
    if missing:
        errors.append(f"sdist lacks {len(missing)} file(s) the build needs: {missing}")
    if meta is None:
        errors.append(f"sdist lacks {top}/PKG-INFO")
    else:
        errors += check_metadata(meta, version, "sdist")
    return errors


def check_metadata(meta, version: str, what: str) -> List[str]:
    errors = []
    if meta["Version"] != version:
        errors.append(f"{what}: metadata version {meta['Version']!r}, expected {version!r}")
    if meta["License-Expression"] != "Apache-2.0":
        errors.append(
            f"{what}: License-Expression {meta['License-Expression']!r}, expected 'Apache-2.0'"
        )
    if "LICENSE" not in (meta.get_all("License-File") or []):
        errors.append(f"{what}: no License-File: LICENSE in the metadata")
    if meta["Description-Content-Type"] != "text/markdown":
        errors.append(
            f"{what}: the README is not the markdown long description "
            f"(Description-Content-Type {meta['Description-Content-Type']!r})"
        )
    return errors


def check_wheel(path: Path, version: str) -> List[str]:
    from packaging.utils import parse_wheel_filename

    errors = []
    name, ver, _, tags = parse_wheel_filename(path.name)
    if str(ver) != version:
        errors.append(f"wheel {path.name}: version {ver}, expected {version}")
    tag_strs = sorted(str(t) for t in tags)
    if not tag_strs or any(not (t.startswith("cp310-abi3-")) for t in tag_strs):
        errors.append(f"wheel {path.name}: tags {tag_strs}, expected cp310-abi3-<platform>")
    info = f"deferredseg-{ver}.dist-info"
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        wheel_meta = zf.read(f"{info}/WHEEL").decode() if f"{info}/WHEEL" in names else ""
        meta = (
            email.parser.Parser().parsestr(zf.read(f"{info}/METADATA").decode())
            if f"{info}/METADATA" in names
            else None
        )
    wheel_tags = [
        line.split(":", 1)[1].strip() for line in wheel_meta.splitlines() if line.startswith("Tag:")
    ]
    if sorted(wheel_tags) != tag_strs:
        errors.append(f"wheel {path.name}: WHEEL tags {wheel_tags} differ from the file name's")
    if "Root-Is-Purelib: false" not in wheel_meta:
        errors.append(f"wheel {path.name}: not a platform wheel (Root-Is-Purelib is not false)")
    exts = sorted(n for n in names if n.startswith("deferredseg_kernels/_C") and n.endswith(".so"))
    if exts != ["deferredseg_kernels/_C.abi3.so"]:
        errors.append(
            f"wheel {path.name}: extension files {exts}, expected "
            f"['deferredseg_kernels/_C.abi3.so']"
        )
    if f"{info}/licenses/LICENSE" not in names:
        errors.append(f"wheel {path.name}: lacks {info}/licenses/LICENSE")
    for required in ("deferredseg_kernels/_version.py", "deferredseg/cli.py"):
        if required not in names:
            errors.append(f"wheel {path.name}: lacks {required}")
    if meta is None:
        errors.append(f"wheel {path.name}: lacks {info}/METADATA")
    else:
        errors += check_metadata(meta, version, "wheel")
    return errors


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sdist", type=Path)
    ap.add_argument("--wheel", type=Path)
    ap.add_argument("--root", type=Path, default=ROOT, help="the source tree (default: this one)")
    args = ap.parse_args(argv)
    if args.sdist is None and args.wheel is None:
        ap.error("give --sdist and/or --wheel")
    version = source_version(args.root)
    errors = []
    if args.sdist is not None:
        errors += check_sdist(args.sdist, args.root, version)
    if args.wheel is not None:
        errors += check_wheel(args.wheel, version)
    for e in errors:
        print(f"check_dist: {e}", file=sys.stderr)
    if not errors:
        checked = [p.name for p in (args.sdist, args.wheel) if p is not None]
        print(f"check_dist: {', '.join(checked)} OK (version {version})")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
