#!/usr/bin/env bash
# Device check for one GPU (written for an H200; at most 8 minutes):
#   bench/gpu/check.sh            self-check on cuda, then bench/gpu/device_check.py (20 bf16 steps of an
#                                 8.5B-width reduced-depth SUV at video-stage latent sizes, save + exact resume,
#                                 dense comparison); figures in bench/gpu/results/results.json
#   bench/gpu/check.sh --dry      the same on CPU at tiny sizes (DRY_RUN=1 is the same; CI runs this)
# The machine's Python needs torch, transformers and tensorboard; anything else (megatron-core, ...) is installed
# offline from the wheels in bench/gpu/wheels/ (WHEELS_DIR) when that folder holds any, e.g. prepared with
#   pip download -d bench/gpu/wheels --no-deps megatron-core==0.16.1 einops safetensors av pyarrow psutil
# on a connected machine with the GPU machine's Python version (the rest of requirements.txt it has).
# CHECK_OUT sets the results folder, PYTHON the interpreter.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
DRY="${DRY_RUN:-0}"
if [[ "${1:-}" == "--dry" ]]; then DRY=1; fi
OUT="${CHECK_OUT:-$REPO/bench/gpu/results}"
WHEELS="${WHEELS_DIR:-$REPO/bench/gpu/wheels}"
PYTHON="${PYTHON:-python}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"

shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if (( ${#wheels[@]} )); then
  echo "installing ${#wheels[@]} wheels from $WHEELS (offline)"
  "$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELS" "${wheels[@]}"
fi

if [[ "$DRY" == 1 ]]; then
  "$PYTHON" -m megatron_video.parallel.selfcheck --world-size 2 --tp 2 | tee "$OUT/selfcheck.txt"
  timeout 900 "$PYTHON" bench/gpu/device_check.py --dry --out "$OUT"
else
  timeout 60 "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 1 \
    -m megatron_video.parallel.selfcheck --tp 1 --device cuda | tee "$OUT/selfcheck.txt"
  timeout 410 "$PYTHON" bench/gpu/device_check.py --out "$OUT"
fi
