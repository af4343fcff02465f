"""Regenerate options_*.npz / options_configs.json: official BFN networks with non-default options.

Usage (needs a checkout of the official code, nnaisense/bayesian-flow-networks at b62568e):

    python tests/data/ref_nets/make_option_fixtures.py /path/to/bayesian-flow-networks

The official classes are imported from that checkout (nothing of it is copied here), built at a
tiny size from each config below (the ``model`` section of an official YAML config), every
parameter perturbed with N(0, 0.05^2) noise (so zero-initialised layers matter), put in eval mode
and run once in float32 on CPU on random inputs. Each options_<name>.npz holds ``net_inputs``,
``t`` (broadcast to the data shape, as the official nets receive it), ``outputs`` and the state
dict under ``state/<key>``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def _component(name, **parameters):
    return {"class_name": name, "parameters": parameters}


CONFIGS = {
    # UNetModel without input projection, scale-shift norm, attention at ds=2 with its own head
    # count on the way up; the adapter adds Fourier time features and fixed position features,
    # then projects them to 12 channels.
    "unet_features": {
        "net": _component(
            "UNetModel",
            image_size=8,
            in_channels=12,
            model_channels=32,
            out_channels=32,
            num_res_blocks=1,
            attention_resolutions=[2],
            dropout=0.1,
            channel_mult=[1, 1],
            conv_resample=True,
            dims=2,
            num_heads=4,
            num_heads_upsample=2,
            use_scale_shift_norm=True,
            project_input=False,
            skip=True,
        ),
        "input_adapter": _component(
            "FourierImageInputAdapter",
            input_channels=1,
            input_shape=[8, 8],
            n_freq_bands=4,
            output_height=12,
            mask_res=10,
            add_pos_feats=True,
            add_mask=True,
        ),
        "output_adapter": _component("OutputAdapter", input_height=44, output_channels=1, output_height=1),
    },
    # UNetModel with one level (so conv_resample=False can be built), learned position features
    # instead of the time feature, no skip, two outputs per pixel.
    "unet_learned": {
        "net": _component(
            "UNetModel",
            image_size=8,
            in_channels=9,
            model_channels=32,
            out_channels=32,
            num_res_blocks=1,
            attention_resolutions=[1],
            dropout=0.0,
            channel_mult=[1],
            conv_resample=False,
            num_heads=2,
            project_input=True,
            skip=False,
        ),
        "input_adapter": _component(
            "FourierImageInputAdapter",
            input_channels=1,
            input_shape=[8, 8],
            output_height=9,
            add_pos_feats=True,
            learn_pos_feats=True,
            pos_embed_size=8,
            add_mask=False,
        ),
        "output_adapter": _component("OutputAdapter", input_height=32, output_channels=1, output_height=2),
    },
    # UNetVDM with attention everywhere (2 heads), no Fourier features, 8 norm groups; the
    # adapter adds the time feature and fixed position features (no projection).
    "vdm_features": {
        "net": _component(
            "UNetVDM",
            embedding_dim=16,
            n_blocks=1,
            n_attention_heads=2,
            dropout_prob=0.1,
            norm_groups=8,
            input_channels=14,
            use_fourier_features=False,
            attention_everywhere=True,
            image_size=8,
        ),
        "input_adapter": _component(
            "FourierImageInputAdapter",
            input_channels=3,
            input_shape=[8, 8],
            n_freq_bands=2,
            output_height=14,
            add_pos_feats=True,
            add_mask=True,
        ),
        "output_adapter": _component("OutputAdapter", input_height=30, output_channels=3, output_height=1),
    },
    # UNetVDM with Fourier features of projected inputs: time code + learned positions -> 5.
    "vdm_projected": {
        "net": _component(
            "UNetVDM",
            embedding_dim=16,
            n_blocks=2,
            n_attention_heads=1,
            dropout_prob=0.0,
            norm_groups=4,
            input_channels=5,
            use_fourier_features=True,
            attention_everywhere=False,
            image_size=8,
        ),
        "input_adapter": _component(
            "FourierImageInputAdapter",
            input_channels=3,
            input_shape=[8, 8],
            n_freq_bands=2,
            output_height=5,
            mask_res=5,
            add_pos_feats=True,
            learn_pos_feats=True,
            pos_embed_size=4,
            add_mask=True,
        ),
        "output_adapter": _component("OutputAdapter", input_height=21, output_channels=3, output_height=2),
    },
    # GPT without biases (the adapter keeps its own), learned positions, no skip, and an output
    # adapter mapping 7 lm_head outputs to the 5 class logits.
    "gpt_options": {
        "net": _component(
            "GPT", vocab_size=7, n_layer=2, n_head=2, n_embd=32, dropout=0.1, bias=False, skip=False, is_causal=False
        ),
        "input_adapter": _component(
            "TextInputAdapter", vocab_size=5, seq_len=16, output_size=32, learn_pos_embedding=True
        ),
        "output_adapter": _component("OutputAdapter", input_height=7, output_channels=1, output_height=5),
    },
    # Causal GPT (skip must then be off), fixed positions.
    "gpt_causal": {
        "net": _component(
            "GPT", vocab_size=5, n_layer=1, n_head=4, n_embd=32, dropout=0.0, bias=True, skip=False, is_causal=True
        ),
        "input_adapter": _component("TextInputAdapter", vocab_size=5, seq_len=16, output_size=32),
        "output_adapter": None,
    },
}


def build(official, model: dict):
    from networks import adapters  # noqa: F401 (the official package, from the checkout)

    def make(module, node, **extra):
        return None if node is None else getattr(module, node["class_name"])(**node["parameters"], **extra)

    data_adapters = {
        "input_adapter": make(official.adapters, model["input_adapter"]),
        "output_adapter": make(official.adapters, model["output_adapter"]),
    }
    return make(official, model["net"], data_adapters=data_adapters)


def inputs(model: dict, batch: int = 3):
    t = torch.tensor([0.1, 0.5, 0.93])[:batch]
    adapter = model["input_adapter"]["parameters"]
    if model["input_adapter"]["class_name"] == "TextInputAdapter":
        length, k = adapter["seq_len"], adapter["vocab_size"]
        theta = torch.softmax(2 * torch.randn(batch, length, k), dim=-1)
        return theta, t[:, None].expand(batch, length).contiguous()
    h, w = adapter["input_shape"]
    x = torch.rand(batch, h, w, adapter["input_channels"]) * 2 - 1
    return x, t.view(batch, 1, 1, 1).expand_as(x).contiguous()


def main(checkout: str) -> None:
    sys.path.insert(0, checkout)
    import networks as official

    configs = {}
    for index, (name, model) in enumerate(CONFIGS.items()):
        torch.manual_seed(index)
        net = build(official, model)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
        net.eval()
        x, t = inputs(model)
        with torch.no_grad():
            out = net(x, t)
        arrays = {"net_inputs": x.numpy(), "t": t.numpy(), "outputs": out.numpy()}
        arrays.update({f"state/{k}": v.numpy() for k, v in net.state_dict().items()})
        np.savez_compressed(HERE / f"options_{name}.npz", **arrays)
        configs[name] = {"model": model}
        print(name, tuple(out.shape), sum(p.numel() for p in net.parameters()), "parameters")
    (HERE / "options_configs.json").write_text(json.dumps(configs, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
