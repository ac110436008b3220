# Shared body of the Open-Sora Plan v1.5 launch scripts (sourced, not run). The caller sets ENTRY
# (pretrain_t2v.py | pretrain_i2v.py), DEVICE (cuda | npu) and DEVICES_PER_NODE, then calls mv_launch.
#
# Everything comes from the environment (defaults in brackets):
#   cluster    NNODES [1]  NODE_RANK [0]  MASTER_ADDR [127.0.0.1]  MASTER_PORT [29500]
#   stage      STAGE [video1]: fills TP, MBS, GBS, LR, TRAIN_ITERS from stage_defaults.sh (= stages.yaml)
#   layout     TP  CP [1]  PP [1]  MBS  GBS  RECOMPUTE [selective: the FFN half, as the training fork | full | none]
#   files      MODEL_CONFIG [model.yaml here]  DATA_CONFIG [data/$STAGE.yaml here]  SAVE_DIR [checkpoints/$STAGE]
#              LOAD_DIR [$SAVE_DIR: resume from its latest checkpoint; a job's first run finds none there and
#                        starts from scratch; LOAD_DIR= (empty) never loads]
#              TENSORBOARD_DIR [$SAVE_DIR/tensorboard]  VAE_PATH T5_PATH CLIP_PATH [unset: use the feature cache]
#   schedule   LR  TRAIN_ITERS  SAVE_INTERVAL [1000]  LOG_INTERVAL [10]  SEED [1234]  PEAK_TFLOPS [per device]
#   i2v only   INPAINT_CONFIG [examples/i2v/inpaint.yaml]  INIT_FROM_T2V [unset] (MODEL_CONFIG defaults to model_i2v.yaml)
#   other      EXTRA_ARGS (appended verbatim, word-split)  TORCHRUN [torchrun]  DRY_RUN=1 prints the command only
# No credentials are read or needed.

mv_launch() {
  local here
  here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
  local repo="${REPO_DIR:-$(cd "${here}/../.." && pwd)}"

  : "${STAGE:=video1}"
  # shellcheck source=stage_defaults.sh
  source "${here}/stage_defaults.sh" || return $?
  : "${NNODES:=1}" "${NODE_RANK:=0}" "${MASTER_ADDR:=127.0.0.1}" "${MASTER_PORT:=29500}"
  : "${CP:=1}" "${PP:=1}" "${RECOMPUTE:=selective}"
  local i2v=0
  [[ "${ENTRY}" == "pretrain_i2v.py" ]] && i2v=1
  if (( i2v )); then
    : "${MODEL_CONFIG:=${here}/model_i2v.yaml}" "${INPAINT_CONFIG:=${repo}/examples/i2v/inpaint.yaml}"
  fi
  : "${MODEL_CONFIG:=${here}/model.yaml}" "${DATA_CONFIG:=${here}/data/${STAGE}.yaml}"
  : "${SAVE_DIR:=checkpoints/${STAGE}}" "${TENSORBOARD_DIR:=${SAVE_DIR}/tensorboard}" "${LOAD_DIR=${SAVE_DIR}}"
  : "${SAVE_INTERVAL:=1000}" "${LOG_INTERVAL:=10}" "${SEED:=1234}" "${TORCHRUN:=torchrun}"

  local n
  for n in NNODES NODE_RANK MASTER_PORT DEVICES_PER_NODE TP CP PP MBS GBS TRAIN_ITERS SAVE_INTERVAL LOG_INTERVAL; do
    if ! [[ "${!n}" =~ ^[0-9]+$ ]]; then
      echo "${n} must be a non-negative integer, got '${!n}'" >&2
      return 2
    fi
  done
  if (( NODE_RANK >= NNODES )); then
    echo "NODE_RANK ${NODE_RANK} must be below NNODES ${NNODES}" >&2
    return 2
  fi
  local world=$(( NNODES * DEVICES_PER_NODE )) model_parallel=$(( TP * CP * PP ))
  if (( model_parallel == 0 || world % model_parallel != 0 )); then
    echo "world size ${world} (NNODES x devices per node) is not divisible by TP x CP x PP = ${model_parallel}" >&2
    return 2
  fi

  local args=(
    "${repo}/${ENTRY}"
    --device "${DEVICE}" --bf16
    --model-config "${MODEL_CONFIG}" --data-config "${DATA_CONFIG}"
    --tensor-model-parallel-size "${TP}" --context-parallel-size "${CP}" --pipeline-model-parallel-size "${PP}"
    --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
    --micro-batch-size "${MBS}" --global-batch-size "${GBS}" --train-iters "${TRAIN_ITERS}"
    --lr "${LR}" --lr-decay-style constant --weight-decay 1e-4 --adam-beta1 0.9 --adam-beta2 0.999 --adam-eps 1e-15
    --clip-grad-ema-decay 0.99 --ema-decay 0.9999
    --save "${SAVE_DIR}" --save-interval "${SAVE_INTERVAL}" --log-interval "${LOG_INTERVAL}"
    --tensorboard-dir "${TENSORBOARD_DIR}" --seed "${SEED}"
  )
  (( TP > 1 )) && args+=(--sequence-parallel)
  case "${RECOMPUTE}" in
    full) args+=(--recompute-granularity full --recompute-method uniform --recompute-num-layers 1) ;;
    selective) args+=(--recompute-granularity selective --recompute-modules mlp) ;;
    none) ;;
    *) echo "RECOMPUTE must be none, selective or full, got '${RECOMPUTE}'" >&2; return 2 ;;
  esac
  if (( i2v )); then
    args+=(--inpaint-config "${INPAINT_CONFIG}")
    [[ -n "${INIT_FROM_T2V:-}" ]] && args+=(--init-from-t2v "${INIT_FROM_T2V}")
  fi
  [[ -n "${LOAD_DIR:-}" ]] && args+=(--load "${LOAD_DIR}")
  [[ -n "${VAE_PATH:-}" ]] && args+=(--vae-path "${VAE_PATH}")
  [[ -n "${T5_PATH:-}" ]] && args+=(--t5-path "${T5_PATH}")
  [[ -n "${CLIP_PATH:-}" ]] && args+=(--clip-path "${CLIP_PATH}")
  [[ -n "${PEAK_TFLOPS:-}" ]] && args+=(--peak-tflops "${PEAK_TFLOPS}")
  if [[ -n "${EXTRA_ARGS:-}" ]]; then
    local extra
    read -r -a extra <<< "${EXTRA_ARGS}"
    args+=("${extra[@]}")
  fi

  local cmd=(
    "${TORCHRUN}" --nnodes "${NNODES}" --node-rank "${NODE_RANK}" --nproc-per-node "${DEVICES_PER_NODE}"
    --master-addr "${MASTER_ADDR}" --master-port "${MASTER_PORT}"
    "${args[@]}"
  )
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    printf '%q ' "${cmd[@]}"
    printf '\n'
    return 0
  fi
  mkdir -p "${SAVE_DIR}"
  exec "${cmd[@]}"
}
