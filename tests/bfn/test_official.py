"""Converting official BFN networks (bfn.networks.official) against outputs of the official code.

Fixtures (tests/data/ref_nets, see its README): three small networks of the official classes with
their weights, inputs and outputs; six tiny ones with non-default options; the key/shape lists of
the paper-size networks; the official YAML configs.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from bfn import (
    BFN,
    BernoulliHead,
    CategoricalHead,
    ContinuousFlow,
    DiscreteFlow,
    DiscretizedNormalHead,
)
from bfn.flows import ContinuousParams, DiscreteParams
from bfn.networks import NETWORKS, build_network, count_parameters, official
from bfn.networks.official import OfficialCheckpointError, OfficialConfigError
from tests.bfn.official_fixtures import (
    OFFICIAL_YAMLS,
    SMALL,
    edited,
    official_yaml,
    option_configs,
    option_fixture,
    paper_keys,
    project_output,
    relative_error,
    small_config,
    small_io,
    small_state,
)

TOLERANCE = 1e-5  # relative: max |project - official| / max |official|
# fp32 kernels sum in a CPU-dependent order: the deeper option nets reach 1.4e-5 (vdm_projected on an
# AVX512-FP16 Xeon) against outputs dumped on another machine; a wrong conversion is off by orders more
OPTIONS_TOLERANCE = 3e-5


def assert_matches(out: torch.Tensor, ref: torch.Tensor, tolerance: float = TOLERANCE) -> float:
    error = relative_error(out, ref)
    assert error <= tolerance, f"relative error {error:.3g}"
    torch.testing.assert_close(out, ref, rtol=tolerance, atol=tolerance * ref.abs().max().item())
    return error


# ----------------------------------------------------------------------------- exactness


@functools.cache
def converted(name: str):
    """(converted network, its output on the fixture inputs, the official output): once per name."""
    net = official.load_network(small_config(name), small_state(name))
    net_inputs, t, outputs = small_io(name)
    return net, project_output(net, net_inputs, t, outputs), outputs


@pytest.mark.parametrize("name", SMALL)
def test_small_fixture_outputs_are_reproduced(name):
    _, out, outputs = converted(name)
    assert_matches(out, outputs)


def test_unprefixed_network_keys_convert_too():
    config = small_config("unet")
    prefixed = official.convert_state_dict(config, small_state("unet"))
    plain = official.convert_state_dict(config, small_state("unet", prefix=""))
    assert prefixed.keys() == plain.keys()
    assert all(torch.equal(prefixed[k], plain[k]) for k in plain)


def _bfn_for(name: str, net) -> tuple[BFN, object]:
    """The project BFN of the fixture's paper config, and flow params whose net inputs are the
    fixture's official net inputs."""
    net_inputs, _, _ = small_io(name)
    b = net_inputs.shape[0]
    if name == "unet":  # binary: the net sees 2 P(class 0) - 1
        p0 = ((net_inputs + 1) / 2).reshape(b, -1)
        model = BFN(net, DiscreteFlow(2, 9.0), BernoulliHead(), data_shape=(28, 28, 1))
        return model, DiscreteParams(torch.stack([p0, 1 - p0], dim=-1))
    if name == "gpt":  # text: the class probabilities
        model = BFN(net, DiscreteFlow(27, 0.5625), CategoricalHead(27), data_shape=(256,))
        return model, DiscreteParams(net_inputs)
    model = BFN(net, ContinuousFlow(1e-3), DiscretizedNormalHead(256, sigma_1=1e-3), data_shape=(32, 32, 3))
    return model, ContinuousParams(net_inputs.reshape(b, -1), 1.0)


@pytest.mark.parametrize("name", SMALL)
def test_the_bfn_model_feeds_the_converted_network_as_the_official_bfn_does(name):
    """BFN.output_distribution builds the net input from flow params and passes t as (B,): the
    network output it gets equals the official network's on the official net inputs."""
    net = copy.deepcopy(converted(name)[0])
    model, params = _bfn_for(name, net)
    _, t, outputs = small_io(name)
    seen = []
    net.register_forward_hook(lambda module, args, output: seen.append(output))
    with torch.no_grad():
        model.output_distribution(params, t.reshape(t.shape[0], -1)[:, :1])
    assert_matches(seen[0].reshape(outputs.shape), outputs)


@pytest.mark.parametrize("name", sorted(option_configs()))
def test_non_default_official_options_are_reproduced(name):
    config = option_configs()[name]
    state, net_inputs, t, outputs = option_fixture(name)
    net = official.load_network(config, state)
    assert_matches(project_output(net, net_inputs, t, outputs), outputs, OPTIONS_TOLERANCE)


