"""Learning-rate schedules as plain functions of the optimizer step (no scheduler state to save)."""

from __future__ import annotations

import math


def learning_rate(
    step: int,
    *,
    base_lr: float,
    total_steps: int,
    warmup_steps: int,
    schedule: str,
    steps_per_epoch: int,
    restart_epochs: int,
) -> float:
    """lr for optimizer step `step` (0-based).

    - warmup: linear from base_lr / warmup_steps up to base_lr over the first `warmup_steps`;
    - cosine: half a cosine from base_lr to 0 over the remaining steps;
    - cosine-restarts: SGDR (Loshchilov & Hutter), first cycle `restart_epochs` epochs, each next
      cycle twice as long, restarting at base_lr;
    - constant: base_lr.
    Extending a run (`resume --epochs N`) changes `total_steps`, so the cosine is recomputed over
    the new length from the step the run has reached.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    after = step - warmup_steps
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(after / span, 1.0)
        return 0.5 * base_lr * (1 + math.cos(math.pi * progress))
    if schedule == "cosine-restarts":
        cycle = max(1, restart_epochs * steps_per_epoch)
        while after >= cycle:
            after -= cycle
            cycle *= 2
        return 0.5 * base_lr * (1 + math.cos(math.pi * after / cycle))
    raise ValueError(f"unknown schedule {schedule!r}")
