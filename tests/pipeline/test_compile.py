"""torch.compile in the training step: a compiler failure at the first step falls back to eager."""

from __future__ import annotations

import logging

import pytest
import torch

from bfn import EMA
from pipeline.config import load
from pipeline.training.build import build_model, build_optimizer
from pipeline.training.worker import CompiledStep


def setup():
    cfg = load(["experiment=smoke"])
    torch.manual_seed(0)
    model = build_model(cfg)
    x = torch.randint(0, 2, (4, 28, 28, 1), generator=torch.Generator().manual_seed(1))
    return cfg, model, build_optimizer(cfg, model), EMA(model, 0.9), x


def test_a_failing_compile_falls_back_to_eager_with_a_warning(monkeypatch, caplog):
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("backend compiler failed: inductor is not available")

    monkeypatch.setattr(torch, "compile", lambda model: Broken())
    cfg, model, optimizer, ema, x = setup()
    step = CompiledStep(model, True, rank=0)
    with caplog.at_level(logging.WARNING):
        result = step(model, x, optimizer, ema, grad_clip=cfg.optim.grad_clip, lr=1e-3)
    assert not bool(result.skipped) and step.model is model
    assert "torch.compile failed (RuntimeError: backend compiler failed" in caplog.text
    assert not bool(step(model, x, optimizer, ema, grad_clip=cfg.optim.grad_clip, lr=1e-3).skipped)


def test_compile_off_is_the_plain_step_and_a_real_error_still_raises(monkeypatch):
    cfg, model, optimizer, ema, x = setup()
    step = CompiledStep(model, False, rank=0)
    assert step.model is model and not step.pending
    monkeypatch.setattr(torch, "compile", lambda model: model)
    step = CompiledStep(model, True, rank=0)
    bad = torch.randint(0, 2, (4, 27, 28, 1))  # wrong shape: an error of the step, not of the compiler
    with pytest.raises(ValueError, match="data shape"):
        step(model, bad, optimizer, ema, grad_clip=cfg.optim.grad_clip, lr=1e-3)
