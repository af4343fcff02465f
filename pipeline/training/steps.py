"""One training step and one validation pass; no Ray calls, so they are unit-testable.

Shapes: x is a batch (B, *data_shape) in the model's data space (long ids or floats in [-1, 1]).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from bfn import BFN, EMA, NLLEstimate
from pipeline.training import torch_private


@dataclass
class StepResult:
    """Device tensors (0-d): reading them waits for the GPU, so the loop reads them only at log steps."""

    loss: torch.Tensor
    grad_norm: torch.Tensor
    skipped: torch.Tensor  # bool: non-finite loss or gradient, no parameter/optimiser/EMA update


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on GPU when enabled; the BFN losses themselves always run in float32."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(
    model,
    raw: BFN,
    x: torch.Tensor,
    optimizer,
    ema: EMA,
    *,
    grad_clip: float,
    lr: float,
    amp: bool = False,
    label: torch.Tensor | None = None,
) -> StepResult:
    """Continuous-time loss -> backward -> clip -> AdamW -> EMA.

    ``label`` (B,) long: the class ids of a conditional model's batch (None: the unconditional call,
    exactly as before conditioning existed).

    ``model`` may be the DDP wrapper of ``raw``. The step is skipped when the loss or the
    (all-reduced) gradient norm is not finite, a decision every rank takes identically; a
    non-finite loss on one rank poisons the shared gradients, so it is caught the same way. With a
    fused optimiser (CUDA) the skip is decided on the device, as mixed-precision scalers do
    (``found_inf``, a private torch API: see ``torch_private``); a foreach optimiser (CPU) cannot skip
    on the device, and there reading the flag costs no device sync.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast(x.device, amp):
        loss = model(x) if label is None else model(x, label=label)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), max_norm)
    loss = loss.detach()
    finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
    if torch_private.supports_device_skip(optimizer):
        torch_private.step_unless(optimizer, ~finite)  # fused AdamW skips the update (and its step count)
        ema.update(raw, apply=finite)
    elif finite.item():
        optimizer.step()
        ema.update(raw)
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, grad_norm.detach(), ~finite)


@torch.no_grad()
def validate(
    model: BFN, batches, *, nll_steps: int, nll_repeats: int, max_batches: int = 0, count_chars=None
) -> dict[str, float | NLLEstimate]:
    """Continuous-time loss and the NLL bound over validation batches.

    The NLL is the n-step loss + reconstruction, or with ``nll_steps`` = 0 (n = infinity) the
    continuous-time loss + reconstruction, each over ``nll_repeats`` independent draws.
    ``batches`` yields x, or (x, label) pairs for a conditional model (its NLL is then of p(x | label)).
    ``count_chars`` (subword text): ids (B, L) -> characters each window covers, so that bits/char
    is the total over the characters of the windows seen.
    Returns {"loss": nats/dim, "nll": NLLEstimate, "examples": count}.
    """
    model.eval()
    cts, bound, recon, examples, chars = [], [], [], 0, []
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        x, label = batch if isinstance(batch, tuple) else (batch, None)
        cts.append(model.continuous_time_loss(x, label=label).mean(-1))
        bound.append(torch.stack([model.bound_loss(x, nll_steps, label) for _ in range(nll_repeats)]))
        recon.append(torch.stack([model.reconstruction_loss(x, label) for _ in range(nll_repeats)]))
        examples += x.shape[0]
        if count_chars is not None:
            chars.append(count_chars(x))
    if not examples:
        raise ValueError("validation split yielded no batches")
    nll = NLLEstimate.from_terms(torch.cat(bound, 1), torch.cat(recon, 1), model.num_dims)
    if chars:
        nll = nll.per_chars(torch.cat(chars).sum().item())
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


def validation_table(step: int, result: dict, nll_steps: int, unit: str) -> str:
    """A few lines a person reads at a glance: the loss and the NLL bound in each unit."""
    nll: NLLEstimate = result["nll"]
    n = "inf" if nll_steps == 0 else str(nll_steps)
    units = list(dict.fromkeys(("nats/dim", "bits/dim", unit)))
    rows = [
        f"validation at step {step} (EMA weights, {result['examples']} examples, n = {n}, "
        f"{nll.num_repeats} repeat{'s' if nll.num_repeats > 1 else ''})",
        "  " + f"{'':<18}" + "".join(f"{u:>22}" for u in units),
    ]
    for label, key in (("NLL bound", "total"), (f"L^{n} loss", "loss"), ("reconstruction", "reconstruction")):
        cells = []
        for u in units:
            v = nll.in_unit(u)
            cells.append(f"{v[key]:>12.4f} ± {v[key + '_se']:<7.4f}")
        rows.append("  " + f"{label:<18}" + "".join(f"{c:>22}" for c in cells))
    return "\n".join(rows)
