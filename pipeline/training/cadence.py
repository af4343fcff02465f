"""When the training loop logs, validates, checkpoints and reports: step in, actions out.

Pure and deterministic, so every rank computes the same actions for the same step. That matters:
``ray.train.report`` is a barrier, and a report taken by one rank alone deadlocks the others.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Actions:
    log: bool  # all-reduce and log the window's train metrics; the only host-device sync point
    validate: bool  # rank 0 validates the EMA weights (and writes samples)
    checkpoint: bool  # rank 0 saves; every rank reports with the checkpoint
    report: bool  # every rank calls ray.train.report (a barrier)
    last: bool  # the loop ends after this step


@dataclass(frozen=True)
class Cadence:
    max_steps: int
    log_every: int
    val_every: int
    checkpoint_every: int

    @classmethod
    def from_config(cls, trainer) -> Cadence:
        return cls(trainer.max_steps, trainer.log_every, trainer.val_every, trainer.checkpoint_every)

    def actions(self, step: int, *, stop: bool = False) -> Actions:
        """Actions after optimiser step ``step`` (1-based). ``stop``: end now (time budget), which
        must itself be agreed by all ranks; the last step logs, validates and checkpoints."""
        last = stop or step >= self.max_steps
        log = last or step % self.log_every == 0
        validate = last or step % self.val_every == 0
        checkpoint = last or step % self.checkpoint_every == 0
        return Actions(
            log=log, validate=validate, checkpoint=checkpoint, report=log or validate or checkpoint, last=last
        )
