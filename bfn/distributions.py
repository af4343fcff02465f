"""Output distributions p_O(x | theta; t) (paper Sec. 4.3, 5.2, 6.3) and the heads that build them.

Shapes: B batch, D data dimensions, K classes or bins, h values the network emits per dimension.
A *head* turns the raw network output (B, D, h) (plus, for continuous data with noise prediction,
the input mean and t) into a distribution with ``probs`` (discrete-valued outputs), ``mean``,
``mode``, ``sample(generator)`` and ``log_prob(x)``.

Heads:
  * BernoulliHead            binary data, h = 1 (logit of P(x = 1))
  * CategoricalHead          K classes, h = K logits
  * DiscretizedNormalHead    discretised data on K bins in [-1, 1], h = 2, outer bins open-ended
  * DeltaHead                continuous data, h = 1, a point estimate clipped to [-1, 1]
The two continuous heads read the output as noise prediction (eps_hat, log sigma_eps), as the
paper's CIFAR-10 models do, or as a direct data prediction with ``noise_prediction=False``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from bfn.numerics import (
    bin_centres,
    bin_inner_boundaries,
    float_to_index,
    index_to_float,
    normal_cdf,
    normal_log_prob,
    quantize,
    safe_exp,
    safe_log,
)


# ------------------------------------------------------------------------------------ distributions
@dataclass
class Bernoulli:
    logits: Tensor  # (B, D): logit of P(x = 1)

    @property
    def probs(self) -> Tensor:
        p1 = torch.sigmoid(self.logits)
        return torch.stack([1 - p1, p1], dim=-1)  # (B, D, 2)

    @property
    def mode(self) -> Tensor:
        """1 where P(x = 1) > 1/2, else 0 (ties go to 0; torch's Bernoulli returns NaN there)."""
        return (self.logits > 0).long()

    def sample(self, generator=None) -> Tensor:
        return torch.bernoulli(torch.sigmoid(self.logits), generator=generator).long()

    def log_prob(self, x: Tensor) -> Tensor:
        return -F.binary_cross_entropy_with_logits(self.logits, x.float(), reduction="none")


@dataclass
class Categorical:
    logits: Tensor  # (B, D, K)

    @property
    def probs(self) -> Tensor:
        return torch.softmax(self.logits, dim=-1)

    @property
    def mode(self) -> Tensor:
        return self.logits.argmax(-1)

    def sample(self, generator=None) -> Tensor:
        flat = self.probs.reshape(-1, self.logits.shape[-1])
        return torch.multinomial(flat, 1, generator=generator).reshape(self.logits.shape[:-1])

    def log_prob(self, x: Tensor) -> Tensor:
        return torch.log_softmax(self.logits, -1).gather(-1, x.unsqueeze(-1)).squeeze(-1)


@dataclass
class DiscretizedNormal:
    """N(mean, std^2) integrated over K bins of [-1, 1]; the two outer bins extend to -inf/+inf."""

    mean: Tensor  # (B, D) of the underlying Gaussian
    std: Tensor  # (B, D)
    num_bins: int
    min_prob: float = 1e-5  # below this, log_prob falls back to a density times the bin width

    @property
    def probs(self) -> Tensor:
        edges = bin_inner_boundaries(self.num_bins, self.mean.device)
        cdf = normal_cdf(edges, self.mean.unsqueeze(-1), self.std.unsqueeze(-1))  # (B, D, K-1)
        cdf = F.pad(cdf, (1, 0), value=0.0)
        cdf = F.pad(cdf, (0, 1), value=1.0)
        return cdf[..., 1:] - cdf[..., :-1]  # (B, D, K)

    @property
    def centres(self) -> Tensor:
        return bin_centres(self.num_bins, self.mean.device)

    @property
    def data_mean(self) -> Tensor:
        """E[x] under the binned distribution: sum_k p(k) centre_k (the training-loss prediction)."""
        return (self.probs * self.centres).sum(-1)

    @property
    def mode(self) -> Tensor:
        return self.centres[self.probs.argmax(-1)]

    def sample(self, generator=None) -> Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device)
        return quantize(self.mean + self.std * noise, self.num_bins)

    def bin_prob(self, x: Tensor) -> Tensor:
        """Probability of the bin that holds x."""
        index = float_to_index(x, self.num_bins)
        centre = index_to_float(index, self.num_bins)
        half_width = 1.0 / self.num_bins
        lower = normal_cdf(centre - half_width, self.mean, self.std)
        upper = normal_cdf(centre + half_width, self.mean, self.std)
        lower = torch.where(index <= 0, torch.zeros_like(lower), lower)
        upper = torch.where(index >= self.num_bins - 1, torch.ones_like(upper), upper)
        return upper - lower

    def log_prob(self, x: Tensor) -> Tensor:
        """log P(bin of x); where that is < min_prob, log density at the bin centre + log width."""
        prob = self.bin_prob(x)
        density = normal_log_prob(quantize(x, self.num_bins), self.mean, self.std)
        log_width = torch.log(torch.tensor(2.0 / self.num_bins))
        return torch.where(prob < self.min_prob, density + log_width, safe_log(prob))


