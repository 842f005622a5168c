#!/usr/bin/env bash
# GPU check of the CUDA kernels, run from the repository root on a machine with a
# GPU: build in place, run the tests marked `cuda`, run compute-sanitizer's
# memcheck and racecheck over scripts/sanitize_ops.py, print a summary table.
# Logs go to ${OUT:-out}/. Each step has a time cap so the whole run stays under
# ~9 minutes. Exit status: 0 only if every step passed.
set -uo pipefail

LOG_DIR="${OUT:-out}"
PY="${PYTHON:-python3}"
mkdir -p "$LOG_DIR"
START=$(date +%s)

now() { date +%s; }
# Caps in seconds: build, pytest, memcheck, racecheck (sum ~8.5 min).
CAP_BUILD=150 CAP_TEST=210 CAP_MEM=80 CAP_RACE=90

# compute-sanitizer ships in the toolkit's bin/, which need not be on PATH.
SAN=$(command -v compute-sanitizer || true)
for d in "${CUDA_HOME:-}" "$(dirname "$(command -v nvcc 2>/dev/null || echo /x/x)")/.." /usr/local/cuda; do
  [ -z "$SAN" ] && [ -x "$d/bin/compute-sanitizer" ] && SAN="$d/bin/compute-sanitizer"
done
# Without a GPU (a dry run of this script) every GPU step says so and is skipped.
HAVE_GPU=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
NO_GPU="skipped: no GPU"

{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi -L 2>&1 || true
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)' 2>&1
  echo "compute-sanitizer: ${SAN:-not found}"
} > "$LOG_DIR/env.log"

# ---- build ----------------------------------------------------------------
t=$(now)
if [ "${GPU_CHECK_SKIP_BUILD:-0}" = 1 ]; then
  echo "build skipped (GPU_CHECK_SKIP_BUILD=1)" > "$LOG_DIR/build.log"; BUILD_RC=0
else
  FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}" timeout "$CAP_BUILD" "$PY" setup.py build_ext --inplace \
    > "$LOG_DIR/build.log" 2>&1
  BUILD_RC=$?
fi
BUILD_S=$(( $(now) - t ))
BUILD_WARN=$(grep -ciE "csrc/cuda/.*warning" "$LOG_DIR/build.log" || true)

# ---- tests ----------------------------------------------------------------
TEST_RES="not run"; TEST_RC=1; TEST_S=0
[ "$HAVE_GPU" = 1 ] || TEST_RES="$NO_GPU"
if [ "$BUILD_RC" -eq 0 ] && [ "$HAVE_GPU" = 1 ]; then
  t=$(now)
  RESNET_FUSED_UNVERIFIED_CUDA=1 timeout "$CAP_TEST" "$PY" -m pytest -q tests -m cuda -p no:cacheprovider \
    --continue-on-collection-errors --junitxml="$LOG_DIR/pytest.xml" > "$LOG_DIR/pytest.log" 2>&1
  TEST_RC=$?
  TEST_S=$(( $(now) - t ))
  TEST_RES=$("$PY" - "$LOG_DIR/pytest.xml" <<'EOF' 2>/dev/null || echo "no junit report (rc=$TEST_RC)"
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
n = lambda k: sum(int(s.get(k, 0)) for s in suites)
tests, fail, err, skip = n("tests"), n("failures"), n("errors"), n("skipped")
print(f"{tests - fail - err - skip} passed, {fail} failed, {err} errors, {skip} skipped")
EOF
)
  [ "$TEST_RC" -eq 124 ] && TEST_RES="$TEST_RES (TIMED OUT)"
fi

# ---- sanitizers -----------------------------------------------------------
MEM_RES="not run"; RACE_RES="not run"; MEM_S=0; RACE_S=0; MEM_OK=0; RACE_OK=0
if [ "$HAVE_GPU" != 1 ]; then
  MEM_RES="$NO_GPU"; RACE_RES="$NO_GPU"
elif [ "$BUILD_RC" -eq 0 ] && [ -n "$SAN" ]; then
  # Without the caching allocator every tensor is its own allocation, so memcheck
  # sees reads past a tensor's end instead of into a neighbour inside one block.
  t=$(now)
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$CAP_MEM" "$SAN" --tool memcheck \
    --print-limit 20 "$PY" scripts/sanitize_ops.py > "$LOG_DIR/memcheck.log" 2>&1
  MEM_RC=$?
  MEM_S=$(( $(now) - t ))
  n=$(grep -oE "ERROR SUMMARY: [0-9]+" "$LOG_DIR/memcheck.log" | tail -1 | grep -oE "[0-9]+")
  if [ -n "$n" ]; then
    MEM_RES="$n errors, script rc=$MEM_RC"
    [ "$n" -eq 0 ] && [ "$MEM_RC" -eq 0 ] && MEM_OK=1
  else
    MEM_RES="no summary (rc=$MEM_RC$([ "$MEM_RC" -eq 124 ] && echo ', TIMED OUT'))"
  fi

  t=$(now)
  timeout "$CAP_RACE" "$SAN" --tool racecheck --racecheck-report hazard \
    --print-limit 20 "$PY" scripts/sanitize_ops.py > "$LOG_DIR/racecheck.log" 2>&1
  RACE_RC=$?
  RACE_S=$(( $(now) - t ))
  line=$(grep -E "RACECHECK SUMMARY|ERROR SUMMARY" "$LOG_DIR/racecheck.log" | tail -1)
  if [ -n "$line" ]; then
    errs=$(echo "$line" | grep -oE "[0-9]+ error" | grep -oE "[0-9]+" || true)
    errs=${errs:-$(echo "$line" | grep -oE "[0-9]+" | head -1)}
    RACE_RES="${line#*SUMMARY: }, script rc=$RACE_RC"
    [ "${errs:-1}" -eq 0 ] && [ "$RACE_RC" -eq 0 ] && RACE_OK=1
  else
    RACE_RES="no summary (rc=$RACE_RC$([ "$RACE_RC" -eq 124 ] && echo ', TIMED OUT'))"
  fi
