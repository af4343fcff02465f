"""The BFN module: sampler, determinism, overfitting one batch, validation of arguments."""

from __future__ import annotations

import pytest
import torch

from bfn import (
    BFN,
    EMA,
    BernoulliHead,
    CategoricalHead,
    ContinuousFlow,
    DeltaHead,
    DiscreteFlow,
    DiscretizedNormalHead,
)
from tests.bfn.nets import DataPredictionMLP, DiscreteOracle, FlatMLP, NoiseOracle

SIGMA_1 = 0.02


def binary_data(B=4):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 2, (B, 6, 6, 1), generator=g)


def text_data(B=4, K=27):
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, K, (B, 12), generator=g)


def binned_data(B=4, K=16):
    g = torch.Generator().manual_seed(3)
    return (2 * torch.randint(0, K, (B, 5, 5, 3), generator=g) + 1) / K - 1


def continuous_data(B=4):
    g = torch.Generator().manual_seed(4)
    return torch.rand(B, 5, 5, 3, generator=g) * 1.6 - 0.8


def make(kind, net=None, **kwargs):
    """A BFN of each data type with a small MLP (or the given net)."""
    if kind == "binary":
        flow, head, shape, in_shape = DiscreteFlow(2, 3.0), BernoulliHead(), (6, 6, 1), (6, 6, 1)
    elif kind == "text":
        flow, head, shape, in_shape = DiscreteFlow(27, 0.75), CategoricalHead(27), (12,), (12, 27)
    elif kind == "binned":
        flow, head = ContinuousFlow(SIGMA_1), DiscretizedNormalHead(16, sigma_1=SIGMA_1)
        shape = in_shape = (5, 5, 3)
    else:
        flow, head, shape, in_shape = ContinuousFlow(SIGMA_1), DeltaHead(sigma_1=SIGMA_1), (5, 5, 3), (5, 5, 3)
    if net is None and isinstance(flow, ContinuousFlow):
        net = DataPredictionMLP(in_shape, shape, head.output_height, sigma_1=SIGMA_1)
    net = net or FlatMLP(in_shape, shape, head.output_height)
    return BFN(net, flow, head, data_shape=shape, **kwargs)


DATA = {"binary": binary_data, "text": text_data, "binned": binned_data, "continuous": continuous_data}


def oracle(kind, x):
    if kind == "binary":
        return DiscreteOracle(x, 2)
    if kind == "text":
        return DiscreteOracle(x, 27)
    return NoiseOracle(x, SIGMA_1, 2 if kind == "binned" else 1)


