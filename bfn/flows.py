"""Bayesian flows (paper Sec. 3-6): input distributions, senders, Bayesian updates, flow samples.

Shapes: B batch, D data dimensions (all non-batch dims flattened), K classes, S Monte-Carlo samples.
Data reach a flow flattened: continuous x is (B, D) float in [-1, 1]; discrete x is (B, D) long ids.
t is (B, 1): one time per example, broadcast over its dimensions.

What is here: the parameters of the input distribution (a Gaussian mean/precision per dimension,
or a categorical per dimension), how they start (prior), how one noisy observation y of accuracy
alpha updates them, and the closed-form flow distribution p_F(theta | x; t) used for training.
What is not: the network, output distributions and losses (see distributions.py and losses.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from bfn.schedules import ContinuousSchedule, DiscreteSchedule


@dataclass(frozen=True)
class ContinuousParams:
    """Gaussian input distribution N(mean, 1/precision) per dimension."""

    mean: Tensor  # (B, D)
    precision: Tensor | float  # (B, 1) during training, a float shared by the batch when sampling


@dataclass(frozen=True)
class DiscreteParams:
    """Categorical input distribution per dimension."""

    probs: Tensor  # (B, D, K)


class ContinuousFlow:
    """Bayesian flow for continuous and discretised data (paper Sec. 4-5), accuracy sigma_1."""

    def __init__(self, sigma_1: float) -> None:
        self.schedule = ContinuousSchedule(sigma_1)

    @property
    def sigma_1(self) -> float:
        return self.schedule.sigma_1

    def prior(self, batch_size: int, num_dims: int, device: torch.device | None = None):
        """theta_0 = (mean 0, precision 1). Used to start sampling."""
        return ContinuousParams(torch.zeros(batch_size, num_dims, device=device), 1.0)

    @torch.no_grad()
    def sample(self, x: Tensor, t: Tensor, noise: Tensor | None = None) -> ContinuousParams:
        """theta ~ p_F(. | x; t) (eq. 77): mean = gamma x + sqrt(gamma (1 - gamma)) noise.

        Used in training. ``noise`` (B, D) is drawn here unless given (tests pass stored draws).
        """
        posterior_variance = self.schedule.posterior_variance(t)  # (B, 1) = 1 - gamma
        gamma = 1 - posterior_variance
        if noise is None:
            noise = torch.randn_like(x, dtype=torch.float32)
        mean = gamma * x + (gamma * posterior_variance).sqrt() * noise
        return ContinuousParams(mean, 1 / posterior_variance)

    def net_inputs(self, params: ContinuousParams, data_shape: tuple[int, ...]) -> Tensor:
        """The network sees the mean only, in the data's own shape (B, *data_shape)."""
        return params.mean.reshape(-1, *data_shape)

    def alpha(self, i: Tensor | int, num_steps: int) -> Tensor | float:
        return self.schedule.alpha(i, num_steps)

    def sender_sample(self, x: Tensor, alpha: Tensor | float, generator=None) -> Tensor:
        """y ~ N(x, 1/alpha) (eq. 86)."""
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        return x + noise / alpha**0.5

    def update(self, params: ContinuousParams, y: Tensor, alpha: float) -> ContinuousParams:
        """Bayesian update (eq. 49-50): precision adds alpha; the mean moves towards y."""
        precision = params.precision + alpha
        mean = (params.precision * params.mean + alpha * y) / precision
        return ContinuousParams(mean, precision)


class DiscreteFlow:
    """Bayesian flow for discrete data with K classes (paper Sec. 6), accuracy beta_1.

    K = 2 (binary data) hands the network a single value per dimension, 2 P(class 0) - 1, as the
    reference does; K > 2 hands it the K probabilities.
    """

    # Numerical guards of the reference: t is kept below 1 - T_MAX_GAP and sqrt(beta) above
    # MIN_SQRT_BETA (below it the flow returns the uniform prior).
    T_MAX_GAP = 1e-6
    MIN_SQRT_BETA = 1e-10

    def __init__(self, num_classes: int, beta_1: float) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = num_classes
        self.schedule = DiscreteSchedule(beta_1)

    @property
    def beta_1(self) -> float:
        return self.schedule.beta_1

    def prior(self, batch_size: int, num_dims: int, device: torch.device | None = None):
        """Uniform 1/K per dimension. Used to start sampling."""
        K = self.num_classes
        return DiscreteParams(torch.full((batch_size, num_dims, K), 1.0 / K, device=device))

    @torch.no_grad()
    def sample(self, x: Tensor, t: Tensor, noise: Tensor | None = None) -> DiscreteParams:
        """theta ~ p_F(. | x; t) (eq. 185): softmax(beta (K e_x - 1) + sqrt(beta K) noise).

        Used in training; ``noise`` (B, D, K) is drawn here unless given.
        """
        K = self.num_classes
        sqrt_beta = t.clamp(max=1 - self.T_MAX_GAP) * self.schedule.sqrt_beta_1  # (B, 1)
        at_prior = sqrt_beta < self.MIN_SQRT_BETA
        beta = sqrt_beta.clamp(min=self.MIN_SQRT_BETA).square().unsqueeze(-1)  # (B, 1, 1)
        if noise is None:
            noise = torch.randn(*x.shape, K, device=x.device)
        logits = beta * (K * F.one_hot(x, K) - 1) + (beta * K).sqrt() * noise  # (B, D, K)
        probs = torch.softmax(logits, dim=-1)
        probs = torch.where(at_prior.unsqueeze(-1), torch.full_like(probs, 1.0 / K), probs)
        return DiscreteParams(probs)

    def net_inputs(self, params: DiscreteParams, data_shape: tuple[int, ...]) -> Tensor:
        """K = 2: 2 P(class 0) - 1 in the data's shape; K > 2: probs as (B, *data_shape, K)."""
        if self.num_classes == 2:
            return (2 * params.probs[..., 0] - 1).reshape(-1, *data_shape)
        return params.probs.reshape(-1, *data_shape, self.num_classes)

    def alpha(self, i: Tensor | int, num_steps: int) -> Tensor | float:
        return self.schedule.alpha(i, num_steps)

    def sender_mean_std(self, x: Tensor, alpha: Tensor | float) -> tuple[Tensor, Tensor | float]:
        """Sender N(alpha (K e_x - 1), alpha K I) (eq. 163): its mean (B, D, K) and std."""
        K = self.num_classes
        if isinstance(alpha, Tensor):
            alpha = alpha.unsqueeze(-1)
        return alpha * (K * F.one_hot(x, K) - 1), (K * alpha) ** 0.5

    def sender_sample(self, x: Tensor, alpha: Tensor | float, generator=None) -> Tensor:
        mean, std = self.sender_mean_std(x, alpha)
        noise = torch.randn(mean.shape, generator=generator, device=x.device)
        return mean + std * noise

    def update(self, params: DiscreteParams, y: Tensor, alpha: float) -> DiscreteParams:
        """Bayesian update (eq. 171): theta' proportional to theta * exp(y).

        exp(y - max y) instead of exp(y): the same after normalisation, but it cannot overflow.
        """
        probs = params.probs * (y - y.amax(-1, keepdim=True)).exp()
        return DiscreteParams(probs / probs.sum(-1, keepdim=True))
