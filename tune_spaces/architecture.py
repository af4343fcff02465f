"""Architecture spaces: the preset (among scaled-down presets of one network family), width,
depth and dropout, through ``net.name`` and ``net.kwargs.<constructor argument>``.

``FAMILIES`` names, per family, its presets, which constructor arguments are the width and the
depth, and the arguments pinned so that every width of the space builds (GroupNorm groups and
attention heads must divide the width). ``pipeline.sweeps.scaling`` uses the same table to scale a
preset in width and depth.
"""

from __future__ import annotations

from ray import tune

FAMILIES: dict[str, dict] = {
    "mnist_unet": {
        "presets": ["mnist_unet_tiny", "mnist_unet_small"],
        "width": "model_channels",
        "widths": [16, 32, 48],
        "depth": "num_res_blocks",
        "depths": [1, 2],
        "pinned": {"norm_groups": 8, "num_heads": 2},
        "dropout": (0.0, 0.5),
    },
    "cifar_unet_vdm": {
        "presets": ["cifar_unet_vdm_tiny", "cifar_unet_vdm_small"],
        "width": "embedding_dim",
        "widths": [16, 32, 64],
        "depth": "n_blocks",
        "depths": [1, 2, 4],
        "pinned": {"norm_groups": 8, "n_attention_heads": 1},
        "dropout": (0.0, 0.3),
    },
    "text8_transformer": {
        "presets": ["text8_transformer_tiny", "text8_transformer_small"],
        "width": "n_embd",
        "widths": [32, 64, 128],
        "depth": "n_layer",
        "depths": [2, 4],
        "pinned": {"n_head": 2},
        "dropout": (0.0, 0.2),
    },
}


def family_of(net_name: str) -> str | None:
    """The family whose presets include ``net_name`` (or whose name prefixes it)."""
    for family, info in FAMILIES.items():
        if net_name in info["presets"] or net_name.startswith(family):
            return family
    return None


def space_for(family: str) -> dict:
    info = FAMILIES[family]
    space = {
        "net.name": tune.choice(list(info["presets"])),
        f"net.kwargs.{info['width']}": tune.choice(list(info["widths"])),
        f"net.kwargs.{info['depth']}": tune.choice(list(info["depths"])),
        "net.kwargs.dropout": tune.uniform(*info["dropout"]),
    }
    space.update({f"net.kwargs.{k}": v for k, v in info["pinned"].items()})
    return space


def mnist_unet() -> dict:
    return space_for("mnist_unet")


def cifar_unet_vdm() -> dict:
    return space_for("cifar_unet_vdm")


def text8_transformer() -> dict:
    return space_for("text8_transformer")
