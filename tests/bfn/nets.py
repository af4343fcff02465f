"""Small networks for the BFN tests: an MLP over the whole flattened input, and oracles."""

from __future__ import annotations

import math

import torch
from torch import nn


class FlatMLP(nn.Module):
    """net(inputs (B, *in_shape), t (B,)) -> (B, *data_shape, h): an MLP on inputs and t features.

    t enters as 2t - 1, ln t and 8 Fourier features, so the MLP can express the 1/sqrt(gamma(t))
    scale that noise prediction needs near t = 0.
    """

    def __init__(self, in_shape, data_shape, out_height, hidden=256):
        super().__init__()
        self.data_shape, self.out_height = tuple(data_shape), out_height
        self.body = nn.Sequential(
            nn.Linear(math.prod(in_shape) + 18, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, math.prod(data_shape) * out_height),
        )

    def forward(self, inputs, t):
        freqs = torch.arange(1, 9, device=t.device) * math.pi * t[:, None]  # (B, 8)
        time = [2 * t[:, None] - 1, (t[:, None] + 1e-4).log() / 4, freqs.sin(), freqs.cos()]
        h = torch.cat([inputs.flatten(1), *time], dim=1)
        return self.body(h).reshape(-1, *self.data_shape, self.out_height)


class DiscreteOracle(nn.Module):
    """Predicts the target batch with near certainty, whatever it is shown."""

    def __init__(self, target, num_classes):
        super().__init__()
        self.register_buffer("logits", 30.0 * nn.functional.one_hot(target, num_classes).float())
        self.dummy = nn.Parameter(torch.zeros(()))
        self.binary = num_classes == 2

    def forward(self, inputs, t):
        logits = self.logits[: inputs.shape[0]]
        return logits[..., 1:] - logits[..., :1] if self.binary else logits


class NoiseOracle(nn.Module):
    """Continuous data: predicts the noise that makes the head's data prediction the target."""

    def __init__(self, target, sigma_1, out_height):
        super().__init__()
        self.register_buffer("target", target)
        self.dummy = nn.Parameter(torch.zeros(()))
        self.min_variance, self.out_height = sigma_1**2, out_height

    def forward(self, mean, t):
        shape = [-1] + [1] * (mean.ndim - 1)
        variance = torch.pow(self.min_variance, t.clamp(min=1e-6)).reshape(shape)
        gamma = 1 - variance
        eps = (mean / gamma - self.target[: mean.shape[0]]) / (variance / gamma).sqrt()
        outs = [eps, torch.full_like(eps, -30.0)][: self.out_height]
        return torch.stack(outs, -1)


class DataPredictionMLP(FlatMLP):
    """Continuous data: an MLP that predicts x, handed to the head as the equivalent noise.

    The BFN heads read the output as noise (paper Sec. 5.2). An MLP finds memorising x far easier
    than emitting eps, whose scale 1/sqrt(gamma (1 - gamma)) spans orders of magnitude, so this
    test net predicts x_hat and returns eps_hat = (mu - gamma x_hat) / sqrt(gamma (1 - gamma)),
    which the head maps back to exactly x_hat (a round trip the tests thereby also exercise).
    """

    def __init__(self, in_shape, data_shape, out_height, *, sigma_1, hidden=256):
        super().__init__(in_shape, data_shape, out_height, hidden)
        self.min_variance = sigma_1**2

    def forward(self, mean, t):
        shape = (-1, *[1] * (mean.ndim - 1))
        variance = torch.pow(self.min_variance, t.clamp(min=1e-6)).reshape(shape)
        gamma = 1 - variance
        out = super().forward(mean, t)
        eps = (mean - gamma * out[..., 0]) / (gamma * variance).sqrt()
        return torch.cat([eps.unsqueeze(-1), out[..., 1:]], dim=-1)


class ConditionalMLP(nn.Module):
    """A class-conditional FlatMLP: net(inputs, t, label=None), label row num_labels = no condition."""

    def __init__(self, in_shape, data_shape, out_height, num_labels, hidden=64):
        super().__init__()
        self.num_labels = num_labels
        self.labels = nn.Embedding(num_labels + 1, 8)
        self.mlp = FlatMLP((math.prod(in_shape) + 8,), data_shape, out_height, hidden)

    def forward(self, inputs, t, label=None):
        if label is None:
            label = torch.full((inputs.shape[0],), self.num_labels, dtype=torch.long, device=inputs.device)
        return self.mlp(torch.cat([inputs.flatten(1), self.labels(label)], dim=1), t)


class FixedLabel(nn.Module):
    """An unconditional view of a conditional net: always called with ``label`` (None: no condition)."""

    def __init__(self, net, label):
        super().__init__()
        self.net, self.label = net, label

    def forward(self, inputs, t):
        return self.net(inputs, t, self.label)
