#!/usr/bin/env bash
# GPU check of the CUDA kernels, run from the repository root on a machine with a
# GPU: build in place; run the CUDA tests once per conv kernel config
# (RESNET_FUSED_CUDA_TILE); run compute-sanitizer's memcheck, racecheck and
# initcheck over scripts/sanitize_ops.py; verify and bench ResNet-50 through
# FusedResNet. Writes one summary table (summary.txt) and one archive of the logs
# (logs.tar.gz) to ${OUT:-out}/. Without a GPU every GPU step reports
# "skipped: no GPU", so the flow can be checked anywhere.
# Exit status: 0 only if the build and its check, every test run, the sanitizers and verify
# passed.
set -uo pipefail

# ---- time budget (seconds) --------------------------------------------------
# One command on the GPU machine may run 600 s in all. Each step is killed at its
# cap; the caps add up to at most BUDGET, which leaves the rest for the uncapped
# glue (environment probe, summary, archive: a few seconds).
BUDGET=570
# build: a clean build took 36-44 s on the H200 machine's 16 cores (170 s with
# MAX_JOBS=2 on 2 shared cores), before the two CUTLASS units (~45 s each on one core
# here, built in parallel with the rest).
CAP_BUILD=120
# tests: the CUDA suite once per kernel config, all configs side by side.
CAP_TEST=140
CAP_MEMCHECK=60 CAP_RACECHECK=60 CAP_INITCHECK=60
CAP_VERIFY=50 CAP_BENCH=50 CAP_BUILD_CHECK=30
if [ $((CAP_BUILD + CAP_BUILD_CHECK + CAP_TEST + CAP_MEMCHECK + CAP_RACECHECK + CAP_INITCHECK + CAP_VERIFY \
        + CAP_BENCH)) -gt "$BUDGET" ]; then
  echo "gpu_check: the step caps add up to more than BUDGET=$BUDGET s" >&2
  exit 2
fi

# Kernel configs the tests run under: the size rule (auto) and each forced config.
# auto runs every test marked cuda; the forced configs run the reference suites.
# H (the Hopper wgmma kernel), L2 (L with the MMAs before the loads) and CUTLASS (the
# CUTLASS kernels) are not yet used by default: their rows are reported but
# do not decide the exit status.
CONFIGS="auto L M S X SIMT H L2 CUTLASS"
EXPERIMENTAL=" H L2 CUTLASS "
FORCED_TESTS="tests/test_cuda_ops.py tests/test_ops.py"

# compute-sanitizer ships in the toolkit's bin/, which need not be on PATH.
SAN=$(command -v compute-sanitizer || true)
for d in "${CUDA_HOME:-}" "$(dirname "$(command -v nvcc 2>/dev/null || echo /x/x)")/.." /usr/local/cuda; do
  [ -z "$SAN" ] && [ -x "$d/bin/compute-sanitizer" ] && SAN="$d/bin/compute-sanitizer"
done

# shellcheck source=scripts/gpu_common.sh
. "$(dirname "$0")/gpu_common.sh"
echo "compute-sanitizer: ${SAN:-not found}" >> "$LOG_DIR/env.log"
build_in_place "$CAP_BUILD"
# The extension shares torch's C++ runtime (a compiler that links libstdc++.a instead
# made every error message with a number in it crash, on this GPU image).
BUILD_CHECK_OK=0
if [ "$BUILD_RC" -eq 0 ]; then
  t=$(now)
  timeout "$CAP_BUILD_CHECK" "$PY" -m pytest -q tests/test_build.py -p no:cacheprovider > "$LOG_DIR/test_build.log" 2>&1
  rc=$?
  [ "$rc" -eq 0 ] && BUILD_CHECK_OK=1
  row "build check" $(( $(now) - t )) "rc=$rc$(timed_out "$rc"); $(tail -1 "$LOG_DIR/test_build.log")"
fi

# ---- tests, once per kernel config ------------------------------------------
# Side by side on the one GPU, each process with its share of the cores (the fp64
# references run on the CPU); tests that need most of the GPU memory take a lock
# (tests/common_utils.py: exclusive_gpu_memory).
junit_summary() {  # junit file, exit status -> one line
  "$PY" - "$1" <<'EOF' 2>/dev/null || echo "no junit report (rc=$2$(timed_out "$2"))"
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
n = lambda k: sum(int(s.get(k, 0)) for s in suites)
tests, fail, err, skip = n("tests"), n("failures"), n("errors"), n("skipped")
print(f"{tests - fail - err - skip} passed, {fail} failed, {err} errors, {skip} skipped")
EOF
}
TEST_OK=0
why=$(gpu_ready)
if [ -n "$why" ]; then
  for cfg in $CONFIGS; do row "pytest $cfg" 0 "$why"; done
