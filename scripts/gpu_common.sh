# What scripts/gpu_check.sh and scripts/gpu_bench.sh share, sourced by both from
# the repository root: the log folder, the environment probe, summary rows, the
# in-place build, the GPU gate and the summary with its log archive (few files to
# bring back from a GPU machine). Without a GPU every GPU step says
# "skipped: no GPU", so either script's flow can be checked anywhere.

LOG_DIR="${OUT:-out}"
PY="${PYTHON:-python3}"
# Built in place, not installed: the scripts under benchmarks/ import the package from here.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$LOG_DIR"
START=$(date +%s)
now() { date +%s; }

HAVE_GPU=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
NO_GPU="skipped: no GPU"

{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi -L 2>&1 || true
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)' 2>&1
  echo "cores: $(nproc)"
} > "$LOG_DIR/env.log"

ROWS=()  # summary rows: step, seconds, result
row() { ROWS+=("$(printf '%-13s %-6s %s' "$1" "$2" "$3")"); }
timed_out() { [ "$1" -eq 124 ] && echo ", TIMED OUT"; }

# build_in_place CAP: `setup.py build_ext --inplace` with the CUDA sources, killed at
# CAP seconds; GPU_SKIP_BUILD=1 keeps the build already there. Sets BUILD_RC.
build_in_place() {
  local t; t=$(now)
  if [ "${GPU_SKIP_BUILD:-0}" = 1 ]; then
    echo "build skipped (GPU_SKIP_BUILD=1)" > "$LOG_DIR/build.log"; BUILD_RC=0
  else
    FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" timeout "$1" "$PY" setup.py build_ext --inplace \
      > "$LOG_DIR/build.log" 2>&1
    BUILD_RC=$?
  fi
  local warn res
  warn=$(grep -ciE "csrc/cuda/.*warning" "$LOG_DIR/build.log" || true)
  if [ "$BUILD_RC" -eq 0 ]; then res="ok, $warn warnings in csrc/cuda"
  else res="FAILED rc=$BUILD_RC$(timed_out "$BUILD_RC")"; fi
  row build $(( $(now) - t )) "$res"
}

# A GPU step runs only with a GPU and a build; else this says why not.
gpu_ready() {
  if [ "$HAVE_GPU" != 1 ]; then echo "$NO_GPU"
  elif [ "$BUILD_RC" -ne 0 ]; then echo "skipped: build failed"
  fi
}

# write_summary NAME BUDGET [EXTRA]: summary.txt (the rows, then EXTRA), printed,
# and every other file of LOG_DIR packed into logs.tar.gz.
write_summary() {
  {
    printf '== %s summary (%s s total, budget %s s) ==\n' "$1" "$(( $(now) - START ))" "$2"
    printf '%-13s %-6s %s\n' step secs result
    printf '%s\n' "${ROWS[@]}"
    [ -n "${3:-}" ] && printf '%s\n' "$3"
  } > "$LOG_DIR/summary.txt"
  echo
  cat "$LOG_DIR/summary.txt"
  (cd "$LOG_DIR" && tar czf logs.tar.gz --exclude=logs.tar.gz --exclude=summary.txt ./* 2>/dev/null \
    && find . -maxdepth 1 -type f ! -name logs.tar.gz ! -name summary.txt -delete)
  echo "logs: $LOG_DIR/logs.tar.gz, summary: $LOG_DIR/summary.txt"
}
