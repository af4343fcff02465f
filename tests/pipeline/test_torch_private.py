"""torch's private optimiser API (`pipeline.training.torch_private`) against the installed torch.

The fused AdamW skip of a non-finite step relies on ``_step_supports_amp_scaling`` and ``found_inf``:
the installed torch honours them; an optimiser that ignores ``found_inf`` (what a torch upgrade
could bring) is caught by the probe and the step is skipped on the host instead of applied; no
other pipeline module touches the private names.
"""

from __future__ import annotations

import ast
import logging
import math

import torch

from pipeline.training import torch_private
from pipeline.training.steps import train_step
from tests.conftest import REPO
from tests.pipeline.test_nonfinite_steps import assert_unchanged, batch, setup, snapshot

PRIVATE_NAMES = {"_step_supports_amp_scaling", "found_inf"}


class IgnoresFoundInf(torch.optim.AdamW):
    """Fused AdamW as a torch that reads the skip flag from elsewhere would run it: found_inf unseen."""

    def step(self, closure=None):
        found_inf = self.__dict__.pop("found_inf", None)
        try:
            return super().step(closure)
        finally:
            if found_inf is not None:
                self.found_inf = found_inf


def test_the_installed_torch_skips_a_fused_adamw_step_on_the_device():
    param = torch.nn.Parameter(torch.ones(3))
    assert not torch_private.supports_device_skip(torch.optim.AdamW([param], foreach=True))
    optimizer = torch.optim.AdamW([param], lr=0.1, fused=True)
    assert torch_private.supports_device_skip(optimizer)
    param.grad = torch.ones(3)
    torch_private.step_unless(optimizer, torch.tensor(True))
    assert torch.equal(param.detach(), torch.ones(3)) and optimizer.state[param]["step"].item() == 0
    torch_private.step_unless(optimizer, torch.tensor(False))
    assert param.detach().lt(1).all() and optimizer.state[param]["step"].item() == 1
    assert not hasattr(optimizer, "found_inf")  # the flag never outlives the step


def test_an_optimiser_that_ignores_found_inf_skips_on_the_host(caplog):
    """Without the probe, the NaN gradient's update would be applied: every weight NaN."""
    cfg, model, _, ema = setup()
    optimizer = IgnoresFoundInf(model.parameters(), lr=1e-3, fused=True)
    kwargs = {"grad_clip": cfg.optim.grad_clip, "lr": 1e-3}
    with caplog.at_level(logging.WARNING):
        train_step(model, model, batch(), optimizer, ema, **kwargs)  # moments exist
    assert "IgnoresFoundInf ignores found_inf" in caplog.text, caplog.text
    hook = next(model.parameters()).register_hook(lambda g: torch.full_like(g, float("nan")))
    before = snapshot(model, optimizer, ema)
    result = train_step(model, model, batch(), optimizer, ema, **kwargs)
    hook.remove()
    assert bool(result.skipped) and not math.isfinite(result.grad_norm)
    assert_unchanged(before, model, optimizer, ema)
    assert not bool(train_step(model, model, batch(), optimizer, ema, **kwargs).skipped)


def test_only_torch_private_touches_the_private_optimiser_api():
    """torch changes its private API without notice: one small module uses it, with its reason."""
    users = set()
    for path in (REPO / "pipeline").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            attribute = isinstance(node, ast.Attribute) and node.attr in PRIVATE_NAMES
            if attribute or (isinstance(node, ast.Constant) and node.value in PRIVATE_NAMES):  # getattr(x, "...")
                users.add(str(path.relative_to(REPO)))
    assert users == {"pipeline/training/torch_private.py"}, users
