#!/usr/bin/env bash
# The one prepared GPU check (issue 16): build margingate against the torch already installed,
# run tests/test_cuda_*.py one test function per process with a timeout, run the CUDA benchmark,
# and write every log under $OUT. Made for an H100/H200 machine without network; finishes within
# GPU_CHECK_BUDGET_S (default 450 s, under the 8 minutes that leave room for a rerun).
#
#   OUT=/path/to/logs bench/gpu_check.sh
#
# $OUT afterwards: summary.txt (read this first), env.log, build.log, smoke.log,
# tests/<test function>.log and .xml (junit), tests/status.txt, bench.log, bench.json.
# Exit status 0 only if the build, every test and the benchmark succeeded.
#
# Knobs (environment): PYTHON (python3), NVCC (CUDA_HOME/bin/nvcc, /usr/local/cuda/bin/nvcc, or
# the nvcc on PATH), GPU_CHECK_ARCHS (the GPU's own, e.g. 90; both 80;90 without a GPU),
# GPU_CHECK_BUDGET_S (450), GPU_CHECK_TEST_TIMEOUT_S (150 per test function), GPU_CHECK_JOBS
# (test processes at once, 4), GPU_CHECK_WORK (scratch folder, a fresh temporary one).
# Nothing is installed into the Python environment: the wheel goes into a private folder on
# PYTHONPATH, and pip runs with --no-deps --no-index --no-build-isolation (no downloads).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
: "${OUT:?set OUT to the folder for the logs}"
mkdir -p "$OUT/tests"
OUT=$(cd "$OUT" && pwd)
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-450}
TEST_TIMEOUT=${GPU_CHECK_TEST_TIMEOUT_S:-150}
JOBS=${GPU_CHECK_JOBS:-4}
PYTHON=${PYTHON:-python3}
WORK=${GPU_CHECK_WORK:-$(mktemp -d)}
mkdir -p "$WORK"
: >"$OUT/summary.txt"
export OUT START BUDGET TEST_TIMEOUT PYTHON ROOT

elapsed() { echo $(($(date +%s) - START)); }
left() { echo $((BUDGET - $(date +%s) + START)); }
log() { echo "[$(elapsed)s] $*" | tee -a "$OUT/summary.txt"; }
export -f elapsed left log

# ------------------------------------------------------------------ environment
{
  echo "date: $(date -u)"
  echo "host: $(uname -a)"
  nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  "$PYTHON" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" 2>&1
  "$PYTHON" -c "import transformers; print('transformers', transformers.__version__)" 2>&1
  "$PYTHON" -m pip --version 2>&1
  "$PYTHON" -c "import scikit_build_core; print('scikit-build-core', scikit_build_core.__version__)" 2>&1
  cmake --version 2>&1 | head -1
  echo "ninja $(ninja --version 2>&1)"
} >"$OUT/env.log" 2>&1
NVCC=${NVCC:-}
for candidate in "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" /usr/local/cuda/bin/nvcc "$(command -v nvcc || true)"; do
  [ -z "$NVCC" ] && [ -n "$candidate" ] && [ -x "$candidate" ] && NVCC=$candidate
