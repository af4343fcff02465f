"""Negative log-likelihood estimates (paper Sec. 4.6): n-step loss + reconstruction loss.

The n-step loss is a single-step Monte-Carlo estimate of n E_i[KL_i] (one random step i per
example), which is why published numbers average many repeats over the test set.
Values are kept in nats per data dimension and converted on output:
bits/dim = nats/dim / ln 2; nats/image = nats/dim x D (binarised MNIST); bits/char = bits/dim x
dims_per_char (1 for text8's characters; tokens over the characters they cover for subword text).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from torch import Tensor

UNITS = ("nats/dim", "bits/dim", "nats/image", "bits/char")


@dataclass(frozen=True)
class NLLEstimate:
    """Mean and standard error of each term, in nats per data dimension."""

    loss: float
    loss_se: float
    reconstruction: float
    reconstruction_se: float
    total: float
    total_se: float
    num_dims: int
    num_repeats: int
    num_examples: int
    dims_per_char: float = 1.0  # data dimensions per character of text (subword tokens: tokens / chars)

    @classmethod
    def from_terms(cls, loss: Tensor, reconstruction: Tensor, num_dims: int) -> NLLEstimate:
        """From per-example values of shape (R repeats, N examples), nats/dim.

        The standard error is that of the R per-repeat means, std(correction=0) / sqrt(R), as the
        reference's test.py reports it; with a single repeat it is the per-example std / sqrt(N).
        """
        if loss.shape != reconstruction.shape or loss.ndim != 2 or loss.numel() == 0:
            raise ValueError(
                f"loss and reconstruction must both be (repeats, examples), got "
                f"{tuple(loss.shape)} and {tuple(reconstruction.shape)}"
            )
        loss, reconstruction = loss.double(), reconstruction.double()
        total = loss + reconstruction

        def mean_se(values: Tensor) -> tuple[float, float]:
            if values.shape[0] > 1:
                means = values.mean(1)
                return means.mean().item(), (means.std(correction=0) / math.sqrt(len(means))).item()
            flat = values.flatten()
            se = flat.std(correction=0) / math.sqrt(flat.numel()) if flat.numel() > 1 else 0.0
            return flat.mean().item(), float(se)

        return cls(
            *mean_se(loss),
            *mean_se(reconstruction),
            *mean_se(total),
            num_dims=num_dims,
            num_repeats=loss.shape[0],
            num_examples=loss.shape[1],
        )

    def per_chars(self, chars: int | float) -> NLLEstimate:
        """This estimate with bits/char over ``chars``, the characters its examples cover (subword
        text: total nats over those characters, so it compares with a character model)."""
        return dataclasses.replace(self, dims_per_char=self.num_examples * self.num_dims / chars)

    def scale(self, unit: str) -> float:
        """Factor turning nats/dim into ``unit``."""
        factors = {
            "nats/dim": 1.0,
            "bits/dim": 1 / math.log(2),
            "bits/char": self.dims_per_char / math.log(2),
            "nats/image": float(self.num_dims),
        }
        if unit not in factors:
            raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
        return factors[unit]

    def in_unit(self, unit: str) -> dict[str, float]:
        """All terms and their standard errors in ``unit``."""
        s = self.scale(unit)
        return {
            "loss": self.loss * s,
            "loss_se": self.loss_se * s,
            "reconstruction": self.reconstruction * s,
            "reconstruction_se": self.reconstruction_se * s,
            "total": self.total * s,
            "total_se": self.total_se * s,
        }

    def summary(self, unit: str) -> str:
        v = self.in_unit(unit)
        return (
            f"NLL {v['total']:.4f} ± {v['total_se']:.4f} {unit} "
            f"(n-step loss {v['loss']:.4f} ± {v['loss_se']:.4f}, reconstruction "
            f"{v['reconstruction']:.4f} ± {v['reconstruction_se']:.4f}; "
            f"{self.num_repeats} repeats x {self.num_examples} examples)"
        )
