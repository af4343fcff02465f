"""Ray Tune search spaces for BFN, keyed by dotted config paths (``optim.lr``,
``net.kwargs.model_channels``), one module per concern: schedule, optim, architecture, conditioning.

``SPACES[name]()`` returns ``{dotted_key: tune domain}``; ``get_space("a+b")`` merges spaces.
``MATCHING[name]`` lists the experiment presets a space is meant for (the tests check that every
key exists in those presets' composed configs). Spaces are chosen by name on the command line, as
Hydra groups are (``bfn tune space=schedule_mnist+optim``). Reading domains and applying a sampled
point live in ``common``; checking a space against a config is ``pipeline.sweeps.spaces``'s job
(the config's own validation decides what is legal). This package imports only ``ray.tune``.
"""

from __future__ import annotations

from collections.abc import Callable

from . import architecture, conditioning, optim, schedule
from .common import apply_to_dict, corner_samples, to_overrides

SPACES: dict[str, Callable[[], dict]] = {
    "schedule_mnist": schedule.mnist,
    "schedule_text8": schedule.text8,
    "schedule_continuous": schedule.continuous,
    "schedule_vocab": schedule.vocabulary,
    "optim": optim.optim,
    "optim_short": optim.optim_short,
    "lr": optim.lr,
    "arch_mnist": architecture.mnist_unet,
    "arch_cifar": architecture.cifar_unet_vdm,
    "arch_text8": architecture.text8_transformer,
    "conditioning": conditioning.conditioning,
}

_MNIST = ("smoke", "mnist_local", "mnist_binary")
_CIFAR = ("cifar10_continuous", "cifar10_discretized_16", "cifar10_discretized_256")
_TEXT8 = ("text8_local", "text8")
_BPE = ("text_bpe_local",)
_COND = ("mnist_cond_local", "cifar10_cond_local")
_ALL = (*_MNIST, *_CIFAR, *_TEXT8, *_BPE)
MATCHING: dict[str, tuple[str, ...]] = {
    "schedule_mnist": _MNIST,
    "schedule_text8": _TEXT8,
    "schedule_continuous": _CIFAR,
    "schedule_vocab": _BPE,
    "optim": _ALL,
    "optim_short": _ALL,
    "lr": _ALL,
    "arch_mnist": _MNIST,
    "arch_cifar": _CIFAR,
    "arch_text8": (*_TEXT8, *_BPE),
    "conditioning": _COND,
}


def get_space(name: str) -> dict:
    """The space ``name``, or several joined with '+' (``optim_short+schedule_mnist``)."""
    space: dict = {}
    for part in name.split("+"):
        if part not in SPACES:
            raise ValueError(
                f"space: unknown space {part!r}; one of {', '.join(sorted(SPACES))} (join several with '+')"
            )
        for key, domain in SPACES[part]().items():
            if key in space:
                raise ValueError(f"space: {key} appears in more than one of {name}")
            space[key] = domain
    return space


__all__ = ["MATCHING", "SPACES", "apply_to_dict", "corner_samples", "get_space", "to_overrides"]
