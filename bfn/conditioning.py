"""Conditioning: class labels, classifier-free guidance and known coordinates (inpainting).

Shapes: B batch, D = prod(data_shape), K classes.

What is here:
  * ``check_label``, ``check_guidance``: the argument checks shared by the BFN's losses and the
    samplers (ValueError naming the argument).
  * ``guide``: classifier-free guidance (Ho & Salimans 2022) on raw network outputs,
    (1 + w) z_c - w z_u: logits for discrete data, the noise or data prediction for continuous
    and discretised data. ``BFN.output_distribution`` evaluates z_c and z_u in ONE network call on
    a doubled batch (2B rows: the labels, then the "no condition" label), so a guided step costs
    about twice the compute of an unguided one with the same number of calls (NFE).
  * ``Known``: given coordinates (a mask and their values) that a sampler keeps: the top half of
    an image, a text prompt. ``SamplingCondition`` applies labels, guidance and known coordinates
    around every network call of a sampler: the input distribution at known coordinates is the
    data itself (one-hot theta for discrete data, mean = x for continuous data; the network sees
    no precision), the predictions and draws there are the data, and so is the result.
What is not: the label embedding of the networks (bfn/networks/layers.py), sequential Monte Carlo.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from bfn.flows import ContinuousParams, DiscreteParams

if TYPE_CHECKING:
    from bfn.model import BFN


def check_label(
    label: Tensor | int | None, num_labels: int | None, batch: int, device, *, check_values: bool = True
) -> Tensor | None:
    """label None, an int (every example) or (B,) integer class ids -> (B,) long, or None.

    ``check_values`` reads the labels back to check their range (a sync on a GPU)."""
    if label is None:
        return None
    if num_labels is None:
        raise ValueError("label given, but the network is unconditional (built without num_labels)")
    if isinstance(label, numbers.Integral) and not isinstance(label, bool):
        label = torch.full((batch,), int(label), dtype=torch.long, device=device)
    elif not isinstance(label, Tensor) or label.dtype.is_floating_point or label.dtype == torch.bool:
        raise ValueError(f"label must be an int or a tensor of integer class ids, got {label!r}")
    elif tuple(label.shape) != (batch,):
        raise ValueError(f"label must have shape ({batch},), got {tuple(label.shape)}")
    label = label.to(device=device, dtype=torch.long)
    if check_values and label.numel() and (label.min() < 0 or label.max() >= num_labels):
        raise ValueError(f"label must lie in [0, {num_labels - 1}], got [{label.min().item()}, {label.max().item()}]")
    return label


def check_guidance(guidance: float, num_labels: int | None, label: Tensor | int | None) -> float:
    """The guidance scale w as a float; w != 0 needs a conditional network and a label."""
    if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real) or not math.isfinite(guidance):
        raise ValueError(f"guidance must be a finite number, got {guidance!r}")
    if guidance != 0 and num_labels is None:
        raise ValueError(f"guidance={guidance} needs a conditional network (built with num_labels)")
    if guidance != 0 and label is None:
        raise ValueError(f"guidance={guidance} needs a label to guide towards")
    return float(guidance)


def guide(conditional: Tensor, unconditional: Tensor, guidance: float) -> Tensor:
    """Classifier-free guidance on raw outputs: (1 + w) z_c - w z_u."""
    return (1 + guidance) * conditional - guidance * unconditional


@dataclass(frozen=True)
class Known:
    """Coordinates whose values are given; a sampler keeps them (inpainting, infilling).

    mask: bool, data_shape (the same coordinates in every sample) or (B, *data_shape).
    values: data_shape (shared) or (B, *data_shape): class ids for discrete data, floats in
        [-1, 1] otherwise; read only where mask is True.
    """

    mask: Tensor
    values: Tensor


class SamplingCondition:
    """Label, guidance and known coordinates, checked once and applied at every sampler step.

    With none of them every method is the identity and ``output`` is the plain
    ``model.output_distribution(params, t)``, so unconditional sampling is unchanged bit for bit.
    """

    def __init__(
        self,
        model: BFN,
        num_samples: int,
        device,
        *,
        label: Tensor | int | None = None,
        guidance: float = 0.0,
        known: Known | None = None,
        replace_input: bool = True,
    ) -> None:
        num_labels = model.num_labels
        self.replace_input = replace_input  # False: known inputs follow the data's own flow (SMC)
        self.guidance = check_guidance(guidance, num_labels, label)
        self.label = check_label(label, num_labels, num_samples, device)
        self.model = model
        self.num_classes = model.flow.num_classes if model.discrete else None
        self.mask, self.values = (None, None) if known is None else _check_known(model, known, num_samples, device)

    def output(self, params, t: Tensor):
        """p_O from one network call, on input params whose known coordinates are the data."""
        return self.model.output_distribution(self.input_params(params), t, label=self.label, guidance=self.guidance)

    def input_params(self, params):
        """Known coordinates set to the data: one-hot theta, or mean = x."""
        if self.mask is None or not self.replace_input:
            return params
        if isinstance(params, DiscreteParams):
            one_hot = F.one_hot(self.values, self.num_classes).to(params.probs.dtype)  # (B, D, K)
            return DiscreteParams(torch.where(self.mask.unsqueeze(-1), one_hot, params.probs))
        return ContinuousParams(torch.where(self.mask, self.values, params.mean), params.precision)

    def data(self, x: Tensor) -> Tensor:
        """A draw or result (B, D) with the data at known coordinates."""
        return x if self.mask is None else torch.where(self.mask, self.values.to(x.dtype), x)

    def prediction(self, prediction: Tensor) -> Tensor:
        """A solver's prediction, x_hat (B, D) or p_hat (B, D, K), with the data at known coordinates."""
        if self.mask is None:
            return prediction
        if prediction.dim() == 2:
            return self.data(prediction)
        one_hot = F.one_hot(self.values, self.num_classes).to(prediction.dtype)
        return torch.where(self.mask.unsqueeze(-1), one_hot, prediction)


