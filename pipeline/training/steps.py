"""One training step and one validation pass; no Ray calls, so they are unit-testable.

Shapes: x is a batch (B, *data_shape) in the model's data space (long ids or floats in [-1, 1]).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from bfn import BFN, EMA, NLLEstimate


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    skipped: bool  # non-finite loss or gradient: no parameter update


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on GPU when enabled; the BFN losses themselves always run in float32."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(model, raw: BFN, x: torch.Tensor, optimizer, ema: EMA, *, grad_clip: float,
               lr: float, amp: bool = False) -> StepResult:  # fmt: skip
    """Continuous-time loss -> backward -> clip -> AdamW -> EMA.

    ``model`` may be the DDP wrapper of ``raw``. The step is skipped when the (all-reduced)
    gradient norm is not finite, a decision every rank takes identically; a non-finite loss on one
    rank poisons the shared gradients, so it is caught the same way.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast(x.device, amp):
        loss = model(x)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), max_norm).item()
    loss_value = loss.item()
    if not (math.isfinite(grad_norm) and math.isfinite(loss_value)):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(loss_value, grad_norm, skipped=True)
    optimizer.step()
    ema.update(raw)
    return StepResult(loss_value, grad_norm, skipped=False)


@torch.no_grad()
def validate(model: BFN, batches, *, nll_steps: int, nll_repeats: int,
             max_batches: int = 0) -> dict[str, float | NLLEstimate]:  # fmt: skip
    """Continuous-time loss and (when nll_steps > 0) the NLL estimate over validation batches.

    Returns {"loss": nats/dim, "nll": NLLEstimate or None, "examples": count}.
    """
    model.eval()
    cts, n_step, recon, examples = [], [], [], 0
    for i, x in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        cts.append(model.continuous_time_loss(x).mean(-1))
        if nll_steps:
            n_step.append(torch.stack([model.n_step_loss(x, nll_steps) for _ in range(nll_repeats)]))
            recon.append(torch.stack([model.reconstruction_loss(x) for _ in range(nll_repeats)]))
        examples += x.shape[0]
    if not examples:
        raise ValueError("validation split yielded no batches")
    nll = None
    if nll_steps:
        nll = NLLEstimate.from_terms(torch.cat(n_step, 1), torch.cat(recon, 1), model.num_dims)
    return {"loss": torch.cat(cts).mean().item(), "nll": nll, "examples": examples}


def nll_metrics(nll: NLLEstimate, unit: str, prefix: str = "val/") -> dict[str, float]:
    """Flat metric dict: nats/dim, bits/dim and the benchmark unit, each with its standard error."""
    out = {}
    for name in dict.fromkeys(("nats/dim", "bits/dim", unit)):
        values = nll.in_unit(name)
        key = name.replace("/", "_per_")
        out[f"{prefix}nll_{key}"] = values["total"]
        out[f"{prefix}nll_{key}_se"] = values["total_se"]
        out[f"{prefix}nstep_loss_{key}"] = values["loss"]
        out[f"{prefix}reconstruction_{key}"] = values["reconstruction"]
    return out
