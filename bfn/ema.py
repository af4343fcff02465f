"""Exponential moving average of a model's parameters (paper's EMA, decay 0.9999).

ema <- ema - (1 - decay)(ema - theta) after every optimiser step, on parameters only (buffers are
copied), with no warm-up or bias correction, as in the reference training loop.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.9999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, apply: torch.Tensor | None = None) -> None:
        """One EMA step. ``apply``: a 0-d bool tensor; when false the step changes nothing, decided
        on the device (a skipped optimiser step must not move the average)."""
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        # lerp(ema, theta, 1 - decay) = ema + (1 - decay)(theta - ema), one fused kernel per dtype
        if apply is None:
            torch._foreach_lerp_(ema_params, params, 1.0 - self.decay)
        else:
            weight = apply.to(ema_params[0].dtype) * (1.0 - self.decay)
            torch._foreach_lerp_(ema_params, params, [weight] * len(params))
        for ema_buffer, buffer in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_buffer.copy_(buffer)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
