"""torch.compile in the training step: a compiler failure at the first step falls back to eager."""

from __future__ import annotations

import logging

import pytest
import torch

from bfn import EMA
from pipeline.config import load
from pipeline.core.build import build_model, build_optimizer
from pipeline.training.steps import train_step
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


@pytest.mark.slow
def test_the_smoke_step_really_compiles_on_the_cpu_and_matches_eager(caplog):
    """trainer.compile=true for real: dynamo captures the smoke network, inductor builds it with the
    CPU's C compiler (~1 min cold, the inductor cache makes reruns fast), and three compiled steps
    give eager's losses and weights. Inductor draws random numbers its own way unless told to fall
    back to torch's generator, so the comparison is made with fallback_random."""
    import torch._inductor.config
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg, eager_model, eager_optimizer, eager_ema, x = setup()
    _, model, optimizer, ema, _ = setup()
    kwargs = {"grad_clip": cfg.optim.grad_clip, "lr": 1e-3}
    compiled, seeds = CompiledStep(model, True, rank=0), (10, 11, 12)
    losses, reference = [], []
    try:
        with torch._inductor.config.patch(fallback_random=True), caplog.at_level(logging.INFO, "pipeline"):
            for seed in seeds:  # the loss draws t and the sender noise from torch's global generator
                torch.manual_seed(seed)
                losses.append(compiled(model, x, optimizer, ema, **kwargs).loss.item())
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert "torch.compile failed" not in caplog.text and "torch.compile warm-up" in caplog.text, caplog.text
    assert compiled.model is not model and graphs >= 1, graphs  # dynamo captured graphs for inductor
    for seed in seeds:
        torch.manual_seed(seed)
        reference.append(train_step(eager_model, eager_model, x, eager_optimizer, eager_ema, **kwargs).loss.item())
    assert losses == pytest.approx(reference, rel=1e-5), (losses, reference)
    for mine, theirs in zip(model.parameters(), eager_model.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-3, atol=1e-5)  # Adam normalises: tiny gradients differ most
