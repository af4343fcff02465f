"""Non-finite losses and gradients at the unit level (`pipeline.training.steps.train_step`, no Ray).

A step whose loss or gradient norm is not finite is skipped: no parameter, optimiser or EMA state
changes, and the next clean step trains normally. The run-level rule (stop after
trainer.max_bad_steps consecutive skipped steps, with a diagnostic checkpoint) is tested end to end
in tests/integration/test_faults.py.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from bfn import EMA
from pipeline.config import load
from pipeline.core.build import build_model, build_optimizer
from pipeline.training.steps import train_step


def setup(*overrides: str):
    cfg = load(["experiment=smoke", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    return cfg, model, optimizer, EMA(model, 0.9)


def snapshot(model, optimizer, ema) -> tuple:
    return (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()), copy.deepcopy(ema.state_dict()))


def assert_unchanged(before: tuple, model, optimizer, ema) -> None:
    after = snapshot(model, optimizer, ema)
    for old, new in zip(before[0].values(), after[0].values(), strict=True):
        assert torch.equal(old, new) or (old.isnan().any() and torch.equal(old.isnan(), new.isnan()))
    assert repr(before[1]["state"]) == repr(after[1]["state"])  # no Adam moments, no step count
    for old, new in zip(before[2].values(), after[2].values(), strict=True):
        if isinstance(old, torch.Tensor):
            assert torch.equal(old.nan_to_num(), new.nan_to_num())


def batch(n: int = 4) -> torch.Tensor:
    return torch.randint(0, 2, (n, 28, 28, 1), generator=torch.Generator().manual_seed(1))


def test_nan_parameter_skips_the_step_and_changes_nothing():
    cfg, model, optimizer, ema = setup()
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    before = snapshot(model, optimizer, ema)
    result = train_step(model, model, batch(), optimizer, ema, grad_clip=cfg.optim.grad_clip, lr=1e-3)
    assert result.skipped and math.isnan(result.loss)
    assert_unchanged(before, model, optimizer, ema)
    assert all(p.grad is None for p in model.parameters())  # no stale gradient left behind


def test_infinite_gradient_with_a_finite_loss_is_skipped():
    cfg, model, optimizer, ema = setup()
    hook = next(model.parameters()).register_hook(lambda g: torch.full_like(g, float("inf")))
    before = snapshot(model, optimizer, ema)
    result = train_step(model, model, batch(), optimizer, ema, grad_clip=cfg.optim.grad_clip, lr=1e-3)
    hook.remove()
    assert result.skipped and math.isfinite(result.loss) and not math.isfinite(result.grad_norm)
    assert_unchanged(before, model, optimizer, ema)
    clean = train_step(model, model, batch(), optimizer, ema, grad_clip=cfg.optim.grad_clip, lr=1e-3)
    assert not clean.skipped and math.isfinite(clean.grad_norm)  # the next clean step trains
    assert not torch.equal(before[0][next(iter(before[0]))], next(iter(model.state_dict().values())))


def test_nan_in_the_input_is_refused_as_bad_data():
    """A NaN in the data is not a numerical accident but bad input: the model refuses it with a
    ValueError before anything is updated (the data layer cannot produce one: bin centres)."""
    cfg = load(["experiment=cifar10_continuous", "net=cifar_unet_vdm_tiny", "data.batch_size=2"])
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer, ema = build_optimizer(cfg, model), EMA(model, 0.9)
    x = torch.rand(2, 32, 32, 3) * 2 - 1
    x[0, 3, 4, 1] = float("nan")
    before = snapshot(model, optimizer, ema)
    with pytest.raises(ValueError, match=r"continuous data must lie in \[-1, 1\], got \[nan"):
        train_step(model, model, x, optimizer, ema, grad_clip=cfg.optim.grad_clip, lr=1e-3)
    assert_unchanged(before, model, optimizer, ema)


@pytest.mark.parametrize("lr", [1e10, 1e30])
def test_a_huge_learning_rate_makes_every_later_step_non_finite(lr):
    """What the end-to-end test relies on: the first update is finite, it wrecks the weights, and
    every step after it is non-finite (skipped, so the wreck does not get worse)."""
    cfg, model, optimizer, ema = setup(f"optim.lr={lr}")
    results = [
        train_step(model, model, batch(), optimizer, ema, grad_clip=cfg.optim.grad_clip, lr=lr) for _ in range(4)
    ]
    assert [bool(r.skipped) for r in results] == [False, True, True, True]


def test_a_fused_optimiser_skips_on_the_device_and_changes_nothing():
    """The CUDA path (fused AdamW): the skip is the optimiser's found_inf, not a host branch. Fused
    AdamW runs on the CPU too, so the device-side decision is tested here."""
    cfg, model, _, ema = setup()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    train_step(model, model, batch(), optimizer, ema, grad_clip=cfg.optim.grad_clip, lr=1e-3)  # moments exist
    hook = next(model.parameters()).register_hook(lambda g: torch.full_like(g, float("nan")))
    before = snapshot(model, optimizer, ema)
    result = train_step(model, model, batch(), optimizer, ema, grad_clip=cfg.optim.grad_clip, lr=1e-3)
    hook.remove()
    assert bool(result.skipped) and result.skipped.device == result.loss.device
    assert_unchanged(before, model, optimizer, ema)
    clean = train_step(model, model, batch(), optimizer, ema, grad_clip=cfg.optim.grad_clip, lr=1e-3)
    assert not bool(clean.skipped)
    assert optimizer.state[next(model.parameters())]["step"].item() == 2  # the skipped step did not count
