#!/usr/bin/env bash
# tools/gpu_report.sh -- one time-boxed check of fastkd on a GPU machine: `make gpu-report OUT=<dir>`.
#
# For a GPU machine that has only its own python3 (torch, triton, nvcc, compute-sanitizer; no
# network, no venv). Every step runs under `timeout`; the whole report keeps to FASTKD_REPORT_BUDGET
# seconds (default 450, under 8 minutes) and ALWAYS writes $OUT/summary.txt, one line per step,
# beside each step's log. Without a CUDA device it ends at once, saying so. Steps: versions; the
# build with the CUDA kernels for this device (beside the Triton smoke test); the smoke test of
# every op on every GPU backend against backend "torch" (tools/gpu_smoke.py); the GPU tests, each
# under FASTKD_TEST_TIMEOUT; a short benchmark (bf16, BT 4096, V 32000 and 128256:
# benchmarks/gpu_bench.py); compute-sanitizer memcheck of the smoke test at tiny shapes; the Hugging
# Face Trainer's own FSDP2 against one process (tests/test_hf_ddp.py: accelerate selects FSDP only on GPUs).
# Exit: 0 every step passed (or no GPU), 1 a step failed or ran out of time.
# Knobs: FASTKD_REPORT_BUDGET, GPU_PY (python3), FASTKD_ARCH (the device's, e.g. 9.0a),
# FASTKD_REPORT_SKIP (comma list of step-name prefixes: smoke,build,tests,bench,memcheck,trainer).
set -u
OUT=${OUT:-gpu-report}
mkdir -p "$OUT" || exit 3
OUT=$(cd "$OUT" && pwd) || exit 3
cd "$(dirname "$0")/.." || exit 3
PY=${GPU_PY:-python3}
BUDGET=${FASTKD_REPORT_BUDGET:-450}
T0=$(date +%s)
DEADLINE=$((T0 + BUDGET))
SUMMARY="$OUT/summary.txt"
FAILED=0
: > "$SUMMARY"
[ -d /usr/local/cuda/bin ] && export PATH="$PATH:/usr/local/cuda/bin"
[ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ] && export CUDA_HOME=/usr/local/cuda
# the checkout on the path: an in-place build installs nothing
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET

note() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $((DEADLINE - $(date +%s))); }
skipped() {
  local x xs
  IFS=, read -ra xs <<< "${FASTKD_REPORT_SKIP:-}"
  for x in "${xs[@]}"; do [ -n "$x" ] && [[ "$1" == "$x"* ]] && return 0; done
  return 1
}
finish() {
  local rc=$?
  [ "$FAILED" -ne 0 ] && rc=1
  note "== done after $(( $(date +%s) - T0 ))s of ${BUDGET}s; exit $rc (0: every step passed, 1: a step failed)"
  for f in "$OUT"/*.log; do  # keep every log small enough to fetch: head and tail of one over 2 MB
    [ -f "$f" ] || continue
    if [ "$(stat -c %s "$f")" -gt 2000000 ]; then
      { head -c 1000000 "$f"; printf '\n[... cut ...]\n'; tail -c 900000 "$f"; } > "$f.cut" && mv "$f.cut" "$f"
    fi
  done
  exit $rc
}
trap finish EXIT
trap 'note "!! interrupted"; exit 1' INT TERM

# run_step NAME LIMIT_S CMD...: CMD under timeout (capped by the time left less a reserve), its
# output in $OUT/NAME.log, one line in the summary; returns CMD's status (200: skipped).
RESERVE=15
run_step() {
  local name=$1 limit=$2; shift 2
  if skipped "$name"; then note "-- $name: skipped (FASTKD_REPORT_SKIP)"; return 200; fi
  local avail=$(( $(left) - RESERVE ))
  [ "$limit" -gt "$avail" ] && limit=$avail
  if [ "$limit" -lt 10 ]; then note "-- $name: no time left"; FAILED=1; return 201; fi
  local s
  s=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - s ))
  if [ $rc -eq 0 ]; then note "ok   $name (${took}s)"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then note "TIME $name: killed after ${limit}s"; FAILED=1
  else note "FAIL $name: exit $rc after ${took}s, see $name.log"; FAILED=1
  fi
  return $rc
}
ok_or_skip() { if [ "$1" -eq 200 ]; then echo 0; else echo "$1"; fi; }  # skipped by request: not a failure

note "== fastkd gpu-report $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), budget ${BUDGET}s"
if ! timeout 60 "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  note "no GPU: torch.cuda.is_available() is False for $PY (or torch is missing); nothing to check here"
  exit 0
fi

# 0. the machine and the versions
{
  echo "## nvidia-smi"; timeout 20 nvidia-smi 2>&1 || echo "(nvidia-smi failed or missing)"
  echo "## nvcc"; timeout 20 nvcc --version 2>&1 || echo "(nvcc missing)"
  echo "## compute-sanitizer"; timeout 20 compute-sanitizer --version 2>&1 | head -3 || echo "(missing)"
  echo "## python"; timeout 60 "$PY" - <<'PYEOF' 2>&1
import importlib, sys
print(sys.version)
for m in ("torch", "triton", "numpy", "setuptools", "ninja", "pytest", "hypothesis", "xdist", "transformers",
          "liger_kernel"):
    try:
        print(f"{m} {getattr(importlib.import_module(m), '__version__', '?')}")
    except Exception as e:
        print(f"{m} MISSING ({type(e).__name__})")
import torch
p = torch.cuda.get_device_properties(0)
print("device", torch.cuda.get_device_name(0), "cc", torch.cuda.get_device_capability(0), "SMs",
      p.multi_processor_count, "GiB", round(p.total_memory / 2**30, 1), "torch.version.cuda", torch.version.cuda)
PYEOF
} > "$OUT/env.log" 2>&1
grep -E "^(torch|triton|numpy|setuptools|device) " "$OUT/env.log" | sed 's/^/   /' | tee -a "$SUMMARY"
if ! "$PY" -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 77)" 2>/dev/null; then
  note "!! setuptools < 77 cannot read pyproject.toml's license string: the CUDA build is skipped (pip install 'setuptools>=77')"
  SKIP_BUILD=1
fi

# 1. the Triton smoke test (needs no fastkd._C) beside the build with the CUDA kernels
( run_step smoke-triton 150 "$PY" tools/gpu_smoke.py triton; echo $? > "$OUT/.smoke-triton.rc" ) &
SMOKE_PID=$!
ARCH=${FASTKD_ARCH:-$("$PY" -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}.{b}' + ('a' if a >= 9 else ''))")}
BUILD_OK=0
if [ -z "${SKIP_BUILD:-}" ] && run_step build 300 env FASTKD_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" \
    MAX_JOBS="${MAX_JOBS:-12}" "$PY" setup.py -q build_ext --inplace; then
  BUILD_OK=1
fi
grep -E "error" "$OUT/build.log" 2>/dev/null | head -5 | sed 's/^/   /' | tee -a "$SUMMARY"
"$PY" -c "import fastkd; print('backends', fastkd.available_backends())" 2>&1 | tail -1 | sed 's/^/   /' | tee -a "$SUMMARY"
wait "$SMOKE_PID"
grep -E "^(FAIL|ERROR)" "$OUT/smoke-triton.log" 2>/dev/null | cut -c1-300 | head -8 | sed 's/^/   /' | tee -a "$SUMMARY"
[ "$(ok_or_skip "$(cat "$OUT/.smoke-triton.rc" 2>/dev/null || echo 1)")" = 0 ] || FAILED=1
rm -f "$OUT/.smoke-triton.rc"

# 2. the CUDA backend's smoke test (every dtype x divergence: it compiles nothing at run time)
CUDA_OK=0
if [ "$BUILD_OK" -eq 1 ]; then
  CUDA_LAUNCH_BLOCKING=1 run_step smoke-cuda 120 "$PY" tools/gpu_smoke.py cuda --full && CUDA_OK=1
  grep -E "^(FAIL|ERROR)" "$OUT/smoke-cuda.log" 2>/dev/null | cut -c1-300 | head -8 | sed 's/^/   /' | tee -a "$SUMMARY"
fi

# 3. the GPU tests: the triton and cuda ones in parallel, each test under FASTKD_TEST_TIMEOUT, -v so a
# group killed by its time box still shows what ran
GPU_TESTS="tests/test_dispatch.py tests/test_gpu.py tests/test_numerics.py tests/test_fused_linear.py"
PYTEST=("$PY" -m pytest -v -p no:cacheprovider -rfE --tb=short --durations=10)
"$PY" -c "import xdist" 2>/dev/null && PYTEST+=(-n 4)
LIMIT=$(( $(left) - 150 )); [ "$LIMIT" -gt 240 ] && LIMIT=240; [ "$LIMIT" -lt 60 ] && LIMIT=60
( FASTKD_TEST_TIMEOUT=120 run_step tests-triton "$LIMIT" "${PYTEST[@]}" $GPU_TESTS -k triton; exit "$(ok_or_skip $?)" ) &
P1=$!
if [ "$BUILD_OK" -eq 1 ]; then
  ( FASTKD_TEST_TIMEOUT=120 run_step tests-cuda "$LIMIT" "${PYTEST[@]}" $GPU_TESTS tests/test_cuda_kernels.py \
      -k "cuda and not compile_with_nvcc_alone"; exit "$(ok_or_skip $?)" ) &
  P2=$!
  wait "$P2" || FAILED=1
fi
wait "$P1" || FAILED=1
for f in tests-triton tests-cuda; do
  [ -f "$OUT/$f.log" ] && tail -1 "$OUT/$f.log" | sed "s/^/   $f: /" | tee -a "$SUMMARY"
done

# 4. a short benchmark: bf16, BT 4096, V 32000 and 128256, the backends whose smoke test passed
BENCH_B=""
grep -q "^ERROR" "$OUT/smoke-triton.log" 2>/dev/null || BENCH_B="triton"
[ "$CUDA_OK" -eq 1 ] && BENCH_B="${BENCH_B:+$BENCH_B,}cuda"
for v in 32000 128256; do
  run_step "bench-bf16-$v" 75 "$PY" benchmarks/gpu_bench.py --bt 4096 --vocab "$v" --dtypes bf16 \
    --skip-fused-linear --backends "$BENCH_B" --output "$OUT/bench-bf16-$v.md"
done

# 5. compute-sanitizer memcheck at tiny shapes, one tensor a cudaMalloc (no caching allocator, so an
# out-of-bounds access leaves its allocation)
if [ "$BUILD_OK" -eq 1 ] || [ -n "$BENCH_B" ]; then
  SAN_B=triton; [ "$BUILD_OK" -eq 1 ] && SAN_B=triton,cuda
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_step memcheck 150 compute-sanitizer --tool memcheck --error-exitcode 9 \
    --target-processes all "$PY" tools/gpu_smoke.py "$SAN_B" --tiny
  grep -E "^=+ (ERROR|Invalid|Program hit)|ERROR SUMMARY" "$OUT/memcheck.log" 2>/dev/null | head -5 | sed 's/^/   /' | tee -a "$SUMMARY"
fi

# 6. the Hugging Face Trainer's own FSDP2 under torchrun against one process on one GPU (accelerate
# selects FSDP only for GPUs: on a CPU the Trainer wraps the model in DDP, so CI cannot run this)
if "$PY" -c "import transformers, accelerate" 2>/dev/null; then
  run_step trainer-fsdp 150 "$PY" -m pytest -q -p no:cacheprovider -rfE --tb=short tests/test_hf_ddp.py \
    -k trainer_fsdp
  tail -1 "$OUT/trainer-fsdp.log" 2>/dev/null | sed 's/^/   /' | tee -a "$SUMMARY"
else
  note "-- trainer-fsdp: transformers or accelerate is missing for $PY"
fi
