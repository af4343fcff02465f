"""Conditioning in the BFN and its samplers (bfn.conditioning): labels, label dropping,
classifier-free guidance and known coordinates (inpainting).

What is checked: an unconditional model computes today's losses with today's random draws;
cond_drop 1 is the unconditional loss, 0 never drops; the label reaches the loss; guidance w = 0
is plain conditional sampling bit for bit in every sampler, w != 0 is one call on a doubled batch
giving (1 + w) z_c - w z_u; known coordinates come back unchanged from every sampler (hypothesis,
random masks, K = 2, K > 2, continuous and discretised data) and steer the rest (a Bayes-optimal
network completes its prototype); bad arguments raise ValueError naming them.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bfn import BFN, losses, sample
from bfn.conditioning import Known
from bfn.distributions import CategoricalHead
from bfn.flows import DiscreteFlow
from bfn.networks import build_network
from bfn.samplers import smc
from tests.bfn.nets import ConditionalMLP, FixedLabel
from tests.bfn.test_model import DATA, make
from tests.bfn.test_samplers import NAMES, one_thread, prototype_frequencies, prototype_model, seeded  # noqa: F401

NUM_LABELS = 5
IN_SHAPES = {"binary": (6, 6, 1), "text": (12, 27), "binned": (5, 5, 3), "continuous": (5, 5, 3)}
DATA_SHAPES = {"binary": (6, 6, 1), "text": (12,), "binned": (5, 5, 3), "continuous": (5, 5, 3)}
OUT_HEIGHTS = {"binary": 1, "text": 27, "binned": 2, "continuous": 1}


def conditional_model(kind: str, **kwargs) -> BFN:
    """A BFN of each data type on a conditional MLP whose output depends on its input."""
    torch.manual_seed(0)
    net = ConditionalMLP(IN_SHAPES[kind], DATA_SHAPES[kind], OUT_HEIGHTS[kind], NUM_LABELS)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return make(kind, net, **kwargs)


def labels(batch: int) -> torch.Tensor:
    return torch.arange(batch) % NUM_LABELS


# ------------------------------------------------------------------------------------- training
def todays_continuous_time_loss(model: BFN, x: torch.Tensor) -> torch.Tensor:
    """BFN.continuous_time_loss before conditioning (commit ee5106a), kept as the reference."""
    x = model.check_data(x)
    t = torch.rand(x.shape[0], 1, device=x.device)
    params = model.flow.sample(x, t)
    dist = model.output_distribution(params, t)
    if model.discrete:
        return losses.continuous_time_loss_discrete(model.flow, dist, x, t)
    return losses.continuous_time_loss_continuous(model.flow, dist, x, t)


@pytest.mark.parametrize("kind", list(DATA))
def test_unconditional_model_computes_todays_loss_with_todays_draws(kind):
    model, x = make(kind), DATA[kind]()
    assert model.num_labels is None and model.cond_drop == 0.0
    torch.manual_seed(3)
    expected, after = todays_continuous_time_loss(model, x), torch.rand(3)
    torch.manual_seed(3)
    got = model.continuous_time_loss(x)
    assert torch.equal(got, expected) and torch.equal(torch.rand(3), after)  # no extra draw


def test_unconditional_paper_network_gives_todays_fixed_seed_loss():
    """The tiny transformer built with today's arguments and with num_labels=None: same loss."""
    kwargs = dict(num_classes=27, seq_len=12, n_layer=2, n_head=2, n_embd=32)
    x = DATA["text"]()
    results = []
    for extra in ({}, {"num_labels": None}):
        torch.manual_seed(0)
        model = make("text", build_network("text_transformer", **kwargs, **extra))
        torch.manual_seed(1)
        results.append(model.loss(x))
    assert torch.equal(*results)


@pytest.mark.parametrize("kind", ["binary", "text", "continuous"])
def test_cond_drop_one_is_the_unconditional_loss_and_zero_never_drops(kind):
    x, t, y = DATA[kind](), torch.rand(4), labels(4)
    dropping, keeping = conditional_model(kind, cond_drop=1.0), conditional_model(kind, cond_drop=0.0)
    assert conditional_model(kind).cond_drop == 0.1  # the default for a conditional network

    def loss(model, label):
        torch.manual_seed(5)
        return model.continuous_time_loss(x, t, label)

    assert torch.equal(loss(dropping, y), loss(dropping, None))
    assert torch.equal(loss(keeping, y), loss(keeping.eval(), y))
    assert not torch.allclose(loss(keeping, y), loss(keeping, None))
    assert torch.equal(loss(dropping.eval(), y), loss(keeping, y))  # eval mode never drops


