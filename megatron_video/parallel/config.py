"""Parallel sizes and their validation, independent of any process group."""

from __future__ import annotations

from dataclasses import dataclass


class ParallelConfigError(ValueError):
    """A parallel layout that cannot work; the message names the offending values."""


@dataclass(frozen=True)
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    context_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    sequence_parallel: bool = False

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.context_parallel_size * self.pipeline_model_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        self.validate(world_size)
        return world_size // self.model_parallel_size

    def validate(self, world_size: int) -> None:
        for name in ("tensor_model_parallel_size", "context_parallel_size", "pipeline_model_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ParallelConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None and (vpp < 1 or self.pipeline_model_parallel_size == 1):
            raise ParallelConfigError(
                f"virtual pipeline size {vpp} needs --pipeline-model-parallel-size > 1 "
                f"(got {self.pipeline_model_parallel_size})"
            )
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ParallelConfigError("--sequence-parallel needs --tensor-model-parallel-size > 1")
        if world_size % self.model_parallel_size != 0:
            raise ParallelConfigError(
                f"world size {world_size} is not divisible by TP x CP x PP = "
                f"{self.tensor_model_parallel_size} x {self.context_parallel_size} x "
                f"{self.pipeline_model_parallel_size} = {self.model_parallel_size}"
            )
