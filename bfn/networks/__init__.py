"""Networks of the BFN reference (Graves et al. 2023) and a registry of named configurations.

Every network is an ``nn.Module`` called as ``net(net_inputs, t)`` with ``t`` of shape (B,):

* images (``UNet``, ``UNetVDM``): net_inputs (B, H, W, C) -> (B, H, W, C, out_height);
* text (``TextTransformer``): net_inputs = probabilities theta (B, L, K) -> logits (B, L, K).

``build_network(name, **overrides)`` builds one of ``PRESETS``. Each preset is a dict::

    {"cls": <class>, "kind": "image" | "text", "kwargs": {...constructor defaults...},
     "data_keys": (...), "description": str}

``data_keys`` lists the data-dependent arguments the network takes (``in_channels``,
``out_height``, ``image_size`` for the U-Nets; ``num_classes``, ``seq_len`` for the transformer).
Any other key of ``DATA_KEYS`` passed to ``build_network`` is ignored, so a pipeline can pass all of
its data description to any network; every other override must be a constructor argument.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .transformer import TextTransformer
from .unet import UNet
from .unet_vdm import UNetVDM

__all__ = [
    "DATA_KEYS",
    "PRESETS",
    "TextTransformer",
    "UNet",
    "UNetVDM",
    "build_network",
    "count_parameters",
]

# Data-dependent arguments a pipeline may pass to any network; ignored where they do not apply.
DATA_KEYS = frozenset({"in_channels", "out_height", "image_size", "num_classes", "seq_len"})

_IMAGE_KEYS = ("in_channels", "out_height", "image_size")
_TEXT_KEYS = ("num_classes", "seq_len")


def _preset(cls: type[nn.Module], description: str, **kwargs: Any) -> dict[str, Any]:
    kind = "text" if cls is TextTransformer else "image"
    keys = _TEXT_KEYS if kind == "text" else _IMAGE_KEYS
    return dict(cls=cls, kind=kind, kwargs=kwargs, data_keys=keys, description=description)


_MNIST = dict(in_channels=1, out_height=1, image_size=28)
_CIFAR = dict(in_channels=3, out_height=2, image_size=32)
_TEXT8 = dict(num_classes=27, seq_len=256)

PRESETS: dict[str, dict[str, Any]] = {
    "mnist_unet": _preset(
        UNet, "paper MNIST U-Net, 24.81M params", **_MNIST,
        model_channels=128, channel_mult=(1, 2, 2), num_res_blocks=2, dropout=0.5, num_heads=4,
    ),
    "mnist_unet_small": _preset(
        UNet, "32-channel MNIST U-Net, 1 ResBlock per level, ~1.08M params", **_MNIST,
        model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, dropout=0.5, num_heads=4,
    ),
    "mnist_unet_tiny": _preset(
        UNet, "16-channel MNIST U-Net for tests", **_MNIST,
        model_channels=16, channel_mult=(1, 2), num_res_blocks=1, dropout=0.5, num_heads=2,
        norm_groups=8,
    ),
    "cifar_unet_vdm": _preset(
        UNetVDM, "paper CIFAR-10 VDM U-Net, 30.72M params", **_CIFAR,
        embedding_dim=128, n_blocks=32, n_attention_heads=1, dropout=0.1, norm_groups=32,
    ),
    "cifar_unet_vdm_small": _preset(
        UNetVDM, "32-channel VDM U-Net, 2 blocks down / 3 up", **_CIFAR,
        embedding_dim=32, n_blocks=2, n_attention_heads=1, dropout=0.1, norm_groups=32,
    ),
    "cifar_unet_vdm_tiny": _preset(
        UNetVDM, "16-channel VDM U-Net for tests", **_CIFAR,
        embedding_dim=16, n_blocks=1, n_attention_heads=1, dropout=0.1, norm_groups=8,
    ),
    "text8_transformer": _preset(
        TextTransformer, "paper text8 transformer, 24x768, 170.18M params", **_TEXT8,
        n_layer=24, n_head=12, n_embd=768, dropout=0.0,
    ),
    "text8_transformer_small": _preset(
        TextTransformer, "4 layers, 4 heads, 128 wide", **_TEXT8,
        n_layer=4, n_head=4, n_embd=128, dropout=0.0,
    ),
    "text8_transformer_tiny": _preset(
        TextTransformer, "2 layers, 2 heads, 32 wide, for tests", **_TEXT8,
        n_layer=2, n_head=2, n_embd=32, dropout=0.0,
    ),
}  # fmt: skip


def build_network(name: str, **overrides: Any) -> nn.Module:
    """Build the preset ``name`` with ``overrides`` applied to its constructor arguments.

    Keys of ``DATA_KEYS`` that the network does not take are ignored; any other unknown key
    raises ValueError (as do invalid values, from the constructor).
    """
    if name not in PRESETS:
        raise ValueError(f"name must be one of {sorted(PRESETS)}, got {name!r}")
    preset = PRESETS[name]
    kwargs = dict(preset["kwargs"])
    for key, value in overrides.items():
        if key in DATA_KEYS and key not in preset["data_keys"]:
            continue
        if key not in kwargs and key not in _constructor_args(preset["cls"]):
            raise ValueError(f"{key!r} is not an argument of {preset['cls'].__name__} ({name})")
        kwargs[key] = value
    return preset["cls"](**kwargs)


def _constructor_args(cls: type[nn.Module]) -> set[str]:
    code = cls.__init__.__code__
    return set(code.co_varnames[1 : code.co_argcount + code.co_kwonlyargcount])


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