elif [ "$BUILD_RC" -eq 0 ]; then
  MEM_RES="compute-sanitizer not found"; RACE_RES="$MEM_RES"
fi

# initcheck (reads of never-written device memory), while time is left.
INIT_RES="not run"; INIT_S=0
[ "$HAVE_GPU" = 1 ] || INIT_RES="$NO_GPU"
if [ "$BUILD_RC" -eq 0 ] && [ "$HAVE_GPU" = 1 ] && [ -n "$SAN" ] \
   && [ $(( $(now) - START )) -lt 360 ]; then
  t=$(now)
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 80 "$SAN" --tool initcheck \
    --print-limit 20 "$PY" scripts/sanitize_ops.py > "$LOG_DIR/initcheck.log" 2>&1
  INIT_RC=$?
  INIT_S=$(( $(now) - t ))
  n=$(grep -oE "ERROR SUMMARY: [0-9]+" "$LOG_DIR/initcheck.log" | tail -1 | grep -oE "[0-9]+")
  INIT_RES="${n:-no summary} errors, script rc=$INIT_RC"
fi

# ---- the model on the GPU (only while time is left under the cap) ----------
# FusedResNet uses the CUDA conv kernels only when told to, until they pass here.
MODEL_RES="not run"; MODEL_S=0
[ "$HAVE_GPU" = 1 ] || MODEL_RES="$NO_GPU"
if [ "$BUILD_RC" -eq 0 ] && [ "$HAVE_GPU" = 1 ] && [ $(( $(now) - START )) -lt 420 ]; then
  t=$(now)
  RESNET_FUSED_UNVERIFIED_CUDA=1 timeout 90 "$PY" -m resnet_fused verify --arch resnet50 --size 128 \
    > "$LOG_DIR/verify.log" 2>&1
  VERIFY_RC=$?
  RESNET_FUSED_UNVERIFIED_CUDA=1 timeout 60 "$PY" -m resnet_fused bench --arch resnet50 \
    --dtype float16 --batch-sizes 256 --repeats 10 > "$LOG_DIR/bench.log" 2>&1
  MODEL_S=$(( $(now) - t ))
  MODEL_RES="verify rc=$VERIFY_RC; bench: $(grep -E '^resnet_fused ' "$LOG_DIR/bench.log" | tr -s ' ' | head -1)"
fi

# ---- summary --------------------------------------------------------------
tail -n 30 "$LOG_DIR/pytest.log" 2>/dev/null | grep -E "FAILED|ERROR|Error" | head -20 || true
grep -E "^(ok |BAD)|sanitize_ops:" "$LOG_DIR/memcheck.log" 2>/dev/null | head -20 || true
BUILD_RES="$([ "$BUILD_RC" -eq 0 ] && echo ok || echo "FAILED rc=$BUILD_RC"), $BUILD_WARN warnings in csrc/cuda"
# One summary file and one archive of the logs: few files to bring back.
{
  printf '== gpu_check summary (%s s total) ==\n' "$(( $(now) - START ))"
  printf '%-10s %-6s %s\n' step secs result
  printf '%-10s %-6s %s\n' build "$BUILD_S" "$BUILD_RES"
  printf '%-10s %-6s %s\n' pytest "$TEST_S" "$TEST_RES"
  printf '%-10s %-6s %s\n' memcheck "$MEM_S" "$MEM_RES"
  printf '%-10s %-6s %s\n' racecheck "$RACE_S" "$RACE_RES"
  printf '%-10s %-6s %s\n' initcheck "$INIT_S" "$INIT_RES"
  printf '%-10s %-6s %s\n' model "$MODEL_S" "$MODEL_RES"
} > "$LOG_DIR/summary.txt"
echo
cat "$LOG_DIR/summary.txt"
(cd "$LOG_DIR" && tar czf logs.tar.gz --exclude=logs.tar.gz --exclude=summary.txt ./* 2>/dev/null \
  && find . -maxdepth 1 -type f ! -name logs.tar.gz ! -name summary.txt -delete)
echo "logs: $LOG_DIR/logs.tar.gz, summary: $LOG_DIR/summary.txt"

[ "$BUILD_RC" -eq 0 ] && [ "$TEST_RC" -eq 0 ] && [ "$MEM_OK" -eq 1 ] && [ "$RACE_OK" -eq 1 ]
