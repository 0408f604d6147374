#!/usr/bin/env bash
# The GPU measurements, one command, on a lent GPU machine (the `device` tool), repo root:
#
#   here:   bash bench/gpu/bundle.sh                       # once: packs what that machine lacks
#   there:  run(command="bash bench/gpu/run.sh", carry=[".gpu"])
#
# One device call may run 10 minutes: if all four steps do not fit, run them as two calls,
# `run.sh sd3 sd3-host` and `run.sh plane batch` (each call unpacks the bundle again; a fresh
# machine also rebuilds the full-size weights, about a minute).
# Steps (default: all, in this order; name some to run only those, e.g. `run.sh plane`):
#   sd3       full-size SD3-Medium (random weights, bf16), 1024x1024, 28 steps: the mesh over
#             the REST API against diffusers' in-process StableDiffusion3Pipeline, interleaved,
#             with UCX between the services (GPU tensors device to device)
#   sd3-host  the same mesh with UCX off: GPU tensors hop through host shared memory
#   plane     bench/tensor_plane.py --device cuda: ucx-cuda and shm-cuda against a device copy
#   batch     bench/batching.py on the full-size transformer: 16 requests at once, max batch 1-8
#   parallel  (not in the default list) bench/parallel.py --full-size: SD3-Medium and Flux.1-dev
#             (random weights, bf16, SIZE px, STEPS steps, RUNS timed requests per degree). On one
#             GPU a group of 2 cannot form (NCCL: one GPU per rank), so it times the unsplit
#             request, SD3's CFG split run in one process (its two halves one after the other: one
#             device's compute, and its latents against the unsplit ones) and a split's exchange
#             through host memory (gloo between two processes plus the device-host copies: an upper
#             bound for NCCL); with 2 GPUs or more, the group itself (add PARALLEL_ARGS="--sweep"
#             for the load sweep against 2 replicas). Writing Flux.1-dev's random weights (24 GB)
#             takes a minute or two on a fresh machine; PARALLEL_ARGS="--cases sd3" skips Flux.
#   tests     (not in the default list) the GPU-only tests and the mesh's equality tests on the
#             GPU (TESTS overrides which)
# Output: $OUT (the device tool's) or bench/results/gpu: one text log per step (what each
# script prints), and details.tgz (every step's JSON results and the mesh logs). RUNS (default 5) sets the timed runs per system; DEVICE, SIZE,
# STEPS and SD3_ARGS (e.g. "--max-layers 1") exist to smoke-test this script on a CPU, e.g.
#   DEVICE=cpu SIZE=128 STEPS=2 RUNS=1 SD3_ARGS="--max-layers 1" BUNDLE=none bash bench/gpu/run.sh parallel
# STEP_TIMEOUT (seconds, default none) stops a step that hangs so the next one still runs: a
# device call is cut at 10 minutes, and what a cut call's steps printed is all that comes back.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-bench/results/gpu}"
RUNS="${RUNS:-5}" DEVICE="${DEVICE:-cuda}" SIZE="${SIZE:-1024}" STEPS="${STEPS:-28}"
DETAILS="$(mktemp -d)"
mkdir -p "$OUT"
BUNDLE="${BUNDLE:-.gpu/site.tar.xz}"  # BUNDLE=none: use this Python's own packages
if [ -f "$BUNDLE" ]; then
  tar -xJf "$BUNDLE" -C /tmp || exit 1
  export PYTHONPATH="/tmp/site:$PWD" PATH="/tmp/site/bin:$PATH"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY="${PYTHON:-python3}"
# The mesh's processes run in sessions of their own (lego/launcher.py), so a step stopped by
# STEP_TIMEOUT would leave them holding GPU memory for the next step: reap them between steps.
reap() { pkill -9 -f -- '-m services\.' ; pkill -9 -x nats-server; true; }
trap reap EXIT
limit() { if [ "${STEP_TIMEOUT:-0}" -gt 0 ]; then timeout "$STEP_TIMEOUT" "$@"; else "$@"; fi; }
# The tests whose GPU paths skip on a CPU (CUDA tensors over UCX, bf16), and the mesh's own
# equality tests, which on a GPU run every service and diffusers' oracle on the GPU.
GPU_TESTS="tests/unit/test_tensor_plane_ucx.py tests/unit/test_dtype.py tests/e2e/test_transports.py tests/e2e/test_generate.py"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(sd3 sd3-host plane batch)

nvidia-smi -L || echo "run.sh: no nvidia-smi; these measurements need a GPU"
$PY - <<'PY' || exit 1
import torch, diffusers, transformers, nats
try:
    import ucxx; u = ucxx.__version__
except ImportError as exc:
    u = f"missing ({exc})"
print(f"torch {torch.__version__} (cuda {torch.version.cuda}, GPU {torch.cuda.is_available()}), "
      f"diffusers {diffusers.__version__}, transformers {transformers.__version__}, ucxx {u}")
PY

sd3() {  # $1: result folder name, rest: extra environment
  local name="$1"; shift
  local t0=$SECONDS
  # shellcheck disable=SC2086
  limit env "$@" $PY bench/overhead.py --full-size --device "$DEVICE" --sizes "$SIZE" --steps "$STEPS" --runs "$RUNS" \
    --warmup 2 ${SD3_ARGS:-} --out "$DETAILS/$name" 2>&1 | tee "$OUT/$name.txt"
  local rc=$?
  echo "run.sh: $name took $((SECONDS - t0)) s (exit $rc)"
  return $rc
}
status=0
for step in "${steps[@]}"; do
  reap
  case "$step" in
    sd3) sd3 sd3 LEGO_UCX_ENABLED=auto || status=1 ;;
    sd3-host) sd3 sd3-host LEGO_UCX_ENABLED=off || status=1 ;;
    plane)
      t0=$SECONDS
      limit $PY bench/tensor_plane.py --device "$DEVICE" --out "$DETAILS/plane" 2>&1 | tee "$OUT/plane.txt" || status=1
      echo "run.sh: plane took $((SECONDS - t0)) s" ;;
    batch)
      t0=$SECONDS
      # shellcheck disable=SC2086
      limit $PY bench/batching.py --full-size --device "$DEVICE" --size "$SIZE" --steps "$STEPS" ${SD3_ARGS:-} \
        --out "$DETAILS/batch" 2>&1 | tee "$OUT/batch.txt" || status=1
      echo "run.sh: batch took $((SECONDS - t0)) s" ;;
    parallel)
      t0=$SECONDS
      # shellcheck disable=SC2086
      limit $PY bench/parallel.py --full-size --device "$DEVICE" --size "$SIZE" --steps "$STEPS" --degree-repeats "$RUNS" \
        ${SD3_ARGS:-} ${PARALLEL_ARGS:-} --out "$DETAILS/parallel" 2>&1 | tee "$OUT/parallel.txt" || status=1
      echo "run.sh: parallel took $((SECONDS - t0)) s" ;;
    tests)
      t0=$SECONDS
      # shellcheck disable=SC2086
      limit $PY -m pytest -q -p no:cacheprovider ${TESTS:-$GPU_TESTS} 2>&1 | tee "$OUT/tests.txt" || status=1
      echo "run.sh: tests took $((SECONDS - t0)) s" ;;
    *) echo "run.sh: unknown step $step (sd3, sd3-host, plane, batch, parallel, tests)"; exit 2 ;;
  esac
done
tar -czf "$OUT/details.tgz" -C "$DETAILS" . && rm -rf "$DETAILS"
exit $status