@pytest.mark.parametrize("kind", list(DATA))
def test_sampler_with_oracle_returns_the_data(kind):
    x = DATA[kind]()
    model = make(kind, oracle(kind, x))
    out = model.sample(x.shape[0], num_steps=10, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    if kind == "continuous":
        torch.testing.assert_close(out, x, atol=1e-4, rtol=0)
    else:
        assert torch.equal(out, x)


@pytest.mark.parametrize("kind", list(DATA))
@pytest.mark.parametrize("return_sample", [False, True])
def test_sampler_is_deterministic_under_a_seed(kind, return_sample):
    torch.manual_seed(0)
    model = make(kind)
    for p in model.parameters():  # make the output depend on the input
        torch.nn.init.normal_(p, std=0.3)
    draw = [
        model.sample(3, num_steps=n, generator=torch.Generator().manual_seed(s), return_sample=return_sample)
        for s, n in ((7, 5), (7, 5), (8, 5), (7, 1))
    ]
    assert torch.equal(draw[0], draw[1])
    assert not torch.equal(draw[0], draw[2]) or kind == "continuous" and not return_sample
    assert draw[3].shape == draw[0].shape


@pytest.mark.parametrize("kind", list(DATA))
def test_tiny_bfn_overfits_one_batch(kind):
    torch.manual_seed(0)
    x = DATA[kind](B=8)
    model = make(kind)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3 if kind in ("binned", "continuous") else 2e-3)
    t = torch.rand(256, 1)  # a fixed set of times, so the losses before and after compare

    def full_loss():
        with torch.no_grad():
            xs = x.repeat(32, *[1] * (x.ndim - 1))
            return model.loss(xs, t=t).item()

    before = full_loss()
    for _ in range(300):
        loss = model(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = full_loss()
    # nats/dim; a Bayes-optimal memoriser of these 8 random examples scores ~0.04 (continuous)
    assert after < before / 5 and after < 1.5, (before, after)


@pytest.mark.parametrize("kind", list(DATA))
def test_loss_nll_shapes_and_float32_under_autocast(kind):
    x = DATA[kind]()
    model = make(kind)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.continuous_time_loss(x)
    assert loss.dtype == torch.float32 and loss.shape == (4, x[0].numel())
    assert model.n_step_loss(x, 10).shape == (4,)
    assert model.reconstruction_loss(x).shape == (4,)
    nll = model.nll(x, num_steps=10, repeats=3)
    assert nll.num_repeats == 3 and nll.total == pytest.approx(nll.loss + nll.reconstruction)
    assert nll.in_unit("bits/dim")["total"] == pytest.approx(nll.total / 0.6931471805599453)
    assert nll.in_unit("nats/image")["total"] == pytest.approx(nll.total * x[0].numel())


def test_ema_follows_the_formula():
    net = torch.nn.Linear(3, 2)
    ema = EMA(net, decay=0.9)
    before = [p.clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net)
    for e, b, p in zip(ema.model.parameters(), before, net.parameters(), strict=True):
        torch.testing.assert_close(e, b - 0.1 * (b - p))


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: ContinuousFlow(1.0), "sigma_1"),
        (lambda: ContinuousFlow(0.0), "sigma_1"),
        (lambda: ContinuousFlow(-0.1), "sigma_1"),
        (lambda: DiscreteFlow(2, 0.0), "beta_1"),
        (lambda: DiscreteFlow(2, -1.0), "beta_1"),
        (lambda: DiscreteFlow(1, 1.0), "num_classes"),
        (lambda: DiscretizedNormalHead(1, sigma_1=0.1), "num_bins"),
        (lambda: DiscretizedNormalHead(16, sigma_1=2.0), "sigma_1"),
        (lambda: CategoricalHead(1), "num_classes"),
        (lambda: EMA(torch.nn.Linear(1, 1), decay=1.0), "decay"),
        (lambda: make("text", receiver="joint"), "receiver"),
        (lambda: BFN(torch.nn.Identity(), DiscreteFlow(27, 1.0), BernoulliHead(), data_shape=(4,)), "27-class"),
        (lambda: BFN(torch.nn.Identity(), ContinuousFlow(0.1), BernoulliHead(), data_shape=(4,)), "continuous"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize(
    ("kind", "x", "match"),
    [
        ("binary", torch.rand(2, 6, 6, 1), "integer"),
        ("binary", torch.full((2, 6, 6, 1), 2), r"\[0, 1\]"),
        ("text", torch.full((2, 12), 27), r"\[0, 26\]"),
        ("text", torch.zeros(2, 13, dtype=torch.long), "shape"),
        ("continuous", torch.zeros(2, 5, 5, 3, dtype=torch.long), "floating"),
        ("continuous", torch.full((2, 5, 5, 3), 1.5), r"\[-1, 1\]"),
        ("binned", torch.zeros(2, 3, 5, 5), "shape"),
    ],
)
def test_bad_data_raises_value_error(kind, x, match):
    model = make(kind)
    with pytest.raises(ValueError, match=match):
        model.loss(x)


def test_bad_sampling_and_nll_arguments():
    model = make("binary")
    for call, match in (
        (lambda: model.sample(2, num_steps=0), "num_steps"),
        (lambda: model.sample(0, num_steps=2), "batch_size"),
        (lambda: model.n_step_loss(binary_data(), 0), "num_steps"),
        (lambda: model.nll(binary_data(), 10, repeats=0), "repeats"),
    ):
        with pytest.raises(ValueError, match=match):
            call()
