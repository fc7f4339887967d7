"""Learning-rate schedule: linear warm-up, constant, linear decay to 0 over the final fraction.

A pure function of the step, so a resumed run needs only the step counter. Adam uses all three
phases by default; schedule-free optimizers average their iterates instead of decaying, so by
default they run at a constant lr (Trainer.lr picks the defaults per optimizer).
"""
from __future__ import annotations


def warmup_steps_for(total_steps: int, warmup_steps: int) -> int:
    """Warm-up capped at 10% of the run, so short runs still train at full lr."""
    return max(0, min(warmup_steps, total_steps // 10))


def lr_at(step: int, total_steps: int, base_lr: float, warmup: int, decay_fraction: float = 0.2) -> float:
    """lr for optimizer step `step` (0-based) of `total_steps`."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    decay_start = int(total_steps * (1 - decay_fraction))
    if decay_fraction > 0 and step >= decay_start:
        remaining = max(total_steps - decay_start, 1)
        return base_lr * max(0.0, (total_steps - step) / remaining)
    return base_lr
