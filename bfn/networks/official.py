"""Import networks trained with the official BFN code (nnaisense/bayesian-flow-networks, b62568e).

(Longer than 500 lines because it is one mapping, three official network classes and their
adapters key by key, that reads best in one place; splitting it would scatter each class's rules.)

The official code builds a model from a YAML config (``configs/*.yaml``): ``model.net`` names the
network class (``GPT``, ``UNetModel`` = improved-diffusion U-Net, ``UNetVDM``) and its
``parameters``; ``model.input_adapter`` / ``model.output_adapter`` the adapters around it
(``TextInputAdapter``, ``FourierImageInputAdapter``, ``OutputAdapter``);
``model.bayesian_flow``, ``model.loss`` and ``model.distribution_factory`` the flow and output
distribution; ``data`` the dataset; ``optimizer`` and ``training`` the optimiser. A released
checkpoint (e.g. ``ema.pt``) is the state dict of the whole ``BFN`` module, so the network's keys
carry a ``net.`` prefix.

Here:

* ``network_spec(config)`` -> (architecture, constructor kwargs) of the equivalent project network
  (``bfn.networks``), with every hyper-parameter of the official classes carried over; options
  the project network did not have before (input feature variants, scale-shift norm, learned
  positions, ...) are constructor options of the project networks, off by default;
* ``build_network(config)``: that network, freshly initialised;
* ``convert_state_dict(config, state_dict)``: the official weights renamed (and 1x1 attention
  convs reshaped to Linear weights) into the project network's state dict;
* ``load_network(config, state_dict)``: both;
* ``component(model, section, classes)``: the class and parameters of any ``model`` section (flow,
  loss, distribution factory too), official defaults filled in and options the project fixes checked,
  and ``number`` / ``integer`` / ``boolean``: the official YAML's values, read as the official code does.
  Mapping the rest of the config onto the project's own config is the pipeline's part
  (``pipeline.training.official``); this module knows only the official format and the networks.

The project network is called as ``net(net_inputs, t)`` with t of shape (B,) (one time per
example, as ``bfn.model.BFN`` does); the official one as ``net(net_inputs, t)`` with t broadcast
to the data's shape. The net inputs are the same tensors: 2 P(class 0) - 1 for binary data, the
class probabilities (B, L, K) for text, the input mean for continuous data. The official image
nets return (B, H*W, C, h), the project ones (B, H, W, C, h): the same numbers.

Every problem raises ``OfficialCheckpointError`` (a ValueError) naming the key: an official key
the project network has no place for, one it needs but the checkpoint lacks, a shape mismatch,
or a fixed buffer whose values differ from the code the config implies. Config problems raise
its subclass ``OfficialConfigError`` naming the config key: unknown parameters, combinations the
official code itself cannot run, and flow/output options the project does not implement.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from . import build_network as build_arch
from .layers import fourier_position_features
from .transformer import sinusoidal_positions

__all__ = [
    "NET_CLASSES",
    "OfficialCheckpointError",
    "OfficialConfigError",
    "boolean",
    "build_network",
    "component",
    "convert_state_dict",
    "integer",
    "load_network",
    "model_section",
    "network_spec",
    "number",
    "strip_prefix",
]

NET_CLASSES = ("GPT", "UNetModel", "UNetVDM")
ARCH_OF_CLASS = {"GPT": "text_transformer", "UNetModel": "unet", "UNetVDM": "unet_vdm"}


class OfficialCheckpointError(ValueError):
    """An official checkpoint does not fit the network its config describes (the key is named)."""


class OfficialConfigError(OfficialCheckpointError):
    """An official config cannot be converted (the config key is named)."""


_REQUIRED = object()

# Constructor defaults of the official classes (their signatures at b62568e).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "GPT": dict(
        vocab_size=_REQUIRED, n_layer=12, n_head=12, n_embd=768, dropout=0.0, bias=True, skip=False, is_causal=False
    ),
    "UNetModel": dict(
        image_size=32,
        in_channels=3,
        model_channels=128,
        out_channels=128,
        num_res_blocks=3,
        attention_resolutions=(8, 16),
        dropout=0.0,
        channel_mult=(1, 2, 2, 2),
        conv_resample=True,
        dims=2,
        skip=True,
        num_classes=None,
        use_checkpoint=False,
        num_heads=4,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        project_input=False,
    ),
    "UNetVDM": dict(
        embedding_dim=128,
        n_blocks=32,
        n_attention_heads=1,
        dropout_prob=0.1,
        norm_groups=32,
        input_channels=3,
        use_fourier_features=True,
        attention_everywhere=False,
        image_size=32,
    ),
    "TextInputAdapter": dict(vocab_size=_REQUIRED, seq_len=_REQUIRED, output_size=256, learn_pos_embedding=False),
    "FourierImageInputAdapter": dict(
        input_channels=3,
        input_shape=(224, 224),
        n_freq_bands=64,
        output_height=256,
        value_res=-1,
        mask_res=-1,
        add_pos_feats=True,
        add_mask=True,
        learn_pos_feats=False,
        pos_embed_size=32,
        init_scale=0.02,
    ),
    "OutputAdapter": dict(input_height=_REQUIRED, output_channels=_REQUIRED, output_height=_REQUIRED),
    "CtsBayesianFlow": dict(min_variance=1e-6),
    "DiscreteBayesianFlow": dict(
        n_classes=_REQUIRED, min_sqrt_beta=1e-10, discretize=False, epsilon=1e-6, max_sqrt_beta=1.0
    ),
    "CtsBayesianFlowLoss": dict(min_loss_variance=-1.0, noise_pred=True),
    "DiscreteBayesianFlowLoss": dict(),
    "BernoulliFactory": dict(),
    "CategoricalFactory": dict(),
    "DeltaFactory": dict(clip_range=1.0),
    "DiscretizedNormalFactory": dict(
        num_bins=_REQUIRED, clip=True, min_std_dev=1e-3, max_std_dev=10.0, min_prob=1e-5, log_dev=True
    ),
}

# Official options the project fixes; any other value is refused.
_FIXED = {
    "DiscreteBayesianFlow": {"min_sqrt_beta": 1e-10, "discretize": False, "epsilon": 1e-6},
    "CtsBayesianFlowLoss": {"min_loss_variance": None},  # any value <= 0 (off)
    "DeltaFactory": {"clip_range": 1.0},
    "DiscretizedNormalFactory": {"clip": True, "min_std_dev": 1e-3, "max_std_dev": 10.0, "min_prob": 1e-5},
}


# ----------------------------------------------------------------------------------- config parsing


def model_section(config: Mapping) -> dict:
    """The ``model`` section of an official config; the section itself is accepted too."""
    if not isinstance(config, Mapping):
        raise OfficialConfigError(f"config: expected a mapping, got {type(config).__name__}")
    if "model" in config:
        model = config["model"]
        if not isinstance(model, Mapping):
            raise OfficialConfigError(f"model: expected a mapping, got {type(model).__name__}")
        return dict(model)
    if "net" in config:
        return dict(config)
    raise OfficialConfigError("config: no 'model' section (and no 'net' section)")


def component(model: Mapping, section: str, allowed: tuple[str, ...], *, optional: bool = False):
    """(class_name, parameters with the official defaults filled in) of model.<section>; a class not in
    ``allowed``, an unknown or missing parameter, or an option the project fixes at another value is an
    OfficialConfigError naming the key. ``optional``: a missing section gives (None, {})."""
    key = f"model.{section}"
    node = model.get(section)
    if node is None:
        if optional:
            return None, {}
        raise OfficialConfigError(f"{key}: missing")
    if not isinstance(node, Mapping) or "class_name" not in node:
        raise OfficialConfigError(f"{key}: expected a mapping with class_name and parameters")
    name = node["class_name"]
    if name not in allowed:
        raise OfficialConfigError(f"{key}.class_name: {name!r} is not supported here (supported: {', '.join(allowed)})")
    given = node.get("parameters") or {}
    if not isinstance(given, Mapping):
        raise OfficialConfigError(f"{key}.parameters: expected a mapping")
    defaults = _DEFAULTS[name]
    for param in given:
        if param not in defaults:
            raise OfficialConfigError(
                f"{key}.parameters.{param}: not a parameter of the official {name}"
                f" (it takes {', '.join(sorted(defaults)) or 'none'})"
            )
    params = {**defaults, **given}
    for param, value in params.items():
        if value is _REQUIRED:
            raise OfficialConfigError(f"{key}.parameters.{param}: required by {name}, missing")
    _check_fixed(f"{key}.parameters", name, params)
    return name, params


def _check_fixed(prefix: str, name: str, params: dict) -> None:
    for param, fixed in _FIXED.get(name, {}).items():
        value = params[param]
        if fixed is None:  # an on/off threshold: only "off" (<= 0) is implemented
            if number(f"{prefix}.{param}", value) > 0:
                raise OfficialConfigError(f"{prefix}.{param}={value!r}: the project implements only the default (off)")
        elif isinstance(fixed, bool):
            if not isinstance(value, bool) or value != fixed:
                raise OfficialConfigError(f"{prefix}.{param}={value!r}: the project implements only {fixed!r}")
        elif number(f"{prefix}.{param}", value) != fixed:
            raise OfficialConfigError(f"{prefix}.{param}={value!r}: the project implements only the default {fixed!r}")


def number(key: str, value: Any) -> float:
    """A YAML number; PyYAML reads '1e-6' (no dot) as a string, so numeric strings are accepted."""
    if isinstance(value, bool):
        raise OfficialConfigError(f"{key}: expected a number, got {value!r}")
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):
        try:
            return float(value.replace("_", ""))
        except ValueError:
            pass
    raise OfficialConfigError(f"{key}: expected a number, got {value!r}")


def integer(key: str, value: Any, minimum: int | None = None) -> int:
    """A YAML integer (numeric strings too), at least ``minimum``; errors name ``key``."""
    parsed = number(key, value)
    if int(parsed) != parsed:
        raise OfficialConfigError(f"{key}: expected an integer, got {value!r}")
    if minimum is not None and parsed < minimum:
        raise OfficialConfigError(f"{key}: must be >= {minimum}, got {value!r}")
    return int(parsed)


def boolean(key: str, value: Any) -> bool:
    """A YAML true/false (no truthy strings or numbers); errors name ``key``."""
    if not isinstance(value, bool):
        raise OfficialConfigError(f"{key}: expected true or false, got {value!r}")
    return value


def _ints(key: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise OfficialConfigError(f"{key}: expected a list of integers, got {value!r}")
    return tuple(integer(key, v) for v in value)


# ----------------------------------------------------------------------------------- network spec


def network_spec(config: Mapping) -> tuple[str, dict[str, Any]]:
    """(architecture, complete constructor kwargs) of the project network equivalent to the
    official config's ``model.net`` with its adapters. ``build_network(arch, **kwargs)`` of
    ``bfn.networks`` builds it."""
    spec = _spec(model_section(config))
    return spec["arch"], dict(spec["kwargs"])


def _spec(model: Mapping) -> dict[str, Any]:
    """class name, architecture, kwargs, and the official-only keys (fixed buffers, unused params)."""
    net_name, _ = component(model, "net", NET_CLASSES)
    if net_name == "GPT":
        return _gpt_spec(model)
    return _image_spec(model, net_name)


def _gpt_spec(model: Mapping) -> dict[str, Any]:
    _, net = component(model, "net", NET_CLASSES)
    _, adapter = component(model, "input_adapter", ("TextInputAdapter",))
    out_name, out = component(model, "output_adapter", ("OutputAdapter",), optional=True)
    p, a = "model.net.parameters", "model.input_adapter.parameters"
    n_embd = integer(f"{p}.n_embd", net["n_embd"], 1)
    vocab = integer(f"{p}.vocab_size", net["vocab_size"], 1)
    num_classes = integer(f"{a}.vocab_size", adapter["vocab_size"], 2)
    seq_len = integer(f"{a}.seq_len", adapter["seq_len"], 1)
    if integer(f"{a}.output_size", adapter["output_size"], 1) != n_embd:
        raise OfficialConfigError(
            f"{a}.output_size={adapter['output_size']} must equal {p}.n_embd={n_embd}"
            " (the official GPT adds the adapter's output to its residual stream)"
        )
    skip, is_causal = boolean(f"{p}.skip", net["skip"]), boolean(f"{p}.is_causal", net["is_causal"])
    if skip and is_causal:
        raise OfficialConfigError(
            f"{p}.skip=true with is_causal=true: the official GPT then builds a 2*n_embd lm_head"
            " but never concatenates, so it cannot run"
        )
    output_projection = None
    if out_name is None:
        if vocab != num_classes:
            raise OfficialConfigError(
                f"{p}.vocab_size={vocab} must equal {a}.vocab_size={num_classes} when there is no output adapter"
            )
    else:
        o = "model.output_adapter.parameters"
        if integer(f"{o}.input_height", out["input_height"]) != vocab:
            raise OfficialConfigError(f"{o}.input_height must equal {p}.vocab_size={vocab}")
        if (
            integer(f"{o}.output_channels", out["output_channels"]) != 1
            or integer(f"{o}.output_height", out["output_height"]) != num_classes
        ):
            raise OfficialConfigError(
                f"{o}: a text net's output adapter must give 1 channel of {num_classes} logits"
                f" per token (output_channels=1, output_height={num_classes})"
            )
        output_projection = vocab
    dropout = float(number(f"{p}.dropout", net["dropout"]))
    learn = boolean(f"{a}.learn_pos_embedding", adapter["learn_pos_embedding"])
    kwargs = dict(
        num_classes=num_classes,
        seq_len=seq_len,
        n_layer=integer(f"{p}.n_layer", net["n_layer"], 1),
        n_head=integer(f"{p}.n_head", net["n_head"], 1),
        n_embd=n_embd,
        dropout=dropout,
        bias=boolean(f"{p}.bias", net["bias"]),
        skip=skip,
        is_causal=is_causal,
        adapter_bias=True,
        learn_positions=learn,
        output_projection=output_projection,
    )
    extra = {}
    if not learn:  # a persistent buffer in the official adapter, a computed one here
        extra["input_adapter.pos_embedding"] = ((seq_len, n_embd), lambda: sinusoidal_positions(seq_len, n_embd))
    return dict(cls="GPT", arch=ARCH_OF_CLASS["GPT"], kwargs=kwargs, extra=extra)


def _image_features(adapter: dict) -> dict[str, Any]:
    """Project ``ImageInputFeatures`` kwargs (full) and sizes of a FourierImageInputAdapter."""
    a = "model.input_adapter.parameters"
    channels = integer(f"{a}.input_channels", adapter["input_channels"], 1)
    shape = _ints(f"{a}.input_shape", adapter["input_shape"])
    if len(shape) != 2:
        raise OfficialConfigError(f"{a}.input_shape: expected [height, width], got {shape}")
    bands = integer(f"{a}.n_freq_bands", adapter["n_freq_bands"], 0)
    mask_res = number(f"{a}.mask_res", adapter["mask_res"])
    number(f"{a}.value_res", adapter["value_res"])  # stored, unused by the official code
    add_mask = boolean(f"{a}.add_mask", adapter["add_mask"])
    add_pos = boolean(f"{a}.add_pos_feats", adapter["add_pos_feats"])
    learn = boolean(f"{a}.learn_pos_feats", adapter["learn_pos_feats"])
    pos_dim = integer(f"{a}.pos_embed_size", adapter["pos_embed_size"], 1)
    init_scale = float(number(f"{a}.init_scale", adapter["init_scale"]))
    output_height = integer(f"{a}.output_height", adapter["output_height"], 1)
    pos_height = pos_dim if learn else 4 * bands + 2
    total = channels
    if add_mask:
        total += 1 + (2 * bands if mask_res > 0 else 0)
    if add_pos:
        total += pos_height
    features = dict(
        time=add_mask,
        time_frequency=float(mask_res) if add_mask and mask_res > 0 else 0.0,
        num_bands=bands,
        positions=("learned" if learn else "fourier") if add_pos else "none",
        position_dim=pos_dim,
        position_init_scale=init_scale,
        out_features=output_height if output_height != total else None,
    )
    return dict(
        channels=channels,
        shape=shape,
        features=features,
        num_features=output_height,
        learn=learn,
        add_pos=add_pos,
        bands=bands,
        pos_dim=pos_dim,
    )


_FEATURE_DEFAULTS = dict(
    time=True,
    time_frequency=0.0,
    num_bands=64,
    positions="none",
    position_dim=32,
    position_init_scale=0.02,
    out_features=None,
)


def _feature_kwargs(features: dict, *, default_time: bool) -> dict | None:
    """The non-default ImageInputFeatures kwargs; None where the features are the network's own
    default (values and 2t - 1 for UNet, the values alone for UNetVDM)."""
    relevant = dict(features)
    if relevant["positions"] != "learned":
        relevant.pop("position_dim"), relevant.pop("position_init_scale")
    if relevant["positions"] != "fourier" and relevant["time_frequency"] <= 0:
        relevant.pop("num_bands")
    changed = {k: v for k, v in relevant.items() if v != _FEATURE_DEFAULTS[k]}
    if not changed:
        return None if default_time else {}
    if changed == {"time": False} and not default_time:
        return None
    return changed


def _image_spec(model: Mapping, net_name: str) -> dict[str, Any]:
    _, net = component(model, "net", NET_CLASSES)
    _, adapter = component(model, "input_adapter", ("FourierImageInputAdapter",))
    _, out = component(model, "output_adapter", ("OutputAdapter",))
    p, o = "model.net.parameters", "model.output_adapter.parameters"
    feats = _image_features(adapter)
    channels, num_features = feats["channels"], feats["num_features"]
    in_key = "in_channels" if net_name == "UNetModel" else "input_channels"
    if integer(f"{p}.{in_key}", net[in_key], 1) != num_features:
        raise OfficialConfigError(
            f"{p}.{in_key}={net[in_key]} must equal the input adapter's output height"
            f" ({num_features}): the official net reshapes the adapter's output to it"
        )
    image_size = integer(f"{p}.image_size", net["image_size"], 1)
    if tuple(feats["shape"]) != (image_size, image_size):
        raise OfficialConfigError(
            f"model.input_adapter.parameters.input_shape={list(feats['shape'])} must be"
            f" [{image_size}, {image_size}] (square images of {p}.image_size)"
        )
    if integer(f"{o}.output_channels", out["output_channels"], 1) != channels:
        raise OfficialConfigError(
            f"{o}.output_channels={out['output_channels']} must equal the data channels"
            f" ({channels}, model.input_adapter.parameters.input_channels)"
        )
    out_height = integer(f"{o}.output_height", out["output_height"], 1)
    common = dict(in_channels=channels, image_size=image_size, out_height=out_height)
    if net_name == "UNetModel":
        kwargs, width = _unet_kwargs(net, feats)
    else:
        kwargs, width = _vdm_kwargs(net, feats)
    if integer(f"{o}.input_height", out["input_height"], 1) != width:
        raise OfficialConfigError(
            f"{o}.input_height={out['input_height']} must be {width}, the width of what the"
            f" official {net_name} hands its output adapter"
        )
    extra = {}
    key = "input_adapter.pos_feats"
    hw = image_size * image_size
    if not feats["learn"]:  # a persistent buffer there, computed here (or unused)
        bands = feats["bands"]
        value = (lambda: fourier_position_features(image_size, image_size, bands)) if feats["add_pos"] else None
        extra[key] = ((hw, 4 * bands + 2), value)
    elif not feats["add_pos"]:  # a learned but unused parameter there
        extra[key] = ((1, hw, feats["pos_dim"]), None)
    return dict(cls=net_name, arch=ARCH_OF_CLASS[net_name], kwargs={**common, **kwargs}, extra=extra)


def _unet_kwargs(net: dict, feats: dict) -> tuple[dict, int]:
    p = "model.net.parameters"
    if integer(f"{p}.dims", net["dims"]) != 2:
        raise OfficialConfigError(f"{p}.dims={net['dims']}: only 2-d images are supported")
    if net["num_classes"] is not None:
        raise OfficialConfigError(
            f"{p}.num_classes={net['num_classes']!r}: the official BFN UNetModel cannot run class-"
            "conditional (its forward never passes labels)"
        )
    mc = integer(f"{p}.model_channels", net["model_channels"], 1)
    mult = _ints(f"{p}.channel_mult", net["channel_mult"])
    if not mult or mult[0] != 1:
        raise OfficialConfigError(
            f"{p}.channel_mult={list(mult)}: the official UNetModel only runs with channel_mult[0]"
            " == 1 (its output conv takes model_channels inputs)"
        )
    if not boolean(f"{p}.conv_resample", net["conv_resample"]) and len(mult) > 1:
        raise OfficialConfigError(
            f"{p}.conv_resample=false: the official UNetModel cannot be built with it"
            " (its average-pooling Downsample is constructed without a kernel size)"
        )
    boolean(f"{p}.use_checkpoint", net["use_checkpoint"])  # memory only
    heads_up = integer(f"{p}.num_heads_upsample", net["num_heads_upsample"])
    attention = net["attention_resolutions"]
    attention = _ints(f"{p}.attention_resolutions", list(attention) if attention else [])
    project_input = boolean(f"{p}.project_input", net["project_input"])
    skip = boolean(f"{p}.skip", net["skip"])
    out_channels = integer(f"{p}.out_channels", net["out_channels"], 1)
    kwargs = dict(
        model_channels=mc,
        out_channels=out_channels,
        channel_mult=list(mult),
        num_res_blocks=integer(f"{p}.num_res_blocks", net["num_res_blocks"], 1),
        attention_resolutions=list(attention),
        dropout=float(number(f"{p}.dropout", net["dropout"])),
        num_heads=integer(f"{p}.num_heads", net["num_heads"], 1),
        num_heads_upsample=None if heads_up == -1 else heads_up,
        norm_groups=32,
        skip=skip,
        input_features=_feature_kwargs(feats["features"], default_time=True),
        project_input=project_input,
        scale_shift_norm=boolean(f"{p}.use_scale_shift_norm", net["use_scale_shift_norm"]),
    )
    width = out_channels + ((mc if project_input else feats["num_features"]) if skip else 0)
    return kwargs, width


def _vdm_kwargs(net: dict, feats: dict) -> tuple[dict, int]:
    p = "model.net.parameters"
    dim = integer(f"{p}.embedding_dim", net["embedding_dim"], 1)
    fourier = boolean(f"{p}.use_fourier_features", net["use_fourier_features"])
    kwargs = dict(
        embedding_dim=dim,
        n_blocks=integer(f"{p}.n_blocks", net["n_blocks"], 0),
        n_attention_heads=integer(f"{p}.n_attention_heads", net["n_attention_heads"], 1),
        attention_everywhere=boolean(f"{p}.attention_everywhere", net["attention_everywhere"]),
        dropout=float(number(f"{p}.dropout_prob", net["dropout_prob"])),
        norm_groups=integer(f"{p}.norm_groups", net["norm_groups"], 1),
        fourier_exponents=[5.0, 6.0] if fourier else [],
        input_features=_feature_kwargs(feats["features"], default_time=False),
        time_frequencies="logspace",
    )
    return kwargs, feats["num_features"] + dim


def build_network(config: Mapping, device: torch.device | str | None = None) -> nn.Module:
    """The project network equivalent to the official config, freshly initialised."""
    arch, kwargs = network_spec(config)
    try:
        if device is None:
            return build_arch(arch, **kwargs)
        with torch.device(device):
            return build_arch(arch, **kwargs)
    except ValueError as error:  # a value the project network refuses
        raise OfficialConfigError(f"model.net: {error}") from None


# ----------------------------------------------------------------------------------- state dicts


def strip_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The network's keys of an official state dict: a whole-BFN dict (``net.`` keys, as the
    released checkpoints) loses the prefix; a network's own dict (no ``net.`` key) is kept."""
    if not isinstance(state_dict, Mapping):
        raise OfficialCheckpointError(f"expected a state dict (a mapping), got {type(state_dict).__name__}")
    for key in state_dict:
        if not isinstance(key, str):
            raise OfficialCheckpointError(f"state dict key {key!r} is not a string")
    if not any(key.startswith("net.") for key in state_dict):
        return dict(state_dict)
    out = {}
    for key, value in state_dict.items():
        if not key.startswith("net."):
            raise OfficialCheckpointError(
                f"unknown key {key!r}: a whole-BFN state dict holds only the network's 'net.' keys"
            )
        out[key[len("net.") :]] = value
    return out


