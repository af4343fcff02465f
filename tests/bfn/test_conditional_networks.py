"""Class-conditional networks (``num_labels``): the unconditional network is unchanged, the label
reaches the output, the "no condition" row is what label None means, bad labels raise."""

from __future__ import annotations

import pytest
import torch

from bfn.networks import build_network, count_parameters
from tests.bfn.test_networks import DATA, SIZES, TINY, build, make_batch, perturb_

NUM_LABELS = 10
# width of each architecture's label table: the U-Nets' time embedding, the transformer's tokens
TABLE_WIDTH = {"mnist_unet_tiny": 4 * 16, "cifar_unet_vdm_tiny": 4 * 16, "text8_transformer_tiny": 32}


@pytest.mark.parametrize("name", TINY)
def test_num_labels_none_is_todays_network_parameter_for_parameter(name):
    """num_labels=None and the unchanged constructor arguments build the same network from a seed."""
    arch, kwargs = SIZES[name]
    torch.manual_seed(0)
    today = build_network(arch, **DATA[arch], **kwargs)
    torch.manual_seed(0)
    explicit = build(name, num_labels=None)
    assert count_parameters(today) == count_parameters(explicit)
    assert today.state_dict().keys() == explicit.state_dict().keys()
    assert all(torch.equal(v, explicit.state_dict()[k]) for k, v in today.state_dict().items())


@pytest.mark.parametrize("name", TINY)
def test_conditional_network_adds_only_the_label_table(name):
    """The table is built last: every other parameter is the unconditional network's, same seed."""
    torch.manual_seed(0)
    plain = build(name)
    torch.manual_seed(0)
    conditional = build(name, num_labels=NUM_LABELS)
    extra = count_parameters(conditional) - count_parameters(plain)
    assert extra == (NUM_LABELS + 1) * TABLE_WIDTH[name]
    state = conditional.state_dict()
    assert set(state) - set(plain.state_dict()) == {"label_embedding.table.weight"}
    assert all(torch.equal(v, state[k]) for k, v in plain.state_dict().items())


@pytest.mark.parametrize("name", TINY)
def test_the_label_reaches_the_output_and_none_is_the_null_row(name):
    torch.manual_seed(0)
    net = perturb_(build(name, num_labels=NUM_LABELS)).eval()
    x, t, shape = make_batch(name, batch=3)
    with torch.no_grad():
        a = net(x, t, torch.tensor([0, 4, 9]))
        b = net(x, t, torch.tensor([1, 4, 2]))
        assert a.shape == shape
        assert not torch.allclose(a[0], b[0], atol=1e-6) and not torch.allclose(a[2], b[2], atol=1e-6)
        torch.testing.assert_close(a[1], b[1])  # the same label in another batch row
        assert torch.equal(net(x, t), net(x, t, torch.full((3,), NUM_LABELS)))


@pytest.mark.parametrize("name", TINY)
def test_gradients_reach_the_label_table(name):
    torch.manual_seed(0)
    net = perturb_(build(name, num_labels=NUM_LABELS))
    x, t, _ = make_batch(name)
    net(x, t, torch.tensor([3, 7])).square().sum().backward()
    grad = net.label_embedding.table.weight.grad
    assert grad[[3, 7]].abs().sum(-1).min() > 0 and grad[[0, NUM_LABELS]].abs().sum() == 0


@pytest.mark.parametrize("name", TINY)
def test_bad_labels_raise_value_error_naming_the_label(name):
    x, t, _ = make_batch(name)
    with pytest.raises(ValueError, match="num_labels"):
        build(name)(x, t, torch.tensor([0, 1]))  # an unconditional network takes no label
    net = build(name, num_labels=NUM_LABELS)
    for bad in (torch.tensor([0, NUM_LABELS + 1]), torch.tensor([-1, 0]), torch.tensor([0.0, 1.0]), torch.tensor([1])):
        with pytest.raises(ValueError, match="label"):
            net(x, t, bad)
    with torch.device("meta"), pytest.raises(ValueError, match="num_labels"):
        build(name, num_labels=0)


def test_transformer_label_table_counts_as_input_embedding():
    with torch.device("meta"):
        plain = build("text8_transformer_tiny")
        conditional = build("text8_transformer_tiny", num_labels=NUM_LABELS)
    non_embedding = count_parameters(conditional, non_embedding=True)
    assert non_embedding == count_parameters(plain, non_embedding=True)