@dataclass
class Delta:
    """A point estimate (continuous data)."""

    value: Tensor  # (B, D)

    @property
    def data_mean(self) -> Tensor:
        return self.value

    @property
    def mode(self) -> Tensor:
        return self.value

    def sample(self, generator=None) -> Tensor:
        return self.value


# ------------------------------------------------------------------------------------------ heads
class BernoulliHead:
    """Binary data: one logit per dimension."""

    output_height = 1
    discrete = True

    def __call__(self, output: Tensor, input_mean=None, t=None) -> Bernoulli:
        return Bernoulli(output[..., 0])


class CategoricalHead:
    """K-class data: K logits per dimension."""

    discrete = True

    def __init__(self, num_classes: int) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.output_height = num_classes

    def __call__(self, output: Tensor, input_mean=None, t=None) -> Categorical:
        return Categorical(output)


class _ContinuousHead:
    """Shared by the continuous heads: turn the raw output into (mean, std) of the data.

    With noise prediction (paper Sec. 5.2, eq. 84) the network predicts the noise eps in
    mu = gamma x + sqrt(gamma (1 - gamma)) eps, so x = mu / gamma - sqrt((1 - gamma) / gamma) eps.
    Near t = 0 that division blows up, so t is floored at MIN_T and below it the prediction is
    the prior (mean 0, std 1), as in the reference.
    """

    discrete = False
    MIN_T = 1e-6

    def __init__(self, *, sigma_1: float, noise_prediction: bool = True) -> None:
        if not 0.0 < sigma_1 < 1.0:
            raise ValueError(f"sigma_1 must lie in the open interval (0, 1), got {sigma_1}")
        self.min_variance = sigma_1**2
        self.noise_prediction = noise_prediction

    def data_prediction(self, output: Tensor, input_mean: Tensor, t: Tensor):
        """(B, D, h) output, (B, D) input mean, (B, 1) t -> mean (B, D), std (B, D) or None."""
        log_std = output[..., 1] if output.shape[-1] > 1 else None
        if not self.noise_prediction:
            return output[..., 0], None if log_std is None else safe_exp(log_std)
        too_early = t < self.MIN_T
        posterior_variance = torch.pow(self.min_variance, t.clamp(min=self.MIN_T))
        gamma = 1 - posterior_variance
        scale = (posterior_variance / gamma).sqrt()
        mean = input_mean / gamma - scale * output[..., 0]
        mean = torch.where(too_early, torch.zeros_like(mean), mean)
        if log_std is None:
            return mean, None
        std = torch.where(too_early, torch.ones_like(mean), scale * safe_exp(log_std))
        return mean, std


class DiscretizedNormalHead(_ContinuousHead):
    """Discretised data on ``num_bins`` bins: (mean, log std) -> DiscretizedNormal."""

    output_height = 2
    MIN_STD, MAX_STD = 1e-3, 10.0

    def __init__(self, num_bins: int, *, sigma_1: float, noise_prediction: bool = True) -> None:
        if num_bins < 2:
            raise ValueError(f"num_bins must be >= 2, got {num_bins}")
        super().__init__(sigma_1=sigma_1, noise_prediction=noise_prediction)
        self.num_bins = num_bins

    def __call__(self, output: Tensor, input_mean: Tensor, t: Tensor) -> DiscretizedNormal:
        mean, std = self.data_prediction(output, input_mean, t)
        return DiscretizedNormal(mean, std.clamp(self.MIN_STD, self.MAX_STD), self.num_bins)


class DeltaHead(_ContinuousHead):
    """Continuous data: a point estimate clipped to [-1, 1]."""

    output_height = 1

    def __call__(self, output: Tensor, input_mean: Tensor, t: Tensor) -> Delta:
        mean, _ = self.data_prediction(output, input_mean, t)
        return Delta(mean.clamp(-1.0, 1.0))
