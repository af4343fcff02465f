"""Fast tests of bfn.networks: sizes, shapes, conditioning on t, validation and custom kernels."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bfn.networks import (
    DATA_KEYS,
    NETWORKS,
    TextTransformer,
    UNet,
    UNetVDM,
    build_network,
    constructor_args,
    count_parameters,
)
from bfn.networks.layers import (
    Dropout,
    GroupNorm32,
    GroupNormNHWC,
    cos_sin_embedding,
    dropout_noise,
    linear_on_concat,
    sin_cos_embedding,
)
from bfn.networks.transformer import TextInputAdapter, sinusoidal_positions

# Networks the tests build: (architecture, constructor arguments); the class defaults are the paper's.
SIZES = {
    "mnist_unet": ("unet", {}),
    "cifar_unet_vdm": ("unet_vdm", {}),
    "text8_transformer": ("text_transformer", {}),
    "mnist_unet_small": ("unet", dict(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, num_heads=4)),
    "mnist_unet_tiny": (
        "unet",
        dict(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, num_heads=2, norm_groups=8),
    ),
    "cifar_unet_vdm_tiny": ("unet_vdm", dict(embedding_dim=16, n_blocks=1, norm_groups=8)),
    "text8_transformer_small": ("text_transformer", dict(n_layer=4, n_head=4, n_embd=128)),
    "text8_transformer_tiny": ("text_transformer", dict(n_layer=2, n_head=2, n_embd=32)),
}
DATA = {  # data-dependent arguments: MNIST, CIFAR-10, text8
    "unet": dict(in_channels=1, out_height=1, image_size=28),
    "unet_vdm": dict(in_channels=3, out_height=2, image_size=32),
    "text_transformer": dict(num_classes=27, seq_len=256),
}
TINY = ["mnist_unet_tiny", "cifar_unet_vdm_tiny", "text8_transformer_tiny"]


def build(name: str, **overrides):
    arch, kwargs = SIZES[name]
    return build_network(arch, **{**DATA[arch], **kwargs, **overrides})


def make_batch(name: str, batch: int = 2, **data):
    """Inputs (net_inputs, t) and the expected output shape for a named test network."""
    arch = SIZES[name][0]
    kwargs = {**DATA[arch], **data}
    t = torch.rand(batch)
    if NETWORKS[arch].kind == "text":
        length, k = 16, kwargs["num_classes"]
        theta = torch.softmax(torch.randn(batch, length, k), dim=-1)
        return theta, t, (batch, length, k)
    size, c, h = kwargs["image_size"], kwargs["in_channels"], kwargs["out_height"]
    x = torch.rand(batch, size, size, c) * 2 - 1
    return x, t, (batch, size, size, c, h)


def perturb_(net: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Add noise to every parameter, so that zero-initialised layers stop hiding the inputs."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn_like(p))
    return net


# ------------------------------------------------------------------------------ sizes


@pytest.mark.parametrize(
    ("name", "expected", "rel"),
    [
        ("mnist_unet", 24.81e6, 0.01),
        ("cifar_unet_vdm", 30.72e6, 0.01),
        ("text8_transformer", 170.18e6, 0.01),
        ("mnist_unet_small", 1.08e6, 0.02),
    ],
)
def test_parameter_counts_match_the_paper(name, expected, rel):
    with torch.device("meta"):
        net = build(name)
    assert count_parameters(net) == pytest.approx(expected, rel=rel)


def test_non_embedding_count_excludes_only_the_text_input_embedding():
    with torch.device("meta"):
        text = build("text8_transformer_small")
        unet = build("mnist_unet_small")
    k, d = 27, 128
    embedding = (k * d + d) + (d + d)  # token and time projections; positions are a buffer
    assert count_parameters(text) - count_parameters(text, non_embedding=True) == embedding
    assert count_parameters(unet, non_embedding=True) == count_parameters(unet)


# ------------------------------------------------------------------------------ shapes, grads


@pytest.mark.parametrize("name", TINY)
def test_tiny_presets_output_shape_and_dtype(name):
    net = build(name)
    x, t, shape = make_batch(name)
    out = net(x, t)
    assert out.shape == shape
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_cifar_continuous_output_height_one():
    net = build("cifar_unet_vdm_tiny", out_height=1)
    x, t, shape = make_batch("cifar_unet_vdm_tiny", out_height=1)
    assert net(x, t).shape == shape == (2, 32, 32, 3, 1)


@pytest.mark.parametrize("name", TINY)
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    net = perturb_(build(name))
    x, t, _ = make_batch(name)
    net(x, t).square().sum().backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", TINY)
def test_gradients_are_laid_out_like_their_parameters(name):
    """Every gradient has its parameter's memory order; strides may differ only along size-1 dims
    (a 1x1 conv's channels_last gradient). DDP compares strides literally and warns once for those;
    the training worker silences that warning on the strength of this test."""
    torch.manual_seed(0)
    net = perturb_(build(name))
    x, t, _ = make_batch(name)
    net(x, t).square().sum().backward()
    for pname, p in net.named_parameters():
        pairs = [(a, b) for a, b, size in zip(p.grad.stride(), p.stride(), p.shape, strict=True) if size > 1]
        assert all(a == b for a, b in pairs), (pname, tuple(p.shape), p.grad.stride(), p.stride())


@pytest.mark.parametrize("name", ["mnist_unet_tiny", "cifar_unet_vdm_tiny"])
def test_zero_initialised_output_conv_still_learns(name):
    """At init the body's last conv is zero, so only the input skip reaches the head (the VDM
    input carries no t, so its output ignores t); that conv's weight still gets a gradient."""
    torch.manual_seed(0)
    net = build(name).eval()
    x, t, _ = make_batch(name)
    out = net(x, t)
    last_conv = net.out[-1] if isinstance(net, UNet) else net.conv_out[-1]
    assert last_conv.weight.abs().sum() == 0
    if isinstance(net, UNetVDM):
        assert torch.equal(out, net(x, 1 - t))
    out.square().sum().backward()
    assert last_conv.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ behaviour


