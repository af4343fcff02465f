"""Accuracy schedules (paper Sec. 4.5 and 6.8): how much information the sender reveals by time t.

Continuous and discretised data use sigma_1, the standard deviation of the input distribution at
t = 1:  beta(t) = sigma_1^(-2t) - 1,  gamma(t) = beta / (1 + beta) = 1 - sigma_1^(2t).
Discrete data use beta_1:  beta(t) = beta_1 t^2.

For an n-step transmission, step i (1..n) has accuracy alpha_i = beta(i/n) - beta((i-1)/n); the
alphas therefore telescope to beta(1): sum_i alpha_i = sigma_1^-2 - 1 (continuous) or beta_1.

Mapping from the official configs:
  * ``min_variance``  = sigma_1^2        (CIFAR-10 256 bins: 1e-6 -> sigma_1 = 1e-3;
                                          16 bins: 1e-3 -> sigma_1 = 0.0316...)
  * ``max_sqrt_beta`` = sqrt(beta_1)     (MNIST: 3 -> beta_1 = 9; text8: 0.75 -> beta_1 = 0.5625)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import torch
from torch import Tensor


@dataclass(frozen=True)
class ContinuousSchedule:
    """beta(t) = sigma_1^(-2t) - 1 for continuous and discretised data."""

    sigma_1: float

    def __post_init__(self) -> None:
        if not 0.0 < self.sigma_1 < 1.0 or not math.isfinite(self.sigma_1):
            raise ValueError(f"sigma_1 must lie in the open interval (0, 1), got {self.sigma_1}")

    @classmethod
    def from_min_variance(cls, min_variance: float) -> ContinuousSchedule:
        """The official configs' ``min_variance`` is sigma_1^2."""
        if not 0.0 < min_variance < 1.0:
            raise ValueError(f"min_variance must lie in (0, 1), got {min_variance}")
        return cls(math.sqrt(min_variance))

    @property
    def min_variance(self) -> float:
        """sigma_1^2: the variance of the input distribution at t = 1."""
        return self.sigma_1**2

    def posterior_variance(self, t: Tensor) -> Tensor:
        """sigma_1^(2t) = 1 - gamma(t), computed directly (1 - gamma loses precision in float32)."""
        return torch.pow(self.min_variance, t)

    def beta(self, t: Tensor) -> Tensor:
        return torch.pow(self.min_variance, -t) - 1

    def alpha(self, i: Tensor | int, num_steps: int) -> Tensor | float:
        """Accuracy of step i of num_steps: sigma_1^(-2i/n) (1 - sigma_1^(2/n))."""
        return (self.sigma_1 ** (-2 * i / num_steps)) * (1 - self.sigma_1 ** (2 / num_steps))


@dataclass(frozen=True)
class DiscreteSchedule:
    """beta(t) = beta_1 t^2 for discrete data."""

    beta_1: float

    def __post_init__(self) -> None:
        if not self.beta_1 > 0.0 or not math.isfinite(self.beta_1):
            raise ValueError(f"beta_1 must be a finite number > 0, got {self.beta_1}")

    @classmethod
    def from_max_sqrt_beta(cls, max_sqrt_beta: float) -> DiscreteSchedule:
        """The official configs' ``max_sqrt_beta`` is sqrt(beta_1)."""
        return cls(max_sqrt_beta**2)

    @property
    def sqrt_beta_1(self) -> float:
        return math.sqrt(self.beta_1)

    def beta(self, t: Tensor) -> Tensor:
        return self.beta_1 * t**2

    def alpha(self, i: Tensor | int, num_steps: int) -> Tensor | float:
        """Accuracy of step i of num_steps: beta_1 (2i - 1) / n^2."""
        return ((self.sqrt_beta_1 / num_steps) ** 2) * (2 * i - 1)


def _rivals(beta_1_times_k: float, num_classes: int) -> float:
    """Expected number of wrong classes whose logit beats the true one at t = 1: y_x - y_k ~ N(b, 2b)
    with b = beta_1 K, so each rival wins with probability Phi(-sqrt(b / 2))."""
    return (num_classes - 1) * 0.5 * math.erfc(math.sqrt(beta_1_times_k / 2) / math.sqrt(2))


TEXT8_RIVALS = _rivals(0.5625 * 27, 27)  # the paper's text8 setting: 0.076 rivals at t = 1


def identifiable_beta_1_times_k(num_classes: int, rivals: float = TEXT8_RIVALS) -> float:
    """beta_1 K that leaves ``rivals`` expected wrong classes above the true one at t = 1 (default: as
    many as the paper's text8 schedule leaves, so it returns 15.19 for K = 27 and 34.0 for K = 4,096).
    A fixed beta_1 K keeps each pair of classes equally separable but not the whole vocabulary:
    with K - 1 rivals the product must grow, slowly (like ln K)."""
    if num_classes < 2 or not 0 < rivals < (num_classes - 1) / 2:
        raise ValueError(f"need num_classes >= 2 and 0 < rivals < (K - 1) / 2, got {num_classes}, {rivals}")
    z = -NormalDist().inv_cdf(rivals / (num_classes - 1))  # Phi(-z) = the tail each rival may take
    return 2 * z * z
