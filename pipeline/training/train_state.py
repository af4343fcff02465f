"""The train state a worker builds, resumes and advances: ``TrainState`` (model, EMA, optimiser, step,
epoch), made at step 0 (``new_state``), then resumed from a checkpoint or started from another run's
weights (``restore``). The loop that advances it is ``worker``; the checkpoint format is ``checkpointing``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import torch

from bfn import BFN, EMA
from pipeline.config import Config
from pipeline.core import checkpointing
from pipeline.core.build import build_model, build_optimizer

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """What the loop advances and a checkpoint holds: the model (unwrapped, as saved), its EMA, the
    optimiser, the optimiser steps taken and the epoch of the data stream being read."""

    model: BFN
    ema: EMA
    optimizer: torch.optim.Optimizer
    step: int = 0
    epoch: int = 0

    def load(self, saved: dict[str, Any]) -> None:
        """Take a checkpoint's state (``checkpointing.resume_state``); the data stream restarts at a fresh
        pass, so the epoch after the saved one."""
        self.model.load_state_dict(saved["model"])
        self.ema.load_state_dict(saved["ema"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.step, self.epoch = saved["train_state"]["step"], saved["train_state"]["epoch"] + 1

    def save(self, folder: str | Path, *, config: dict, extra: dict | None = None) -> Path:
        """Write this state as a checkpoint folder; ``extra``: more keys for its train_state.json."""
        return checkpointing.save(
            folder,
            model=self.model,
            ema=self.ema,
            optimizer=self.optimizer,
            train_state={"step": self.step, "epoch": self.epoch, **(extra or {})},
            config=config,
        )


def _seed(seed: int, rank: int, step: int) -> None:
    """Seed torch for (trainer.seed, rank, step): ranks differ, and a resumed rank other than 0 draws anew."""
    torch.manual_seed(seed * 1_000_003 + rank * 7919 + step)


def new_state(cfg: Config, device) -> TrainState:
    """Model, EMA and optimiser at step 0, with the same initial weights on every launch and rank."""
    torch.manual_seed(cfg.trainer.seed)
    raw = build_model(cfg).to(device)
    # values are checked where data enters (every shard before Ray starts, driver.preflight) and the
    # data layer can only produce valid ones, so the step does not read batches back to the host
    raw.check_values = False
    ema = EMA(raw, cfg.optim.ema_decay)
    return TrainState(raw, ema, build_optimizer(cfg, raw))


def restore(cfg: Config, state: TrainState, newest_checkpoint, *, device, rank: int, world: int) -> None:
    """Resume ``state`` from Ray's checkpoint or the driver's newer ``newest_checkpoint`` (chosen by rank 0
    alone, the same on every rank: ``checkpointing.resume_state``), or start it from ``run.init_from``'s
    weights; then seed the ranks that did not get their RNG back."""
    saved = checkpointing.resume_state(ray.train.get_checkpoint(), newest_checkpoint, device, rank, world)
    if saved:
        state.load(saved)
        if rank == 0:
            checkpointing.set_rng_state(saved["rng"])
            log.info("resumed from step %d (%s)", state.step, saved["path"])
    elif cfg.run.init_from:
        _init_from(cfg.run.init_from, state, device, rank)
    if not (saved and rank == 0):
        _seed(cfg.trainer.seed, rank, state.step)


def _init_from(folder: str, state: TrainState, device, rank: int) -> None:
    """A new run starting from another checkpoint's weights (fine-tuning): model and EMA from its
    raw and EMA weights, read weights-only; optimiser state and step start fresh."""
    saved = checkpointing.read_for_init(folder, map_location=device)
    state.model.load_state_dict(saved["model"])
    state.ema.load_state_dict(saved["ema"])
    if rank == 0:
        log.info("initialised from the weights of %s (a new run: fresh optimiser, step 0)", folder)