@pytest.mark.parametrize("name", TINY)
def test_output_depends_on_t_and_eval_is_deterministic(name):
    torch.manual_seed(0)
    net = perturb_(build(name)).eval()
    x, t, _ = make_batch(name)
    with torch.no_grad():
        out = net(x, t)
        assert torch.equal(out, net(x, t))
        assert not torch.allclose(out, net(x, 1 - t), atol=1e-5)


@pytest.mark.parametrize("name", ["mnist_unet_tiny", "cifar_unet_vdm_tiny"])
def test_dropout_is_active_in_train_mode(name):
    torch.manual_seed(0)
    net = perturb_(build(name)).train()
    x, t, _ = make_batch(name)
    assert not torch.allclose(net(x, t), net(x, t))


def test_transformer_is_not_causal():
    torch.manual_seed(0)
    net = build("text8_transformer_tiny").eval()
    theta, t, _ = make_batch("text8_transformer_tiny")
    changed = theta.clone()
    changed[:, -1] = torch.softmax(torch.randn(2, 27), dim=-1)
    with torch.no_grad():
        before, after = net(theta, t), net(changed, t)
    assert not torch.allclose(before[:, 0], after[:, 0])


def test_transformer_accepts_per_token_time():
    net = build("text8_transformer_tiny").eval()
    theta, t, _ = make_batch("text8_transformer_tiny")
    with torch.no_grad():
        per_sample = net(theta, t)
        per_token = net(theta, t[:, None].expand(2, theta.shape[1]))
    assert torch.allclose(per_sample, per_token, atol=1e-6)


def test_channels_last_does_not_change_the_function():
    torch.manual_seed(0)
    fast = perturb_(build("mnist_unet_tiny", attention_resolutions=(1,))).eval()
    plain = build("mnist_unet_tiny", attention_resolutions=(1,), channels_last=False)
    plain.load_state_dict(fast.state_dict())
    plain.eval()
    x, t, _ = make_batch("mnist_unet_tiny")
    with torch.no_grad():
        assert torch.allclose(fast(x, t), plain(x, t), atol=1e-5)


def test_unet_runs_under_bfloat16_autocast():
    torch.manual_seed(0)
    net = perturb_(build("mnist_unet_tiny"))
    x, t, shape = make_batch("mnist_unet_tiny")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, t)
    assert out.shape == shape and torch.isfinite(out).all()
    out.float().sum().backward()


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("cls", "kwargs", "argument"),
    [
        (UNet, {"model_channels": 48}, "norm_groups"),  # 32 groups do not divide 48
        (UNet, {"model_channels": 0}, "model_channels"),
        (UNet, {"dropout": 1.0}, "dropout"),
        (UNet, {"channel_mult": ()}, "channel_mult"),
        (UNet, {"num_heads": 3}, "num_heads"),
        (UNet, {"image_size": 30}, "image_size"),
        (UNet, {"in_channels": 0}, "in_channels"),
        (UNet, {"num_res_blocks": 0}, "num_res_blocks"),
        (UNetVDM, {"embedding_dim": 100}, "norm_groups"),
        (UNetVDM, {"n_attention_heads": 3}, "n_attention_heads"),
        (UNetVDM, {"n_blocks": -1}, "n_blocks"),
        (UNetVDM, {"out_height": 0}, "out_height"),
        (TextTransformer, {"n_head": 5}, "n_head"),
        (TextTransformer, {"n_layer": 0}, "n_layer"),
        (TextTransformer, {"num_classes": 1}, "num_classes"),
        (TextTransformer, {"dropout": -0.1}, "dropout"),
    ],
)
def test_bad_hyperparameters_raise_value_error_naming_them(cls, kwargs, argument):
    with torch.device("meta"), pytest.raises(ValueError, match=argument):
        cls(**kwargs)


