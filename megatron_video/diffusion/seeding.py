"""Seeds for the diffusion noise: identical on TP/CP peers, distinct across DP ranks, micro-batches and steps.

Rule: the noise (ε) and the timestep / σ of a micro-batch are drawn from a local `torch.Generator` seeded
with `noise_seed(base_seed, iteration, micro_batch, dp_rank)`. Every rank of one model replica (its TP and CP
peers, and its PP stages) has the same data-parallel rank and sees the same micro-batch, so it draws exactly
the same numbers without any communication; other replicas, micro-batches and iterations get other streams.
The global torch RNG is never consumed, so dropout / init RNG streams (megatron's RNG tracker) are untouched
and a resumed run that knows its iteration reproduces the same noise.

With context parallelism, draw the noise for the *full* latent (as every CP peer holds the same x0 before the
sequence split) and slice after sampling, so the CP shards of one sample fit together.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    # A fixed integer mixer (no dependence on Python's salted hash) so seeds agree across processes and runs.
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def noise_seed(base_seed: int, iteration: int, micro_batch: int, dp_rank: int) -> int:
    """A 63-bit seed from (base seed, iteration, micro-batch index, data-parallel rank); all must be >= 0."""
    parts = {"base_seed": base_seed, "iteration": iteration, "micro_batch": micro_batch, "dp_rank": dp_rank}
    for name, value in parts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    h = 0
    for value in parts.values():
        h = _splitmix64(h ^ _splitmix64(value))
    return h & ((1 << 63) - 1)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh local generator (does not touch the global RNG)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def noise_generator(
    base_seed: int, iteration: int, micro_batch: int, dp_rank: int, device: torch.device | str = "cpu"
) -> torch.Generator:
    """`make_generator(noise_seed(...))`: the generator to pass to `Objective.sample`."""
    return make_generator(noise_seed(base_seed, iteration, micro_batch, dp_rank), device)


def sample_generators(
    base_seed: int, iteration: int, positions: list[int], device: torch.device | str = "cpu"
) -> list[torch.Generator]:
    """One generator per sample, keyed by the sample's position in the global batch.

    The stream of a sample then does not depend on how the global batch is split into data-parallel ranks
    and micro-batches, so a run resumed at another DP size draws exactly the same noise (the training loop's
    rule). TP/CP/PP peers see the same positions and draw the same numbers."""
    return [noise_generator(base_seed, iteration, position, 0, device) for position in positions]