def test_cond_drop_replaces_labels_at_its_rate():
    model = conditional_model("binary", cond_drop=0.3)
    torch.manual_seed(0)
    label = model.training_label(labels(20_000), torch.zeros(20_000, 1))
    dropped = label == NUM_LABELS
    assert abs(dropped.float().mean().item() - 0.3) < 0.015
    assert torch.equal(label[~dropped], labels(20_000)[~dropped])


@pytest.mark.parametrize("kind", list(DATA))
def test_the_label_reaches_the_loss(kind):
    model, x, t = conditional_model(kind).eval(), DATA[kind](), torch.rand(4)
    torch.manual_seed(0)
    a = model.continuous_time_loss(x, t, torch.tensor([0, 1, 2, 3]))
    torch.manual_seed(0)
    b = model.continuous_time_loss(x, t, torch.tensor([4, 1, 0, 3]))
    assert not torch.allclose(a[0], b[0]) and not torch.allclose(a[2], b[2])
    torch.testing.assert_close(a[[1, 3]], b[[1, 3]])
    nll = model.nll(x, num_steps=3, label=labels(4))
    assert nll.total == nll.total and nll.total > 0  # finite, conditional NLL


# ------------------------------------------------------------------------------------- guidance
@pytest.mark.parametrize("kind", list(DATA))
@pytest.mark.parametrize("name", NAMES)
def test_guidance_zero_is_plain_conditional_sampling_bit_for_bit(kind, name):
    model, label = conditional_model(kind).eval(), labels(3)
    plain = make(kind, FixedLabel(model.net, label))  # the conditional net, no conditioning code
    expected = sample(plain, 3, sampler=name, nfe=5, generator=seeded(2), return_sample=True)
    got = sample(model, 3, sampler=name, nfe=5, generator=seeded(2), return_sample=True, label=label, guidance=0.0)
    assert torch.equal(got, expected)
    assert torch.equal(
        model.sample(3, num_steps=4, sampler=name, generator=seeded(2), label=label),
        plain.sample(3, 4, sampler=name, generator=seeded(2)),
    )


@pytest.mark.parametrize("kind", list(DATA))
def test_guided_output_is_one_doubled_call_combining_raw_outputs(kind):
    model, w, label = conditional_model(kind).eval(), 1.5, labels(4)
    x = DATA[kind]()
    t = torch.full((4, 1), 0.4)
    params = model.flow.sample(model.check_data(x), t)
    inputs = model.flow.net_inputs(params, model.data_shape)
    conditional, unconditional = model.net(inputs, t[:, 0], label), model.net(inputs, t[:, 0])
    expected = make(kind, FixedLabel(model.net, label))  # used for the head only
    expected.net = _Constant((1 + w) * conditional - w * unconditional)
    sizes = []
    model.net.register_forward_hook(lambda module, args, out: sizes.append(args[0].shape[0]))
    got = model.output_distribution(params, t, label=label, guidance=w)
    want = expected.output_distribution(params, t)
    assert sizes == [8]  # one call on the doubled batch
    for field in ("logits", "mean", "std", "value"):
        if hasattr(want, field):
            torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=1e-5, atol=1e-5)


class _Constant(torch.nn.Module):
    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, inputs, t):
        return self.output


@pytest.mark.parametrize("name", NAMES)
def test_guided_sampling_makes_nfe_calls_on_a_doubled_batch(name):
    model = conditional_model("text").eval()
    sizes = []
    model.net.register_forward_hook(lambda module, args, out: sizes.append(args[0].shape[0]))
    out = sample(model, 3, sampler=name, nfe=4, generator=seeded(0), label=2, guidance=3.0)
    assert out.shape == (3, 12) and sizes == [6] * 4


# ------------------------------------------------------------------------------ known coordinates
KINDS = {"binary": "K=2", "text": "K=27", "binned": "discretised", "continuous": "continuous"}


