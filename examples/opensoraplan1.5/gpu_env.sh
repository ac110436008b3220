# NCCL / CUDA settings for the GPU launch scripts (sourced). Every value can be overridden from the environment.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"  # keeps TP/SP collectives in issue order
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"  # a dead rank fails the job
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"  # bucketed video shapes
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
# Multi-node: set NCCL_SOCKET_IFNAME / NCCL_IB_HCA for your fabric if NCCL does not pick the right interfaces.
