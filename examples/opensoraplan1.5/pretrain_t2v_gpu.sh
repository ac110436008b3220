#!/usr/bin/env bash
# Text-to-video pre-training of the Open-Sora Plan v1.5 SUV MMDiT on GPUs (NCCL),
# one call per node.
#
#   STAGE=video1 NNODES=64 NODE_RANK=$i MASTER_ADDR=node0 DATA_CONFIG=my_data.yaml SAVE_DIR=ckpt/video1 \
#       bash examples/opensoraplan1.5/pretrain_t2v_gpu.sh
#   DRY_RUN=1 bash examples/opensoraplan1.5/pretrain_t2v_gpu.sh   # print the torchrun command only
#
# GPUS_PER_NODE [8] devices per node; every other variable is listed in launch_common.sh.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=gpu_env.sh
source "${HERE}/gpu_env.sh"
# shellcheck source=launch_common.sh
source "${HERE}/launch_common.sh"
ENTRY=pretrain_t2v.py
DEVICE=cuda
DEVICES_PER_NODE="${GPUS_PER_NODE:-8}"
mv_launch