else
  TEST_OK=1
  n_cfg=$(echo $CONFIGS | wc -w)
  threads=$(( $(nproc) / n_cfg )); [ "$threads" -ge 1 ] || threads=1
  declare -A PIDS
  t=$(now)
  for cfg in $CONFIGS; do
    if [ "$cfg" = auto ]; then sel="tests"; marks="cuda"; else sel="$FORCED_TESTS"; marks="cuda and not slow"; fi
    # shellcheck disable=SC2086
    RESNET_FUSED_CUDA_TILE=$cfg OMP_NUM_THREADS=$threads \
      timeout "$CAP_TEST" "$PY" -m pytest -q $sel -m "$marks" -p no:cacheprovider \
      --continue-on-collection-errors --junitxml="$LOG_DIR/pytest-$cfg.xml" \
      > "$LOG_DIR/pytest-$cfg.log" 2>&1 &
    PIDS[$cfg]=$!
  done
  for cfg in $CONFIGS; do
    wait "${PIDS[$cfg]}"; rc=$?
    [ "$rc" -eq 0 ] || [[ "$EXPERIMENTAL" == *" $cfg "* ]] || TEST_OK=0
    row "pytest $cfg" $(( $(now) - t )) "$(junit_summary "$LOG_DIR/pytest-$cfg.xml" "$rc")$(timed_out "$rc")"
  done
fi

# ---- sanitizers ---------------------------------------------------------------
# Our kernels only: sanitize_ops.py computes its references on the CPU.
# Without the caching allocator every tensor is its own allocation, so memcheck
# and initcheck see reads past a tensor's end instead of into a neighbour.
SAN_OK=1
sanitize() {  # tool, cap, extra options...
  local tool=$1 cap=$2; shift 2
  local why; why=$(gpu_ready)
  [ -z "$why" ] && [ -z "$SAN" ] && why="compute-sanitizer not found"
  if [ -n "$why" ]; then row "$tool" 0 "$why"; SAN_OK=0; return; fi
  local t rc line errs envs=()
  [ "$tool" = racecheck ] || envs=(PYTORCH_NO_CUDA_MEMORY_CACHING=1)
  t=$(now)
  env "${envs[@]}" timeout "$cap" "$SAN" --tool "$tool" "$@" --print-limit 20 \
    "$PY" scripts/sanitize_ops.py > "$LOG_DIR/$tool.log" 2>&1
  rc=$?
  line=$(grep -E "RACECHECK SUMMARY|ERROR SUMMARY" "$LOG_DIR/$tool.log" | tail -1)
  if [ -n "$line" ]; then
    errs=$(echo "$line" | grep -oE "[0-9]+ error" | head -1 | grep -oE "[0-9]+" || true)
    errs=${errs:-$(echo "$line" | grep -oE "[0-9]+" | head -1)}
    row "$tool" $(( $(now) - t )) "${line#*SUMMARY: }, script rc=$rc"
    [ "${errs:-1}" -eq 0 ] && [ "$rc" -eq 0 ] || SAN_OK=0
  else
    row "$tool" $(( $(now) - t )) "no summary (rc=$rc$(timed_out "$rc"))"
    SAN_OK=0
  fi
}
sanitize memcheck "$CAP_MEMCHECK"
sanitize racecheck "$CAP_RACECHECK" --racecheck-report hazard
sanitize initcheck "$CAP_INITCHECK"

# ---- the model ----------------------------------------------------------------
VERIFY_OK=0
why=$(gpu_ready)
if [ -n "$why" ]; then
  row verify 0 "$why"; row bench 0 "$why"
else
  t=$(now)
  timeout "$CAP_VERIFY" "$PY" -m resnet_fused verify --arch resnet50 \
    --size 128 > "$LOG_DIR/verify.log" 2>&1
  rc=$?
  [ "$rc" -eq 0 ] && VERIFY_OK=1
  row verify $(( $(now) - t )) "rc=$rc$(timed_out "$rc"); $(tail -1 "$LOG_DIR/verify.log")"
  t=$(now)
  timeout "$CAP_BENCH" "$PY" -m resnet_fused bench --arch resnet50 \
    --dtype float16 --batch-sizes 256 --repeats 10 > "$LOG_DIR/bench.log" 2>&1
  rc=$?
  row bench $(( $(now) - t )) "rc=$rc$(timed_out "$rc"); $(grep -E '^batch [0-9]+: ' "$LOG_DIR/bench.log" | head -1)"
fi

# ---- summary --------------------------------------------------------------
write_summary gpu_check "$BUDGET" "$(
  for f in "$LOG_DIR"/pytest-*.log; do
    [ -e "$f" ] || continue
    fails=$(grep -E "^(FAILED|ERROR) " "$f" | head -10)
    [ -n "$fails" ] && printf '\n%s:\n%s\n' "$(basename "$f")" "$fails"
  done
  grep -hE "^BAD|sanitize_ops:" "$LOG_DIR"/memcheck.log 2>/dev/null | head -20
)"

[ "$BUILD_RC" -eq 0 ] && [ "$BUILD_CHECK_OK" -eq 1 ] && [ "$TEST_OK" -eq 1 ] && [ "$SAN_OK" -eq 1 ] && [ "$VERIFY_OK" -eq 1 ]
