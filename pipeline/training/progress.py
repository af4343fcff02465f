"""What the training loop measures between two log steps (``Window``, kept on the device) and what it
has logged so far (``Progress``: curves, throughput, the ETA), and the one all-reduce both need."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from pipeline.training import steps


def all_mean(values: torch.Tensor, world_size: int) -> torch.Tensor:
    """Mean over ranks of a float64 CPU tensor (a no-op on one worker)."""
    if world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.all_reduce(values)
        values = values / world_size
    return values


@dataclass
class Window:
    """Training statistics kept on the device between two log steps (float64: the sums match a
    host-side accumulation of the per-step floats exactly)."""

    device: torch.device
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        self.loss_sum, self.good, self.skipped = zero.clone(), zero.clone(), zero.clone()
        self.bad_run, self.worst_run = zero.clone(), zero.clone()  # the run is carried across windows
        self.grad_norm = zero.clone()

    def add(self, result: steps.StepResult) -> None:
        bad = result.skipped.to(torch.float64)
        self.loss_sum += torch.where(result.skipped, 0.0, result.loss.to(torch.float64))
        self.good += 1 - bad
        self.skipped += bad
        self.bad_run = (self.bad_run + 1) * bad
        self.worst_run = torch.maximum(self.worst_run, self.bad_run)
        self.grad_norm = result.grad_norm.to(torch.float64)

    def read(self, world: int) -> dict[str, float]:
        """Host values of the window (the loop's one device sync), mean loss over ranks; resets."""
        values = torch.stack([self.loss_sum, self.good, self.skipped, self.worst_run, self.grad_norm]).cpu()
        loss_sum, good, skipped, worst_run, grad_norm = values.tolist()
        loss = all_mean(torch.tensor([loss_sum / max(good, 1.0)], dtype=torch.float64), world).item()
        stats = {
            "loss": loss,
            "good": good,
            "skipped": skipped,
            "worst_run": worst_run,
            "grad_norm": grad_norm,
            "seconds": time.perf_counter() - self.started,
        }
        self.loss_sum.zero_(), self.good.zero_(), self.skipped.zero_()
        self.worst_run.copy_(self.bad_run)
        self.started = time.perf_counter()
        return stats


@dataclass
class Progress:
    """What the loop has logged so far: curves for the figure, the summary returned to the driver."""

    max_steps: int
    budget_seconds: float = 0.0  # trainer.max_minutes in seconds; 0: no time budget
    history: dict = field(default_factory=lambda: {"train/loss": [], "val/loss": []})
    throughput: list = field(default_factory=list)  # samples/s per log window (the benchmark reads it)
    logged_at: list = field(default_factory=list)  # wall-clock time at the end of each window (the same)
    last: dict = field(default_factory=dict)
    skipped_total: int = 0
    loop_started: float = field(default_factory=time.perf_counter)
    first_step: int = 0

    def eta(self, step: int) -> str:
        done = step - self.first_step
        if done <= 0:
            return "?"
        elapsed = time.perf_counter() - self.loop_started
        seconds = elapsed / done * (self.max_steps - step)
        if self.budget_seconds > 0:  # the run stops at whichever comes first
            seconds = max(min(seconds, self.budget_seconds - elapsed), 0.0)
        return time.strftime("%H:%M:%S", time.gmtime(seconds)) if seconds < 86400 else f"{seconds / 3600:.0f} h"
