#!/usr/bin/env bash
# Image-to-video on CPU, 4 ranks (TP 2 x DP 2), online encoding (the masked video is VAE-encoded per step).
#
#   DATA_CONFIG=...      data config without cache_path (decoded videos, 8n+1 frames)
#   VAE_PATH=...         WF-VAE weights (safetensors);  VAE_CONFIG=... its config JSON (optional)
#   T5_PATH=... CLIP_PATH=...   local text encoder directories
#   MODEL_CONFIG         default: examples/i2v/model_small_i2v.yaml
#   INPAINT_CONFIG       default: examples/i2v/inpaint.yaml
#   INIT_FROM_T2V        optional T2V checkpoint directory to start from
#   SAVE_DIR             default: ./checkpoints/i2v
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
: "${DATA_CONFIG:?set DATA_CONFIG}" "${VAE_PATH:?set VAE_PATH}" "${T5_PATH:?set T5_PATH}" "${CLIP_PATH:?set CLIP_PATH}"
MODEL_CONFIG="${MODEL_CONFIG:-$REPO/examples/i2v/model_small_i2v.yaml}"
INPAINT_CONFIG="${INPAINT_CONFIG:-$REPO/examples/i2v/inpaint.yaml}"
SAVE_DIR="${SAVE_DIR:-./checkpoints/i2v}"
PYTHON="${PYTHON:-python}"

EXTRA=()
if [[ -n "${VAE_CONFIG:-}" ]]; then EXTRA+=(--vae-config "$VAE_CONFIG"); fi
if [[ -n "${INIT_FROM_T2V:-}" ]]; then EXTRA+=(--init-from-t2v "$INIT_FROM_T2V"); fi

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m torch.distributed.run --nproc-per-node 4 "$REPO/pretrain_i2v.py" --device cpu \
    --tensor-model-parallel-size 2 --use-distributed-optimizer \
    --model-config "$MODEL_CONFIG" --data-config "$DATA_CONFIG" --inpaint-config "$INPAINT_CONFIG" \
    --vae-path "$VAE_PATH" --t5-path "$T5_PATH" --clip-path "$CLIP_PATH" \
    --train-iters "${TRAIN_ITERS:-20}" --global-batch-size 4 --micro-batch-size 1 --lr 1e-3 \
    --lr-decay-style constant --weight-decay 1e-4 --adam-eps 1e-15 --log-interval 1 \
    --save "$SAVE_DIR" --load "$SAVE_DIR" --save-interval "${SAVE_INTERVAL:-10}" "${EXTRA[@]}"
