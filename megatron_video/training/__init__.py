"""The training loop, forward step, checkpoints and logging."""