done
"${NVCC:-nvcc}" --version >>"$OUT/env.log" 2>&1
ARCHS=${GPU_CHECK_ARCHS:-$("$PYTHON" -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}{b}')" 2>/dev/null || echo "80;90")}
log "python $PYTHON, nvcc ${NVCC:-none}, CUDA architectures $ARCHS, scratch $WORK, budget ${BUDGET}s"

# ------------------------------------------------------------------ build
# The wheel, as users build it (scikit-build-core), against the installed torch; our kernels for
# this GPU's architecture only (half the nvcc time). If packaging fails, a plain CMake build.
status=0
SITE="$WORK/site"
build_ok=0
log "build: pip wheel (log: build.log)"
if CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$PYTHON" -m pip wheel "$ROOT" --no-deps --no-index --no-build-isolation \
  -w "$WORK/wheel" -v \
  -Cbuild-dir="$WORK/build" \
  -Ccmake.define.MARGINGATE_CUDA=ON \
  -Ccmake.define.CMAKE_CUDA_COMPILER="${NVCC:-nvcc}" \
  -Ccmake.define.MARGINGATE_CUDA_ARCHITECTURES="$ARCHS" \
  -Ccmake.define.MARGINGATE_BUILD_BENCH=OFF >"$OUT/build.log" 2>&1 &&
  "$PYTHON" -m pip install --no-deps --no-index --target "$SITE" "$WORK"/wheel/margingate-*.whl >>"$OUT/build.log" 2>&1; then
  build_ok=1
  export PYTHONPATH="$SITE"
  log "build: wheel installed into $SITE"
else
  log "build: pip wheel FAILED (tail of build.log below); trying a plain CMake build"
  tail -n 30 "$OUT/build.log" | sed 's/^/    /' | tee -a "$OUT/summary.txt"
  if cmake -S "$ROOT" -B "$WORK/dev" -G Ninja -DPython3_EXECUTABLE="$(command -v "$PYTHON")" \
    -DMARGINGATE_CUDA=ON -DCMAKE_CUDA_COMPILER="${NVCC:-nvcc}" -DMARGINGATE_CUDA_ARCHITECTURES="$ARCHS" \
    -DMARGINGATE_BUILD_BENCH=OFF >>"$OUT/build.log" 2>&1 && ninja -C "$WORK/dev" >>"$OUT/build.log" 2>&1; then
    build_ok=1
    export PYTHONPATH="$ROOT/python"  # the development build puts _margingate.so there
    log "build: CMake development build into python/margingate"
  else
    log "build: FAILED (tail of build.log below)"
    tail -n 30 "$OUT/build.log" | sed 's/^/    /' | tee -a "$OUT/summary.txt"
    status=1
  fi
fi
grep -m1 -o "CUDA registrations [A-Z]*" "$OUT/build.log" | sed 's/^/build: /' | tee -a "$OUT/summary.txt"

# ------------------------------------------------------------------ smoke
if [ $build_ok -eq 1 ]; then
  if "$PYTHON" - >"$OUT/smoke.log" 2>&1 <<'EOF'; then
import torch, margingate
info = margingate.build_info()
print(info)
assert info["cuda"], "this margingate build has no CUDA kernels"
assert torch.cuda.is_available(), "torch sees no GPU"
x = torch.randn(4, 1000, device="cuda", dtype=torch.bfloat16)
top1 = margingate.margin(x)[0]
torch.cuda.synchronize()
assert torch.equal(top1, x.argmax(1)), (top1, x.argmax(1))
print("smoke: margin on the GPU equals argmax")
EOF
    log "smoke: ok ($(head -1 "$OUT/smoke.log"))"
  else
    log "smoke: FAILED (smoke.log: $(tail -1 "$OUT/smoke.log"))"
    status=1
  fi
fi

# ------------------------------------------------------------------ tests, one function per process
# A kernel fault poisons the process's CUDA context, so each test function runs in its own
# process (its parametrizations share it) under a timeout; several processes share the GPU.
run_group() {  # $1 = FILE::function of a CUDA test
  local name=$1 rc
  if [ "$(left)" -lt 120 ]; then  # keep two minutes for the benchmark
    echo "$name SKIPPED(budget)" >>"$OUT/tests/status.txt"
    return 0
  fi
  local t0
  t0=$(date +%s)
  local file=${name//[\/:]/_}  # tests/test_cuda_margin.py::test_x -> a file name
  timeout -k 10 "$TEST_TIMEOUT" "$PYTHON" -m pytest -q -rA -p no:cacheprovider "$name" \
    --junitxml="$OUT/tests/$file.xml" >"$OUT/tests/$file.log" 2>&1
  rc=$?
  case $rc in
    0) verdict=PASS ;;
    5) verdict=NOTESTS ;;
    124 | 137) verdict="TIMEOUT(${TEST_TIMEOUT}s)" ;;
    *) verdict="FAIL(rc=$rc)" ;;
  esac
  echo "$name $verdict $(($(date +%s) - t0))s" >>"$OUT/tests/status.txt"
}
export -f run_group
: >"$OUT/tests/status.txt"
if [ $build_ok -eq 1 ]; then
  log "tests: collecting tests/test_cuda_*.py"
  "$PYTHON" -m pytest --collect-only -q -p no:cacheprovider tests/test_cuda_*.py >"$OUT/tests/collect.log" 2>&1
  grep '^tests/test_cuda_[a-z_]*\.py::' "$OUT/tests/collect.log" | sed -e 's/\[.*//' |
    awk '!seen[$0]++' >"$OUT/tests/functions.txt"
  log "tests: $(grep -c '::' "$OUT/tests/collect.log") tests in $(wc -l <"$OUT/tests/functions.txt") functions, $JOBS processes at once, ${TEST_TIMEOUT}s each"
  xargs -P "$JOBS" -I{} bash -c 'run_group "$@"' _ {} <"$OUT/tests/functions.txt"
  # Per-test outcome from the junit files (the status file is per function).
  "$PYTHON" - "$OUT/tests" >>"$OUT/summary.txt" 2>&1 <<'EOF'