def _official_key(cls: str, key: str) -> tuple[str, int]:
    """Official name of a project state-dict key, and how many trailing 1-dims its shape has
    there (attention projections are 1x1 convolutions in the official nets)."""
    if cls == "GPT":
        for old, new in (
            ("input_adapter.token_proj.", "input_adapter.inp_embedding."),
            ("input_adapter.time_proj.", "input_adapter.t_embedding."),
            ("input_adapter.position_embedding.", "input_adapter.pos_embedding."),
            ("blocks.", "transformer.h."),
            ("ln_f.", "transformer.ln_f."),
            ("output_proj.", "output_adapter.output_projection."),
        ):
            if key.startswith(old):
                return new + key[len(old) :], 0
        return key, 0
    if key.startswith("head."):
        return "output_adapter.output_projection." + key[len("head.") :], 0
    if key.startswith("input_features.projection."):
        return "input_adapter.output_projection." + key[len("input_features.projection.") :], 0
    if key == "input_features.positions":
        return "input_adapter.pos_feats", 0
    attention = re.search(r"\.(qkv|proj_out)\.weight$", key) is not None
    if cls == "UNetModel":
        key = re.sub(r"\.emb_proj\.", ".emb_layers.1.", key)
        key = re.sub(r"\.skip\.", ".skip_connection.", key)
        if key.startswith("down."):
            key = re.sub(r"^down\.(\d+)\.0\.conv\.", r"down.\1.0.op.", key)  # Downsample
        for old, new in (
            ("input_proj.", "input_projection."),
            ("time_mlp.", "time_embed."),
            ("down.", "input_blocks."),
            ("middle.", "middle_block."),
            ("up.", "output_blocks."),
        ):
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        return key, (1 if attention else 0)
    # UNetVDM
    key = re.sub(r"\.skip\.", ".skip_conv.", key)
    attn = {"norm": "0", "qkv": "1", "proj_out": "3"}
    match = re.match(r"^(down|up)_attn\.(\d+)\.(norm|qkv|proj_out)\.(.+)$", key)
    if match:
        where, index, part, rest = match.groups()
        return f"{where}_blocks.{index}.attention_block.layers.{attn[part]}.{rest}", (2 if attention else 0)
    match = re.match(r"^mid_attn\.(norm|qkv|proj_out)\.(.+)$", key)
    if match:
        return f"mid_attn_block.layers.{attn[match.group(1)]}.{match.group(2)}", (2 if attention else 0)
    match = re.match(r"^(down|up)\.(\d+)\.(.+)$", key)
    if match:
        return f"{match.group(1)}_blocks.{match.group(2)}.resnet_block.{match.group(3)}", 0
    for old, new in (
        ("time_mlp.", "embed_conditioning."),
        ("mid1.", "mid_resnet_block_1."),
        ("mid2.", "mid_resnet_block_2."),
    ):
        if key.startswith(old):
            return new + key[len(old) :], 0
    return key, 0