def _check_known(model: BFN, known: Known, batch: int, device) -> tuple[Tensor, Tensor]:
    """Known mask and values -> flattened (B, D) bool mask and (B, D) values on ``device``."""
    if not isinstance(known, Known):
        raise ValueError(f"known must be a bfn.conditioning.Known(mask, values), got {type(known).__name__}")
    shape, allowed = tuple(model.data_shape), (tuple(model.data_shape), (batch, *model.data_shape))
    mask, values = known.mask, known.values
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) not in allowed:
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"known.mask must be a bool tensor of shape {shape} or {(batch, *shape)}, got {got}")
    if not isinstance(values, Tensor) or tuple(values.shape) not in allowed:
        got = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise ValueError(f"known.values must have shape {shape} or {(batch, *shape)}, got {got}")
    mask = mask.to(device).expand(batch, *shape).reshape(batch, -1)  # (B, D)
    values = values.to(device).expand(batch, *shape).reshape(batch, -1)  # (B, D)
    if model.discrete:
        if values.dtype.is_floating_point or values.dtype == torch.bool:
            raise ValueError(f"known.values must be integer class ids for discrete data, got {values.dtype}")
        given = values[mask]
        if given.numel() and (given.min() < 0 or given.max() >= model.flow.num_classes):
            raise ValueError(f"known.values must lie in [0, {model.flow.num_classes - 1}] where known.mask is True")
        return mask, values.long().clamp(0, model.flow.num_classes - 1)  # unknown entries may be anything
    if not values.dtype.is_floating_point:
        raise ValueError(f"known.values must be floating point for continuous data, got {values.dtype}")
    given = values[mask]
    if given.numel() and (not torch.isfinite(given).all() or given.abs().max() > 1):
        raise ValueError("known.values must lie in [-1, 1] where known.mask is True")
    return mask, torch.where(mask, values.float(), 0.0)