def test_wrong_input_shapes_raise_value_error():
    net = build("mnist_unet_tiny")
    with pytest.raises(ValueError, match="net_inputs"):
        net(torch.zeros(2, 28, 28, 3), torch.zeros(2))
    with pytest.raises(ValueError, match="t must"):
        net(torch.zeros(2, 28, 28, 1), torch.zeros(3))
    text = build("text8_transformer_tiny", seq_len=8)
    with pytest.raises(ValueError, match="seq_len"):
        text(torch.full((1, 9, 27), 1 / 27), torch.zeros(1))


# ------------------------------------------------------------------------------ registry


def test_every_architecture_builds_with_its_data_keys():
    assert set(NETWORKS) == {"unet", "unet_vdm", "text_transformer"}
    for arch, network in NETWORKS.items():
        assert set(network.data_keys) <= DATA_KEYS and set(network.data_keys) <= set(constructor_args(arch))
        assert network.kind in ("image", "text")
        with torch.device("meta"):
            assert isinstance(build_network(arch), network.cls)


def test_build_network_overrides_and_ignores_foreign_data_keys():
    net = build("mnist_unet_tiny", in_channels=3, out_height=2, num_classes=2, seq_len=5)
    x = torch.zeros(1, 28, 28, 3)
    assert net(x, torch.zeros(1)).shape == (1, 28, 28, 3, 2)
    text = build("text8_transformer_tiny", num_classes=5, out_height=7, image_size=3)
    assert text(torch.full((1, 4, 5), 0.2), torch.zeros(1)).shape == (1, 4, 5)


def test_build_network_rejects_unknown_architectures_and_arguments():
    with pytest.raises(ValueError, match="arch"):
        build_network("no_such_net")
    with pytest.raises(ValueError, match="widht"):
        build_network("unet", widht=3)


def test_optim_groups_decay_only_linear_weights():
    net = build("text8_transformer_tiny")
    decay, no_decay = net.optim_groups(0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    linear_weights = {id(m.weight) for m in net.modules() if isinstance(m, torch.nn.Linear)}
    assert {id(p) for p in decay["params"]} == linear_weights
    all_ids = [id(p) for p in decay["params"] + no_decay["params"]]
    assert sorted(all_ids) == sorted(id(p) for p in net.parameters())


def test_transformer_init_scales():
    torch.manual_seed(0)
    net = build("text8_transformer_small", n_layer=8)
    block = net.blocks[0]
    assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert block.attn.c_attn.bias.abs().max() == 0


# ------------------------------------------------------------------------------ building blocks


def test_time_embeddings_follow_the_reference_conventions():
    # improved-diffusion: [cos, sin], frequencies 1e4^(-i/half)
    emb = cos_sin_embedding(torch.tensor([0.0, 2.0]), 8)
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    assert emb[1, 5].item() == pytest.approx(math.sin(2 * 1e4 ** (-1 / 4)), abs=1e-6)
    # VDM: [sin, cos], frequencies log-spaced from 1 to 1e-4 inclusive
    emb = sin_cos_embedding(torch.tensor([3.0]), 8)
    assert emb[0, 0].item() == pytest.approx(math.sin(3.0), abs=1e-6)
    assert emb[0, 3].item() == pytest.approx(math.sin(3e-4), abs=1e-7)
    assert emb[0, 4].item() == pytest.approx(math.cos(3.0), abs=1e-6)


def test_linear_on_concat_equals_linear_of_cat():
    torch.manual_seed(0)
    layer = torch.nn.Linear(7, 3)
    a, b = torch.randn(2, 5, 4), torch.randn(2, 5, 3)
    assert torch.allclose(linear_on_concat(layer, [a, b]), layer(torch.cat([a, b], -1)), atol=1e-6)
    with pytest.raises(ValueError, match="features"):
        linear_on_concat(layer, [a])


def test_position_code_uses_base_1000():
    code = sinusoidal_positions(4, 8)
    assert code[3, 2].item() == pytest.approx(math.sin(3 / 1000 ** (2 / 8)), abs=1e-6)
    assert code[3, 3].item() == pytest.approx(math.cos(3 / 1000 ** (3 / 8)), abs=1e-6)


@pytest.mark.parametrize(("channels", "groups", "offset"), [(8, 4, 3.0), (16, 16, 3.0), (12, 3, 3.0), (8, 2, 1e3)])
def test_channels_last_group_norm_matches_torch(channels, groups, offset):
    """Both layouts agree with a float64 reference; offset 1e3 (|mean| >> std) takes the
    centred-variance fallback, where float32 itself limits the accuracy to ~1e-4."""
    torch.manual_seed(0)
    norm = GroupNorm32(groups, channels)
    perturb_(norm, 0.5)
    x = torch.randn(3, channels, 5, 7) * 4 + offset
    grad = torch.randn_like(x)
    x64, w64, b64 = (v.detach().double().requires_grad_() for v in (x, norm.weight, norm.bias))
    ref = F.group_norm(x64, groups, w64, b64)
    ref.backward(grad.double())
    atol = 1e-5 if offset < 100 else 2e-4
    for layout in (torch.contiguous_format, torch.channels_last):
        xi = x.detach().contiguous(memory_format=layout).requires_grad_()
        norm.zero_grad()
        out = norm(xi)
        out.backward(grad)
        assert out.is_contiguous(memory_format=layout)
        assert torch.allclose(out.double(), ref, atol=atol, rtol=1e-4)
        assert torch.allclose(xi.grad.double(), x64.grad, atol=1e-5, rtol=1e-4)
        assert torch.allclose(norm.weight.grad.double(), w64.grad, atol=1e-3, rtol=1e-4)
        assert torch.allclose(norm.bias.grad.double(), b64.grad, atol=1e-4, rtol=1e-4)


def test_channels_last_group_norm_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    w = torch.randn(6, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_())
    assert torch.autograd.gradcheck(lambda *a: GroupNormNHWC.apply(*a, 3, 1e-5), args)


def test_group_norm_keeps_low_precision_dtype():
    norm = GroupNorm32(4, 8)
    x = torch.randn(2, 8, 4, 4).to(torch.bfloat16)
    out = norm(x.contiguous(memory_format=torch.channels_last))
    ref = F.group_norm(x.float(), 4, norm.weight, norm.bias)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), ref, atol=0.05)


