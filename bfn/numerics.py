"""Numerical helpers shared by the BFN math: clamped log/exp, Gaussian log-density and CDF, bins.

Bins: K equal bins tile [-1, 1]; bin k (0-based) has centre (2k + 1)/K - 1 and width 2/K.
Everything here is float32 tensor math; the constants are those of the official implementation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOG_MIN = 1e-10  # safe_log floor
EXP_RANGE = 10.0  # safe_exp clamps its argument to [-10, 10]
_HALF_LOG_TWO_PI = math.log(math.sqrt(2 * math.pi))
_FLOAT32_EPS = torch.finfo(torch.float32).eps


def safe_log(x: Tensor) -> Tensor:
    return x.clamp(min=LOG_MIN).log()


def safe_exp(x: Tensor) -> Tensor:
    return x.clamp(min=-EXP_RANGE, max=EXP_RANGE).exp()


def normal_log_prob(x: Tensor, mean: Tensor | float, std: Tensor | float) -> Tensor:
    """log N(x | mean, std^2), elementwise (the same expression torch.distributions.Normal uses)."""
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device)
    return -((x - mean) ** 2) / (2 * std**2) - std.log() - _HALF_LOG_TWO_PI


def normal_cdf(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Phi((x - mean) / std), with torch.distributions.Normal's operation order (bit-compatible)."""
    return 0.5 * (1 + torch.erf((x - mean) * std.reciprocal() / math.sqrt(2)))


def categorical_log_weights(probs: Tensor) -> Tensor:
    """Log mixture weights as torch's ``Categorical(probs=...)`` forms them inside a mixture.

    The probabilities are renormalised, clamped to [eps, 1 - eps] (float32 eps) before the log and
    log-softmaxed again. Reproducing the clamp matters: without it 256-bin losses differ by ~4e-4.
    """
    probs = probs / probs.sum(-1, keepdim=True)
    return torch.log_softmax(probs.clamp(_FLOAT32_EPS, 1 - _FLOAT32_EPS).log(), dim=-1)


def float_to_index(x: Tensor, num_bins: int) -> Tensor:
    """Index of the bin of x in [-1, 1] (values outside fall in the outer bins)."""
    return torch.clamp(torch.floor((x / 2.0 + 0.5) * num_bins), min=0, max=num_bins - 1).long()


def index_to_float(index: Tensor, num_bins: int) -> Tensor:
    """Centre of bin ``index``."""
    return 2.0 * ((index + 0.5) / num_bins) - 1.0


def quantize(x: Tensor, num_bins: int) -> Tensor:
    """x mapped to the centre of its bin."""
    return index_to_float(float_to_index(x, num_bins), num_bins)


def bin_centres(num_bins: int, device: torch.device | None = None) -> Tensor:
    """(K,) bin centres, computed as the reference does (an arange in float32)."""
    width = 2.0 / num_bins
    return torch.arange(width / 2 - 1, 1, width, device=device)[:num_bins]


def bin_inner_boundaries(num_bins: int, device: torch.device | None = None) -> Tensor:
    """(K - 1,) boundaries between neighbouring bins."""
    width = 2.0 / num_bins
    return torch.arange(width - 1, 1 - width / 2, width, device=device)[: num_bins - 1]
