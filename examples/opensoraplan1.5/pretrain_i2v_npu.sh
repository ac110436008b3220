#!/usr/bin/env bash
# Image-to-video pre-training of the Open-Sora Plan v1.5 SUV MMDiT on Ascend NPUs
# (torch_npu, HCCL), one call per node.
#
#   STAGE=video1 NNODES=64 NODE_RANK=$i MASTER_ADDR=node0 DATA_CONFIG=my_data.yaml SAVE_DIR=ckpt/video1 \
#       bash examples/opensoraplan1.5/pretrain_i2v_npu.sh
#   DRY_RUN=1 bash examples/opensoraplan1.5/pretrain_i2v_npu.sh   # print the torchrun command only
#
# NPUS_PER_NODE [8] devices per node; every other variable is listed in launch_common.sh.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=npu_env.sh
source "${HERE}/npu_env.sh"
# shellcheck source=launch_common.sh
source "${HERE}/launch_common.sh"
ENTRY=pretrain_i2v.py
DEVICE=npu
DEVICES_PER_NODE="${NPUS_PER_NODE:-8}"
mv_launch
