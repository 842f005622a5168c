#!/usr/bin/env bash
# GPU measurements, run from the repository root on a machine with a GPU after
# scripts/gpu_check.sh has passed: `verify --arch all` (fp32 with TF32 and exact,
# fp16, bf16), `bench` of ResNet-50 at batch 1, 32 and 256 (torch.compile at 256)
# and of ResNet-18 at 256 (fp16, channels_last: torchvision eager, torch.compile,
# cuDNN's fused ops, resnet_fused), the per-shape harness (benchmarks/conv_shapes.py, with
# the Hopper wgmma kernel as a column of its own) and the captured
# forward at batch 1 (benchmarks/capture_latency.py). Writes summary.txt (the rows,
# then each bench's table) and logs.tar.gz to ${OUT:-out}/; without a GPU every
# step reports "skipped: no GPU". GPU_SKIP_BUILD=1 keeps a build already in place.
# Exit status: 0 only if verify passed and every step finished.
set -uo pipefail

# ---- time budget (seconds): one command may run 600 s in all ------------------
# bench prints its table only at the end, so torch.compile (two variants, a cold
# compile per batch shape, ~30-60 s each) runs in its own step at batch 256 only.
BUDGET=570
CAP_BUILD=100 CAP_VERIFY=75 CAP_VERIFY_EXACT=75 CAP_BENCH50=60 CAP_COMPILE=130 CAP_BENCH18=30
CAP_SHAPES=60 CAP_CAPTURE=30
if [ $((CAP_BUILD + CAP_VERIFY + CAP_VERIFY_EXACT + CAP_BENCH50 + CAP_COMPILE + CAP_BENCH18 \
        + CAP_SHAPES + CAP_CAPTURE)) -gt "$BUDGET" ]; then
  echo "gpu_bench: the step caps add up to more than BUDGET=$BUDGET s" >&2
  exit 2
fi

# shellcheck source=scripts/gpu_common.sh
. "$(dirname "$0")/gpu_common.sh"
build_in_place "$CAP_BUILD"

OK=1
# step NAME CAP LOG SUMMARY_REGEX CMD...: runs CMD under the cap into LOG, adds a
# row with the exit status and the last line of LOG that matches SUMMARY_REGEX.
step() {
  local name=$1 cap=$2 log=$3 pattern=$4; shift 4
  local why; why=$(gpu_ready)
  if [ -n "$why" ]; then row "$name" 0 "$why"; OK=0; return; fi
  local t rc; t=$(now)
  timeout "$cap" "$@" > "$LOG_DIR/$log" 2>&1
  rc=$?
  [ "$rc" -eq 0 ] || OK=0
  row "$name" $(( $(now) - t )) "rc=$rc$(timed_out "$rc"); $(grep -E "$pattern" "$LOG_DIR/$log" | tail -1)"
}

step verify "$CAP_VERIFY" verify.log "match" \
  "$PY" -m resnet_fused verify --arch all --size 224
# TF32 off: fp32 convs exact on both sides.
step "verify exact" "$CAP_VERIFY_EXACT" verify_exact.log "match" \
  "$PY" -c 'import sys, torch; torch.backends.cudnn.allow_tf32 = False; torch.backends.cuda.matmul.allow_tf32 = False
from resnet_fused.cli import main; sys.exit(main(["verify", "--arch", "all", "--size", "224"]))'
step "bench r50" "$CAP_BENCH50" bench_resnet50.log "^batch 256: " \
  "$PY" -m resnet_fused bench --arch resnet50 --dtype float16 --batch-sizes 1,32,256 \
  --repeats 20 --json "$LOG_DIR/bench_resnet50.json"
step "compile r50" "$CAP_COMPILE" bench_resnet50_compile.log "^batch 256: " \
  "$PY" -m resnet_fused bench --arch resnet50 --dtype float16 --batch-sizes 256 --compile \
  --repeats 20 --json "$LOG_DIR/bench_resnet50_compile.json"
step "bench r18" "$CAP_BENCH18" bench_resnet18.log "^batch 256: " \
  "$PY" -m resnet_fused bench --arch resnet18 --dtype float16 --batch-sizes 256 --repeats 20 \
  --json "$LOG_DIR/bench_resnet18.json"
step "conv shapes" "$CAP_SHAPES" conv_shapes.log "^resnet50, all convs" \
  "$PY" benchmarks/conv_shapes.py --tiles L,L2,H,CUTLASS --repeats 10 --json "$LOG_DIR/conv_shapes.json"
step capture "$CAP_CAPTURE" capture.log "speedup" \
  "$PY" benchmarks/capture_latency.py

# ---- summary: the rows, then the tables a reader wants without unpacking -------
write_summary gpu_bench "$BUDGET" "$(
  for log in bench_resnet50 bench_resnet50_compile bench_resnet18 conv_shapes capture; do
    [ -s "$LOG_DIR/$log.log" ] || continue
    printf '\n== %s ==\n' "$log"
    grep -vE '^\{|^W[0-9]{4} |^  batch [0-9]+ \.\.\.$' "$LOG_DIR/$log.log" | tail -45
  done
)"

[ "$BUILD_RC" -eq 0 ] && [ "$OK" -eq 1 ]
