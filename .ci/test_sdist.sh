#!/usr/bin/env bash
# The release path, as a user of the source distribution meets it:
#   1. build the sdist from the tree;
#   2. unpack it in a temporary folder away from the tree and build the wheel there
#      (against the torch of BUILD_PYTHON, without build isolation, as the README says);
#   3. check both files: every build file in the sdist, the cp310-abi3 tag and the
#      extension in the wheel (.ci/check_dist.py), `twine check --strict` (the README
#      renders as the long description), `abi3audit` (only limited-API symbols);
#   4. install the wheel with its dependencies into a fresh virtual environment
#      (torch 2.13.0 CPU, the other pins of requirements/dev.txt as constraints) and run
#      the installed-package smoke test and the `deferredseg` command from outside the tree.
#
# Usage: bash .ci/test_sdist.sh BUILD_PYTHON [VENV_PYTHON]
#   BUILD_PYTHON  an interpreter with torch and the build tools (requirements/dev.txt)
#   VENV_PYTHON   the interpreter the fresh environment is made from (default python3)
# KEEP_DIST=DIR copies the sdist and the wheel there.
set -euo pipefail
BUILD_PY=$1
VENV_PY=${2:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TORCH_PIN=$(grep -E '^torch==' "$ROOT/requirements/torch-cpu.txt")
WORK=$(mktemp -d "${TMPDIR:-/tmp}/deferredseg-sdist.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
# pip here warns about every missing local index folder; keep its real errors.
quiet_pip() { "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; return "${PIPESTATUS[0]}"; }
step() { echo "-- $* ($(( SECONDS - T0 ))s)"; }
T0=$SECONDS

step "sdist from the tree"
(cd "$ROOT" && "$BUILD_PY" -m build --no-isolation --sdist --outdir "$WORK/dist" . \
  > "$WORK/sdist.log" 2>&1) || { cat "$WORK/sdist.log"; exit 1; }
SDIST=$(ls "$WORK"/dist/deferredseg-*.tar.gz)
"$BUILD_PY" "$ROOT/.ci/check_dist.py" --sdist "$SDIST"

step "wheel from the unpacked sdist, in $WORK/src"
mkdir "$WORK/src"
tar -xzf "$SDIST" -C "$WORK/src"
SRC=$(ls -d "$WORK"/src/deferredseg-*)
(cd "$SRC" && "$BUILD_PY" -m build --no-isolation --wheel --outdir "$WORK/dist" . \
  > "$WORK/wheel.log" 2>&1) || { tail -n 60 "$WORK/wheel.log"; exit 1; }
grep "^deferredseg:" "$WORK/wheel.log" || true
WHEEL=$(ls "$WORK"/dist/deferredseg-*.whl)

step "checks of $(basename "$SDIST") and $(basename "$WHEEL")"
"$BUILD_PY" "$ROOT/.ci/check_dist.py" --sdist "$SDIST" --wheel "$WHEEL"
"$BUILD_PY" -m twine check --strict "$SDIST" "$WHEEL"
"$BUILD_PY" -m abi3audit --strict --summary "$WHEEL"
if [ -n "${KEEP_DIST:-}" ]; then mkdir -p "$KEEP_DIST" && cp "$SDIST" "$WHEEL" "$KEEP_DIST"/; fi

step "fresh virtual environment: $TORCH_PIN and the wheel with its dependencies"
"$VENV_PY" -m venv "$WORK/venv"
quiet_pip "$WORK/venv/bin/python" -m pip install -q -c "$ROOT/requirements/dev.txt" \
  "$TORCH_PIN" "$WHEEL"
"$WORK/venv/bin/python" -m pip check

step "smoke test of the installed package, from $WORK"
cd "$WORK"
"$WORK/venv/bin/python" "$ROOT/.ci/smoke_installed.py" --expect-backend cpu --no-cuda --expect-abi3
"$WORK/venv/bin/deferredseg" --help > /dev/null
step "sdist install path OK"
