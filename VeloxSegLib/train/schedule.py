"""Learning-rate schedule of the paper's recipe: linear warm-up, then cosine decay.

The paper trains 300 epochs: 10 linear warm-up epochs to lr 2.5e-4, then a cosine to 6e-6 over
the remaining 290. :func:`recipe_schedule` keeps those proportions for any run length. The
schedule is stepped once per optimizer step (iteration), so short runs still warm up smoothly;
its whole state is one integer, saved as JSON in checkpoints.
"""
from __future__ import annotations

import math
from typing import Dict

from ..errors import ConfigError

PAPER_EPOCHS = 300
PAPER_WARMUP_EPOCHS = 10
PAPER_LR = 2.5e-4
PAPER_MIN_LR = 6e-6
PAPER_WEIGHT_DECAY = 0.01


class WarmupCosineSchedule:
    """lr(step): linear from ``base_lr / warmup_steps`` up to ``base_lr`` over ``warmup_steps``,
    then a half cosine down to ``min_lr`` at ``total_steps`` (held there afterwards).

    Call :meth:`step` after every optimizer step; the optimizer's groups get the new lr (scaled
    by each group's ``lr_scale``, default 1, so fine-tuning can use a lower head/encoder ratio).
    A group with a ``start_step`` S joins late: lr 0 before step S, then its own linear ramp over
    ``warmup_steps`` (from step S) times the schedule, so weights that join a run in progress
    warm up as gently as the run did (fine-tuning's ``--fresh-warmup``; see :meth:`started`).
    """

    def __init__(self, optimizer, total_steps: int, warmup_steps: int = 0, base_lr: float = PAPER_LR,
                 min_lr: float = PAPER_MIN_LR):
        if total_steps < 1:
            raise ConfigError(f"the schedule needs at least one step, got {total_steps}")
        if not 0 <= warmup_steps <= total_steps:
            raise ConfigError(f"warm-up steps must be 0..{total_steps}, got {warmup_steps}")
        if base_lr <= 0 or min_lr < 0 or min_lr > base_lr:
            raise ConfigError(f"need 0 <= min_lr <= base_lr and base_lr > 0 (got {min_lr}, {base_lr})")
        self.optimizer = optimizer
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.base_lr = float(base_lr)
        self.min_lr = float(min_lr)
        self.last_step = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        """The learning rate used for optimizer step number ``step`` (0-based)."""
        if self.warmup_steps and step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        span = max(self.total_steps - self.warmup_steps, 1)
        t = min(max(step - self.warmup_steps, 0) / span, 1.0)
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * t))

    @property
    def lr(self) -> float:
        return self.lr_at(self.last_step)

    def group_lr(self, group: dict, step: int) -> float:
        """The learning rate of optimizer ``group`` at optimizer step ``step``."""
        lr = self.lr_at(step) * float(group.get("lr_scale", 1.0))
        start = int(group.get("start_step", 0))
        if step < start:
            return 0.0
        if start > 0 and self.warmup_steps:
            lr *= min(1.0, (step - start + 1) / self.warmup_steps)
        return lr

    def started(self, group: dict) -> bool:
        """Whether ``group`` takes part in the current step (see ``start_step``); a group that has
        not started must have no gradients at the optimizer step, so that AdamW leaves it alone
        (no moment updates, no weight decay)."""
        return self.last_step >= int(group.get("start_step", 0))

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.group_lr(group, self.last_step)

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def state_dict(self) -> Dict[str, float]:
        return {"last_step": self.last_step, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "base_lr": self.base_lr, "min_lr": self.min_lr}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        for key in ("total_steps", "warmup_steps"):
            if int(state[key]) != getattr(self, key):
                raise ConfigError(f"the checkpoint's schedule has {key}={state[key]}, this run {getattr(self, key)}; "
                                  f"resume with the same --epochs and --iterations-per-epoch")
        self.base_lr = float(state["base_lr"])
        self.min_lr = float(state["min_lr"])
        self.last_step = int(state["last_step"])
        self._apply()


def warmup_steps_for(total_steps: int) -> int:
    """The paper's warm-up share (10 of 300 epochs) of ``total_steps``, at least one step."""
    return max(1, round(total_steps * PAPER_WARMUP_EPOCHS / PAPER_EPOCHS)) if total_steps > 1 else 0


def min_lr_for(base_lr: float) -> float:
    """The paper's floor (6e-6 for 2.5e-4) scaled with the base learning rate."""
    return base_lr * PAPER_MIN_LR / PAPER_LR


def recipe_schedule(optimizer, epochs: int, iterations_per_epoch: int, base_lr: float = PAPER_LR,
                    min_lr: float = None) -> WarmupCosineSchedule:
    """The paper's schedule scaled to ``epochs`` x ``iterations_per_epoch`` optimizer steps."""
    total = int(epochs) * int(iterations_per_epoch)
    return WarmupCosineSchedule(optimizer, total, warmup_steps_for(total), base_lr,
                                min_lr_for(base_lr) if min_lr is None else min_lr)


__all__ = ["WarmupCosineSchedule", "recipe_schedule", "warmup_steps_for", "min_lr_for", "PAPER_LR",
           "PAPER_MIN_LR", "PAPER_WEIGHT_DECAY", "PAPER_EPOCHS", "PAPER_WARMUP_EPOCHS"]