import glob, os, sys
import xml.etree.ElementTree as ET
counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
bad = []
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.xml"))):
    for case in ET.parse(path).getroot().iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        kind = {"failure": "failed", "error": "error", "skipped": "skipped"}.get(kinds[0] if kinds else "", "passed")
        counts[kind] += 1
        if kind in ("failed", "error"):
            message = next(child for child in case if child.tag in ("failure", "error")).get("message", "")
            bad.append(f"    {kind}: {case.get('name')}: {message.splitlines()[0][:200] if message else ''}")
print("tests (junit): " + ", ".join(f"{v} {k}" for k, v in counts.items()))
print("\n".join(bad))
EOF
  sed 's/^/    /' "$OUT/tests/status.txt" >>"$OUT/summary.txt"
  if grep -qv ' PASS ' "$OUT/tests/status.txt"; then
    status=1
    grep -v ' PASS ' "$OUT/tests/status.txt" | while read -r name _; do  # the end of each failure's log
      echo "  --- tail of tests/${name//[\/:]/_}.log" >>"$OUT/summary.txt"
      tail -n 15 "$OUT/tests/${name//[\/:]/_}.log" 2>/dev/null | cut -c1-300 | sed 's/^/    /' >>"$OUT/summary.txt"
    done
  fi
  log "tests: $(grep -c ' PASS ' "$OUT/tests/status.txt") of $(wc -l <"$OUT/tests/status.txt") functions passed"
fi

# ------------------------------------------------------------------ benchmark
if [ $build_ok -eq 1 ]; then
  remaining=$(left)
  quick=()
  [ "$remaining" -lt 150 ] && quick=(--quick)
  if [ "$remaining" -lt 40 ]; then
    log "bench: SKIPPED (${remaining}s left)"
    status=1
  else
    log "bench: bench_cuda ${quick[*]} (log: bench.log, ${remaining}s left)"
    PYTHONPATH="$PYTHONPATH:$ROOT" timeout -k 10 $((remaining - 15)) "$PYTHON" -m bench.python.bench_cuda \
      "${quick[@]}" --json "$OUT/bench.json" >"$OUT/bench.log" 2>&1
    rc=$?
    [ $rc -ne 0 ] && status=1
    log "bench: exit $rc"
    grep -E '^(device|geomean)' "$OUT/bench.log" | sed 's/^/    /' | tee -a "$OUT/summary.txt"
    grep -A8 '^## margin' "$OUT/bench.log" | sed 's/^/    /' >>"$OUT/summary.txt"
  fi
fi

log "done in $(elapsed)s, exit $status"
exit $status