@pytest.mark.parametrize("p", [0.5, 0.1])
def test_dropout_noise_statistics_and_layout(p):
    torch.manual_seed(0)
    x = torch.ones(16, 8, 32, 32).contiguous(memory_format=torch.channels_last)
    noise = dropout_noise(x, p)
    assert noise.stride() == x.stride()
    assert (noise == 0).float().mean().item() == pytest.approx(p, abs=0.01)
    assert noise.mean().item() == pytest.approx(1.0, abs=0.02)
    layer = Dropout(p)
    assert torch.equal(layer.eval()(x), x)
    out = layer.train()(x.requires_grad_())
    out.sum().backward()
    assert torch.equal(x.grad, out.detach())  # gradient is the same scaled mask


def test_token_projection_is_the_reference_linear_on_2_theta_minus_1():
    """The adapter evaluates Linear(K -> d)(2 theta - 1) as theta (2W)^T + (b - W 1), never building
    the K-wide temporary; both agree to float64 rounding and to 1e-5 in float32."""
    torch.manual_seed(0)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        adapter = TextInputAdapter(300, 16, 32, bias=True).to(dtype)
        theta = torch.softmax(torch.randn(2, 16, 300, dtype=dtype), -1)
        t = torch.rand(2, dtype=dtype)
        proj = adapter.token_proj
        expected = (
            proj(2 * theta - 1) + adapter.positions[:16].to(dtype) + adapter.time_proj((2 * t - 1)[:, None, None])
        )
        torch.testing.assert_close(adapter(theta, t), expected, rtol=tol, atol=tol)


def test_tied_embeddings_share_the_head_weight_and_save_k_times_d_parameters():
    kwargs = dict(num_classes=500, seq_len=8, n_layer=1, n_head=2, n_embd=16)
    untied, tied = TextTransformer(**kwargs), TextTransformer(**kwargs, tie_embeddings=True)
    assert count_parameters(untied) - count_parameters(tied) == 500 * 16  # the adapter's W (d x K) is gone
    assert not any("token_proj" in name for name, _ in tied.named_parameters())
    theta = torch.softmax(torch.randn(2, 8, 500), -1)
    out = tied(theta, torch.rand(2))
    out.square().mean().backward()
    head = tied.lm_head.weight.grad
    assert out.shape == (2, 8, 500) and head is not None and torch.isfinite(head).all()
    # the input side reaches the head's weight: with a zero output gradient only the tie contributes
    tied.zero_grad()
    x_in = tied.input_adapter(theta, torch.rand(2), tied._tied_weight())
    x_in.sum().backward()
    assert tied.lm_head.weight.grad[:, :16].abs().sum() > 0 and tied.lm_head.weight.grad[:, 16:].abs().sum() == 0
    with pytest.raises(ValueError, match="tie_embeddings"):
        TextTransformer(**kwargs, tie_embeddings=True, output_projection=64)
