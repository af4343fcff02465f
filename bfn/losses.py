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

from bfn.distributions import Bernoulli, Categorical, DiscretizedNormal
from bfn.flows import ContinuousFlow, DiscreteFlow
from bfn.numerics import categorical_log_weights, normal_log_prob

RECEIVERS = ("reference", "paper")
SENDER_CHUNK_ELEMENTS = 2**25  # y values drawn at once by the discrete n-step loss (128 MB of float32)


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
    return t * flow.beta_1 * (K * _squared_distance_to_one_hot(dist.probs, x))


def _squared_distance_to_one_hot(probs: Tensor, x: Tensor) -> Tensor:
    """||e_x - p||^2 over the last axis, (..., K) -> (...), without a one-hot tensor.

    The terms are those of (e_x - p)^2 exactly (p_k^2 off x, (1 - p_x)^2 at x), summed in the same
    order, so it equals the one-hot form bit for bit, and its gradient too, with one K-wide
    temporary instead of four (an int64 one-hot, the difference, its square)."""
    index = x.unsqueeze(-1)
    terms = probs.square().scatter(-1, index, (1 - probs.gather(-1, index)).square())
    return terms.sum(-1)


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
    alpha = alpha.unsqueeze(-1)  # (B, 1, 1)
    log_weights, others = _receiver_weights(dist.probs, receiver)  # (B, D, K): shared by every draw
    if y is not None:
        draws = [y]
    else:  # at most SENDER_CHUNK_ELEMENTS per draw of y, so memory stays O(B D K) for any K
        per_chunk = max(1, SENDER_CHUNK_ELEMENTS // mean.numel())
        sizes = [min(per_chunk, num_samples - start) for start in range(0, num_samples, per_chunk)]
        draws = (mean + std * torch.randn(size, *mean.shape, device=x.device) for size in sizes)
    index = x.unsqueeze(-1)  # (B, D, 1)
    log_ratio = torch.cat([_log_sender_over_receiver(draw, index, alpha, log_weights, others) for draw in draws])
    return num_steps * log_ratio.mean(0).mean(-1)  # log_ratio (S, B, D)


def _log_sender_over_receiver(y: Tensor, index: Tensor, alpha: Tensor, log_weights: Tensor, others) -> Tensor:
    """ln p_S(y) - ln p_R(y) per dimension, (S, B, D, K) -> (S, B, D).

    sum_j ln N(y_j | -alpha, alpha K) is cancelled before summing over K: the two sums are huge and
    nearly equal for large K, and float32 would lose the difference."""
    K = log_weights.shape[-1]
    log_sender = _log_hit_over_miss(y, alpha, K).gather(-1, index.expand_as(y[..., :1])).squeeze(-1)
    return log_sender - _log_receiver_over_miss(y, alpha, log_weights, others)


def discrete_receiver_log_prob(y: Tensor, probs: Tensor, alpha: Tensor | float, receiver: str):
    """ln p_R(y) per dimension, summed over the K coordinates of y: (..., D, K) -> (..., D).

    Every component shares the std sqrt(alpha K); component m has mean alpha (K - 1) in coordinate
    m and -alpha elsewhere. ``alpha`` broadcasts against y.
    """
    K = probs.shape[-1]
    log_miss = normal_log_prob(y, -alpha, (K * alpha) ** 0.5)  # coordinate j under a component m != j
    return log_miss.sum(-1) + _log_receiver_over_miss(y, alpha, *_receiver_weights(probs, receiver))


def _log_hit_over_miss(y: Tensor, alpha: Tensor | float, K: int) -> Tensor:
    """ln N(y_j | alpha (K - 1), alpha K) - ln N(y_j | -alpha, alpha K), exactly: y_j - alpha (K - 2) / 2."""
    return y - alpha * (K - 2) / 2


def _log_receiver_over_miss(y: Tensor, alpha: Tensor | float, log_weights: Tensor, others: Tensor | None) -> Tensor:
    """ln p_R(y) - sum_j ln N(y_j | -alpha, alpha K), (..., D, K) -> (..., D), in O(K) per coordinate.

    Both receivers are exact rewrites of the mixtures in the module docstring: no (..., K, K)
    tensor is ever built, so K = 50,257 fits. With ln w the receiver's log weights and
    d_j = ln hit_j - ln miss_j, the paper's joint mixture (``others`` None) is
    logsumexp_m(ln w_m + d_m); the reference's per-coordinate one is
    sum_j logaddexp(ln w_j + d_j, ln sum_{m != j} w_m), with ``others`` = ``_log_sum_of_others``.
    """
    d = _log_hit_over_miss(y, alpha, log_weights.shape[-1])
    if others is None:
        return torch.logsumexp(log_weights + d, -1)
    return torch.logaddexp(log_weights + d, others).sum(-1)


def _receiver_weights(probs: Tensor, receiver: str) -> tuple[Tensor, Tensor | None]:
    """ln w (..., D, K) of the receiver's mixture and, for the reference receiver, ln sum_{m != j} w_m."""
    log_weights = categorical_log_weights(probs)
    return log_weights, _log_sum_of_others(log_weights) if receiver == "reference" else None


def _log_sum_of_others(log_weights: Tensor) -> Tensor:
    """ln sum_{m != j} w_m = ln(1 - w_j) for every j of normalised log weights, (..., K), in O(K).

    log1p(-w_j) is well conditioned wherever w_j <= 1/2, which holds for every j but the largest
    weight's; there the sum is taken without it. The weights' sum is taken as exactly 1, not
    recomputed: its rounding error would enter all K terms alike and add up over K.
    """
    top = log_weights.argmax(dim=-1, keepdim=True)
    is_top = torch.zeros_like(log_weights, dtype=torch.bool).scatter_(-1, top, True)
    # the largest weight is replaced before log1p: its branch is unused, and 1 - w may be 0
    weights = torch.where(is_top, 0.0, log_weights.exp())
    without_top = torch.logsumexp(log_weights.masked_fill(is_top, float("-inf")), dim=-1, keepdim=True)
    return torch.where(is_top, without_top, torch.log1p(-weights))


def sender_log_ratio(dist, y: Tensor, x: Tensor, alpha: float) -> Tensor:
    """ln p_S(y | x) - ln p_R(y | theta) per dimension for ONE sender draw y, any data kind, (B, D).

    The per-draw integrand of the n-step loss with the receiver the paper's sampler draws from (for
    discrete data the joint mixture, eq. 191; for a Delta output N(x_hat, 1/alpha); for a binned
    output the mixture over bins, eq. 118). Sequential Monte Carlo weighs a particle whose sender
    draw came from the data instead of from its receiver by the negative of this.
    y: (B, D, K) for discrete data, (B, D) otherwise; x: (B, D); alpha: the step's accuracy.
    """
    if isinstance(dist, Bernoulli | Categorical):
        return _log_sender_over_receiver(y, x.unsqueeze(-1), alpha, categorical_log_weights(dist.probs), None)
    std = alpha**-0.5
    if isinstance(dist, DiscretizedNormal):
        components = normal_log_prob(y.unsqueeze(-1), dist.centres, std)  # (B, D, K)
        log_receiver = torch.logsumexp(categorical_log_weights(dist.probs) + components, -1)
    else:
        log_receiver = normal_log_prob(y, dist.data_mean, std)
    return normal_log_prob(y, x, std) - log_receiver


def reconstruction_loss_discrete(dist, x: Tensor) -> Tensor:
    """-ln p_O(x | theta(1)) per dimension, (B, D)."""
    return -dist.log_prob(x)
