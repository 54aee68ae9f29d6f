#!/usr/bin/env bash
# GPU check of deferredseg, all within 8 minutes on one GPU machine
# (torch 2.11, triton 3.6, Python 3.12, 16 cores, no internet):
#   0. refuse at once, with the error, when `import deferredseg_kernels` fails here
#   1. build the extension in place (MAX_JOBS=16 python setup.py build_ext --inplace)
#   2. the GPU tests (pytest -m gpu)
#   3. the kernel benchmarks (pytest-benchmark: loss and routing of the triton and cuda
#      kernels against the eager reference) and their tables
#   4. the whole Triton test file on CUDA tensors, then torch.compile of the reference
#      in the benchmarks, each with the time that is left
# Logs go to $OUT (when set) or benchmarks/results/gpu_check/. Each step has a
# deadline; a step that fails is reported and the next one still runs.
# Usage: bash benchmarks/gpu_check.sh            (PYTHON=... to pick the interpreter)

set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python || command -v python3)}"
LOG="${OUT:-benchmarks/results/gpu_check}"
mkdir -p "$LOG"
START=$(date +%s)
TOTAL=${GPU_CHECK_SECONDS:-470}   # a little under 8 minutes
SUMMARY="$LOG/summary.md"
: > "$SUMMARY"

left() { echo $(( TOTAL - ($(date +%s) - START) )); }
note() { echo "$*" | tee -a "$SUMMARY"; }

# run NAME MAX_SECONDS CMD...: at most MAX_SECONDS (and never past the deadline)
run() {
  local name=$1 max=$2; shift 2
  local budget; budget=$(left)
  (( budget > max )) && budget=$max
  if (( budget < 10 )); then note "- $name: skipped (out of time)"; return 0; fi
  local t0; t0=$(date +%s)
  timeout --kill-after=5 "$budget" "$@" > "$LOG/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if (( rc == 0 )); then note "- $name: ok (${dt}s)";
  elif (( rc == 124 || rc == 137 )); then note "- $name: TIMED OUT after ${dt}s (see $LOG/$name.log)";
  else note "- $name: FAILED rc=$rc (${dt}s, see $LOG/$name.log)"; fi
  return $rc
}

