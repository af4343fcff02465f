"""The one place that uses torch's private optimiser API: a fused AdamW step skipped on the device.

Why it exists: a step whose loss or gradient norm is not finite must change nothing (weights,
Adam moments, step count, EMA). Deciding that on the host reads a flag from the GPU, one device
sync per step. Fused AdamW can take the decision itself, on the device: ``torch.amp.GradScaler``
hands it a ``found_inf`` tensor and the fused kernel leaves everything unchanged where it is
nonzero. That protocol is private (torch 2.13: the optimiser's ``_step_supports_amp_scaling``
attribute, and ``Adam.step`` reading ``self.found_inf``), so a torch upgrade may change it without
notice. Each optimiser class is therefore probed once, on a one-element parameter, before its
device-side skip is trusted; one that ignores ``found_inf`` takes the host branch (one sync per
step) with a warning instead of applying a non-finite update. ``tests/pipeline/test_torch_private.py``
checks the protocol against the installed torch.
"""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger(__name__)


def supports_device_skip(optimizer: torch.optim.Optimizer) -> bool:
    """True when ``optimizer`` (fused) skips a step on the device given ``found_inf``, as probed."""
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return False  # foreach/for-loop optimisers (the CPU's): the caller decides on the host
    return _honours_found_inf(type(optimizer))


def step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """``optimizer.step()``, a no-op on the device where the 0-d bool ``skip`` is true."""
    optimizer.found_inf = skip.float()
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


@functools.cache
def _honours_found_inf(optimizer_class: type) -> bool:
    """Whether a fused ``optimizer_class`` step with found_inf = 1 leaves its parameter and state alone."""
    param = torch.nn.Parameter(torch.ones(1))
    try:
        optimizer = optimizer_class([param], fused=True)
        param.grad = torch.ones(1)
        step_unless(optimizer, torch.tensor(False))  # one real step: the state exists
        before = param.detach().clone(), optimizer.state[param]["step"].clone()
        step_unless(optimizer, torch.tensor(True))
        honoured = torch.equal(param.detach(), before[0]) and torch.equal(optimizer.state[param]["step"], before[1])
    except Exception as error:  # noqa: BLE001 (any failure of the private protocol: decide on the host)
        log.warning(
            "%s: the device-side skip of a non-finite step failed a probe (%s: %s); non-finite steps are "
            "skipped on the host (one device sync per step)",
            optimizer_class.__name__,
            type(error).__name__,
            error,
        )
        return False
    if not honoured:
        log.warning(
            "%s ignores found_inf (a torch change); non-finite steps are skipped on the host (one device "
            "sync per step)",
            optimizer_class.__name__,
        )
    return honoured