def test_fixture_errors_are_within_tolerance_and_reported(capsys):
    """Prints the worst relative error per fixture (pytest -s shows it)."""
    errors = {name: relative_error(*converted(name)[1:]) for name in SMALL}
    print({k: f"{v:.2e}" for k, v in errors.items()})
    assert max(errors.values()) <= TOLERANCE


# ----------------------------------------------------------------------------- paper sizes


@pytest.mark.parametrize(
    ("yaml_name", "keys"),
    [
        ("mnist_discrete", "unet"),
        ("cifar10_discretized_256bins", "vdm"),
        ("cifar10_discretized_16bins", "vdm"),
        ("text8_discrete", "gpt"),
    ],
)
def test_paper_size_keys_and_shapes_all_map(yaml_name, keys):
    config = official_yaml(yaml_name)
    expected = paper_keys(keys)
    assert official.expected_official_keys(config) == expected
    state = {"net." + k: torch.empty(shape, device="meta") for k, shape in expected.items()}
    with torch.device("meta"):
        net = official.build_network(config)
    converted = official.convert_state_dict(config, state, net)
    target = net.state_dict()
    assert converted.keys() == target.keys()
    assert all(converted[k].shape == target[k].shape for k in target)


@pytest.mark.parametrize("yaml_name", OFFICIAL_YAMLS)
def test_paper_configs_give_the_project_paper_networks(yaml_name):
    """The converted kwargs build networks the size of the project's paper presets."""
    arch, kwargs = official.network_spec(official_yaml(yaml_name))
    with torch.device("meta"):
        converted = build_network(arch, **kwargs)
        paper = build_network(arch, **{k: kwargs[k] for k in NETWORKS[arch].data_keys})  # class defaults: paper
    assert count_parameters(converted) == count_parameters(paper)
    assert converted.state_dict().keys() == paper.state_dict().keys()


def test_continuous_config_has_one_output_per_channel():
    config = official_yaml("cifar10_continuous_256bins")
    shapes = official.expected_official_keys(config)
    assert shapes["output_adapter.output_projection.weight"] == (3, 131)
    assert paper_keys("vdm")["output_adapter.output_projection.weight"] == (6, 131)


# ----------------------------------------------------------------------------- config parsing


def test_the_model_section_alone_is_enough_for_the_network():
    config = official_yaml("mnist_discrete")
    assert official.network_spec(config["model"]) == official.network_spec(config)


# ----------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def unet():
    return small_config("unet"), small_state("unet")


def _raises_naming(key: str, error=OfficialCheckpointError):
    return pytest.raises(error, match=key.replace(".", r"\."))


def test_missing_key_is_named(unet):
    config, state = unet
    state = dict(state)
    del state["net.middle_block.1.qkv.weight"]
    with _raises_naming("middle_block.1.qkv.weight"):
        official.convert_state_dict(config, state)


def test_unknown_key_is_named(unet):
    config, state = unet
    with _raises_naming("label_emb.weight"):
        official.convert_state_dict(config, {**state, "net.label_emb.weight": torch.zeros(10, 128)})


def test_shape_mismatch_is_named(unet):
    config, state = unet
    state = {**state, "net.time_embed.0.weight": torch.zeros(128, 31)}
    with _raises_naming("time_embed.0.weight") as info:
        official.convert_state_dict(config, state)
    assert "(128, 31)" in str(info.value) and "(128, 32)" in str(info.value)


def test_keys_outside_the_network_are_refused(unet):
    config, state = unet
    with _raises_naming("bayesian_flow.x"):
        official.convert_state_dict(config, {**state, "bayesian_flow.x": torch.zeros(1)})


def test_non_tensor_values_are_refused(unet):
    config, state = unet
    with _raises_naming("out.2.bias"):
        official.convert_state_dict(config, {**state, "net.out.2.bias": [0.0] * 32})


def test_a_wrong_fixed_position_code_is_refused():
    config = small_config("gpt")
    state = small_state("gpt")
    state["net.input_adapter.pos_embedding"] = state["net.input_adapter.pos_embedding"] + 0.5
    with _raises_naming("input_adapter.pos_embedding"):
        official.convert_state_dict(config, state)


def test_errors_are_value_errors():
    assert issubclass(OfficialConfigError, OfficialCheckpointError)
    assert issubclass(OfficialCheckpointError, ValueError)