@settings(max_examples=12, deadline=None)
@given(
    kind=st.sampled_from(list(KINDS)),
    name=st.sampled_from(NAMES),
    per_sample=st.booleans(),
    return_sample=st.booleans(),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_known_coordinates_come_back_unchanged_from_every_sampler(kind, name, per_sample, return_sample, density, seed):
    model, g = conditional_model(kind).eval(), seeded(seed)
    shape = (3, *model.data_shape) if per_sample else model.data_shape
    mask = torch.rand(shape, generator=g) < density
    values = make_values(kind, g)
    out = sample(model, 3, sampler=name, nfe=3, generator=g, return_sample=return_sample, known=Known(mask, values))
    mask = mask.expand_as(out)
    assert out.dtype == values.dtype and torch.equal(out[mask], values[mask])


def make_values(kind: str, g: torch.Generator) -> torch.Tensor:
    """Three data points that need not look like the training data."""
    shape = (3, *DATA_SHAPES[kind])
    if kind == "binary":
        return torch.randint(0, 2, shape, generator=g)
    if kind == "text":
        return torch.randint(0, 27, shape, generator=g)
    if kind == "binned":
        return (2 * torch.randint(0, 16, shape, generator=g) + 1) / 16 - 1
    return torch.rand(shape, generator=g) * 2 - 1


@pytest.mark.parametrize("kind", list(DATA))
@pytest.mark.parametrize("name", NAMES)
def test_nothing_known_is_unconditional_sampling_bit_for_bit(kind, name):
    model = conditional_model(kind).eval()
    nothing = Known(torch.zeros(model.data_shape, dtype=torch.bool), make_values(kind, seeded(0)))
    a = sample(model, 3, sampler=name, nfe=4, generator=seeded(1), known=nothing)
    assert torch.equal(a, sample(model, 3, sampler=name, nfe=4, generator=seeded(1)))


@pytest.mark.parametrize("kind", list(DATA))
@pytest.mark.parametrize("name", NAMES)
def test_known_half_completes_its_prototype(kind, name):
    """A Bayes-optimal network over 3 prototypes (weights 0.5, 0.3, 0.2), shown half of one, gives
    back all of it: always for discrete data; for continuous data mostly, as replacement is not
    exact posterior sampling (measured, 64 samples x 3 prototypes: 5% off with paper/SDE, 14% with
    the ODEs, up to 31% for the 0.2 prototype; unconditionally it would be 80%)."""
    model, prototypes = prototype_model(kind)
    half = torch.arange(prototypes.shape[1]) < prototypes.shape[1] // 2
    for m in range(prototypes.shape[0]):
        out = sample(model, 48, sampler=name, nfe=40, generator=seeded(m), known=Known(half, prototypes[m]))
        matches = (out.float() - prototypes[m].float()).abs().amax(-1) < 0.02  # (48,)
        if model.discrete:
            assert matches.all(), (m, out[~matches])
        else:
            assert matches.float().mean() > 0.5, (m, matches.float().mean())


# ------------------------------------------------------------------------- sequential Monte Carlo
@pytest.mark.parametrize("kind", list(DATA))
def test_the_smc_weight_is_the_n_step_loss_integrand_of_one_draw(kind):
    """ln p_S(y|x) - ln p_R(y|theta) per dimension, averaged over D and scaled by n, is the n-step
    loss of that single draw y (the paper's receiver for discrete data)."""
    model = conditional_model(kind, receiver="paper").eval()
    g, n, i = seeded(3), 10, 4
    x = make_values(kind, g).reshape(3, -1)
    x = x.long() if model.discrete else x.float()
    t = torch.full((3, 1), (i - 1) / n)
    with torch.no_grad():
        dist = model.output_distribution(model.flow.sample(x, t), t)
    alpha = model.flow.alpha(i, n)
    y = model.flow.sender_sample(x, alpha, g)
    ratio = losses.sender_log_ratio(dist, y, x, alpha)  # (B, D)
    if model.discrete:
        expected = losses.n_step_loss_discrete(model.flow, dist, x, t, n, receiver="paper", y=y[None])
    elif kind == "binned":
        expected = losses.n_step_loss_continuous(model.flow, dist, x, t, n, y=y[None])
    else:  # a Delta output: ln N(y|x, 1/a) - ln N(y|x_hat, 1/a) = a/2 ((y - x_hat)^2 - (y - x)^2)
        expected = n * (alpha / 2 * ((y - dist.data_mean).square() - (y - x).square())).mean(-1)
    torch.testing.assert_close(n * ratio.mean(-1), expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=8, deadline=None)
@given(
    kind=st.sampled_from(list(KINDS)), per_sample=st.booleans(), particles=st.integers(2, 5), seed=st.integers(0, 99)
)
def test_smc_keeps_the_known_coordinates(kind, per_sample, particles, seed):
    model, g = conditional_model(kind).eval(), seeded(seed)
    shape = (3, *model.data_shape) if per_sample else model.data_shape
    mask = torch.rand(shape, generator=g) < 0.5
    values = make_values(kind, g)
    out = sample(model, 3, nfe=4, generator=g, known=Known(mask, values), particles=particles, label=1, guidance=1.0)
    assert out.shape == values.shape and torch.equal(out[mask.expand_as(out)], values[mask.expand_as(out)])


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("kind", list(KINDS))
def test_smc_approaches_the_models_own_conditional_as_particles_grow(kind):
    """Three prototypes (weights 0.5, 0.3, 0.2), the first two equal on the known half: the
    Bayes-optimal network's conditional is 0.625 / 0.375 / 0. One particle (inputs that follow the
    data's flow, no weights) ends 2-9% of the time on neither prototype (measured); 16 twisted
    particles draw the exact shares within sampling noise (sd 0.015 on 1000 samples) and no mixture
    (without the twist, 16 particles still left 2-3% and 64 left 0.1-0.5%)."""
    model, prototypes = prototype_model(kind)
    prototypes[1, :3] = prototypes[0, :3]
    if model.discrete:  # the third differs on the known half (the continuous prototypes already do)
        prototypes[2, 0] = (prototypes[0, 0] + 1) % model.flow.num_classes
    model.net.prototypes.copy_(prototypes)
    known = Known(torch.arange(prototypes.shape[1]) < 3, prototypes[0])
    shares = {p: prototype_frequencies(smc(model, 1000, 50, p, known=known, generator=seeded(1)), prototypes)
              for p in (1, 16)}  # fmt: skip
    assert shares[1][3] > 0.015 and shares[16][3] < 0.005, shares
    torch.testing.assert_close(shares[16], torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.05, rtol=0)


class ClassPrototypes(torch.nn.Module):
    """Class c is prototype c exactly: the Bayes-optimal conditional network of K-class data over M
    prototypes, with label M for "no condition" (a uniform prior over the prototypes)."""

    def __init__(self, prototypes: torch.Tensor, num_classes: int):
        super().__init__()
        self.register_buffer("one_hot", torch.nn.functional.one_hot(prototypes, num_classes).float())  # (M, D, K)
        self.num_labels = prototypes.shape[0]
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, inputs, t, label=None):
        M = self.num_labels
        score = torch.einsum("bdk,mdk->bm", inputs.clamp(min=1e-30).log(), self.one_hot)
        label = torch.full((inputs.shape[0],), M) if label is None else label
        prior = torch.where(label[:, None] == M, 0.0, torch.where(torch.arange(M) == label[:, None], 0.0, -1e4))
        posterior = torch.softmax(prior + score, -1)
        return (torch.einsum("bm,mdk->bdk", posterior, self.one_hot) + 1e-12).log()


