"""Optimiser spaces: learning rate, linear warm-up steps and EMA decay.

``optim``: for real runs (thousands of steps); ``optim_short``: for short local runs (hundreds of
steps), where an EMA of 0.9999 would still be the initial weights at validation time; ``lr``: the
learning rate alone.
"""

from __future__ import annotations

from ray import tune


def optim() -> dict:
    return {
        "optim.lr": tune.loguniform(3e-5, 3e-3),
        "optim.warmup_steps": tune.choice([0, 500, 5000]),
        "optim.ema_decay": tune.choice([0.999, 0.9995, 0.9999]),
    }


def optim_short() -> dict:
    return {
        "optim.lr": tune.loguniform(1e-4, 1e-2),
        "optim.warmup_steps": tune.choice([0, 10, 50]),
        "optim.ema_decay": tune.choice([0.9, 0.95, 0.99]),
    }


def lr() -> dict:
    return {"optim.lr": tune.loguniform(1e-4, 1e-2)}