@pytest.mark.parametrize(
    ("name", "section", "change", "named"),
    [
        ("unet", "net", {"use_fp16": True}, "model.net.parameters.use_fp16"),
        ("unet", "net", {"num_classes": 10}, "model.net.parameters.num_classes"),
        ("unet", "net", {"dims": 3}, "model.net.parameters.dims"),
        ("unet", "net", {"channel_mult": [2, 2]}, "model.net.parameters.channel_mult"),
        ("unet", "net", {"conv_resample": False}, "model.net.parameters.conv_resample"),
        ("unet", "net", {"in_channels": 3}, "model.net.parameters.in_channels"),
        ("unet", "output_adapter", {"input_height": 65}, "model.output_adapter.parameters.input_height"),
        ("unet", "input_adapter", {"input_shape": [28, 14]}, "model.input_adapter.parameters.input_shape"),
        ("gpt", "net", {"is_causal": True}, "model.net.parameters.skip"),
        ("gpt", "net", {"vocab_size": 28}, "model.net.parameters.vocab_size"),
        ("gpt", "input_adapter", {"output_size": 64}, "model.input_adapter.parameters.output_size"),
        ("vdm", "net", {"dropout_prob": "x"}, "model.net.parameters.dropout_prob"),
    ],
)
def test_network_config_errors_name_the_key(name, section, change, named):
    config = edited(small_config(name), section, **change)
    with _raises_naming(named, OfficialConfigError):
        official.network_spec(config)


FLOW_CLASSES = {
    "bayesian_flow": ("CtsBayesianFlow", "DiscreteBayesianFlow"),
    "loss": ("CtsBayesianFlowLoss", "DiscreteBayesianFlowLoss"),
    "distribution_factory": ("BernoulliFactory", "CategoricalFactory", "DeltaFactory", "DiscretizedNormalFactory"),
}


@pytest.mark.parametrize(
    ("yaml_name", "section", "change", "named"),
    [
        ("mnist_discrete", "bayesian_flow", {"min_sqrt_beta": 1e-8}, "min_sqrt_beta"),
        ("mnist_discrete", "bayesian_flow", {"discretize": True}, "discretize"),
        ("cifar10_discretized_256bins", "distribution_factory", {"clip": False}, "clip"),
        ("cifar10_discretized_256bins", "distribution_factory", {"min_std_dev": -1}, "min_std_dev"),
        ("cifar10_discretized_256bins", "loss", {"min_loss_variance": 1e-6}, "min_loss_variance"),
        ("cifar10_continuous_16bins", "distribution_factory", {"clip_range": 2.0}, "clip_range"),
        ("mnist_discrete", "bayesian_flow", {"n_clases": 2}, "n_clases"),  # not a parameter there
    ],
)
def test_flow_options_the_project_lacks_are_refused(yaml_name, section, change, named):
    config = edited(official_yaml(yaml_name), section, **change)
    with _raises_naming(f"model.{section}.parameters.{named}", OfficialConfigError):
        official.component(config["model"], section, FLOW_CLASSES[section])


def test_components_fill_in_the_official_defaults():
    model = official_yaml("cifar10_discretized_256bins")["model"]
    name, params = official.component(model, "distribution_factory", FLOW_CLASSES["distribution_factory"])
    assert name == "DiscretizedNormalFactory"
    assert params == {
        "num_bins": 256,
        "clip": True,
        "min_std_dev": 1e-3,
        "max_std_dev": 10.0,
        "min_prob": 1e-5,
        "log_dev": True,
    }
    assert official.component(model, "absent", ("X",), optional=True) == (None, {})
    with _raises_naming("model.absent", OfficialConfigError):
        official.component(model, "absent", ("X",))


@pytest.mark.parametrize(
    ("parse", "value", "message"),
    [
        (official.number, "1e-6", None),
        (official.number, "x", "expected a number"),
        (official.number, True, "expected a number"),
        (official.integer, 2.5, "expected an integer"),
        (official.integer, "1_000", None),
        (official.boolean, "yes", "expected true or false"),
    ],
)
def test_official_yaml_values_are_read_as_the_official_code_reads_them(parse, value, message):
    """PyYAML reads '1e-6' (no dot) as a string: numeric strings are numbers; anything else names the key."""
    if message is None:
        assert parse("optimizer.lr", value) == float(str(value).replace("_", ""))
    else:
        with _raises_naming("optimizer.lr", OfficialConfigError) as info:
            parse("optimizer.lr", value)
        assert message in str(info.value)
    with _raises_naming("training.seed", OfficialConfigError):
        official.integer("training.seed", -1, 0)


def test_unsupported_classes_are_refused():
    config = official_yaml("cifar10_discretized_256bins")
    config["model"]["distribution_factory"]["class_name"] = "DiscretizedGMMFactory"
    with _raises_naming("model.distribution_factory.class_name", OfficialConfigError):
        official.component(config["model"], "distribution_factory", FLOW_CLASSES["distribution_factory"])
    config = official_yaml("mnist_discrete")
    config["model"]["net"]["class_name"] = "ResNet"
    with _raises_naming("model.net.class_name", OfficialConfigError):
        official.network_spec(config)