def test_smc_infers_the_class_from_the_known_part():
    """Five classes, each one prototype; prototypes 1 and 2 agree on the known half. One particle
    system per class (infer_label): drawn by weight (return_sample), the completions are prototype
    1 or 2, half each (uniform class prior), never another class's; by default the most probable
    class is taken, so every completion is one of the two that fit, and with two particles per class
    (resampling within a class) the same holds."""
    g = seeded(0)
    prototypes = torch.randint(0, 5, (5, 8), generator=g)
    prototypes[2, :4] = prototypes[1, :4]
    for m in (0, 3, 4):
        prototypes[m, 0] = (prototypes[1, 0] + 1 + m) % 5  # the other classes differ on the known half
    model = BFN(ClassPrototypes(prototypes, 5), DiscreteFlow(5, 2.0), CategoricalHead(5), data_shape=(8,)).eval()
    known = Known(torch.arange(8) < 4, prototypes[1])
    drawn = smc(model, 400, 30, 5, known=known, generator=seeded(1), infer_label=True, return_sample=True)
    shares = prototype_frequencies(drawn, prototypes)
    assert shares[[0, 3, 4, 5]].sum() == 0, shares
    assert abs(shares[1] - 0.5) < 0.1, shares  # sd 0.025 on 400 samples
    for particles in (5, 10):
        mode = prototype_frequencies(smc(model, 50, 30, particles, known=known, infer_label=True), prototypes)
        assert mode[[1, 2]].sum() == 1, (particles, mode)


