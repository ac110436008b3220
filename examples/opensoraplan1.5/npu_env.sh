# CANN / HCCL settings for the Ascend launch scripts (sourced). Every value can be overridden from the environment.
#
# ASCEND_TOOLKIT_HOME: the CANN toolkit to use; its set_env.sh puts the CANN libraries, ATC and the HCCL
# runtime on the paths. The default is CANN's standard install location. torch_npu must match the CANN version.
ASCEND_TOOLKIT_HOME="${ASCEND_TOOLKIT_HOME:-/usr/local/Ascend/ascend-toolkit/latest}"
if [[ -f "${ASCEND_TOOLKIT_HOME}/set_env.sh" ]]; then
  # shellcheck disable=SC1091
  source "${ASCEND_TOOLKIT_HOME}/set_env.sh"
elif [[ "${DRY_RUN:-0}" != "1" ]]; then
  echo "CANN set_env.sh not found under ASCEND_TOOLKIT_HOME=${ASCEND_TOOLKIT_HOME}; install CANN or point" \
       "ASCEND_TOOLKIT_HOME at it (e.g. <install dir>/ascend-toolkit/latest)" >&2
  return 2
fi
export HCCL_CONNECT_TIMEOUT="${HCCL_CONNECT_TIMEOUT:-1200}"  # seconds to build communicators on 512 NPUs
export HCCL_EXEC_TIMEOUT="${HCCL_EXEC_TIMEOUT:-1800}"  # a hung collective fails the job after this
export HCCL_BUFFSIZE="${HCCL_BUFFSIZE:-200}"  # MB per communicator buffer (large SP all-gathers)
export TASK_QUEUE_ENABLE="${TASK_QUEUE_ENABLE:-2}"  # asynchronous operator dispatch
export CPU_AFFINITY_CONF="${CPU_AFFINITY_CONF:-1}"  # bind host threads near each NPU
export PYTORCH_NPU_ALLOC_CONF="${PYTORCH_NPU_ALLOC_CONF:-expandable_segments:True}"
export MULTI_STREAM_MEMORY_REUSE="${MULTI_STREAM_MEMORY_REUSE:-1}"
export ASCEND_GLOBAL_LOG_LEVEL="${ASCEND_GLOBAL_LOG_LEVEL:-3}"  # errors only
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
# Multi-node: HCCL_IF_IP / HCCL_SOCKET_IFNAME choose the host interface for HCCL's bootstrap if needed.
