"""Networks of the BFN reference (Graves et al. 2023) and a registry of their classes by architecture.

Every network is an ``nn.Module`` called as ``net(net_inputs, t)`` with ``t`` of shape (B,):

* images (``UNet``, ``UNetVDM``): net_inputs (B, H, W, C) -> (B, H, W, C, out_height);
* text (``TextTransformer``): net_inputs = probabilities theta (B, L, K) -> logits (B, L, K).

``NETWORKS`` maps an architecture name to its class, the kind of data it takes and its
data-dependent constructor arguments (``in_channels``, ``out_height``, ``image_size`` for the
U-Nets; ``num_classes``, ``seq_len`` for the transformer). The sizes of named configurations (the
paper's networks, small CPU ones) are data, kept by the caller (the pipeline's ``conf/net/*.yaml``);
each class's defaults are the paper's network. ``build_network(arch, **kwargs)`` builds one.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from torch import nn

from .transformer import TextTransformer
from .unet import UNet
from .unet_vdm import UNetVDM

__all__ = [
    "DATA_KEYS",
    "NETWORKS",
    "Network",
    "TextTransformer",
    "UNet",
    "UNetVDM",
    "build_network",
    "constructor_args",
    "count_parameters",
]


@dataclass(frozen=True)
class Network:
    """One architecture: its class, the data it takes ("image" or "text") and the constructor
    arguments that the data decide rather than the architecture."""

    cls: type[nn.Module]
    kind: str
    data_keys: tuple[str, ...]


_IMAGE_KEYS = ("in_channels", "out_height", "image_size")
NETWORKS: dict[str, Network] = {
    "unet": Network(UNet, "image", _IMAGE_KEYS),  # improved-diffusion U-Net (paper MNIST)
    "unet_vdm": Network(UNetVDM, "image", _IMAGE_KEYS),  # VDM U-Net (paper CIFAR-10)
    "text_transformer": Network(TextTransformer, "text", ("num_classes", "seq_len")),  # paper text8
}

# Data-dependent arguments a pipeline may pass to any network; ignored where they do not apply.
DATA_KEYS = frozenset(key for network in NETWORKS.values() for key in network.data_keys)


def constructor_args(arch: str) -> tuple[str, ...]:
    """The keyword arguments of architecture ``arch``'s constructor, in signature order."""
    if arch not in NETWORKS:
        raise ValueError(f"arch must be one of {sorted(NETWORKS)}, got {arch!r}")
    parameters = inspect.signature(NETWORKS[arch].cls.__init__).parameters
    return tuple(name for name in parameters if name != "self")


def build_network(arch: str, **kwargs: Any) -> nn.Module:
    """Build architecture ``arch`` with constructor arguments ``kwargs`` (the rest: class defaults).

    Keys of ``DATA_KEYS`` that this architecture does not take are ignored, so a pipeline can pass
    its whole data description to any network; any other unknown key raises ValueError (as do
    invalid values, from the constructor).
    """
    allowed = constructor_args(arch)
    network = NETWORKS[arch]
    chosen = {}
    for key, value in kwargs.items():
        if key in DATA_KEYS and key not in network.data_keys:
            continue
        if key not in allowed:
            raise ValueError(f"{key!r} is not an argument of {network.cls.__name__} ({arch})")
        chosen[key] = value
    return network.cls(**chosen)


def count_parameters(net: nn.Module, non_embedding: bool = False) -> int:
    """Number of parameters of ``net``.

    ``non_embedding=True`` leaves out the input-embedding parameters of the text transformer
    (token and time projections; its position code is a fixed buffer), as in scaling-law
    studies. For the U-Nets it changes nothing.
    """
    excluded: set[int] = set()
    if non_embedding and hasattr(net, "embedding_parameters"):
        excluded = {id(p) for p in net.embedding_parameters()}
    return sum(p.numel() for p in net.parameters() if id(p) not in excluded)