def test_bad_smc_arguments_raise_value_errors_naming_them():
    model = conditional_model("binary").eval()
    known = Known(torch.ones(model.data_shape, dtype=torch.bool), make_values("binary", seeded(0)))
    for kwargs, match in (
        ({"particles": 0}, "particles must be an int >= 1"),
        ({"particles": 2.0}, "particles must be an int >= 1"),
        ({"particles": 4}, "known=None"),
        ({"particles": 4, "known": known, "sampler": "ode2"}, "sampler='ode2'"),
        ({"particles": 4, "known": known, "grid": "uniform"}, "grid"),
        ({"particles": 4, "known": known, "infer_label": True}, "particles a multiple of num_labels"),
        ({"particles": 5, "known": known, "infer_label": True, "label": 1}, "no label"),
        ({"infer_label": True}, "infer_label"),
    ):
        with pytest.raises(ValueError, match=match):
            sample(model, 3, nfe=3, **kwargs)


# ------------------------------------------------------------------------------------ bad input
def test_bad_conditioning_arguments_raise_value_errors_naming_them():
    conditional, plain = conditional_model("text"), make("text")
    x = DATA["text"]()
    cases = [
        (lambda: conditional.loss(x, label=torch.tensor([0, 1, 2, NUM_LABELS])), "label"),
        (lambda: conditional.loss(x, label=torch.tensor([0, 1, -1, 2])), "label"),
        (lambda: conditional.loss(x, label=torch.tensor([0.0, 1.0, 2.0, 3.0])), "label"),
        (lambda: conditional.loss(x, label=torch.tensor([0, 1])), "label"),
        (lambda: plain.loss(x, label=labels(4)), "label"),
        (lambda: sample(conditional, 2, nfe=2, label=NUM_LABELS), "label"),
        (lambda: sample(plain, 2, nfe=2, label=1), "label"),
        (lambda: sample(plain, 2, nfe=2, guidance=1.0), "guidance"),
        (lambda: sample(conditional, 2, nfe=2, guidance=1.0), "guidance"),  # nothing to guide towards
        (lambda: sample(conditional, 2, nfe=2, label=1, guidance=float("nan")), "guidance"),
        (lambda: plain.sample(2, 1, guidance=2.0), "guidance"),
        (lambda: BFN(plain.net, plain.flow, plain.head, data_shape=(12,), cond_drop=0.2), "cond_drop"),
        (lambda: make("text", ConditionalMLP((12, 27), (12,), 27, 3), cond_drop=1.5), "cond_drop"),
        (lambda: make("text", ConditionalMLP((12, 27), (12,), 27, 3), cond_drop=-0.1), "cond_drop"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()


@pytest.mark.parametrize(
    ("kind", "mask", "values", "match"),
    [
        ("text", torch.ones(11, dtype=torch.bool), torch.zeros(2, 12, dtype=torch.long), "known.mask"),
        ("text", torch.ones(3, 12, dtype=torch.bool), torch.zeros(2, 12, dtype=torch.long), "known.mask"),
        ("text", torch.ones(12), torch.zeros(2, 12, dtype=torch.long), "known.mask"),  # not bool
        ("text", torch.ones(12, dtype=torch.bool), torch.zeros(2, 13, dtype=torch.long), "known.values"),
        ("text", torch.ones(12, dtype=torch.bool), torch.zeros(2, 12), "known.values"),  # floats
        ("text", torch.ones(12, dtype=torch.bool), torch.full((2, 12), 27), "known.values"),
        ("binary", torch.ones(6, 6, 1, dtype=torch.bool), torch.full((2, 6, 6, 1), 2), "known.values"),
        ("continuous", torch.ones(5, 5, 3, dtype=torch.bool), torch.full((2, 5, 5, 3), 1.5), "known.values"),
        (
            "continuous",
            torch.ones(5, 5, 3, dtype=torch.bool),
            torch.zeros(2, 5, 5, 3, dtype=torch.long),
            "known.values",
        ),
    ],
)
def test_bad_known_coordinates_raise_value_errors_naming_them(kind, mask, values, match):
    with pytest.raises(ValueError, match=match):
        sample(make(kind), 2, nfe=2, known=Known(mask, values))


def test_values_outside_the_mask_are_not_checked():
    mask = torch.zeros(12, dtype=torch.bool)
    mask[:3] = True
    values = torch.full((2, 12), -1)
    values[:, :3] = torch.tensor([4, 0, 26])
    out = sample(make("text"), 2, nfe=2, known=Known(mask, values), generator=seeded(0))
    assert torch.equal(out[:, :3], values[:, :3]) and out.min() >= 0
