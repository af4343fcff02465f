"""BFN losses (paper Sec. 4.4-4.6, 5.3, 6.4-6.6): continuous-time, n-step and reconstruction.

Shapes: B batch, D data dimensions, K classes/bins, S Monte-Carlo sender samples.
All losses are in nats per data dimension and computed in float32 (callers disable autocast).
Inputs: x (B, D) data (long ids for discrete data, floats in [-1, 1] otherwise), t (B, 1),
``dist`` the output distribution the head built from the network output.

Discrete-time receivers for discrete data (``receiver=``):
  * "reference": the official code's per-coordinate mixture, a product over the K coordinates of
    y of one-dimensional mixtures  sum_m p_O(m) N(y_j | alpha (K delta_jm - 1), alpha K).
  * "paper": the joint mixture of the paper (eq. 191), sum_m p_O(m) N(y | alpha (K e_m - 1), alpha K I).
Both are normalised densities over y, so both give valid code lengths; they differ in value.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bfn.distributions import DiscretizedNormal
from bfn.flows import ContinuousFlow, DiscreteFlow
from bfn.numerics import categorical_log_weights, normal_log_prob

RECEIVERS = ("reference", "paper")


# ------------------------------------------------------------------------------- continuous data
def continuous_time_loss_continuous(flow: ContinuousFlow, dist, x: Tensor, t: Tensor) -> Tensor:
    """L_inf(x) = -ln(sigma_1) (x_hat - x)^2 / sigma_1^(2t)  (eq. 101), (B, D).

    x_hat is the Delta estimate or the mean of the discretised distribution. Used in training.
    """
    x_hat = dist.data_mean
    return -math.log(flow.sigma_1) * (x_hat - x).square() / flow.schedule.posterior_variance(t)


def n_step_loss_continuous(
    flow: ContinuousFlow,
    dist,
    x: Tensor,
    t: Tensor,
    num_steps: int,
    *,
    num_samples: int = 10,
    y: Tensor | None = None,
) -> Tensor:
    """n-step loss at the step i = t n + 1 that t was drawn for, (B,).

    Delta output: closed form n alpha_i / 2 (x_hat - x)^2 (eq. 96), averaged over D.
    Discretised output: Monte-Carlo over ``num_samples`` sender draws y ~ N(x, 1/alpha_i) of
    ln p_S(y) - ln p_R(y), p_R the bin mixture of N(centre_k, 1/alpha_i) (eq. 118).
    ``y`` (S, B, D) can be passed to reuse stored draws.
    """
    alpha = flow.alpha(t * num_steps + 1, num_steps)  # (B, 1)
    if not isinstance(dist, DiscretizedNormal):
        return num_steps * (alpha / 2 * (dist.data_mean - x).square()).mean(-1)
    std = 1.0 / alpha**0.5  # (B, 1)
    if y is None:
        y = x + std * torch.randn(num_samples, *x.shape, device=x.device)
    log_sender = normal_log_prob(y, x, std)  # (S, B, D)
    log_weights = categorical_log_weights(dist.probs)  # (B, D, K)
    log_components = normal_log_prob(y.unsqueeze(-1), dist.centres, std.unsqueeze(-1))
    log_receiver = torch.logsumexp(log_components + log_weights, dim=-1)  # (S, B, D)
    return num_steps * (log_sender - log_receiver).mean(0).mean(-1)


def reconstruction_loss_continuous(dist, x: Tensor, *, num_bins: int, std: float) -> Tensor:
    """-ln p_O(x | theta(1)) per dimension, (B, D).

    A discretised output is evaluated directly. A Delta output has no density of its own, so, as in
    the paper (Sec. 7.2), it is scored as a discretised Gaussian N(x_hat, std^2) over ``num_bins``
    bins (the reference uses std = sigma_1 and 256 bins, or 0.7 sigma_1 and 16 bins for 16-bin data).
    """
    if not isinstance(dist, DiscretizedNormal):
        dist = DiscretizedNormal(dist.data_mean, torch.full_like(x, std), num_bins)
    return -dist.log_prob(x)


# --------------------------------------------------------------------------------- discrete data
def continuous_time_loss_discrete(flow: DiscreteFlow, dist, x: Tensor, t: Tensor) -> Tensor:
    """L_inf(x) = K beta_1 t ||e_x - p_O||^2 (eq. 196; beta'(t) = 2 beta_1 t), (B, D)."""
    K = flow.num_classes
    one_hot = torch.nn.functional.one_hot(x, K)
    return t * flow.beta_1 * (K * (one_hot - dist.probs).square().sum(-1))


def n_step_loss_discrete(
    flow: DiscreteFlow,
    dist,
    x: Tensor,
    t: Tensor,
    num_steps: int,
    *,
    num_samples: int = 10,
    receiver: str = "reference",
    y: Tensor | None = None,
) -> Tensor:
    """n-step loss n E_y[ln p_S(y) - ln p_R(y)] at step i = t n + 1, averaged over D, (B,).

    y ~ p_S = N(alpha (K e_x - 1), alpha K I), ``num_samples`` draws (or the given y (S, B, D, K)).
    """
    if receiver not in RECEIVERS:
        raise ValueError(f"receiver must be one of {RECEIVERS}, got {receiver!r}")
    alpha = flow.alpha(t * num_steps + 1, num_steps)  # (B, 1)
    mean, std = flow.sender_mean_std(x, alpha)  # (B, D, K), (B, 1, 1)
    if y is None:
        y = mean + std * torch.randn(num_samples, *mean.shape, device=x.device)
    log_sender = normal_log_prob(y, mean, std).sum(-1)  # (S, B, D)
    log_receiver = discrete_receiver_log_prob(y, dist.probs, alpha.unsqueeze(-1), receiver)
    return num_steps * (log_sender - log_receiver).mean(0).mean(-1)


def discrete_receiver_log_prob(y: Tensor, probs: Tensor, alpha: Tensor | float, receiver: str):
    """ln p_R(y) per dimension, summed over the K coordinates of y: (..., D, K) -> (..., D).

    Every component shares the std sqrt(alpha K); component m has mean alpha (K - 1) in coordinate
    m and -alpha elsewhere. Both receivers are exact rewrites of the mixtures in the module
    docstring that never build a (..., K, K) tensor per sample. ``alpha`` broadcasts against y.
    """
    K = probs.shape[-1]
    std = (K * alpha) ** 0.5
    log_hit = normal_log_prob(y, alpha * (K - 1), std)  # coordinate j under component m = j
    log_miss = normal_log_prob(y, -alpha, std)  # coordinate j under any other component
    log_weights = categorical_log_weights(probs)  # (..., D, K)
    if receiver == "paper":
        return log_miss.sum(-1) + torch.logsumexp(log_weights + log_hit - log_miss, -1)
    log_rest = _log_sum_of_others(log_weights)  # ln sum_{m != j} w_m
    return torch.logaddexp(log_weights + log_hit, log_rest + log_miss).sum(-1)


def _log_sum_of_others(log_weights: Tensor) -> Tensor:
    """ln sum_{m != j} exp(log_weights_m) for every j, (..., K)."""
    K = log_weights.shape[-1]
    eye = torch.eye(K, dtype=torch.bool, device=log_weights.device)
    masked = log_weights.unsqueeze(-2).masked_fill(eye, float("-inf"))  # (..., K, K)
    return torch.logsumexp(masked, dim=-1)


def reconstruction_loss_discrete(dist, x: Tensor) -> Tensor:
    """-ln p_O(x | theta(1)) per dimension, (B, D)."""
    return -dist.log_prob(x)