def expected_official_keys(config: Mapping, net: nn.Module | None = None) -> dict[str, tuple]:
    """Official key -> shape of the network the config describes (what its checkpoint holds)."""
    spec = _spec(model_section(config))
    net = net if net is not None else build_network(config, device="meta")
    shapes = {}
    for key, value in net.state_dict().items():
        name, ones = _official_key(spec["cls"], key)
        shapes[name] = tuple(value.shape) + (1,) * ones
    for name, (shape, _) in spec["extra"].items():
        shapes[name] = tuple(shape)
    return shapes


def convert_state_dict(
    config: Mapping, state_dict: Mapping[str, Any], net: nn.Module | None = None
) -> dict[str, Tensor]:
    """Official network weights -> the project network's state dict.

    ``state_dict`` holds the official network's keys, with or without the ``net.`` prefix of a
    whole-BFN checkpoint; values are tensors (meta tensors are fine: only shapes are checked
    then). ``net``: the project network (built on the meta device from the config if omitted).
    Raises OfficialCheckpointError naming the first unknown key, missing key, shape mismatch,
    non-tensor value or fixed buffer that differs from the code the config implies.
    """
    spec = _spec(model_section(config))
    net = net if net is not None else build_network(config, device="meta")
    given = strip_prefix(state_dict)
    target = net.state_dict()
    official_of = {key: _official_key(spec["cls"], key) for key in target}
    project_of = {name: key for key, (name, _) in official_of.items()}
    if len(project_of) != len(official_of):  # a naming bug, not a checkpoint problem
        raise AssertionError("two project keys map to the same official key")
    for name, value in given.items():
        if name not in project_of and name not in spec["extra"]:
            raise OfficialCheckpointError(
                f"unknown key {name!r}: the official {spec['cls']} of this config has no such parameter or buffer"
            )
        if not isinstance(value, Tensor):
            raise OfficialCheckpointError(f"key {name!r}: expected a tensor, got {type(value).__name__}")
    expected = expected_official_keys(config, net)
    for name in expected:
        if name not in given:
            raise OfficialCheckpointError(
                f"missing key {name!r}: the official {spec['cls']} of this config has it, the checkpoint does not"
            )
    for name, value in given.items():
        if tuple(value.shape) != expected[name]:
            raise OfficialCheckpointError(
                f"shape mismatch for key {name!r}: checkpoint has {tuple(value.shape)}, the"
                f" official {spec['cls']} of this config has {expected[name]}"
            )
    for name, (_, code) in spec["extra"].items():
        value = given[name]
        if code is None or value.is_meta:
            continue
        reference = code().to(torch.float32)
        difference = (value.detach().to("cpu", torch.float32) - reference).abs().max().item()
        if not difference <= 1e-4:
            raise OfficialCheckpointError(
                f"key {name!r}: the fixed position code differs from the one the config implies"
                f" (max abs difference {difference:.3g}); this network computes it, so it cannot"
                " take other values"
            )
    out = {}
    for key, reference in target.items():
        value = given[official_of[key][0]]
        out[key] = value.detach().reshape(reference.shape).to(reference.dtype)
    return out


def load_network(config: Mapping, state_dict: Mapping[str, Any], device="cpu") -> nn.Module:
    """The project network of the official config, loaded with the official weights, in eval mode."""
    net = build_network(config, device=device)
    net.load_state_dict(convert_state_dict(config, state_dict, net))
    return net.eval()
