#!/bin/bash
# Synthetic launch script shaped like the Open-Sora Plan fork's pretrain_opensoraplan1_5.sh (see README.md here).
NNODES=1
GPUS_PER_NODE=8
WORLD_SIZE=$(($GPUS_PER_NODE*$NNODES))
TP=8
PP=1
CP=1
MBS=1
GRAD_ACC_STEP=1
GBS=$(($WORLD_SIZE*$GRAD_ACC_STEP*$MBS/$CP/$TP))
MM_DATA="./examples/opensoraplan1.5/data.json"
MM_MODEL="./examples/opensoraplan1.5/model_opensoraplan1_5.json"
MM_TOOL="./mindspeed_mm/tools/tools.json"
PROJECT_DIR="./runs/osp15"

GPT_ARGS="
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --context-parallel-size ${CP} \
    --micro-batch-size ${MBS} \
    --global-batch-size ${GBS} \
    --num-layers 32 \
    --hidden-size 3072 \
    --num-attention-heads 16 \
    --seq-length 1024 \
    --max-position-embeddings 1024 \
    --attention-dropout 0.0 \
    --hidden-dropout 0.0 \
    --tokenizer-type NullTokenizer \
    --vocab-size 0 \
    --position-embedding-type rope \
    --rotary-base 500000 \
    --swiglu \
    --no-masked-softmax-fusion \
    --bf16 \
    --lr 1e-5 \
    --min-lr 1e-5 \
    --adam-beta1 0.9 \
    --adam-beta2 0.999 \
    --adam-eps 1e-15 \
    --lr-decay-style constant \
    --weight-decay 1e-4 \
    --lr-warmup-init 1e-5 \
    --lr-warmup-iters 0 \
    --clip-grad 1.0 \
    --train-iters 100000 \
    --no-gradient-accumulation-fusion \
    --use-distributed-optimizer \
    --recompute-granularity full \
    --recompute-method block \
    --recompute-num-layers 0 \
    --normalization RMSNorm \
    --use-fused-rmsnorm \
    --qk-layernorm \
    --sequence-parallel \
    --optimizer-selection fused_ema_adamw \
    --seed 1024 \
    --data-parallel-random-init \
    --use-ema \
    --load $PROJECT_DIR \
    --fp32-residual-connection \
    --attention-softmax-in-fp32 \
    --accumulate-allreduce-grads-in-fp32
"
    # --no-load-optim \

MM_ARGS="
    --mm-data $MM_DATA \
    --mm-model $MM_MODEL \
    --mm-tool $MM_TOOL \
    --model_custom_precision \
    --clip_grad_ema_decay 0.99 \
    --selective_recom \
    --recom_ffn_layers 32 \
"

OUTPUT_ARGS="
    --save $PROJECT_DIR
    --log-interval 1 \
    --save-interval 1000 \
    --eval-interval 10 \
    --eval-iters 10 \
"

WANDB_ARGS="
    --wandb-project osp15 \
    --wandb-exp-name test \
    --wandb-save-dir . \
    --tensorboard-log-interval 1 \
"

torchrun --nproc_per_node $GPUS_PER_NODE pretrain_sora.py \
    $GPT_ARGS \
    $MM_ARGS \
    $OUTPUT_ARGS \
    $WANDB_ARGS \
    --distributed-backend nccl 2>&1 | tee logs/train.log