# The GPU machine has no internet and no monai: the training-step benchmark and the
# benchmark suite need the wheels carried in .whl/ (e.g. `pip download --no-deps -d .whl
# monai==1.6.1 einops==0.8.2 pytest-benchmark==5.3.1 py-cpuinfo2==10.1.1`).
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/ds-site .whl/*.whl \
    && export PYTHONPATH="/tmp/ds-site${PYTHONPATH:+:$PYTHONPATH}"
fi

note "## deferredseg GPU check"
"$PY" - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import torch
try:
    import triton; tv = triton.__version__
except Exception as exc:  # noqa: BLE001
    tv = f"unavailable ({exc})"
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "NO GPU"
print(f"- {name}; torch {torch.__version__}; CUDA {torch.version.cuda}; triton {tv}")
EOF

# Refuse early, before building anything, when the package does not import with this
# torch and triton (as on a GPU: compiled Triton kernels, so the ops register through
# torch.library.triton_op): no later step could work, and the machine's time is scarce.
# The extension is not built yet; a stale one from another torch is kept out of it.
if ! timeout 120 env -u TRITON_INTERPRET "$PY" - > "$LOG/import.log" 2>&1 <<'EOF'
import sys
sys.modules["deferredseg_kernels._C"] = None  # the next step builds it
import deferredseg_kernels
from deferredseg_kernels.ops import triton_support
reason = triton_support.why_unavailable()
print("deferredseg_kernels imports;",
      "Triton ops registered" if reason is None else f"no Triton backend: {reason}")
EOF
then
  note "- import: FAILED: \`import deferredseg_kernels\` fails with this torch and triton;"
  note "  stopping before the build, nothing else was run (see $LOG/import.log):"
  grep -v -e '^\s' -e '^Traceback' "$LOG/import.log" | tail -n 3 | sed 's/^/    /' | tee -a "$SUMMARY"
  exit 1
fi
note "- import: $(tail -n 1 "$LOG/import.log")"

run build 240 env MAX_JOBS=16 "$PY" setup.py build_ext --inplace
tail -n 3 "$LOG/build.log" | sed 's/^/    /'

run backends 30 "$PY" -c "import deferredseg_kernels as dk; print(dk.available_backends()); \
from deferredseg_kernels import _dispatch as d; print({b: d.why_unavailable(b) for b in ('triton','cuda')})"
sed 's/^/    /' "$LOG/backends.log" | tee -a "$SUMMARY"

# Triton compiles one binary per kernel variant (about a second each): the GPU-marked
# tests cover the variants that matter most (and the C++ CUDA entries of the conformance
# suite); Triton's other tests and its conformance entries on CUDA tensors run after the
# main benchmark, with the time that is left (not the GPU-marked ones again).
run tests_gpu 150 "$PY" -m pytest tests/test_conformance.py tests/test_cuda_kernel.py \
  tests/test_triton.py tests/test_route.py \
  -m gpu -q -rs -p no:cacheprovider
tail -n 1 "$LOG/tests_gpu.log" | sed 's/^/    /' | tee -a "$SUMMARY"
grep -E "^(FAILED|ERROR)" "$LOG/tests_gpu.log" | head -20 | sed 's/^/    /' | tee -a "$SUMMARY"

# The benchmark suite on CUDA tensors, timed with a device-synchronizing timer.
BENCH_OPTS=(--benchmark-only --bench-device cuda --benchmark-max-time=0.5 -q -rs
            -p no:cacheprovider --benchmark-columns=median,iqr,rounds --benchmark-sort=name)
run bench 150 "$PY" -m pytest benchmarks "${BENCH_OPTS[@]}" -k "not compiled" \
  --benchmark-json "$LOG/bench.json"
tail -n 1 "$LOG/bench.log" | sed 's/^/    /' | tee -a "$SUMMARY"

run train_step 60 "$PY" benchmarks/bench_train_step.py --repeats 20
sed 's/^/    /' "$LOG/train_step.log" | tee -a "$SUMMARY"

T_LEFT=$(( $(left) - 100 ))
DS_TEST_BACKENDS=triton run tests_triton_cuda $(( T_LEFT > 20 ? T_LEFT : 20 )) "$PY" -m pytest \
  tests/test_triton.py tests/test_conformance.py -m "not gpu" -q -rs \
  -p no:cacheprovider
tail -n 1 "$LOG/tests_triton_cuda.log" | sed 's/^/    /' | tee -a "$SUMMARY"
grep -E "^(FAILED|ERROR)" "$LOG/tests_triton_cuda.log" | head -20 | sed 's/^/    /' | tee -a "$SUMMARY"

# torch.compile of the reference: tens of seconds of compilation per shape and mode.
BENCH_LEFT=$(( $(left) - 10 ))
if (( BENCH_LEFT > 60 )); then
  run bench_compiled "$BENCH_LEFT" "$PY" -m pytest benchmarks "${BENCH_OPTS[@]}" \
    -k "compiled and (2d-16x512 or 2d-8x512-K4) and (full or nograd_forward or assign)" \
    --benchmark-json "$LOG/bench_compiled.json"
else
  note "- bench_compiled: skipped (out of time)"
fi

{
  echo
  [ -f "$LOG/bench.log" ] && sed -n "/ benchmark '/,/^Legend/p" "$LOG/bench.log"
  echo
  [ -f "$LOG/bench_compiled.log" ] && sed -n "/ benchmark '/,/^Legend/p" "$LOG/bench_compiled.log"
} | tee -a "$SUMMARY"
note ""
note "total $(( $(date +%s) - START ))s; logs in $LOG"
