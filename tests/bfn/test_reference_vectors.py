"""Exact match with tensors dumped from the official BFN implementation (tests/data/bfn_vectors).

The stored network outputs, flow noise and sender draws are fed to this project's math, so no RNG
or network has to match. Tolerance: 1e-5 relative (float32 throughout).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bfn import BernoulliHead, ContinuousFlow, DiscreteFlow, DiscretizedNormalHead, losses
from tests.conftest import TEST_DATA

VECTORS = TEST_DATA / "bfn_vectors"
RTOL = 1e-5


def load(name: str) -> dict[str, torch.Tensor]:
    with np.load(VECTORS / name) as f:
        return {k: torch.from_numpy(f[k]) for k in f.files}


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL, atol: float = 1e-6):
    torch.testing.assert_close(actual.float(), expected.float().reshape(actual.shape), rtol=rtol, atol=atol)


def per_example_t(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(t.shape[0], -1)
    assert (t == t[:, :1]).all(), "one t per example, broadcast over dimensions"
    return t[:, :1]


# ---------------------------------------------------------------------------------- binary MNIST
@pytest.fixture(scope="module")
def mnist():
    v = load("mnist_discrete.npz")
    v["x"] = v["data"].reshape(4, -1).long()
    return v


@pytest.fixture(scope="module")
def mnist_flow():
    return DiscreteFlow(2, beta_1=DiscreteFlow(2, 1.0).schedule.from_max_sqrt_beta(3.0).beta_1)


def test_mnist_flow_and_net_inputs(mnist, mnist_flow):
    t = per_example_t(mnist["t_cts"])
    params = mnist_flow.sample(mnist["x"], t, noise=mnist["flow_eps"].reshape(4, 784, 2))
    close(params.probs[..., 0], mnist["input_param0"])
    close(mnist_flow.net_inputs(params, (28, 28, 1)), mnist["net_inputs"])
    recon = mnist_flow.sample(mnist["x"], torch.ones(4, 1), noise=mnist["recon_eps"].reshape(4, 784, 2))
    close(recon.probs[..., 0], mnist["recon_input_param0"])


def test_mnist_continuous_time_loss(mnist, mnist_flow):
    t = per_example_t(mnist["t_cts"])
    dist = BernoulliHead()(mnist["output_params"].reshape(4, 784, 1))
    loss = losses.continuous_time_loss_discrete(mnist_flow, dist, mnist["x"], t)
    close(loss, mnist["cts_loss_elem"])
    close(loss.mean(), mnist["cts_loss_mean"])


@pytest.mark.parametrize("n", [10, 100])
def test_mnist_n_step_loss(mnist, mnist_flow, n):
    t = per_example_t(mnist[f"disc{n}_t"])
    dist = BernoulliHead()(mnist[f"disc{n}_out"].reshape(4, 784, 1))
    loss = losses.n_step_loss_discrete(mnist_flow, dist, mnist["x"], t, n, receiver="reference", y=mnist[f"disc{n}_y"])
    close(loss, mnist[f"disc{n}_loss"])


def test_mnist_reconstruction_loss(mnist):
    dist = BernoulliHead()(mnist["recon_output_params"].reshape(4, 784, 1))
    loss = losses.reconstruction_loss_discrete(dist, mnist["x"])
    close(loss, mnist["recon_loss_elem"])
    close(loss.mean(), mnist["recon_loss"])


# ------------------------------------------------------------------------- CIFAR-10, 256 bins
SIGMA_1 = 1e-3  # min_variance 1e-6


@pytest.fixture(scope="module")
def cifar():
    v = load("cifar10_discretized_256bins.npz")
    v["x"] = v["data"].reshape(4, -1)
    return v


def cifar_dist(v, t_key, eps_key, out_key):
    flow = ContinuousFlow(SIGMA_1)
    t = per_example_t(v[t_key]) if t_key else torch.ones(4, 1)
    params = flow.sample(v["x"], t, noise=v[eps_key].reshape(4, -1))
    head = DiscretizedNormalHead(256, sigma_1=SIGMA_1)
    return flow, t, params, head(v[out_key].reshape(4, 3072, 2), params.mean, t)


def test_cifar_flow_and_net_inputs(cifar):
    flow, _, params, _ = cifar_dist(cifar, "t_cts", "flow_eps", "output_params")
    close(params.mean, cifar["input_param0"])
    close(flow.net_inputs(params, (32, 32, 3)), cifar["net_inputs"])
    _, _, recon, _ = cifar_dist(cifar, None, "recon_eps", "recon_output_params")
    close(recon.mean, cifar["recon_input_param0"])


def test_cifar_continuous_time_loss(cifar):
    flow, t, _, dist = cifar_dist(cifar, "t_cts", "flow_eps", "output_params")
    loss = losses.continuous_time_loss_continuous(flow, dist, cifar["x"], t)
    expected = cifar["cts_loss_elem"]
    close(loss.mean(-1), expected.mean(-1))
    close(loss.mean(), cifar["cts_loss_mean"])
    # Elementwise, L = C (x_hat - x)^2 / sigma_1^(2t) is ill-conditioned where x_hat ~ x: one float32
    # ulp of x_hat (a sum over 256 bins) moves L by 2 ulp / |x_hat - x| relative. So compare the
    # well-conditioned quantity it encodes, |x_hat - x| = sqrt(L sigma_1^(2t) / C), to 1e-6 absolute,
    # and L itself to 1e-5 relative wherever |x_hat - x| > 0.1 (every element is within 3e-3).
    scale = flow.schedule.posterior_variance(t) / -np.log(SIGMA_1)
    close((loss * scale).sqrt(), (expected * scale).sqrt(), rtol=0, atol=1e-6)
    large = (expected * scale).sqrt() > 0.1
    assert large.sum() > 500
    close(loss[large], expected[large])
    close(loss, expected, rtol=3e-3)


@pytest.mark.parametrize("n", [10, 100])
def test_cifar_n_step_loss(cifar, n):
    flow, t, _, dist = cifar_dist(cifar, f"disc{n}_t", f"disc{n}_eps", f"disc{n}_out")
    loss = losses.n_step_loss_continuous(flow, dist, cifar["x"], t, n, y=cifar[f"disc{n}_y"])
    close(loss, cifar[f"disc{n}_loss"])


def test_cifar_reconstruction_loss(cifar):
    _, _, _, dist = cifar_dist(cifar, None, "recon_eps", "recon_output_params")
    loss = losses.reconstruction_loss_continuous(dist, cifar["x"], num_bins=256, std=SIGMA_1)
    close(loss, cifar["recon_loss_elem"])
    close(loss.mean(), cifar["recon_loss"])
